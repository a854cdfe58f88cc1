"""xxpo.integrations.trl: XxpoGRPOTrainer against xxpo.objectives and against TRL 1.16's own GRPO losses.

Every comparison runs real ``GRPOTrainer`` objects on a tiny Qwen2 model (built from a config, float64,
the suite's character tokenizer; nothing downloaded) and one hand-made batch in TRL's format, through
the trainers' own ``compute_loss``. Values and gradients (over every model parameter) are compared.

- against ``xxpo.objectives``: log-probs from an independent forward pass, then the objective;
- against TRL: ``GRPOTrainer`` configured as ``xxpo.integrations.TRL_EQUIVALENTS`` says;
- the known differences (empty responses; TRL's vLLM ratio) are asserted, not hidden;
- gradient accumulation: one micro-batch of the whole batch vs two unequal halves, same gradient;
- a few real training steps (generation, rewards, updates) with GSPO and decoupled PPO.
"""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import xxpo.objectives as O  # noqa: E402
from xxpo.functional import selective_log_softmax  # noqa: E402
from xxpo.integrations import POLICY_OBJECTIVES, TRL_EQUIVALENTS, TRL_REFUSED, calling_form  # noqa: E402
from xxpo.integrations.trl import XxpoGRPOTrainer  # noqa: E402
from xxpo.models import MODEL_PRESETS, build_model  # noqa: E402

B, P, T, G = 6, 5, 7, 2
SEQUENCE_LEVEL = ("gspo", "gspo_token")
TRL_OBJECTIVES = tuple(n for n in POLICY_OBJECTIVES if n not in TRL_REFUSED)


@pytest.fixture(scope="module")
def model(tok):
    return build_model(MODEL_PRESETS["tiny"], tok, seed=0).double()


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict({"prompt": ["12+34=", "5+6=", "7+8=", "1+1=", "9+9=", "3+4="]})


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) / 10 for c in completions]


def config(tmp_path, **overrides) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=B, num_generations=G,
                max_completion_length=T, use_cpu=True, bf16=False, fp16=False, report_to="none",
                logging_strategy="no", save_strategy="no", disable_tqdm=True, activation_checkpointing=False,
                max_steps=1, seed=0, learning_rate=1e-3)
    base.update(overrides)
    return GRPOConfig(**base)


def make(cls, model, tok, dataset, tmp_path, config_kw=None, **kw):
    trainer = cls(model=model, reward_funcs=length_reward, args=config(tmp_path, **(config_kw or {})),
                  train_dataset=dataset, processing_class=tok, **kw)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; these tests call compute_loss directly
    trainer.model.train()
    return trainer


def independent_logp(model, inputs):
    """log pi(completion token) from a plain forward pass and a log-softmax (not TRL's code path)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=att).logits  # (B, P + T, V)
    t = inputs["completion_ids"].shape[1]
    return selective_log_softmax(logits[:, -t - 1:-1], inputs["completion_ids"])  # (B, T)


def make_inputs(model, seed, *, spread=0.35, empty_row=False, rows=B, with_old=True, ref=False, sampling=False):
    """A batch in GRPOTrainer's format: left-padded prompts, right-padded completions of unequal lengths."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(4, vocab, (rows, P), generator=g)
    prompt_len = torch.randint(2, P + 1, (rows,), generator=g)
    prompt_mask = (torch.arange(P)[None] >= (P - prompt_len)[:, None]).long()  # left padding
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(4, vocab, (rows, T), generator=g)
    lengths = torch.randint(1, T + 1, (rows,), generator=g)
    lengths[0], lengths[1 % rows] = T, 1
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    if empty_row:
        completion_mask[2] = 0
    advantages = torch.randn(rows, generator=g, dtype=torch.float64)
    advantages[0], advantages[min(3, rows - 1)] = abs(advantages[0]) + 0.2, -abs(advantages[min(3, rows - 1)]) - 0.2
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages,
                  num_items_in_batch=completion_mask.sum().double())
    with torch.no_grad():
        cur = independent_logp(model, inputs)
    if with_old:
        inputs["old_per_token_logps"] = cur + spread * torch.randn(rows, T, generator=g, dtype=torch.float64)
    if ref:
        inputs["ref_per_token_logps"] = cur + 0.3 * torch.randn(rows, T, generator=g, dtype=torch.float64)
    if sampling:
        base = inputs.get("old_per_token_logps", cur)
        inputs["sampling_per_token_logps"] = base + 0.4 * torch.randn(rows, T, generator=g, dtype=torch.float64)
    return inputs


def loss_and_grad(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return loss.detach(), grad


def close(a, b, rtol=1e-9, atol=1e-12):
    return torch.allclose(a, b, rtol=rtol, atol=atol)


def near(a, b, rel=2e-6):
    """Within ``rel`` of b's size, to float32 precision: TRL's fused log-prob path returns float32 log-probs
    even for a float64 model, and xxpo's objectives compute in the dtype of ``logp``."""
    return float((a - b).norm()) <= rel * float(b.norm()) + 1e-7


def spread_for(name):
    return 5e-3 if name in SEQUENCE_LEVEL else 0.35


def clip_config(name):
    return {"epsilon": 3e-4, "epsilon_high": 4e-4} if name in SEQUENCE_LEVEL else {}


# --------------------------------------------------------------------------------------------------
# the adapter computes the objective
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRL_OBJECTIVES)
def test_loss_and_gradient_equal_the_objective(name, model, tok, dataset, tmp_path):
    kw = {"dual_clip_c": 3.0} if name in ("ppo", "grpo", "dapo") else {}
    trainer = make(XxpoGRPOTrainer, model, tok, dataset, tmp_path, clip_config(name), objective=name,
                   objective_kwargs=kw)
    inputs = make_inputs(model, 1, spread=spread_for(name), sampling=calling_form(name) == "decoupled")
    got_v, got_g = loss_and_grad(model, lambda: trainer.compute_loss(model, inputs))

    def direct():
        logp = independent_logp(model, inputs)
        args = dict(kw)
        if name in SEQUENCE_LEVEL:
            args.update(clip_eps_low=3e-4, clip_eps_high=4e-4)
        elif name != "sapo":
            args.update(clip_eps_low=0.2, clip_eps_high=0.2)
        if name == "dr_grpo":
            args["norm_len"] = T  # GRPOConfig.max_completion_length
        mask, adv, old = inputs["completion_mask"], inputs["advantages"], inputs["old_per_token_logps"]
        if calling_form(name) == "decoupled":
            return O.get(name)(logp, inputs["sampling_per_token_logps"], old, adv, mask, **args).loss
        return O.get(name)(logp, old, adv, mask, **args).loss

    want_v, want_g = loss_and_grad(model, direct)
    assert near(got_v, want_v) and near(got_g, want_g), (got_v, want_v)
    assert want_g.abs().sum() > 0
    assert f"xxpo/ratio_mean" in trainer._metrics["train"]


def test_on_policy_batch_uses_current_log_probs(model, tok, dataset, tmp_path):
    """Without old_per_token_logps (TRL omits them on-policy) the ratio is 1 and GRPO's gradient is A grad log pi."""
    trainer = make(XxpoGRPOTrainer, model, tok, dataset, tmp_path, objective="grpo")
    inputs = make_inputs(model, 2, with_old=False)
    got_v, got_g = loss_and_grad(model, lambda: trainer.compute_loss(model, inputs))

    def reinforce():  # seq-mean-token-mean of -A log pi, shifted to the loss value -A at ratio 1
        logp = independent_logp(model, inputs)
        m = inputs["completion_mask"].double()
        adv = inputs["advantages"][:, None]
        per_row = (-(adv * (logp - logp.detach() + 1)) * m).sum(-1) / m.sum(-1)
        return per_row.mean()

    want_v, want_g = loss_and_grad(model, reinforce)
    assert near(got_v, want_v) and near(got_g, want_g)
    assert trainer._metrics["train"]["xxpo/ratio_mean"][-1] == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# against TRL's own loss
# --------------------------------------------------------------------------------------------------

GRPO_EQUIVALENTS = [n for n, eq in TRL_EQUIVALENTS.items() if eq is not None and eq.trainer == "GRPOTrainer"]


@pytest.mark.parametrize("name", GRPO_EQUIVALENTS)
def test_equals_trl_builtin_loss(name, model, tok, dataset, tmp_path):
    eq = TRL_EQUIVALENTS[name]
    settings = dict(eq.settings)
    vllm = settings.pop("use_vllm", False)
    theirs = make(GRPOTrainer, model, tok, dataset, tmp_path, settings)
    ours_settings = {k: v for k, v in settings.items() if not k.startswith("vllm") and k != "importance_sampling_level"}
    ours = make(XxpoGRPOTrainer, model, tok, dataset, tmp_path, ours_settings, objective=name,
                objective_kwargs=dict(eq.extra))
    inputs = make_inputs(model, 3, spread=spread_for(name), sampling=vllm)
    if vllm:
        # TRL's generation step computes this ratio when vLLM's importance-sampling correction is on
        # (mode token_truncate): exp(old - sampling) clamped at vllm_importance_sampling_clip_max.
        cap = theirs.args.vllm_importance_sampling_clip_max
        assert cap == eq.extra["behav_weight_cap"]
        diff = (inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]) * inputs["completion_mask"]
        inputs["importance_sampling_ratio"] = diff.exp().clamp(max=cap)
        theirs.use_vllm, theirs.vllm_importance_sampling_correction = True, True  # no vLLM server on CPU
    trl_v, trl_g = loss_and_grad(model, lambda: theirs.compute_loss(model, inputs))
    our_v, our_g = loss_and_grad(model, lambda: ours.compute_loss(model, inputs))
    assert near(our_v, trl_v) and near(our_g, trl_g), (name, our_v, trl_v)
    assert trl_g.abs().sum() > 0
    if name == "gspo":  # some responses are clipped, some are not
        assert 0 < sum(ours._metrics["train"][f"xxpo/seq_clip_frac_{s}"][-1] for s in ("low", "high")) < 1
    if name not in ("sapo", "gspo") and not vllm:  # the clip metrics share TRL's definition
        assert ours._metrics["train"]["xxpo/clip_frac"][-1] == pytest.approx(
            theirs._metrics["train"]["clip_ratio/region_mean"][-1], abs=1e-6)


def test_trl_cases_exercise_the_clip(model, tok, dataset, tmp_path):
    theirs = make(GRPOTrainer, model, tok, dataset, tmp_path, {"loss_type": "grpo"})
    theirs.compute_loss(model, make_inputs(model, 3))
    assert theirs._metrics["train"]["clip_ratio/low_mean"][-1] > 0
    assert theirs._metrics["train"]["clip_ratio/high_mean"][-1] > 0


def test_kl_term_equals_trl(model, tok, dataset, tmp_path):
    """beta > 0: TRL's reference log-probs become ref_logp and beta kl_coef (k3, without TRL's ratio weight).

    With beta > 0 TRL loads a reference model from the policy's path, so both trainers load the saved tiny
    model (two copies of the same weights); each trainer's gradient is taken on its own copy.
    """
    path = tmp_path / "policy"
    model.save_pretrained(path)
    cfg = {"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False}
    theirs = make(GRPOTrainer, str(path), tok, dataset, tmp_path, cfg)
    ours = make(XxpoGRPOTrainer, str(path), tok, dataset, tmp_path, cfg, objective="grpo")
    inputs = make_inputs(model, 4, ref=True)
    trl_v, trl_g = loss_and_grad(theirs.model, lambda: theirs.compute_loss(theirs.model, inputs))
    our_v, our_g = loss_and_grad(ours.model, lambda: ours.compute_loss(ours.model, inputs))
    assert near(our_v, trl_v) and near(our_g, trl_g)
    assert ours._metrics["train"]["xxpo/kl"][-1] == pytest.approx(theirs._metrics["train"]["kl"][-1], rel=1e-6)
    assert ours._metrics["train"]["xxpo/kl"][-1] > 0


@pytest.mark.parametrize("name", ["grpo", "gspo", "sapo"])
def test_empty_response_known_difference(name, model, tok, dataset, tmp_path):
    """TRL's response-averaged losses count an empty response as 0; xxpo averages over non-empty ones."""
    eq = TRL_EQUIVALENTS[name]
    theirs = make(GRPOTrainer, model, tok, dataset, tmp_path, eq.settings)
    ours = make(XxpoGRPOTrainer, model, tok, dataset, tmp_path,
                {k: v for k, v in eq.settings.items() if k != "importance_sampling_level"}, objective=name)
    inputs = make_inputs(model, 5, spread=spread_for(name), empty_row=True)
    trl_v, trl_g = loss_and_grad(model, lambda: theirs.compute_loss(model, inputs))
    our_v, our_g = loss_and_grad(model, lambda: ours.compute_loss(model, inputs))
    nonempty = int((inputs["completion_mask"].sum(-1) > 0).sum())
    assert nonempty == B - 1
    assert near(our_v * nonempty / B, trl_v) and near(our_g * nonempty / B, trl_g)
    assert not near(our_v, trl_v, rel=1e-3)


# --------------------------------------------------------------------------------------------------
# gradient accumulation
# --------------------------------------------------------------------------------------------------


def split(inputs, rows):
    out = {k: v[rows] for k, v in inputs.items() if k != "num_items_in_batch"}
    out["num_items_in_batch"] = inputs["num_items_in_batch"]  # TRL: the tokens of the whole generation batch
    return out


@pytest.mark.parametrize("name", TRL_OBJECTIVES)
def test_gradient_accumulation_one_vs_two(name, model, tok, dataset, tmp_path):
    """One micro-batch of 6 responses vs two of 3 (with 1 + ... tokens unequal): the same loss and gradient."""
    trainer = make(XxpoGRPOTrainer, model, tok, dataset, tmp_path, clip_config(name), objective=name)
    inputs = make_inputs(model, 6, spread=spread_for(name), sampling=calling_form(name) == "decoupled")
    halves = [split(inputs, slice(0, 3)), split(inputs, slice(3, 6))]
    tokens = [int(h["completion_mask"].sum()) for h in halves]
    assert tokens[0] != tokens[1]

    trainer.current_gradient_accumulation_steps, trainer.args.steps_per_generation = 1, 1
    one_v, one_g = loss_and_grad(model, lambda: trainer.compute_loss(model, inputs))
    trainer.current_gradient_accumulation_steps, trainer.args.steps_per_generation = 2, 2
    two_v, two_g = loss_and_grad(model, lambda: sum(trainer.compute_loss(model, h) for h in halves))
    assert near(two_v, one_v) and near(two_g, one_g), (name, one_v, two_v)

    if trainer.objective_mode == "token-mean":  # the check can fail: naive 1/steps scaling is wrong here
        naive = sum(trainer.objective_fn(*_call_args(trainer, model, h)).loss / 2 for h in halves)
        assert not math.isclose(float(naive), float(one_v), rel_tol=1e-3)


def _call_args(trainer, model, inputs):
    logp = independent_logp(model, inputs).detach()
    mask, adv, old = inputs["completion_mask"], inputs["advantages"], inputs["old_per_token_logps"]
    if trainer.objective_form == "decoupled":
        return logp, inputs["sampling_per_token_logps"], old, adv, mask
    return logp, old, adv, mask


def test_trl_dapo_accumulates_like_the_adapter(model, tok, dataset, tmp_path):
    """TRL's own token-mean (loss_type='dapo') is also exact under accumulation; its 'bnpo' is not."""
    inputs = make_inputs(model, 6)
    halves = [split(inputs, slice(0, 3)), split(inputs, slice(3, 6))]
    for loss_type, exact in (("dapo", True), ("bnpo", False)):
        trainer = make(GRPOTrainer, model, tok, dataset, tmp_path, {"loss_type": loss_type})
        trainer.current_gradient_accumulation_steps, trainer.args.steps_per_generation = 1, 1
        one_v, _ = loss_and_grad(model, lambda: trainer.compute_loss(model, inputs))
        trainer.current_gradient_accumulation_steps, trainer.args.steps_per_generation = 2, 2
        two_v, _ = loss_and_grad(model, lambda: sum(trainer.compute_loss(model, h) for h in halves))
        assert near(two_v, one_v, rel=1e-6) == exact, loss_type


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective,config_kw,kwargs,message", [
    ("a3po", {}, None, "staleness 0"),
    ("trpo", {}, None, "policy objectives"),
    ("dpo", {}, None, "policy objectives"),
    ("gspo", {"beta": 0.04}, None, "no KL term"),
    ("grpo", {"beta": 0.04}, None, "use_bias_correction_kl"),
    ("grpo", {"importance_sampling_level": "sequence", "loss_type": "grpo"}, None, "objective='gspo'"),
    ("grpo", {"top_entropy_quantile": 0.2}, None, "top_entropy_quantile"),
    ("grpo", {"entropy_coef": 0.01}, None, "entropy bonus"),
    ("grpo", {}, {"clip_eps_low": 0.1}, "GRPOConfig.epsilon"),
    ("sapo", {}, {"tau_neg": 2.0}, "GRPOConfig.sapo_temperature_neg"),
    ("grpo", {}, {"kl_coef": 0.1}, "GRPOConfig.beta"),
    ("grpo", {}, {"ref_logp": None}, "tensor of the batch"),
    ("gspo", {}, {"loss_agg_mode": "token-mean"}, "takes no argument 'loss_agg_mode'"),
])
def test_refusals_name_the_setting(objective, config_kw, kwargs, message, model, tok, dataset, tmp_path):
    with pytest.raises(ValueError, match=message):
        make(XxpoGRPOTrainer, model, tok, dataset, tmp_path, config_kw, objective=objective, objective_kwargs=kwargs)


def test_gspo_refuses_per_token_advantages(model, tok, dataset, tmp_path):
    trainer = make(XxpoGRPOTrainer, model, tok, dataset, tmp_path, clip_config("gspo"), objective="gspo")
    inputs = make_inputs(model, 7, spread=2e-3)
    m = inputs["completion_mask"].double()
    inputs["advantages"] = inputs["advantages"][:, None] * m  # one value per response: accepted
    trainer.compute_loss(model, inputs)
    inputs["advantages"] = inputs["advantages"] + 0.1 * torch.arange(T, dtype=torch.float64) * m
    with pytest.raises(ValueError, match="differ across the tokens"):
        trainer.compute_loss(model, inputs)


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["gspo", "decoupled_ppo"])
def test_trains_a_tiny_model(objective, tok, dataset, tmp_path):
    """A few real GRPOTrainer steps (generation, rewards, advantages, updates) with an xxpo objective.

    steps_per_generation=2 makes the second optimizer step of each generation batch off-policy, so TRL
    recomputes old log-probs and the objective's ratio leaves 1.
    """
    policy = build_model(MODEL_PRESETS["tiny"], tok, seed=1)
    before = [p.detach().clone() for p in policy.parameters()]
    clip = {"epsilon": 3e-4, "epsilon_high": 4e-4} if objective == "gspo" else {}
    trainer = XxpoGRPOTrainer(model=policy, reward_funcs=length_reward, train_dataset=dataset, processing_class=tok,
                              args=config(tmp_path, max_steps=4, per_device_train_batch_size=4,
                                          steps_per_generation=2, max_completion_length=6, learning_rate=3e-3,
                                          temperature=1.0, logging_strategy="steps", logging_steps=1, **clip),
                              objective=objective)
    result = trainer.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(policy.parameters(), before))
    assert moved > 0
    logged = [row for row in trainer.state.log_history if "xxpo/ratio_mean" in row]
    assert len(logged) == 4
    ratios = [row["xxpo/ratio_mean"] for row in logged]
    assert all(math.isfinite(r) for r in ratios)
    assert any(abs(r - 1.0) > 1e-9 for r in ratios)  # off-policy steps: the recomputed old log-probs matter


# --------------------------------------------------------------------------------------------------
# the preference losses against TRL's DPOTrainer (no adapter needed: these are losses of sequence log-probs)
# --------------------------------------------------------------------------------------------------

DPO_EQUIVALENTS = [n for n, eq in TRL_EQUIVALENTS.items() if eq is not None and eq.trainer == "DPOTrainer"]


def sequence_logp(model, input_ids, attention_mask, completion_mask):
    """Sum of the completion tokens' log-probs, from a plain forward pass."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (2B, L - 1, V)
    per_token = selective_log_softmax(logits, input_ids[:, 1:])  # (2B, L - 1)
    return (per_token * completion_mask[:, 1:]).sum(-1)  # (2B,)


@pytest.mark.parametrize("name", DPO_EQUIVALENTS)
def test_preference_losses_equal_trl_dpo_trainer(name, tok, tmp_path):
    from trl import DPOConfig, DPOTrainer

    eq = TRL_EQUIVALENTS[name]
    pairs = Dataset.from_dict({"prompt": ["1+1=", "2+3="], "chosen": ["2", "5"], "rejected": ["3", "6"]})
    # fresh models: a trainer patches its model's forward (TRL's fused LM head), so no fixture is shared here
    model = build_model(MODEL_PRESETS["tiny"], tok, seed=0).double()
    reference = build_model(MODEL_PRESETS["tiny"], tok, seed=1).double()  # a reference that differs from the policy
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, beta=0.1, use_cpu=True,
                     bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
                     activation_checkpointing=False, **eq.settings)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=pairs, processing_class=tok)
    trainer.model.train()
    g = torch.Generator().manual_seed(8)
    rows, length = 4, 9  # [chosen x 2; rejected x 2], prompt of 4 tokens then a completion
    input_ids = torch.randint(4, model.config.vocab_size, (2 * rows, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = (torch.arange(length)[None] >= 4).long().expand(2 * rows, length).clone()
    completion_mask[1, 7:] = 0
    attention_mask[1, 7:] = 0
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
    trl_v, trl_g = loss_and_grad(model, lambda: trainer.compute_loss(model, inputs))

    def ours():
        logp = sequence_logp(model, input_ids, attention_mask, completion_mask)
        with torch.no_grad():
            ref = sequence_logp(reference, input_ids, attention_mask, completion_mask)
        if name == "dpo":
            return O.dpo_loss(logp[:rows], logp[rows:], ref[:rows], ref[rows:], dpo_beta=0.1).loss
        # self-play SPPO with TRL's hard probabilities: 1 for the chosen response, 0 for the rejected, eta = 1/beta
        win = torch.cat([torch.ones(rows), torch.zeros(rows)]).double()
        return 2 * O.sppo_selfplay_loss(logp, ref, win, eta=1 / 0.1).loss  # TRL sums the pair, xxpo averages

    our_v, our_g = loss_and_grad(model, ours)
    assert near(our_v, trl_v) and near(our_g, trl_g), (name, our_v, trl_v)
    assert trl_g.abs().sum() > 0
