"""xxpo against Hugging Face TRL 1.16 (algorithms.md sections 2, 6-9, 12, 15.1).

Three kinds of comparison:

1. TRL's public pure helpers (``selective_log_softmax``, ``entropy_from_logits``, ``nanstd``) on random tensors.
2. TRL's real GRPO loss: ``GRPOTrainer._compute_loss`` is called unbound on a stand-in ``self`` that
   carries only the attributes the method reads and returns our log-probs in place of a model
   forward pass (no model, no download). Each ``loss_type`` is also re-stated independently below
   (``_restated``), and the re-statement is checked against TRL itself, so a change in TRL shows up
   as a failing re-statement rather than as a silent drift.
3. Advantage formulas that TRL computes inside its trainers, re-stated from its code.

Known, documented differences (asserted below, not hidden):
- TRL's ``grpo``/``sapo`` average over *all* B rows (an empty row counts as 0); xxpo's
  seq-mean-token-mean averages over rows with at least one valid token.
- Dr. GRPO: TRL divides the masked sum by ``B * max_completion_length``; xxpo by ``B * norm_len``, so
  ``norm_len = max_completion_length`` matches. verl's ``seq-mean-token-sum-norm`` divides by the padded
  width only (no 1/B): a constant factor B apart, i.e. an effective learning-rate change.
- ``scale_rewards="batch"`` is xxpo's ``adv_norm="group_mean_batch_std"`` (group mean, std of the RAW
  rewards over the batch); xxpo's ``"group_mean_residual_std"`` (AReaL's group/batch) and ``"batch"``
  (AReaL's batch/batch) differ from it, asserted below.
- TRL does not clamp log-ratios; xxpo clamps at +-20. The tensors here stay far inside that range.
- TRL computes two things in float32 even for float64 inputs: the Bessel factor count / (count - 1) in
  ``nanstd`` (an int64 division) and the SAPO temperatures (``torch.where`` on Python floats, so
  tau_neg = 1.05 becomes 1.0499999523). Comparisons that touch them use a relative tolerance of 1e-6.
"""

import collections
import math
import types

import pytest
import torch

trl = pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import entropy_from_logits as trl_entropy  # noqa: E402
from trl.trainer.utils import nanstd as trl_nanstd  # noqa: E402
from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax  # noqa: E402

import xxpo.functional as F  # noqa: E402
import xxpo.objectives as O  # noqa: E402


def test_trl_version():
    assert trl.__version__.startswith("1.16")


# ------------------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_selective_log_softmax_matches_trl(dtype, chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(3, 7, 33, generator=g)).to(dtype)  # (B, T, V)
    index = torch.randint(0, 33, (3, 7), generator=g)
    ours = F.selective_log_softmax(logits, index, chunk_size=chunk_size)
    theirs = trl_selective_log_softmax(logits, index)
    # TRL returns bf16 for bf16 logits (rounded); xxpo upcasts to float32
    tol = 0.1 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(ours.double(), theirs.double(), atol=tol, rtol=0)
    if dtype == torch.float32:
        assert ours.dtype == theirs.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_entropy_matches_trl(dtype, chunk_size):
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(4, 6, 17, generator=g)).to(dtype)
    ours = F.entropy_from_logits(logits, chunk_size=chunk_size)
    theirs = trl_entropy(logits, chunk_size=chunk_size)
    assert torch.allclose(ours.double(), theirs.double(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- advantages


def _trl_group_advantages(rewards, g, scale_rewards):
    """Re-statement of GRPOTrainer's advantage block (sum_then_normalize, one reward function)."""
    mean_g = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    if scale_rewards == "batch":
        std = trl_nanstd(rewards).expand_as(rewards)
    else:
        std = trl_nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    adv = rewards - mean_g
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return adv


SCALE_REWARDS = [("group", "group"), ("batch", "group_mean_batch_std"), ("none", "none")]


def test_trl_advantage_block_is_what_the_restatement_reads():
    """The re-statement above follows TRL's source: a change there fails here, not silently."""
    import inspect

    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    batch_branch = src[src.index('elif self.scale_rewards == "batch":'):src.index("advantages = rewards - mean_grouped")]
    assert "nanstd(rewards).expand_as(rewards)" in batch_branch  # std of the raw rewards over the batch
    assert "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)" in src
    assert "advantages = advantages / (std_rewards + 1e-4)" in src


@pytest.mark.parametrize("scale_rewards,adv_norm", SCALE_REWARDS)
@pytest.mark.parametrize("seed", [2, 5])
def test_group_advantages_match_trl(scale_rewards, adv_norm, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(16, generator=g, dtype=torch.float64).round()  # binary rewards, G = 4
    rewards[4:8] = 1.0  # a zero-variance group
    rewards[12:16] = torch.tensor([0.3, 0.9, 0.1, 0.6], dtype=torch.float64)
    ours = F.group_advantages(rewards, 4, adv_norm=adv_norm, eps=1e-4, unbiased=True)
    theirs = _trl_group_advantages(rewards, 4, scale_rewards)
    assert torch.allclose(ours, theirs, atol=1e-12, rtol=1e-6)  # TRL's Bessel factor is float32
    assert torch.all(ours[4:8] == 0)


def test_only_group_mean_batch_std_is_trl_batch():
    """Group means 0.25 and 0.75: the batch-scale variants separate (the old "batch" was the residual one)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    theirs = _trl_group_advantages(rewards, 4, "batch")
    assert torch.allclose(F.group_advantages(rewards, 4, "group_mean_batch_std", eps=1e-4), theirs, atol=1e-12,
                          rtol=1e-6)
    for other in ("group_mean_residual_std", "batch"):
        assert not torch.allclose(F.group_advantages(rewards, 4, other, eps=1e-4), theirs, atol=1e-3, rtol=0), other


def test_leave_one_out_matches_trl_rloo_baseline():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    grouped = rewards.view(-1, 4)
    baselines = ((grouped.sum(1, keepdim=True) - grouped) / 3).view(-1)  # RLOOTrainer's baseline
    assert torch.allclose(F.leave_one_out_advantages(rewards, 4), rewards - baselines, atol=1e-12, rtol=1e-9)


# ------------------------------------------------------------------------------------------- GRPO losses


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(loss_type, logp, old, adv, mask, *, level="token", beta=0.0, ref=None, eps_low=0.2, eps_high=0.2,
              max_completion_length=None, tau_pos=1.0, tau_neg=1.05):
    """Run TRL's own GRPOTrainer._compute_loss on given tensors; returns (loss, metrics)."""
    fake = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length or logp.shape[1],
        accelerator=_Accelerator(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, sapo_temperature_pos=tau_pos,
                                   sapo_temperature_neg=tau_neg, steps_per_generation=1),
    )
    b, t = logp.shape
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


def _restated(loss_type, logp, old, adv, mask, *, level="token", beta=0.0, ref=None, eps_low=0.2, eps_high=0.2,
              max_completion_length=None, tau_pos=1.0, tau_neg=1.05):
    """Our own reading of TRL's normalisation per loss_type (written from its formulas, not its code)."""
    m = mask.to(logp.dtype)
    a = adv[:, None]
    lr = logp - old
    if level == "sequence":
        lr = ((lr * m).sum(-1) / m.sum(-1).clamp(min=1))[:, None]  # (B, 1), broadcast over tokens
    ratio = lr.exp()
    if loss_type == "sapo":
        tau = torch.where(a > 0, torch.tensor(tau_pos, dtype=logp.dtype), torch.tensor(tau_neg, dtype=logp.dtype))
        per_token = -4 / tau * torch.sigmoid(tau * (ratio - 1)) * a
    elif loss_type == "cispo":  # the weight min(r, epsilon_high), no gradient, times A log pi
        per_token = -ratio.clamp(max=eps_high).detach() * a * logp
    else:
        per_token = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if beta:
        d = ref - logp
        per_token = per_token + beta * (d.exp() - d - 1)
    per_token = per_token.expand_as(m)
    if loss_type in ("grpo", "sapo"):  # mean over ALL rows of each row's token mean
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type in ("bnpo", "dapo", "cispo"):  # local (= global here) active-token mean
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (m.shape[0] * (max_completion_length or m.shape[1]))
    raise AssertionError(loss_type)


def _batch(seed, b=6, t=7, empty_row=False, spread=0.35):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    lengths[1] = 1
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.float64)
    if empty_row:
        mask[2] = 0
    old = -0.2 - 2 * torch.rand(b, t, generator=g, dtype=torch.float64)
    logp = (old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    adv[0], adv[3] = abs(adv[0]) + 0.2, -abs(adv[3]) - 0.2  # both signs on multi-token rows
    ref = old - 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    return logp, old, adv, mask, ref


def _ours(loss_type, logp, old, adv, mask, *, level="token", beta=0.0, ref=None, eps_low=0.2, eps_high=0.2,
          max_completion_length=None, tau_pos=1.0, tau_neg=1.05):
    kl = {} if not beta else {"ref_logp": ref, "kl_coef": beta, "kl_estimator": "k3"}
    if level == "sequence":
        assert loss_type == "grpo" and not beta
        return O.gspo_loss(logp, old, adv, mask, clip_eps_low=eps_low, clip_eps_high=eps_high)
    if loss_type == "grpo":
        return O.grpo_loss(logp, old, adv, mask, clip_eps_low=eps_low, clip_eps_high=eps_high,
                           loss_agg_mode="seq-mean-token-mean", **kl)
    if loss_type == "bnpo":
        return O.grpo_loss(logp, old, adv, mask, clip_eps_low=eps_low, clip_eps_high=eps_high,
                           loss_agg_mode="token-mean", **kl)
    if loss_type == "dr_grpo":
        return O.dr_grpo_loss(logp, old, adv, mask, norm_len=max_completion_length or logp.shape[1],
                              clip_eps_low=eps_low, clip_eps_high=eps_high, **kl)
    if loss_type == "dapo":
        return O.dapo_loss(logp, old, adv, mask, clip_eps_low=eps_low, clip_eps_high=eps_high, **kl)
    if loss_type == "sapo":
        return O.sapo_loss(logp, old, adv, mask, tau_pos=tau_pos, tau_neg=tau_neg)
    if loss_type == "cispo":  # TRL's epsilon_high is the cap 1 + clip_eps_high; TRL has no lower bound
        return O.cispo_loss(logp, old, adv, mask, clip_eps_high=eps_high - 1.0, **kl)
    raise AssertionError(loss_type)


def _value_and_grad(fn, logp):
    logp.grad = None
    out = fn()
    loss = out[0] if isinstance(out, tuple) else out  # LossOutput, (loss, metrics) or a bare tensor
    loss.backward()
    g = logp.grad.clone()
    logp.grad = None
    return loss.detach(), g, out


CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="grpo", eps_high=0.28),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo"),
    dict(loss_type="bnpo", beta=0.1, eps_low=0.1, eps_high=0.3),
    dict(loss_type="dr_grpo"),
    dict(loss_type="dr_grpo", max_completion_length=16),
    dict(loss_type="dr_grpo", beta=0.04, max_completion_length=16),
    dict(loss_type="dapo", eps_high=0.28),
    dict(loss_type="dapo", eps_high=0.28, beta=0.04),
    dict(loss_type="sapo"),
    dict(loss_type="sapo", tau_pos=0.5, tau_neg=2.0),
    dict(loss_type="cispo", eps_high=5.0),
    dict(loss_type="cispo", eps_high=1.2),
    dict(loss_type="grpo", level="sequence", eps_low=3e-4, eps_high=4e-4),
    dict(loss_type="grpo", level="sequence", eps_low=0.02, eps_high=0.03),
]


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("seed", [10, 11])
def test_grpo_family_matches_trl(case, seed):
    spread = 0.01 if case.get("level") == "sequence" else 0.35  # sequence ratios near the 3e-4 clip range
    logp, old, adv, mask, ref = _batch(seed, spread=spread)
    kw = dict(case, ref=ref, logp=logp, old=old, adv=adv, mask=mask)
    trl_v, trl_g, (_, trl_metrics) = _value_and_grad(lambda: _trl_loss(**kw), logp)
    rest_v, rest_g, _ = _value_and_grad(lambda: _restated(**kw), logp)
    ours_v, ours_g, ours = _value_and_grad(lambda: _ours(**kw), logp)
    rtol = 1e-6 if case["loss_type"] == "sapo" else 1e-9  # TRL's SAPO temperatures are float32
    # the re-statement reads TRL correctly ...
    assert torch.allclose(rest_v, trl_v, atol=1e-12, rtol=rtol) and torch.allclose(rest_g, trl_g, atol=1e-12,
                                                                                    rtol=rtol)
    assert torch.allclose(rest_v, ours_v, atol=1e-12, rtol=1e-9) and torch.allclose(rest_g, ours_g, atol=1e-12,
                                                                                     rtol=1e-9)
    # ... and xxpo with the corresponding settings gives the same value and gradient
    assert torch.allclose(ours_v, trl_v, atol=1e-12, rtol=rtol), (ours_v, trl_v)
    assert torch.allclose(ours_g, trl_g, atol=1e-12, rtol=rtol)
    # clip metrics share TRL's definition (A < 0 and r < 1 - eps_low; A > 0 and r > 1 + eps_high)
    if case["loss_type"] == "cispo":  # TRL counts capped weights where A > 0 only; xxpo counts every capped weight
        r = (logp.detach() - old).exp()
        a = adv[:, None].expand_as(mask)
        trl_count = (((r > case["eps_high"]) & (a > 0)).double() * mask).sum() / mask.sum()
        assert abs(trl_metrics["cispo_clip_ratio"] - trl_count.item()) < 1e-6
        assert ours.metrics["clip_frac_high"].item() >= trl_metrics["cispo_clip_ratio"] - 1e-6
    elif case["loss_type"] != "sapo" and case.get("level", "token") == "token":
        assert abs(ours.metrics["clip_frac_low"].item() - trl_metrics["clip_ratio/low_mean"]) < 1e-6
        assert abs(ours.metrics["clip_frac_high"].item() - trl_metrics["clip_ratio/high_mean"]) < 1e-6
        assert abs(ours.metrics["clip_frac"].item() - trl_metrics["clip_ratio/region_mean"]) < 1e-6
    if case.get("beta"):
        assert abs(ours.metrics["kl"].item() - trl_metrics["kl"]) < 1e-6


def test_trl_cases_exercise_clipping():
    logp, old, adv, mask, ref = _batch(10)
    _, metrics = _trl_loss("grpo", logp, old, adv, mask)
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "sapo"])
def test_empty_row_normalisation_differs_by_row_count(loss_type):
    """TRL counts an empty row in the mean over rows; xxpo does not: they differ by B / B_nonempty."""
    logp, old, adv, mask, ref = _batch(12, empty_row=True)
    trl_v = _trl_loss(loss_type, logp, old, adv, mask)[0].item()
    ours_v = _ours(loss_type, logp, old, adv, mask).loss.item()
    b, nonempty = mask.shape[0], int((mask.sum(-1) > 0).sum())
    assert nonempty < b
    assert abs(ours_v - trl_v * b / nonempty) < 1e-6 * abs(ours_v)  # float32 SAPO temperatures in TRL


def test_dr_grpo_normalizer_against_verl():
    """xxpo (= TRL) divides by B * norm_len; verl 0.9.1's seq-mean-token-sum-norm divides by the number of
    non-empty responses times loss_scale_factor: equal without empty responses, B / B_nonempty apart with one."""
    from verl.trainer.ppo.core_algos import agg_loss

    logp, old, adv, mask, _ = _batch(13)
    b, t = mask.shape
    for rows in (mask, torch.cat([mask[:-1], torch.zeros_like(mask[-1:])])):  # then the last response empty
        ours = O.dr_grpo_loss(logp, old, adv, rows, norm_len=t).loss
        r = (logp.detach() - old).exp()
        a = adv[:, None]
        loss_mat = -torch.minimum(r * a, r.clamp(0.8, 1.2) * a)
        verl = agg_loss(loss_mat, rows, "seq-mean-token-sum-norm", loss_scale_factor=t)
        nonempty = int((rows.sum(-1) > 0).sum())
        assert abs(ours.item() - (loss_mat * rows).sum().item() / (b * t)) < 1e-12
        assert abs(verl.item() * nonempty / b - ours.item()) < 1e-9
    assert nonempty == b - 1


def test_trl_cispo_case_exercises_the_cap():
    logp, old, adv, mask, _ = _batch(10)
    _, metrics = _trl_loss("cispo", logp, old, adv, mask, eps_high=1.2)
    assert 0 < metrics["cispo_clip_ratio"] < 1


# ------------------------------------------------------------------------------------------- GMPO (trl.experimental)


def _trl_gmpo_loss(logp, old, adv, mask, eps_low=0.4, eps_high=0.4):
    """TRL's own GMPOTrainer._compute_loss, unbound, on a stand-in ``self`` (as ``_trl_loss`` does for GRPO)."""
    from trl.experimental.gmpo import GMPOTrainer

    fake = types.SimpleNamespace(
        top_entropy_quantile=1.0, epsilon_low=eps_low, epsilon_high=eps_high, beta=0.0,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=_Accelerator(),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
    )
    b, t = logp.shape
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old}
    loss = GMPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("eps", [(0.4, 0.4), (0.1, 0.25)])
@pytest.mark.parametrize("seed", [10, 11])
def test_gmpo_matches_trl(eps, seed):
    logp, old, adv, mask, _ = _batch(seed, spread=0.35)
    trl_v, trl_g, (_, metrics) = _value_and_grad(lambda: _trl_gmpo_loss(logp, old, adv, mask, *eps), logp)
    ours_v, ours_g, ours = _value_and_grad(lambda: O.gmpo_loss(logp, old, adv, mask, clip_eps_low=eps[0],
                                                               clip_eps_high=eps[1]), logp)
    assert torch.allclose(ours_v, trl_v, atol=1e-12, rtol=1e-9) and torch.allclose(ours_g, trl_g, atol=1e-12, rtol=1e-9)
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # the case exercises the per-token clip
    for side in ("low", "high"):
        assert abs(ours.metrics[f"clip_frac_{side}"].item() - metrics[f"clip_ratio/{side}_mean"]) < 1e-6
    assert abs(ours.metrics["clip_frac"].item() - metrics["clip_ratio/region_mean"]) < 1e-6


def test_gmpo_empty_rows_differ_from_trl_by_their_minus_a():
    """TRL's GMPO keeps a response with no valid token in its mean (ratio 1, value -A_i, no gradient)."""
    logp, old, adv, mask, _ = _batch(12, empty_row=True)
    trl_v = _trl_gmpo_loss(logp, old, adv, mask)[0].item()
    ours_v = O.gmpo_loss(logp, old, adv, mask).loss.item()
    empty = mask.sum(-1) == 0
    b, nonempty = mask.shape[0], int((~empty).sum())
    assert abs(trl_v * b - (ours_v * nonempty - adv[empty].sum().item())) < 1e-10


# ------------------------------------------------------------------------------------------- vLLM IS correction


def _trl_vllm_weights(old, sampling, mask, mode, clip_min, clip_max):
    """Re-statement of the importance-sampling block of GRPOTrainer._generate_and_score_completions (checked
    against its source below): log-ratio old - sampling, summed over the response for sequence_* modes."""
    diff = (old - sampling) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = diff.exp()
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def test_trl_vllm_block_is_what_the_restatement_reads():
    import inspect

    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask" in src
    assert "per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)" in src
    assert "vllm_importance_sampling_ratio = torch.exp(logps_diff)" in src
    assert 'if self.vllm_importance_sampling_mode in ["sequence_truncate", "token_truncate"]:' in src
    assert "invalid_mis_mask, value=0.0" in src


VLLM_MODES = [("token_truncate", None, 3.0), ("token_truncate", 0.5, 2.0), ("token_mask", 0.5, 5.0),
              ("sequence_truncate", None, 3.0), ("sequence_mask", None, 3.0), ("sequence_mask", 0.5, 2.0)]


@pytest.mark.parametrize("mode, clip_min, clip_max", VLLM_MODES)
def test_mismatch_weights_match_trl_vllm_modes(mode, clip_min, clip_max):
    g = torch.Generator().manual_seed(21)
    logp, old, adv, mask, _ = _batch(13)
    sampling = old + 0.5 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    level, action = mode.split("_")
    ours = O.mismatch_weights(old, sampling, mask, level=level, mode=action, low=clip_min, high=clip_max)
    theirs = _trl_vllm_weights(old, sampling, mask, mode, clip_min, clip_max).expand_as(mask)
    valid = mask.bool()
    assert torch.allclose(ours.weights[valid], theirs[valid], atol=1e-12, rtol=1e-12)
    assert 0 < ours.metrics["is_bound_frac"].item() < 1  # the bounds bite on some tokens, not all


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_trl_loss_with_vllm_correction_is_the_objective_on_weighted_advantages(loss_type, mode):
    """TRL multiplies each token's loss by the IS weight; xxpo gets the same loss from advantages * weights."""
    g = torch.Generator().manual_seed(22)
    logp, old, adv, mask, _ = _batch(14)
    sampling = old + 0.4 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    level, action = mode.split("_")
    w = O.mismatch_weights(old, sampling, mask, level=level, mode=action, high=3.0).weights
    eps_high = 5.0 if loss_type == "cispo" else 0.2

    def theirs():
        fake_inputs = dict(logp=logp, old=old, adv=adv, mask=mask, eps_high=eps_high)
        return _trl_loss_vllm(loss_type, w, **fake_inputs)

    trl_v, trl_g, _ = _value_and_grad(theirs, logp)
    weighted = adv[:, None] * w
    ours_v, ours_g, _ = _value_and_grad(lambda: _ours(loss_type, logp, old, weighted, mask, eps_high=eps_high), logp)
    rtol = 1e-6 if loss_type == "sapo" else 1e-9
    assert torch.allclose(ours_v, trl_v, atol=1e-12, rtol=rtol) and torch.allclose(ours_g, trl_g, atol=1e-12, rtol=rtol)


def _trl_loss_vllm(loss_type, weights, *, logp, old, adv, mask, eps_high):
    """``_trl_loss`` with TRL's vLLM correction switched on and ``weights`` as its importance_sampling_ratio."""
    fake = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.0,
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high, use_vllm=True,
        vllm_importance_sampling_correction=True, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=logp.shape[1],
        accelerator=_Accelerator(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, sapo_temperature_pos=1.0,
                                   sapo_temperature_neg=1.05, steps_per_generation=1),
    )
    b, t = logp.shape
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
              "importance_sampling_ratio": weights}
    return GRPOTrainer._compute_loss(fake, None, inputs), None


# ------------------------------------------------------------------------------------------- RLOO


def test_rloo_trainer_baseline_is_what_leave_one_out_restates():
    """TRL's RLOOTrainer: baseline = (group sum - own reward) / (count - 1), advantage = reward - baseline."""
    import inspect

    from trl.trainer.rloo_trainer import RLOOTrainer

    src = inspect.getsource(RLOOTrainer._generate_and_score_completions)
    assert "baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)" in src
    assert "advantages = rewards - baselines" in src
