"""xxpo.functional against independent float64 loops (algorithms.md sections 2, 4, 14)."""

import math

import pytest
import torch

import xxpo.functional as F

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

RAGGED = [
    [1, 1, 1, 1],
    [1, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 1, 0, 1],
]


def _close(a, b, tol=1e-10):
    a = a.item() if isinstance(a, torch.Tensor) else a
    return abs(float(a) - float(b)) <= tol * (1 + abs(float(b)))


# ---------------------------------------------------------------- log-probs and entropy


def _naive_logp(logits, index):
    lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return lp.gather(-1, index.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_selective_log_softmax_matches_naive(dtype, chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(5, 4, 11, generator=g)).to(dtype)  # (B, T, V): 20 rows, chunk < rows
    index = torch.randint(0, 11, (5, 4), generator=g)
    out = F.selective_log_softmax(logits, index, chunk_size=chunk_size)
    assert out.shape == (5, 4)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = _naive_logp(logits, index)  # float64 of the (possibly rounded) bf16 input
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=0)


def test_selective_log_softmax_2d_and_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)  # (N, V)
    index = torch.randint(0, 9, (6,), generator=g)
    F.selective_log_softmax(logits, index, chunk_size=4).sum().backward()
    # d/dz_j of sum_n log softmax(z_n)[i_n] = 1[j = i_n] - softmax(z_n)_j
    p = torch.softmax(logits.detach(), -1)
    expected = -p
    expected[torch.arange(6), index] += 1
    assert torch.allclose(logits.grad, expected, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_entropy_from_logits(dtype, chunk_size):
    g = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(3, 4, 7, generator=g)).to(dtype)
    out = F.entropy_from_logits(logits, chunk_size=chunk_size)
    assert out.shape == (3, 4)
    z = logits.double().tolist()
    for i in range(3):
        for t in range(4):
            m = max(z[i][t])
            e = [math.exp(v - m) for v in z[i][t]]
            s = sum(e)
            h = -sum(x / s * math.log(x / s) for x in e)
            assert abs(out[i, t].item() - h) < 1e-5


def test_entropy_uniform_and_onehot():
    logits = torch.zeros(2, 8)
    assert torch.allclose(F.entropy_from_logits(logits), torch.full((2,), math.log(8)), atol=1e-6, rtol=0)
    peaked = torch.tensor([[0.0, -1e4, -1e4]])
    assert abs(F.entropy_from_logits(peaked).item()) < 1e-6


# ---------------------------------------------------------------- masked reductions and aggregation


def test_masked_sum_and_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0]],
                     dtype=torch.float64)
    m = torch.tensor(RAGGED, dtype=torch.float64)
    assert F.masked_sum(x, m).item() == 1 + 2 + 3 + 4 + 5 + 2 + 4
    assert _close(F.masked_mean(x, m), 21 / 7)
    assert F.masked_sum(x, m, dim=-1).tolist() == [10.0, 5.0, 0.0, 6.0]
    assert F.masked_mean(x, m, dim=-1).tolist() == [2.5, 5.0, 0.0, 3.0]  # 0 where no valid entry
    assert F.masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_masked_mean_ignores_nonfinite_padding():
    x = torch.tensor([[1.0, float("inf")], [2.0, float("nan")]])
    m = torch.tensor([[1, 0], [1, 0]])
    assert F.masked_mean(x, m).item() == 1.5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", ["float", "bool", "int"])
def test_aggregate_matches_loop(ref, mode, mask_kind):
    g = torch.Generator().manual_seed(3)
    loss = torch.randn(4, 4, generator=g, dtype=torch.float64)
    loss[torch.tensor(RAGGED) == 0] = 1e6  # padding garbage must not leak
    mask = torch.tensor(RAGGED, dtype={"float": torch.float64, "bool": torch.bool, "int": torch.int64}[mask_kind])
    norm_len = 6 if mode == "seq-mean-token-sum-norm" else None
    out = F.aggregate(loss, mask, mode, norm_len=norm_len)
    assert out.dim() == 0
    assert _close(out, ref.aggregate(loss.tolist(), RAGGED, mode, norm_len))


def test_aggregate_explicit_values():
    # rows: [1,2,3,4] (4 tokens), [5] (1 token), empty, [2,4] (2 tokens); B = 4, 3 non-empty rows
    loss = torch.tensor([[1.0, 2, 3, 4], [5, 0, 0, 0], [7, 7, 7, 7], [0, 2, 0, 4]], dtype=torch.float64)
    m = torch.tensor(RAGGED)
    assert _close(F.aggregate(loss, m, "token-mean"), 21 / 7)
    assert _close(F.aggregate(loss, m, "seq-mean-token-mean"), (2.5 + 5 + 3) / 3)
    assert _close(F.aggregate(loss, m, "seq-mean-token-sum"), (10 + 5 + 6) / 3)
    assert _close(F.aggregate(loss, m, "seq-mean-token-sum-norm", norm_len=5), 21 / (4 * 5))


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_gradient_is_mask_over_normalizer(ref, mode):
    loss = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    norm_len = 6 if mode == "seq-mean-token-sum-norm" else None
    F.aggregate(loss, torch.tensor(RAGGED), mode, norm_len=norm_len).backward()
    expected = torch.tensor(ref.agg_weights(RAGGED, mode, norm_len), dtype=torch.float64)
    assert torch.allclose(loss.grad, expected, rtol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_empty_batch_is_zero_not_nan(mode):
    loss = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = F.aggregate(loss, torch.zeros(3, 4), mode, norm_len=4 if mode.endswith("norm") else None)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(3, 4, dtype=torch.float64))


def test_aggregate_modes_constant():
    assert tuple(F.LOSS_AGG_MODES) == MODES


# ---------------------------------------------------------------- ratios


def test_token_log_ratio_clamps_and_detaches_old():
    logp = torch.tensor([[0.0, -30.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-25.0, 0.0, -1.5]], dtype=torch.float64, requires_grad=True)
    out = F.token_log_ratio(logp, old)
    assert out.tolist() == [[20.0, -20.0, 0.5]]
    assert F.LOG_RATIO_CLAMP == 20.0
    out.sum().backward()
    assert logp.grad.tolist() == [[0.0, 0.0, 1.0]]  # clamp blocks the gradient outside [-20, 20]
    assert old.grad is None


def test_sequence_log_ratio(ref):
    g = torch.Generator().manual_seed(4)
    logp = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    old = torch.randn(4, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor(RAGGED)
    out = F.sequence_log_ratio(logp, old, mask)
    lp, o = logp.tolist(), old.tolist()
    for i, row in enumerate(RAGGED):
        idx = [t for t, m in enumerate(row) if m]
        exp = sum(lp[i][t] - o[i][t] for t in idx) / len(idx) if idx else 0.0
        assert _close(out[i], exp)
    out.sum().backward()
    n = [sum(r) for r in RAGGED]
    expected = [[(m / n[i] if m else 0.0) for m in row] for i, row in enumerate(RAGGED)]
    assert torch.allclose(logp.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-9)


def test_sequence_log_ratio_clamped():
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[-50.0, -40.0]], dtype=torch.float64)
    assert F.sequence_log_ratio(logp, old, torch.ones(1, 2)).item() == 20.0
    assert F.sequence_log_ratio(-old, -logp, torch.ones(1, 2)).item() == 20.0
    assert F.sequence_log_ratio(old, logp, torch.ones(1, 2)).item() == -20.0


# ---------------------------------------------------------------- advantages


def _token_list_advantages(rewards, g, adv_norm, eps, unbiased, lengths=None):
    """Plain-Python oracle: every response's reward repeated once per counted token (once per response
    without ``lengths``), then means and stds over those lists, as the docstring's formulas read."""
    n = len(rewards)
    lengths = [1] * n if lengths is None else lengths
    groups = [list(range(k, k + g)) for k in range(0, n, g)]

    def tokens(idx):
        return [rewards[i] for i in idx for _ in range(lengths[i])]

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    def std(devs):
        d = len(devs) - 1 if unbiased else len(devs)
        return math.sqrt(sum(x * x for x in devs) / d) if d > 0 else 1.0

    everything = tokens(range(n))
    m, flat_batch = mean(everything), len(set(rewards)) == 1
    s = std([x - m for x in everything])
    out = [0.0] * n
    if adv_norm == "batch":
        for i in range(n):
            out[i] = 0.0 if flat_batch else (rewards[i] - m) / (s + eps)
    else:
        m_g = {}
        for idx in groups:
            flat = len({rewards[i] for i in idx}) == 1
            for i in idx:
                m_g[i] = rewards[i] if flat else mean(tokens(idx))
        residual_std = std([rewards[i] - m_g[i] for i in range(n) for _ in range(lengths[i])])
        for idx in groups:
            s_g = std([x - m_g[idx[0]] for x in tokens(idx)])
            for i in idx:
                dev = rewards[i] - m_g[i]
                scale = {"group": s_g + eps, "group_mean_batch_std": s + eps,
                         "group_mean_residual_std": residual_std + eps, "none": 1.0}[adv_norm]
                out[i] = dev / scale if dev else 0.0
    return [0.0 if lengths[i] == 0 else out[i] for i in range(n)]


@pytest.mark.parametrize("adv_norm", F.ADV_NORMS)
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 1e-4, 0.5])
def test_group_advantages(adv_norm, unbiased, eps):
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.25]
    out = F.group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, adv_norm=adv_norm, eps=eps,
                             unbiased=unbiased)
    expected = _token_list_advantages(rewards, 4, adv_norm, eps, unbiased)
    assert out.shape == (12,)
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("adv_norm", ["group", "none"])
def test_group_advantages_agree_with_the_shared_oracle(ref, adv_norm):
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.25]
    out = F.group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, adv_norm=adv_norm)
    assert torch.allclose(out, torch.tensor(ref.group_advantages(rewards, 4, adv_norm), dtype=torch.float64),
                          atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("adv_norm", F.ADV_NORMS)
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_token_weighted(adv_norm, unbiased):
    """mask: each response counts once per valid token (AReaL normalizes per-token advantages)."""
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.25]
    lengths = [3, 1, 4, 2, 2, 5, 1, 3, 4, 0, 2, 1]  # one response without valid tokens
    mask = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    out = F.group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, adv_norm=adv_norm, eps=1e-5,
                             unbiased=unbiased, mask=mask)
    expected = _token_list_advantages(rewards, 4, adv_norm, 1e-5, unbiased, lengths)
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    assert out[9] == 0  # no valid token
    unweighted = F.group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, adv_norm=adv_norm, eps=1e-5,
                                    unbiased=unbiased)
    assert not torch.allclose(out, unweighted)  # the weights matter for every variant
    r = torch.tensor(rewards, dtype=torch.float64)
    equal_lengths = torch.ones(12, 3, dtype=torch.bool)  # biased std: the same as one count per response
    assert torch.allclose(F.group_advantages(r, 4, adv_norm=adv_norm, unbiased=False, mask=equal_lengths),
                          F.group_advantages(r, 4, adv_norm=adv_norm, unbiased=False), atol=1e-12, rtol=1e-9)


def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    # mean 0.25; unbiased std = sqrt((0.5625 + 3*0.0625)/3) = 0.5
    out = F.group_advantages(r, 4, adv_norm="group", eps=0.0)
    assert torch.allclose(out, torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64), rtol=1e-9)
    out = F.group_advantages(r, 4, adv_norm="group", eps=0.0, unbiased=False)
    s = math.sqrt(0.75 / 4)
    expected = torch.tensor([0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s], dtype=torch.float64)
    assert torch.allclose(out, expected, rtol=1e-9)
    assert torch.allclose(F.group_advantages(r, 4, adv_norm="none"),
                          torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64), rtol=1e-9)


def test_batch_scale_variants_hand_values():
    # group means 0.25 and 0.75; batch mean 0.5. Raw rewards: 8 deviations of 0.5 -> unbiased std sqrt(2/7).
    # Residuals R - m_g: two of 0.75, six of 0.25 -> sum of squares 1.5 -> unbiased std sqrt(1.5/7).
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    resid = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75], dtype=torch.float64)
    raw_std, resid_std = math.sqrt(2 / 7), math.sqrt(1.5 / 7)
    assert torch.allclose(F.group_advantages(r, 4, "group_mean_batch_std", eps=0.0), resid / raw_std, rtol=1e-12)
    assert torch.allclose(F.group_advantages(r, 4, "group_mean_residual_std", eps=0.0), resid / resid_std,
                          rtol=1e-12)
    assert torch.allclose(F.group_advantages(r, 4, "batch", eps=0.0), (r - 0.5) / raw_std, rtol=1e-12)
    # the three differ: this batch tells them apart
    outs = [F.group_advantages(r, 4, m, eps=0.0) for m in ("group_mean_batch_std", "group_mean_residual_std", "batch")]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


GROUP_CENTRED = [m for m in F.ADV_NORMS if m != "batch"]


@pytest.mark.parametrize("adv_norm", GROUP_CENTRED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.7, 5.0, -2.3])
def test_group_advantages_zero_variance_group_is_exactly_zero(adv_norm, dtype, value):
    rewards = torch.tensor([value] * 3 + [0.0, 1.0, 1.0], dtype=dtype)
    out = F.group_advantages(rewards, 3, adv_norm=adv_norm)
    assert torch.all(out[:3] == 0)
    assert torch.all(out[3:] != 0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [0.1, 1 / 3, 5.0])
def test_batch_norm_keeps_signal_of_flat_groups_and_zeroes_a_flat_batch(dtype, value):
    rewards = torch.tensor([value] * 3 + [0.0, 1.0, 1.0], dtype=dtype)
    out = F.group_advantages(rewards, 3, adv_norm="batch")
    assert torch.all(out[:3] == out[0]) and out[0] != 0  # a flat group is compared with the batch mean
    flat = F.group_advantages(torch.full((6,), value, dtype=dtype), 3, adv_norm="batch", eps=0.0)
    assert torch.all(flat == 0)


def test_leave_one_out(ref):
    rewards = [1.0, 0.0, 2.0, 5.0, 3.0, 3.0, -1.0, 7.0]
    for g in (2, 4):
        out = F.leave_one_out_advantages(torch.tensor(rewards, dtype=torch.float64), g)
        assert torch.allclose(out, torch.tensor(ref.leave_one_out(rewards, g), dtype=torch.float64), rtol=1e-9)
    # hand: group [1, 0, 2, 5]: 1 - (0+2+5)/3 = -4/3
    assert _close(F.leave_one_out_advantages(torch.tensor(rewards[:4], dtype=torch.float64), 4)[0], -4 / 3)


@pytest.mark.parametrize("with_mask", [True, False])
def test_batch_whiten(with_mask):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.tensor(RAGGED) if with_mask else None
    out = F.batch_whiten(x, mask, eps=1e-8)
    m = RAGGED if with_mask else [[1] * 4] * 4
    vals = [x[i, t].item() for i in range(4) for t in range(4) if m[i][t]]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / len(vals)  # biased
    for i in range(4):
        for t in range(4):
            exp = (x[i, t].item() - mu) / math.sqrt(var + 1e-8) if m[i][t] else 0.0
            assert _close(out[i, t], exp)


GAE_MASK = [
    [1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0],
    [1, 0, 1, 1, 0],  # a hole at t=1
    [0, 0, 0, 0, 0],
]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.97), (0.9, 1.0), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_skipping_loop(ref, gamma, lam):
    g = torch.Generator().manual_seed(6)
    rewards = torch.randn(4, 5, generator=g, dtype=torch.float64)
    values = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(GAE_MASK, dtype=torch.float64)
    adv, ret = F.gae(rewards, values, mask, gamma=gamma, lam=lam)
    e_adv, e_ret = ref.gae(rewards.tolist(), values.tolist(), GAE_MASK, gamma, lam)
    assert torch.allclose(adv, torch.tensor(e_adv, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    assert torch.allclose(ret, torch.tensor(e_ret, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    assert not ret.requires_grad and not adv.requires_grad


def test_gae_hole_hand_value():
    # row [r0, hole, r2] with gamma = lam = 1: A_2 = r2 - V2; A_0 = r0 + V2 - V0 + A_2 = r0 + r2 - V0
    rewards = torch.tensor([[1.0, 100.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 100.0, 0.25]], dtype=torch.float64)
    adv, ret = F.gae(rewards, values, torch.tensor([[1, 0, 1]]), gamma=1.0, lam=1.0)
    assert adv.tolist() == [[2.5, 0.0, 1.75]]
    assert ret.tolist() == [[3.0, 0.0, 2.0]]


def test_sequence_value_advantages():
    r = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    v = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, requires_grad=True)
    out = F.sequence_value_advantages(r, v)
    assert out.tolist() == [0.75, -0.5, 0.25]
    assert not out.requires_grad


def test_token_rewards_from_outcome():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    mask = torch.tensor(GAE_MASK)
    out = F.token_rewards_from_outcome(rewards, mask)
    expected = [[0, 0, 0, 0, 1.0], [0, 0, 2.0, 0, 0], [0, 0, 0, 3.0, 0], [0, 0, 0, 0, 0]]
    assert out.tolist() == expected
    kl = torch.arange(20, dtype=torch.float64).reshape(4, 5) / 10
    out = F.token_rewards_from_outcome(rewards, mask, kl=kl, kl_coef=0.5)
    for i in range(4):
        for t in range(5):
            exp = (expected[i][t] - 0.5 * kl[i, t].item()) if GAE_MASK[i][t] else 0.0
            assert _close(out[i, t], exp)


# ---------------------------------------------------------------- KL estimators


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_value_and_gradient(ref, estimator):
    g = torch.Generator().manual_seed(7)
    logp = (torch.randn(3, 4, generator=g, dtype=torch.float64) - 1).requires_grad_()
    ref_logp = (torch.randn(3, 4, generator=g, dtype=torch.float64) - 1).requires_grad_()
    with torch.no_grad():
        logp[0, 0] = ref_logp[0, 0] - 30  # outside the clamp: log_rho = +20, no gradient
    out = F.kl_penalty(logp, ref_logp, estimator)
    out.sum().backward()
    for i in range(3):
        for t in range(4):
            v, d = ref.kl_token(logp[i, t].item(), ref_logp[i, t].item(), estimator)
            assert _close(out[i, t], v)
            assert _close(logp.grad[i, t], d)
    assert ref_logp.grad is None


def test_kl_estimators_hand_values():
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    ref_logp = torch.tensor([[math.log(0.25)]], dtype=torch.float64)  # rho = 0.5, log rho = -log 2
    assert _close(F.kl_penalty(logp, ref_logp, "k1"), math.log(2))
    assert _close(F.kl_penalty(logp, ref_logp, "k2"), 0.5 * math.log(2) ** 2)
    assert _close(F.kl_penalty(logp, ref_logp, "k3"), 0.5 - 1 + math.log(2))
    assert tuple(F.KL_ESTIMATORS) == ("k1", "k2", "k3")


def test_is_corrected_k3_value_and_gradient():
    g = torch.Generator().manual_seed(8)
    logp = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_()
    ref_logp = torch.randn(2, 3, generator=g, dtype=torch.float64)
    old = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_()
    out = F.is_corrected_k3(logp, ref_logp, old)
    out.sum().backward()
    for i in range(2):
        for t in range(3):
            lp, rf, o = logp[i, t].item(), ref_logp[i, t].item(), old[i, t].item()
            w = math.exp(lp - o)
            k3 = math.exp(rf - lp) - 1 - (rf - lp)
            assert _close(out[i, t], w * k3)
            assert _close(logp.grad[i, t], w * k3 + w * (1 - math.exp(rf - lp)))
    assert old.grad is None


# Exact expectations by enumeration over a small categorical softmax policy (section 14.1).

K = 5


def _policy():
    g = torch.Generator().manual_seed(9)
    theta = torch.randn(K, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(K, generator=g, dtype=torch.float64)
    old_logits = torch.randn(K, generator=g, dtype=torch.float64)
    return theta, torch.log_softmax(ref_logits, 0), torch.log_softmax(old_logits, 0)


def _exact_kls(theta, ref_logp):
    pi = [math.exp(v) for v in torch.log_softmax(theta, 0).tolist()]
    rho = [math.exp(v) for v in ref_logp.tolist()]
    rev = sum(p * math.log(p / q) for p, q in zip(pi, rho))  # KL(pi || ref)
    # closed-form softmax gradients: d KL(pi||ref)/d theta_j = pi_j (log(pi_j/ref_j) - KL);
    # d KL(ref||pi)/d theta_j = pi_j - ref_j
    g_rev = [p * (math.log(p / q) - rev) for p, q in zip(pi, rho)]
    g_fwd = [p - q for p, q in zip(pi, rho)]
    return pi, rev, g_rev, g_fwd


def _expected_grad(theta, weights, per_sample):
    """sum_x weights[x] * grad_theta per_sample(logp)[x] with the sampling weights held fixed."""
    th = theta.clone().requires_grad_()
    logp = torch.log_softmax(th, 0).reshape(1, K)  # (1, K): each column is one outcome x
    (per_sample(logp).reshape(K) * torch.tensor(weights, dtype=torch.float64)).sum().backward()
    return th.grad.tolist()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_k3_unbiased_in_expectation(estimator):
    theta, ref_logp, _ = _policy()
    pi, rev, _, _ = _exact_kls(theta, ref_logp)
    k = F.kl_penalty(torch.log_softmax(theta, 0).reshape(1, K), ref_logp.reshape(1, K), estimator).reshape(K)
    assert _close(sum(p * v for p, v in zip(pi, k.tolist())), rev)


def test_k2_is_biased_and_k3_nonnegative():
    theta, ref_logp, _ = _policy()
    pi, rev, _, _ = _exact_kls(theta, ref_logp)
    lp = torch.log_softmax(theta, 0).reshape(1, K)
    k2 = F.kl_penalty(lp, ref_logp.reshape(1, K), "k2").reshape(K)
    assert abs(sum(p * v for p, v in zip(pi, k2.tolist())) - rev) > 1e-3
    k3 = F.kl_penalty(lp, ref_logp.reshape(1, K), "k3")
    assert torch.all(k3 >= 0)


def test_expected_gradient_k1_is_zero():
    theta, ref_logp, _ = _policy()
    pi, _, _, _ = _exact_kls(theta, ref_logp)
    g = _expected_grad(theta, pi, lambda lp: F.kl_penalty(lp, ref_logp.reshape(1, K), "k1"))
    assert max(abs(v) for v in g) < 1e-12


def test_expected_gradient_k2_is_reverse_kl_gradient():
    theta, ref_logp, _ = _policy()
    pi, _, g_rev, g_fwd = _exact_kls(theta, ref_logp)
    g = _expected_grad(theta, pi, lambda lp: F.kl_penalty(lp, ref_logp.reshape(1, K), "k2"))
    assert all(_close(a, b, 1e-9) for a, b in zip(g, g_rev))
    assert max(abs(a - b) for a, b in zip(g_rev, g_fwd)) > 1e-2  # the two targets differ here


def test_expected_gradient_k3_is_forward_kl_gradient():
    theta, ref_logp, _ = _policy()
    pi, _, g_rev, g_fwd = _exact_kls(theta, ref_logp)
    g = _expected_grad(theta, pi, lambda lp: F.kl_penalty(lp, ref_logp.reshape(1, K), "k3"))
    assert all(_close(a, b, 1e-9) for a, b in zip(g, g_fwd))
    assert max(abs(a - b) for a, b in zip(g, g_rev)) > 1e-2


def test_expected_gradient_is_corrected_k3_is_reverse_kl_gradient():
    theta, ref_logp, old_logp = _policy()
    _, _, g_rev, _ = _exact_kls(theta, ref_logp)
    old_probs = [math.exp(v) for v in old_logp.tolist()]  # samples come from pi_old
    g = _expected_grad(theta, old_probs,
                       lambda lp: F.is_corrected_k3(lp, ref_logp.reshape(1, K), old_logp.reshape(1, K)))
    assert all(_close(a, b, 1e-9) for a, b in zip(g, g_rev))


# ---------------------------------------------------------------- where the log-ratio clamp changes a loss


def _one_token(log_ratio, adv):
    logp = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    return logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1)


def test_clamp_caps_ppo_only_on_the_side_the_clip_leaves_open():
    import xxpo.objectives as O

    logp, old, adv, mask = _one_token(25.0, -1.0)  # A < 0, r = e^25: PPO's unclipped term -r A
    out = O.ppo_loss(logp, old, adv, mask)
    out.loss.backward()
    assert abs(out.loss.item() - math.exp(20.0)) < 1e-6 * math.exp(20.0)  # capped at -e^20 A, not e^25
    assert logp.grad.item() == 0.0
    logp, old, adv, mask = _one_token(25.0, -1.0)  # with dual clip the cap -c A binds first: no change
    out = O.ppo_loss(logp, old, adv, mask, dual_clip_c=3.0)
    out.loss.backward()
    assert abs(out.loss.item() - 3.0) < 1e-12 and logp.grad.item() == 0.0
    logp, old, adv, mask = _one_token(25.0, 1.0)  # A > 0: clipped at 1 + eps whatever the clamp
    out = O.ppo_loss(logp, old, adv, mask)
    out.loss.backward()
    assert abs(out.loss.item() + 1.2) < 1e-12 and logp.grad.item() == 0.0
    assert abs(out.metrics["ratio_max"].item() - math.exp(20.0)) < 1e-6 * math.exp(20.0)  # logged clamped


def test_clamp_bounds_the_behaviour_weight_and_caps_gspo_token_weight():
    import xxpo.objectives as O

    logp, _, adv, mask = _one_token(-1.0, 1.0)
    behav = torch.tensor([[-26.0]], dtype=torch.float64)  # log pi_prox/pi_behav = 25: weight e^20, not e^25
    out = O.decoupled_ppo_loss(logp, behav, logp.detach().clone(), adv, mask)
    assert abs(out.metrics["behav_weight_max"].item() - math.exp(20.0)) < 1e-6 * math.exp(20.0)
    logp, old, adv, mask = _one_token(25.0, -1.0)  # GSPO-token: the gradient keeps flowing, weight e^20
    out = O.gspo_token_loss(logp, old, adv, mask)
    out.loss.backward()
    assert abs(logp.grad.item() - math.exp(20.0)) < 1e-6 * math.exp(20.0)
    logp, old, adv, mask = _one_token(25.0, -1.0)  # GSPO: the sequence's gradient is zeroed
    out = O.gspo_loss(logp, old, adv, mask)
    out.loss.backward()
    assert logp.grad.item() == 0.0 and abs(out.loss.item() - math.exp(20.0)) < 1e-6 * math.exp(20.0)
