"""Tests of xxpo.rollout: the sampling loop, the recomputed log-probs, and bounded staleness."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from xxpo.models import MODEL_PRESETS, build_model, routing_decisions
from xxpo.rollout import LaggedPolicy, Rollout, decode_responses, response_logprobs, sample
from xxpo.tasks.tokenizer import encode_prompts

PROMPTS = ["12+34=", "5+6=", "123*45="]  # different lengths: the batch is left padded


@pytest.fixture(scope="module")
def prompts(tok):
    return encode_prompts(tok, PROMPTS)


class LogitBias(torch.nn.Module):
    """Wraps a causal LM and adds ``bias`` to one token's logit everywhere (to make EOS likely)."""

    def __init__(self, inner, token_id: int, bias: float):
        super().__init__()
        self.inner, self.config, self.token_id, self.bias = inner, inner.config, token_id, bias

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits.clone()
        out.logits[..., self.token_id] += self.bias
        return out


def run(model, tok, prompts, **kwargs):
    defaults = dict(num_samples=4, max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return sample(model, *prompts, **{**defaults, **kwargs})


def unpadded_logprobs(model, rollout: Rollout, temperature: float) -> list[torch.Tensor]:
    """Reference log-probs computed row by row with no padding at all (default positions 0..S-1)."""
    rows = []
    for i in range(len(rollout)):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
        n = int(rollout.response_mask[i].sum())
        response = rollout.response_ids[i, :n]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0].double()  # (S, V)
        logits = logits[len(prompt) - 1 : len(prompt) - 1 + n] / temperature  # (n, V)
        rows.append(logits.log_softmax(-1).gather(-1, response[:, None]).squeeze(-1))
    return rows


# ---------------------------------------------------------------------------------- layout and masks


def test_layout_is_group_by_group(dense, tok, prompts):
    r = run(dense, tok, prompts, num_samples=4, generator=torch.Generator().manual_seed(0))
    n = len(PROMPTS)
    assert r.response_ids.shape[0] == n * 4 and r.prompt_ids.shape == (n * 4, prompts[0].shape[1])
    assert r.prompt_index.tolist() == [i for i in range(n) for _ in range(4)]
    for row in range(n * 4):
        assert torch.equal(r.prompt_ids[row], prompts[0][row // 4])
        assert torch.equal(r.prompt_mask[row], prompts[1][row // 4])
    assert r.input_ids.shape == (n * 4, r.prompt_ids.shape[1] + r.response_ids.shape[1])
    assert torch.equal(r.attention_mask[:, r.prompt_ids.shape[1] :].float(), r.response_mask)


def test_eos_stops_each_row_and_masks_after_it(dense, tok, prompts):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model = LogitBias(dense, eos, 2.5)  # EOS likely but not certain: lengths vary
    r = run(model, tok, prompts, num_samples=16, max_new_tokens=10, generator=torch.Generator().manual_seed(1))
    lengths = []
    for ids, mask, logp, version in zip(r.response_ids, r.response_mask, r.behav_logp, r.version):
        hits = (ids == eos).nonzero().flatten().tolist()
        n = hits[0] + 1 if hits else ids.shape[0]  # real tokens: up to and including the first EOS
        lengths.append(n)
        assert mask.tolist() == [1.0] * n + [0.0] * (ids.shape[0] - n)
        assert (ids[n:] == pad).all()
        assert (logp[:n] < 0).all() and (logp[n:] == 0).all()
        assert (version[:n] == 0).all() and (version[n:] == -1).all()
    assert r.lengths.tolist() == lengths
    assert min(lengths) < r.response_ids.shape[1] and len(set(lengths)) > 2  # the test saw real variety


def test_loop_stops_when_every_row_has_finished(dense, tok, prompts):
    r = run(LogitBias(dense, tok.eos_token_id, 50.0), tok, prompts, max_new_tokens=12, greedy=True)
    assert r.response_ids.shape[1] == 1 and (r.response_ids == tok.eos_token_id).all()
    assert r.lengths.tolist() == [1] * len(r)


def test_no_eos_runs_to_max_new_tokens(dense, tok, prompts):
    never_eos = LogitBias(dense, tok.eos_token_id, -1e4)
    r = run(never_eos, tok, prompts, max_new_tokens=7, generator=torch.Generator().manual_seed(0))
    assert r.response_ids.shape[1] == 7 and (r.response_mask == 1).all()


def test_policy_version_is_recorded_on_real_tokens(dense, tok, prompts):
    r = run(dense, tok, prompts, policy_version=7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r.version, torch.where(r.response_mask > 0, 7, -1))


def test_sample_restores_training_mode(dense, tok, prompts):
    dense.train()
    run(dense, tok, prompts, generator=torch.Generator().manual_seed(0))
    assert dense.training
    dense.eval()
    run(dense, tok, prompts, generator=torch.Generator().manual_seed(0))
    assert not dense.training


# ------------------------------------------------------------------------------- sampling behaviour


def test_left_padding_does_not_change_the_answer(dense, tok):
    """A prompt answered alone and inside a batch padded for a longer prompt gives the same tokens."""
    alone = encode_prompts(tok, ["5+6="])
    batched = encode_prompts(tok, ["5+6=", "123*45+678="])
    assert batched[1][0, 0] == 0  # the short prompt really is padded
    a = run(dense, tok, alone, num_samples=1, greedy=True)
    b = run(dense, tok, batched, num_samples=1, greedy=True)
    n = int(a.lengths[0])
    assert torch.equal(a.response_ids[0, :n], b.response_ids[0, :n])
    torch.testing.assert_close(a.behav_logp[0, :n], b.behav_logp[0, :n], atol=1e-5, rtol=0)


def test_same_generator_seed_same_samples(dense, tok, prompts):
    a = run(dense, tok, prompts, generator=torch.Generator().manual_seed(3), temperature=1.3)
    b = run(dense, tok, prompts, generator=torch.Generator().manual_seed(3), temperature=1.3)
    c = run(dense, tok, prompts, generator=torch.Generator().manual_seed(4), temperature=1.3)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.behav_logp, b.behav_logp)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_tiny_top_p_is_greedy(dense, tok, prompts):
    greedy = run(dense, tok, prompts, num_samples=1, greedy=True)
    nucleus = run(dense, tok, prompts, num_samples=1, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.response_ids, nucleus.response_ids)
    # greedy picks the argmax of the independently computed distribution
    first = dense(input_ids=encode_prompts(tok, ["5+6="])[0]).logits[0, -1]
    assert greedy.response_ids[1, 0] == first.argmax()


def test_first_token_frequencies_follow_tempered_softmax(dense, tok):
    ids, mask = encode_prompts(tok, ["12+34="])
    temperature = 0.5
    with torch.no_grad():
        probs = (dense(input_ids=ids).logits[0, -1].double() / temperature).softmax(-1)  # (V,)
    r = run(dense, tok, (ids, mask), num_samples=4000, max_new_tokens=1, temperature=temperature,
            generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(r.response_ids[:, 0], minlength=probs.shape[0]).double() / 4000
    assert (freq - probs).abs().max() < 4 * (0.25 / 4000) ** 0.5  # 4 sigma of the worst-case binomial
    torch.testing.assert_close(r.behav_logp[:, 0].double(), probs.log()[r.response_ids[:, 0]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_p_samples_only_inside_the_nucleus_and_records_its_renormalised_logprob(dense, tok, temperature):
    ids, mask = encode_prompts(tok, ["12+34="])
    top_p = 0.5
    with torch.no_grad():
        probs = (dense(input_ids=ids).logits[0, -1].double() / temperature).softmax(-1)  # (V,)
    ordered, order = probs.sort(descending=True)
    size = int((ordered.cumsum(0) < top_p).sum()) + 1  # smallest prefix reaching top_p
    nucleus = order[:size].tolist()
    mass = float(ordered[:size].sum())  # Z, the nucleus's probability
    assert size >= 2 and top_p <= mass < 1  # a real truncation with a choice inside it
    r = run(dense, tok, (ids, mask), num_samples=2000, max_new_tokens=1, top_p=top_p, temperature=temperature,
            generator=torch.Generator().manual_seed(0))
    first = r.response_ids[:, 0]
    assert set(first.tolist()) == set(nucleus)
    # behav_logp: the truncated, renormalised distribution actually sampled from, log(p / Z)
    torch.testing.assert_close(r.behav_logp[:, 0].double(), (probs / mass).log()[first], atol=1e-5, rtol=0)
    # policy_logp: the untruncated tempered policy, log p; their difference is log Z
    torch.testing.assert_close(r.policy_logp[:, 0].double(), probs.log()[first], atol=1e-5, rtol=0)
    torch.testing.assert_close(r.nucleus_log_mass[:, 0].double(), torch.full((2000,), mass).log().double(),
                               atol=1e-5, rtol=0)
    # the frequencies are those of the renormalised nucleus
    freq = torch.bincount(first, minlength=probs.shape[0]).double() / 2000
    renormalised = torch.zeros_like(probs)
    renormalised[order[:size]] = ordered[:size] / mass
    assert (freq - renormalised).abs().max() < 4 * (0.25 / 2000) ** 0.5


def test_without_truncation_both_logprobs_are_one_tensor(dense, tok, prompts):
    r = run(dense, tok, prompts, generator=torch.Generator().manual_seed(0))
    assert r.policy_logp is r.behav_logp and (r.nucleus_log_mass == 0).all()
    g = run(dense, tok, prompts, top_p=0.5, greedy=True)  # greedy: untruncated log-probs, no nucleus
    assert g.policy_logp is g.behav_logp


def test_on_policy_ratio_under_top_p_is_the_nucleus_mass(dense, tok, prompts):
    """Before any update, exp(trainer logp - behav_logp) = Z_t per token, in [top_p, 1]; 1 with top_p = 1."""
    top_p = 0.8
    r = run(dense, tok, prompts, top_p=top_p, generator=torch.Generator().manual_seed(2))
    real = r.response_mask.bool()
    with torch.no_grad():
        ratio = torch.exp(response_logprobs(dense, r) - r.behav_logp)  # (B, T)
    torch.testing.assert_close(ratio[real], r.nucleus_log_mass.exp()[real], atol=1e-5, rtol=0)
    assert (ratio[real] >= top_p - 1e-5).all() and (ratio[real] <= 1 + 1e-5).all()
    assert (ratio[real] < 1 - 1e-3).any()  # the truncation really moved some ratios
    full = run(dense, tok, prompts, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ratio = torch.exp(response_logprobs(dense, full) - full.behav_logp)
    torch.testing.assert_close(ratio[full.response_mask.bool()], torch.ones(int(full.response_mask.sum())),
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ log-probs


@pytest.mark.parametrize("arch", ["dense", "moe"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logprobs_equal_behaviour_logprobs(arch, temperature, request, tok, prompts):
    model = request.getfixturevalue(arch)
    r = run(LogitBias(model, tok.eos_token_id, 1.5), tok, prompts, temperature=temperature, top_p=0.95,
            generator=torch.Generator().manual_seed(5))
    assert r.lengths.min() < r.response_ids.shape[1]  # some rows stopped early
    logp = response_logprobs(LogitBias(model, tok.eos_token_id, 1.5), r, temperature=temperature)
    torch.testing.assert_close(logp, r.policy_logp, atol=1e-5, rtol=0)  # the untruncated policy (top_p < 1)
    torch.testing.assert_close(r.behav_logp, r.policy_logp - r.nucleus_log_mass, atol=0, rtol=0)
    # and both agree with a padding-free forward, row by row
    for i, ref in enumerate(unpadded_logprobs(LogitBias(model, tok.eos_token_id, 1.5), r, temperature)):
        torch.testing.assert_close(logp[i, : len(ref)].double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_samples", [1, 3])  # 1: the plain forward; 3: the shared-prompt forward
@pytest.mark.parametrize("max_new_tokens", [1, 2])
def test_recomputed_logprobs_of_one_and_two_token_responses(dense, tok, prompts, num_samples, max_new_tokens):
    """The training forward stops before the last response token; with T = 1 it is the prompt pass alone."""
    r = run(dense, tok, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
            generator=torch.Generator().manual_seed(1))
    assert r.response_ids.shape[1] == max_new_tokens
    logp = response_logprobs(dense, r)
    torch.testing.assert_close(logp.detach(), r.behav_logp, atol=1e-5, rtol=0)
    for i, ref in enumerate(unpadded_logprobs(dense, r, 1.0)):
        torch.testing.assert_close(logp[i, : len(ref)].detach().double(), ref, atol=1e-5, rtol=0)


def test_response_logprobs_is_differentiable_and_returns_entropy(dense, tok, prompts):
    r = run(dense, tok, prompts, generator=torch.Generator().manual_seed(0))
    logp, entropy = response_logprobs(dense, r, with_entropy=True)
    (logp.sum()).backward()
    assert dense.model.embed_tokens.weight.grad is not None
    dense.zero_grad(set_to_none=True)
    row = 0
    n = int(r.lengths[row])
    prompt = r.prompt_ids[row][r.prompt_mask[row].bool()]
    with torch.no_grad():
        logits = dense(input_ids=torch.cat([prompt, r.response_ids[row, :n]])[None]).logits[0, len(prompt) - 1 :][:n]
    p = logits.double().softmax(-1)
    torch.testing.assert_close(entropy[row, :n].double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
    assert (entropy[r.response_mask == 0] == 0).all()


def test_rows_sharing_a_prompt_share_its_forward_with_the_same_gradients(dense, tok, prompts):
    """The G rows of a prompt run the prompt once; values and gradients equal row-by-row unpadded forwards."""
    r = run(dense, tok, prompts, generator=torch.Generator().manual_seed(3))  # 3 prompts x 4 samples
    batch_sizes = []
    hook = dense.model.embed_tokens.register_forward_hook(lambda m, i, o: batch_sizes.append(o.shape[0]))
    try:
        weights = torch.randn(r.response_ids.shape, generator=torch.Generator().manual_seed(0))  # (B, T)
        (response_logprobs(dense, r) * weights).sum().backward()
    finally:
        hook.remove()
    assert batch_sizes == [3, 12]  # the prompt pass over the 3 distinct prompts, then the 12 responses
    shared = {n: p.grad.clone() for n, p in dense.named_parameters()}
    dense.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(len(r)):
        prompt = r.prompt_ids[i][r.prompt_mask[i].bool()]
        n = int(r.lengths[i])
        logits = dense(input_ids=torch.cat([prompt, r.response_ids[i, :n]])[None]).logits[0, len(prompt) - 1 :][:n]
        total = total + (logits.log_softmax(-1).gather(-1, r.response_ids[i, :n, None]).squeeze(-1) * weights[i, :n]).sum()
    total.backward()
    for name, param in dense.named_parameters():
        torch.testing.assert_close(shared[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    dense.zero_grad(set_to_none=True)


def test_decode_responses_drops_padding_and_special_tokens(dense, tok, prompts):
    r = run(LogitBias(dense, tok.eos_token_id, 2.0), tok, prompts, generator=torch.Generator().manual_seed(0))
    texts = decode_responses(tok, r)
    for text, ids, n in zip(texts, r.response_ids, r.lengths.tolist()):
        expected = "".join(tok.convert_ids_to_tokens(t) for t in ids[:n].tolist() if t not in tok.all_special_ids)
        assert text == expected


# ------------------------------------------------------------------------------------- Rollout API


def test_select_and_cat(dense, tok):
    a = run(dense, tok, encode_prompts(tok, ["5+6="]), num_samples=2, max_new_tokens=3,
            generator=torch.Generator().manual_seed(0))
    b = run(dense, tok, encode_prompts(tok, ["123*45="]), num_samples=2, max_new_tokens=6, policy_version=1,
            generator=torch.Generator().manual_seed(0))
    both = Rollout.cat([a, b])
    assert both.prompt_ids.shape == (4, b.prompt_ids.shape[1])
    assert both.response_ids.shape == (4, max(a.response_ids.shape[1], b.response_ids.shape[1]))
    first = both.select([0, 1])
    pa = a.prompt_ids.shape[1]
    assert torch.equal(first.prompt_ids[:, -pa:], a.prompt_ids) and (first.prompt_mask[:, :-pa] == 0).all()
    ta = a.response_ids.shape[1]
    assert torch.equal(first.response_ids[:, :ta], a.response_ids) and (first.response_mask[:, ta:] == 0).all()
    assert (first.version[:, ta:] == -1).all() and torch.equal(both.select(slice(2, 4)).version, b.version)
    # re-padding keeps the recomputed log-probs unchanged
    torch.testing.assert_close(response_logprobs(dense, both).detach(), both.behav_logp, atol=1e-5, rtol=0)
    # policy_logp follows behav_logp through cat and select, under truncation too
    c = run(dense, tok, encode_prompts(tok, ["12+34="]), num_samples=2, max_new_tokens=4, top_p=0.6,
            generator=torch.Generator().manual_seed(0))
    mixed = Rollout.cat([a, c])
    assert torch.equal(mixed.select([2, 3]).policy_logp[:, : c.response_ids.shape[1]], c.policy_logp)
    assert torch.equal(mixed.select([0, 1]).nucleus_log_mass, torch.zeros_like(mixed.select([0, 1]).behav_logp))
    torch.testing.assert_close(response_logprobs(dense, mixed).detach(), mixed.policy_logp, atol=1e-5, rtol=0)
    assert both.to("cpu").response_ids is not None and len(both) == 4


def test_bad_inputs_raise_naming_the_argument(dense, tok, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="prompt_mask"):
        sample(dense, ids, mask.flip(1), num_samples=1, max_new_tokens=2, eos_token_id=2, pad_token_id=0)
    with pytest.raises(ValueError, match="num_samples"):
        run(dense, tok, prompts, num_samples=0)
    with pytest.raises(ValueError, match="temperature"):
        run(dense, tok, prompts, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        run(dense, tok, prompts, top_p=1.5)
    with pytest.raises(TypeError, match="prompt_ids"):
        run(dense, tok, (ids.float(), mask))


# ------------------------------------------------------------------------------------ LaggedPolicy


def perturbed(model, version: int):
    """Set the model's weights to a version-specific value (what an optimizer step would do)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(version)) * 0.1)


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_lagged_policy_eta_zero_samples_current_weights(tok, prompts):
    live = build_model(MODEL_PRESETS["tiny"], tok, seed=1)
    lagged = LaggedPolicy(live, eta=0)
    for step in range(1, 4):
        perturbed(live, step)
        lagged.publish(live, step)
        model, version = lagged.sample_model(step)
        assert version == step and model is live  # no copy: the live weights sample
    kwargs = dict(num_samples=2, max_new_tokens=5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    r_lag = lagged.sample(3, *prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    r_live = sample(live, *prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(r_lag.response_ids, r_live.response_ids)
    assert torch.equal(r_lag.version, torch.where(r_lag.response_mask > 0, 3, -1))


def test_lagged_policy_eta_two_samples_two_versions_old(tok, prompts):
    live = build_model(MODEL_PRESETS["tiny"], tok, seed=1)
    history = {0: build_model(MODEL_PRESETS["tiny"], tok, seed=1)}
    lagged = LaggedPolicy(live, eta=2)
    assert lagged.sample_model(0)[1] == 0
    for step in range(1, 6):
        perturbed(live, step)
        lagged.publish(live, step)
        history[step] = build_model(MODEL_PRESETS["tiny"], tok, seed=1)
        perturbed(history[step], step)
        model, version = lagged.sample_model(step)
        assert version == max(0, step - 2)
        assert same_weights(model, history[version])
        if version < step:
            assert not same_weights(model, live)
    kwargs = dict(num_samples=2, max_new_tokens=5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    r = lagged.sample(5, *prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(r.version, torch.where(r.response_mask > 0, 3, -1))
    old = sample(history[3], *prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(r.response_ids, old.response_ids)
    assert sorted(lagged.snapshots) == [3, 4, 5]  # only eta + 1 versions are kept
    with pytest.raises(ValueError, match="version"):
        lagged.publish(live, 5)
    with pytest.raises(ValueError, match="step"):
        lagged.sample_model(6)


def test_lagged_policy_uniform_lag_stays_within_eta(tok):
    live = build_model(MODEL_PRESETS["tiny"], tok, seed=1)
    lagged = LaggedPolicy(live, eta=3, mode="uniform", generator=torch.Generator().manual_seed(0))
    for step in range(1, 4):
        lagged.publish(live, step)
    versions = [lagged.sample_model(3)[1] for _ in range(40)]
    assert set(versions) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="mode"):
        LaggedPolicy(live, eta=1, mode="newest")
    with pytest.raises(ValueError, match="eta"):
        LaggedPolicy(live, eta=-1)


# ---------------------------------------------------------------------------- Routing Replay's cache


def kick_routers(model, seed: int) -> None:
    """Change only the MoE routers' weights, strongly enough that the routing changes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight += torch.randn(layer.mlp.gate.weight.shape, generator=generator)


def test_lagged_policy_routing_comes_from_the_sampling_weights(tok, prompts):
    """With eta = 2 the rollout of step 2 is sampled by version 0: its routing is version 0's, not the learner's."""
    live = build_model(MODEL_PRESETS["tiny-moe"], tok, seed=0)
    version0 = build_model(MODEL_PRESETS["tiny-moe"], tok, seed=0)
    lagged = LaggedPolicy(live, eta=2)
    for step in (1, 2):
        kick_routers(live, step)
        lagged.publish(live, step)
    kwargs = dict(num_samples=3, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    r = lagged.sample(2, *prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert set(r.version[r.response_mask > 0].tolist()) == {0}
    decisions = lagged.routing(r)
    ids, mask = r.input_ids, r.attention_mask
    assert decisions.shape == (2, len(r), ids.shape[1], 2)
    assert torch.equal(decisions, routing_decisions(version0, ids, mask))
    learner = routing_decisions(live, ids, mask)
    assert (decisions != learner).any(-1)[:, mask.bool()].float().mean() > 0.2
    # the cache replays the behaviour policy: on its own weights the replayed forward gives behav_logp
    torch.testing.assert_close(response_logprobs(version0, r, routing=decisions).detach(), r.behav_logp,
                               atol=1e-5, rtol=0)
    # and the learner's replayed forward routes the minibatch's tokens as version 0 did
    idx = torch.tensor([0, 4, 8])
    seen = []
    handles = [layer.mlp.experts.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
               for layer in live.model.layers]
    try:
        logp = response_logprobs(live, r.select(idx), routing=decisions[:, idx])
    finally:
        for h in handles:
            h.remove()
    used = decisions[:, idx, :-1]  # the last token predicts nothing, so the forward stops before it
    assert torch.equal(torch.stack(seen).reshape(used.shape), used)
    assert logp.shape == (3, r.response_ids.shape[1]) and logp.requires_grad


def test_lagged_policy_routing_with_mixed_versions_and_its_errors(tok, prompts):
    live = build_model(MODEL_PRESETS["tiny-moe"], tok, seed=0)
    version0 = build_model(MODEL_PRESETS["tiny-moe"], tok, seed=0)
    lagged = LaggedPolicy(live, eta=1)
    kick_routers(live, 1)
    lagged.publish(live, 1)
    kwargs = dict(num_samples=2, max_new_tokens=5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  generator=torch.Generator().manual_seed(0))
    old = lagged.sample(1, *prompts, **kwargs)  # version 0 (lag 1)
    new = sample(live, *encode_prompts(tok, ["7+8="]), policy_version=1, **kwargs)
    both = Rollout.cat([old, new])
    decisions = lagged.routing(both)
    ids, mask = both.input_ids, both.attention_mask
    n = len(old)
    assert torch.equal(decisions[:, :n], routing_decisions(version0, ids[:n], mask[:n]))
    assert torch.equal(decisions[:, n:], routing_decisions(live, ids[n:], mask[n:]))
    kick_routers(live, 2)
    lagged.publish(live, 2)
    kick_routers(live, 3)
    lagged.publish(live, 3)
    with pytest.raises(ValueError, match="version 0"):
        lagged.routing(old)  # version 0 is no longer kept
    synchronous = LaggedPolicy(live, eta=0)
    r = synchronous.sample(0, *prompts, **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    assert torch.equal(synchronous.routing(r), routing_decisions(live, r.input_ids, r.attention_mask))
    synchronous.publish(live, 1)
    with pytest.raises(ValueError, match="right after sampling"):
        synchronous.routing(r)  # the live weights are no longer version 0
    with pytest.raises(ValueError, match="MoE"):
        LaggedPolicy(build_model(MODEL_PRESETS["tiny"], tok, seed=0), eta=0).routing(r)
    with pytest.raises(TypeError, match="rollout"):
        lagged.routing(r.input_ids)


# --------------------------------------------------------------------- the sampler's fast paths


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_decoding_masks_match_what_transformers_builds(tok, prompts, kernel):
    """The one-per-rollout 4D masks give the same tokens and log-probs as the 2D mask transformers expands."""
    model = build_model(MODEL_PRESETS["tiny"], tok, seed=3)
    model.config._attn_implementation = kernel
    kwargs = dict(num_samples=4, max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  temperature=1.3)

    class TwoDimensionalMask(torch.nn.Module):
        """The model with the mask transformers builds itself at every step (2D in, any kernel)."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, copy.copy(inner.config)
            self.config._attn_implementation = "unhandled"  # _decoding_masks returns None for it

        def forward(self, **kw):
            return self.inner(**kw)

    with torch.no_grad():
        a = sample(model, *prompts, generator=torch.Generator().manual_seed(0), **kwargs)
        b = sample(TwoDimensionalMask(model), *prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.behav_logp, b.behav_logp)
    assert (a.response_mask.sum(-1) > 1).any()  # several decoding steps ran
    torch.testing.assert_close(response_logprobs(model, a, temperature=1.3).detach(), a.behav_logp, atol=1e-5, rtol=0)


def test_sampled_tensors_are_ordinary_tensors_usable_in_training(dense, tok, prompts):
    """Decoding runs under inference_mode; nothing it returns may be an inference tensor."""
    r = run(dense, tok, prompts, top_p=0.9, generator=torch.Generator().manual_seed(0))
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "behav_logp", "policy_logp",
                 "version", "prompt_index"):
        assert not getattr(r, name).is_inference(), name
    response_logprobs(dense, r).sum().backward()  # embedding the response ids saves them for backward
    assert dense.model.embed_tokens.weight.grad is not None
    dense.zero_grad(set_to_none=True)
