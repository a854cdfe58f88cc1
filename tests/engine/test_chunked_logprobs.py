"""The training / reference / proximal forwards on the chunked path (log-probs from hidden states).

The automatic rule (:func:`xxpo.rollout.uses_chunked_logprobs`) keeps the tiny models on the full-logits
path their records were made with; forced chunking gives the same numbers up to float rounding, with
shared prompts, with Routing Replay on an MoE model, and in a training step.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from xxpo.functional import logprobs as logprobs_module
from xxpo.models import routing_decisions
from xxpo.rollout import (
    CHUNKED_LOGITS_THRESHOLD,
    lm_head_of,
    response_hidden,
    response_logits,
    response_logprobs,
    sample,
    uses_chunked_logprobs,
)
from xxpo.tasks.tokenizer import encode_prompts
from xxpo.train import TrainConfig
from xxpo.train.loop import Trainer

PROMPTS = ["12+34=", "5+6=", "123*45="]


def rollout_of(model, tok, seed=0, num_samples=4):
    prompt_ids, prompt_mask = encode_prompts(tok, PROMPTS)
    return sample(model, prompt_ids, prompt_mask, num_samples=num_samples, max_new_tokens=8,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=1.3,
                  generator=torch.Generator().manual_seed(seed))


class CountCalls:
    """Counts calls of the chunked autograd function (patched in for a ``with`` block)."""

    def __enter__(self):
        self.calls, self.original = 0, logprobs_module._HiddenLogprobs.apply

        def apply(*args):
            self.calls += 1
            return self.original(*args)

        logprobs_module._HiddenLogprobs.apply = apply
        return self

    def __exit__(self, *exc):
        logprobs_module._HiddenLogprobs.apply = self.original


def test_the_rule():
    assert not uses_chunked_logprobs(16 * 8 * 64, 40)  # a tiny model's largest batches
    assert uses_chunked_logprobs(1024, 151_936)  # 1,024 response tokens of a Qwen vocabulary
    assert uses_chunked_logprobs(CHUNKED_LOGITS_THRESHOLD + 1, 1) and not uses_chunked_logprobs(CHUNKED_LOGITS_THRESHOLD, 1)
    assert not uses_chunked_logprobs(10**9, 10**6, 0) and uses_chunked_logprobs(1, 1, 4)


def test_hidden_states_through_the_head_are_the_logits(dense, tok):
    r = rollout_of(dense, tok)  # 3 prompts x 4: the shared-prompt forward
    args = (dense, r.prompt_ids, r.prompt_mask.long(), r.response_ids, r.response_mask.long())
    weight, bias = lm_head_of(dense)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.linear(response_hidden(*args), weight, bias),
                                   response_logits(*args), rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forced_chunking_gives_the_same_logprobs_entropy_and_gradients(dense, tok, temperature):
    r = rollout_of(dense, tok, seed=1)
    weights = torch.randn(r.response_ids.shape, generator=torch.Generator().manual_seed(0))  # (B, T)
    results = []
    for chunk_rows in (0, 5):
        with CountCalls() as counter:
            logp, entropy = response_logprobs(dense, r, temperature, with_entropy=True, chunk_rows=chunk_rows)
            ((logp * weights).sum() + entropy.sum()).backward()
        assert counter.calls == (chunk_rows > 0)
        results.append((logp.detach(), entropy.detach(), {n: p.grad.clone() for n, p in dense.named_parameters()}))
        dense.zero_grad(set_to_none=True)
    (full_logp, full_ent, full_grads), (chunk_logp, chunk_ent, chunk_grads) = results
    torch.testing.assert_close(chunk_logp, full_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunk_ent, full_ent, rtol=0, atol=1e-5)
    assert (chunk_logp[r.response_mask == 0] == 0).all() and (chunk_ent[r.response_mask == 0] == 0).all()
    for name in full_grads:
        err = (chunk_grads[name] - full_grads[name]).abs().max()
        assert err <= 1e-4 * full_grads[name].abs().max() + 1e-6, (name, float(err))


def test_routing_replay_works_on_the_chunked_path(moe, tok):
    r = rollout_of(moe, tok, seed=2, num_samples=2)
    decisions = routing_decisions(moe, r.input_ids, r.attention_mask)
    with torch.no_grad(), CountCalls() as counter:
        full = response_logprobs(moe, r, 1.3, routing=decisions, chunk_rows=0)
        chunked = response_logprobs(moe, r, 1.3, routing=decisions, chunk_rows=3)
    assert counter.calls == 1
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, r.behav_logp, rtol=0, atol=1e-4)


def step_metrics(method="grpo", **overrides):
    """One training step of the cached tiny SFT model: its metrics (times dropped), chunked-function calls."""
    config = TrainConfig.from_preset(method, steps=1, prompts_per_step=4, group_size=4, progress=False, **overrides)
    trainer = Trainer(config)
    with CountCalls() as counter:
        row = trainer.step(0)
    return {k: v for k, v in row.items() if not k.startswith("time") and k != "tokens_per_second"}, counter.calls


def test_tiny_models_keep_the_full_logits_path_bit_for_bit():
    automatic, calls = step_metrics(kl_coef=0.04)  # kl_coef > 0: the reference forward enters the loss
    assert calls == 0  # training and reference forwards: all on the full-logits path
    full, _ = step_metrics(kl_coef=0.04, logprob_chunk_rows=0)
    assert automatic == full  # bitwise: the same floats
    chunked, calls = step_metrics(kl_coef=0.04, logprob_chunk_rows=7)
    assert calls == 2  # the reference forward and the training forward
    assert chunked.keys() == full.keys()
    for key, value in full.items():
        assert chunked[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key


def test_proximal_forward_takes_the_chunked_path():
    full, _ = step_metrics("decoupled_ppo", staleness=0, logprob_chunk_rows=0)
    chunked, calls = step_metrics("decoupled_ppo", staleness=0, logprob_chunk_rows=7)
    assert calls == 1 + 1 + 4  # reference (logged at step 0), proximal, 4 minibatches
    for key, value in full.items():
        assert chunked[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key


def test_models_without_a_plain_linear_head_and_bad_values(dense):
    class Wrapped(torch.nn.Module):  # no backbone to take hidden states from
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

    assert lm_head_of(Wrapped(dense)) is None
    assert lm_head_of(dense)[0] is dense.lm_head.weight
    with pytest.raises(ValueError, match="logprob_chunk_rows"):
        TrainConfig(logprob_chunk_rows=-1)


def test_trpo_takes_the_hidden_state_path_and_makes_the_same_update():
    """TRPO with a forced chunked path: exact KL and Fisher products from hidden states, no (B, T, V) tensor;
    the same step as the full-vocabulary path (the KL's double backward) up to float rounding."""
    full_logprobs_calls = []
    import xxpo.train.loop as loop

    original = loop.full_logprobs

    def counting(*args, **kwargs):
        full_logprobs_calls.append(1)
        return original(*args, **kwargs)

    loop.full_logprobs = counting
    try:
        full, _ = step_metrics("trpo", logprob_chunk_rows=0)
        assert full_logprobs_calls  # the full-vocabulary path ran
        full_logprobs_calls.clear()
        chunked, calls = step_metrics("trpo", logprob_chunk_rows=7)
        assert not full_logprobs_calls and calls > 0  # the hidden-state path ran, and only it
    finally:
        loop.full_logprobs = original
    assert full["accepted"] == 1.0 and chunked.keys() == full.keys()
    for key in ("kl", "surrogate_gain", "step_norm", "backtracks", "accepted"):
        assert chunked[key] == pytest.approx(full[key], rel=2e-3, abs=1e-6), key


def test_the_hidden_state_fisher_product_is_the_hessian_of_the_exact_kl(dense, tok):
    """trpo_from_hidden's Fisher-vector product equals the double-backward Hessian-vector product of the exact
    full-vocabulary KL at theta_old (float64)."""
    from xxpo.train.loop import full_logprobs, trpo_from_hidden

    model = dense.double()
    r = rollout_of(model, tok)
    adv = torch.randn(r.response_ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        _, kl, fvp = trpo_from_hidden(model, r, adv, 1.3, chunk_rows=5)
        with torch.no_grad():
            old_full = full_logprobs(model, r, 1.3)  # (B, T, V)
        new_full = full_logprobs(model, r, 1.3)
        exact = ((old_full.exp() * (old_full - new_full)).sum(-1) * r.response_mask).sum() / r.response_mask.sum()
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact, params, create_graph=True)])
        v = torch.randn(grad.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        hessian_v = torch.cat([g.reshape(-1) for g in torch.autograd.grad(grad @ v, params)])
        fisher_v = fvp(v)
    assert float(kl()) == pytest.approx(0.0, abs=1e-12)  # at theta_old
    # Qwen2's RMSNorm computes in float32 even in a float64 model, so the two orders of differentiation agree
    # to float32 rounding (2.5e-7 of the norm here); a wrong Fisher (no p p^T term, a missing 1/T) is off by O(1)
    assert hessian_v.norm() > 0
    assert float((fisher_v - hessian_v).norm() / hessian_v.norm()) < 1e-5
