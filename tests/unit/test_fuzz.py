"""Property-based fuzzing: every objective gives a finite loss, finite gradients and finite metrics on
extreme log-ratios (+-50), empty rows, length-1 responses, zero advantages, in float32 and bfloat16."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xxpo.functional as F
import xxpo.objectives as O

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float64])
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

log_ratio = st.one_of(st.sampled_from([-50.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 50.0]),
                      st.floats(-50, 50, allow_nan=False))
adv_value = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e3, -1e3]), st.floats(-10, 10, allow_nan=False))


@st.composite
def policy_batches(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 5))
    dtype = draw(DTYPES)
    mask = [[draw(st.booleans()) for _ in range(t)] for _ in range(b)]
    if draw(st.booleans()):
        mask[0] = [False] * t  # an empty row
    if b > 1 and draw(st.booleans()):
        mask[1] = [True] + [False] * (t - 1)  # a length-1 response
    if draw(st.integers(0, 9)) == 0:
        mask = [[False] * t for _ in range(b)]  # nothing valid at all
    old = [[draw(st.floats(-30, 0, allow_nan=False)) for _ in range(t)] for _ in range(b)]
    lr = [[draw(log_ratio) for _ in range(t)] for _ in range(b)]
    per_token = draw(st.booleans())
    adv = ([[draw(adv_value) for _ in range(t)] for _ in range(b)] if per_token
           else [draw(adv_value) for _ in range(b)])
    old_t = torch.tensor(old, dtype=torch.float64)
    logp = (old_t + torch.tensor(lr, dtype=torch.float64)).to(dtype).requires_grad_()
    return logp, old_t.to(dtype), torch.tensor(adv, dtype=dtype), torch.tensor(mask)


def _assert_finite(out, *leaves):
    assert torch.isfinite(out.loss).all(), out.loss
    for key, value in out.metrics.items():
        assert value.dim() == 0 and torch.isfinite(value.float()), (key, value)
    out.loss.backward()
    for leaf in leaves:
        assert leaf.grad is None or torch.isfinite(leaf.grad.float()).all(), leaf.grad
    if not out.metrics:
        raise AssertionError("no metrics")


def _empty(mask):
    return not bool(mask.any())


@SETTINGS
@given(policy_batches(), st.sampled_from(MODES), st.sampled_from([None, 3.0]))
def test_fuzz_ppo(batch, mode, dual_c):
    logp, old, adv, mask = batch
    out = O.ppo_loss(logp, old, adv, mask, dual_clip_c=dual_c, loss_agg_mode=mode)
    _assert_finite(out, logp)
    if _empty(mask):
        assert out.loss.item() == 0.0


@SETTINGS
@given(policy_batches(), st.sampled_from(MODES + ("seq-mean-token-sum-norm",)), st.sampled_from(["k1", "k2", "k3"]))
def test_fuzz_grpo_with_kl(batch, mode, estimator):
    logp, old, adv, mask = batch
    ref_logp = old - 40.0  # an extreme reference
    out = O.grpo_loss(logp, old, adv, mask, ref_logp=ref_logp, kl_coef=0.04, kl_estimator=estimator,
                      loss_agg_mode=mode, norm_len=7 if mode.endswith("norm") else None)
    _assert_finite(out, logp)
    if _empty(mask):
        assert out.loss.item() == 0.0


@SETTINGS
@given(policy_batches())
def test_fuzz_dr_grpo_and_dapo(batch):
    logp, old, adv, mask = batch
    for out in (O.dr_grpo_loss(logp, old, adv, mask, norm_len=5), O.dapo_loss(logp, old, adv, mask)):
        logp.grad = None
        _assert_finite(out, logp)


@SETTINGS
@given(policy_batches())
def test_fuzz_gspo(batch):
    logp, old, adv, mask = batch
    seq_adv = adv if adv.dim() == 1 else adv[:, 0].contiguous()
    out = O.gspo_loss(logp, old, seq_adv, mask)
    _assert_finite(out, logp)
    logp.grad = None
    _assert_finite(O.gspo_token_loss(logp, old, adv, mask), logp)
    if _empty(mask):
        assert out.loss.item() == 0.0


@SETTINGS
@given(policy_batches(), st.sampled_from(MODES))
def test_fuzz_sapo(batch, mode):
    logp, old, adv, mask = batch
    _assert_finite(O.sapo_loss(logp, old, adv, mask, loss_agg_mode=mode), logp)


@SETTINGS
@given(policy_batches(), st.sampled_from(MODES), st.sampled_from([None, 0.2]), st.sampled_from([0.0, 0.28, 4.0]))
def test_fuzz_cispo(batch, mode, eps_low, eps_high):
    logp, old, adv, mask = batch
    out = O.cispo_loss(logp, old, adv, mask, clip_eps_low=eps_low, clip_eps_high=eps_high, loss_agg_mode=mode)
    _assert_finite(out, logp)
    if _empty(mask):
        assert out.loss.item() == 0.0


@SETTINGS
@given(policy_batches(), st.sampled_from([0.0, 0.4, 50.0]))
def test_fuzz_gmpo(batch, eps):
    logp, old, adv, mask = batch
    seq_adv = adv if adv.dim() == 1 else adv[:, 0].contiguous()
    out = O.gmpo_loss(logp, old, seq_adv, mask, clip_eps_low=eps)
    _assert_finite(out, logp)
    if _empty(mask):
        assert out.loss.item() == 0.0


@SETTINGS
@given(policy_batches(), st.sampled_from([None, 2.0]), st.integers(0, 8))
def test_fuzz_decoupled_and_a3po(batch, cap, staleness):
    logp, old, adv, mask = batch
    behav = old - 45.0  # a very stale behaviour policy
    out = O.decoupled_ppo_loss(logp, behav, old, adv, mask, behav_weight_cap=cap)
    _assert_finite(out, logp)
    logp.grad = None
    _assert_finite(O.a3po_loss(logp, behav, adv, mask, staleness, behav_weight_cap=cap), logp)


@SETTINGS
@given(policy_batches())
def test_fuzz_sppo_seq_and_value_loss(batch):
    logp, old, adv, mask = batch
    _assert_finite(O.sppo_seq_loss(logp, old, adv, mask), logp)
    values = (old * 2).detach().requires_grad_()
    _assert_finite(O.value_loss(values, old, logp.detach(), mask), values)
    values.grad = None
    _assert_finite(O.value_loss(values, old, logp.detach(), mask, clip_eps=None), values)


seq_logp = st.floats(-200, 0, allow_nan=False)


@SETTINGS
@given(st.integers(1, 5).flatmap(lambda b: st.tuples(*[st.lists(seq_logp, min_size=b, max_size=b)] * 4)),
       DTYPES, st.sampled_from(["sigmoid", "ipo"]), st.sampled_from([0.01, 0.1, 1.0, 10.0]),
       st.sampled_from([0.0, 0.2]))
def test_fuzz_dpo(vals, dtype, variant, beta, ls):
    c, r, c0, r0 = (torch.tensor(v, dtype=dtype) for v in vals)
    c.requires_grad_()
    r.requires_grad_()
    ls = ls if variant == "sigmoid" else 0.0
    _assert_finite(O.dpo_loss(c, r, c0, r0, dpo_beta=beta, variant=variant, label_smoothing=ls), c, r)


@SETTINGS
@given(st.lists(st.tuples(seq_logp, seq_logp, st.floats(0, 1), st.floats(-50, 50, allow_nan=False),
                          st.floats(0, 1)), min_size=1, max_size=6), DTYPES)
def test_fuzz_sppo_selfplay_and_sequence_value(rows, dtype):
    logp, ref_lp, win, z, y = (torch.tensor(col, dtype=dtype) for col in zip(*rows))
    logp.requires_grad_()
    z.requires_grad_()
    _assert_finite(O.sppo_selfplay_loss(logp, ref_lp, win), logp)
    _assert_finite(O.sequence_value_loss(z, y), z)


# ------------------------------------------------------------------------------------------- functional


@SETTINGS
@given(st.integers(2, 5), st.integers(1, 4), st.data(), st.sampled_from([torch.float32, torch.float64,
                                                                          torch.bfloat16]))
def test_fuzz_group_advantages_zero_variance(group_size, n_groups, data, dtype):
    groups = []
    for _ in range(n_groups):
        if data.draw(st.booleans()):
            groups.append([data.draw(st.floats(-100, 100, allow_nan=False))] * group_size)
        else:
            groups.append(data.draw(st.lists(st.floats(-100, 100, allow_nan=False), min_size=group_size,
                                             max_size=group_size)))
    rewards = torch.tensor([x for g in groups for x in g], dtype=dtype)
    grouped = rewards.reshape(n_groups, group_size)
    for adv_norm in F.ADV_NORMS:
        out = F.group_advantages(rewards, group_size, adv_norm=adv_norm)
        assert torch.isfinite(out).all()
        if adv_norm == "batch":  # centred on the batch mean: only a flat batch is exactly zero
            if bool((rewards == rewards[0]).all()):
                assert torch.all(out == 0), (adv_norm, rewards)
            continue
        for k in range(n_groups):
            if bool((grouped[k] == grouped[k, 0]).all()):
                assert torch.all(out[k * group_size:(k + 1) * group_size] == 0), (adv_norm, grouped[k])


@SETTINGS
@given(st.lists(st.floats(-60, 60, allow_nan=False), min_size=1, max_size=8), st.floats(-60, 60, allow_nan=False),
       DTYPES)
def test_fuzz_k3_nonnegative(logps, shift, dtype):
    # k3 = (rho - 1) - log rho >= 0 exactly; tiny log-ratios are where a naive exp(x) - 1 - x goes negative
    logp = torch.tensor([logps], dtype=dtype)
    ref_logp = logp + shift
    for estimator in ("k2", "k3"):
        assert torch.all(F.kl_penalty(logp, ref_logp, estimator) >= 0)
    assert torch.all(F.kl_penalty(logp, ref_logp.flip(-1), "k3") >= 0)


def test_k3_nonnegative_for_tiny_log_ratio():
    logp = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    ref_logp = torch.tensor([[1e-250, 1e-12, -1e-12, 3e-9]], dtype=torch.float64)
    assert torch.all(F.kl_penalty(logp, ref_logp, "k3") >= 0)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 6), st.integers(2, 9), st.integers(1, 8), st.data(),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_fuzz_selective_log_softmax(b, t, v, chunk, data, dtype):
    scale = data.draw(st.sampled_from([1.0, 30.0]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    logits = (scale * torch.randn(b, t, v, generator=g)).to(dtype)
    index = torch.randint(0, v, (b, t), generator=g)
    out = F.selective_log_softmax(logits, index, chunk_size=chunk)
    naive = torch.log_softmax(logits.double(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(out.double(), naive, atol=1e-5 * max(1.0, scale / 10), rtol=0)
    ent = F.entropy_from_logits(logits, chunk_size=chunk)
    assert torch.isfinite(ent).all() and torch.all(ent >= -1e-5) and torch.all(ent <= math.log(v) + 1e-4)
