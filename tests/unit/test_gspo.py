"""gspo_loss and gspo_token_loss (algorithms.md section 9)."""

import math

import pytest
import torch

from xxpo.objectives import gspo_loss, gspo_token_loss

SEQ_METRICS = ("seq_clip_frac_low", "seq_clip_frac_high", "clip_frac_low", "clip_frac_high", "clip_frac",
               "ratio_mean", "ratio_min", "ratio_max")
TOKEN_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "ratio_min", "ratio_max")

# rows: 5 tokens, 2 tokens, 3 tokens with a hole, empty, 1 token, 4 tokens
MASK = [
    [1, 1, 1, 1, 1],
    [1, 1, 0, 0, 0],
    [1, 0, 1, 1, 0],
    [0, 0, 0, 0, 0],
    [1, 0, 0, 0, 0],
    [1, 1, 1, 1, 0],
]


def _check_metrics(metrics, expected, names, tol=1e-6):
    for name in names:
        v = metrics[name]
        assert v.dim() == 0 and not v.requires_grad, name
        assert abs(v.item() - expected[name]) <= tol * (1 + abs(expected[name])), (name, v.item(), expected[name])


def _batch(seq_ratios, adv, seed=41, per_token_adv=False):
    """Token log-ratios with a prescribed sequence ratio per row (the masked mean of the token log-ratios)."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(MASK), len(MASK[0])
    old = -0.5 - torch.rand(b, t, generator=g, dtype=torch.float64)  # (B, T)
    noise = 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    lr = torch.zeros(b, t, dtype=torch.float64)
    for i, row in enumerate(MASK):
        idx = [k for k, m in enumerate(row) if m]
        for k in range(t):
            lr[i, k] = 4.0  # poison at padding
        if idx:
            centred = noise[i, idx] - noise[i, idx].mean()
            lr[i, idx] = math.log(seq_ratios[i]) + centred
    logp = old + lr
    mask = torch.tensor(MASK, dtype=torch.float64)
    if per_token_adv:
        a = torch.randn(b, t, generator=g, dtype=torch.float64)
    else:
        a = torch.tensor(adv, dtype=torch.float64)
    return logp, old, a, mask


# sequence ratios chosen away from 1 - 3e-4 and 1 + 4e-4: in range, clipped low/high (with both signs of A)
SEQ_RATIOS = [1.0001, 0.9985, 1.0025, 1.0, 0.9995, 1.00005]
ADV = [1.0, -0.5, 2.0, 0.7, -1.5, -0.3]


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.2, 0.2), (1e-3, 2e-3)])
@pytest.mark.parametrize("seed", [41, 42])
def test_gspo_value_gradient_metrics(ref, tl, eps, seed):
    el, eh = eps
    logp, old, adv, mask = _batch(SEQ_RATIOS, ADV, seed)
    logp.requires_grad_()
    old.requires_grad_()
    out = gspo_loss(logp, old, adv, mask, clip_eps_low=el, clip_eps_high=eh)
    e_loss, e_grad, e_metrics = ref.gspo(tl(logp), tl(old), tl(adv), tl(mask), el, eh)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    assert old.grad is None
    _check_metrics(out.metrics, e_metrics, SEQ_METRICS)


def test_gspo_case_exercises_clipping(ref, tl):
    logp, old, adv, mask = _batch(SEQ_RATIOS, ADV)
    _, _, m = ref.gspo(tl(logp), tl(old), tl(adv), tl(mask))
    assert m["seq_clip_frac_low"] > 0 and m["seq_clip_frac_high"] > 0 and m["clip_frac"] < 1


def test_gspo_defaults_are_paper_values(ref, tl):
    logp, old, adv, mask = _batch(SEQ_RATIOS, ADV)
    e_loss, _, _ = ref.gspo(tl(logp), tl(old), tl(adv), tl(mask), 3e-4, 4e-4)
    assert abs(gspo_loss(logp, old, adv, mask).loss.item() - e_loss) < 1e-12


def test_gspo_hand_computed():
    # row 0: log-ratios (0.1, -0.1, 0.3) -> s = exp(0.1); A = 1, eps = 0.2: unclipped, l = -exp(0.1)
    # row 1: one token, log-ratio log(0.5), A = -1: clipped low, l = 0.8
    # row 2: empty (excluded from the mean)
    old = torch.zeros(3, 3, dtype=torch.float64)
    logp = torch.tensor([[0.1, -0.1, 0.3], [math.log(0.5), 9.0, 9.0], [9.0, 9.0, 9.0]], dtype=torch.float64,
                        requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    out = gspo_loss(logp, old, torch.tensor([1.0, -1.0, 3.0], dtype=torch.float64), mask,
                    clip_eps_low=0.2, clip_eps_high=0.2)
    s = math.exp(0.1)
    assert abs(out.loss.item() - (-s + 0.8) / 2) < 1e-12
    out.loss.backward()
    # d/dlogp_t of -s: -s / 3 per token of row 0, then / 2 rows
    expected = torch.tensor([[-s / 6] * 3, [0.0] * 3, [0.0] * 3], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected, rtol=1e-9)
    assert abs(out.metrics["seq_clip_frac_low"].item() - 0.5) < 1e-6
    assert abs(out.metrics["clip_frac_low"].item() - 0.25) < 1e-6  # 1 of 4 valid tokens
    assert abs(out.metrics["ratio_min"].item() - 0.5) < 1e-6


def test_gspo_rejects_token_advantages():
    logp, old, _, mask = _batch(SEQ_RATIOS, ADV)
    with pytest.raises(ValueError, match="gspo_token_loss"):
        gspo_loss(logp, old, torch.zeros_like(logp), mask)


def test_gspo_empty_batch():
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    out = gspo_loss(logp, logp.detach() - 1, torch.ones(2, dtype=torch.float64), torch.zeros(2, 3))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3, dtype=torch.float64))
    assert all(torch.isfinite(v) for v in out.metrics.values())


# ------------------------------------------------------------------------------------------- GSPO-token


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (1e-3, 2e-3)])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_gspo_token_value_gradient_metrics(ref, tl, eps, per_token_adv):
    el, eh = eps
    logp, old, adv, mask = _batch(SEQ_RATIOS, ADV, per_token_adv=per_token_adv)
    logp.requires_grad_()
    out = gspo_token_loss(logp, old, adv, mask, clip_eps_low=el, clip_eps_high=eh)
    e_loss, e_grad, e_metrics = ref.gspo_token(tl(logp), tl(old), tl(adv), tl(mask), el, eh)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    _check_metrics(out.metrics, e_metrics, TOKEN_METRICS)


def test_gspo_token_gradient_is_s_times_grad_logp():
    # one row, log-ratios (0.2, -0.1): s = exp(0.05); A_t = (1, 2), wide clip: l_t = -s A_t
    # d loss / d logp_t = -s A_t / 2 (token-mean within the row); the other token gets nothing
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.tensor([[0.2, -0.1]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    out = gspo_token_loss(logp, old, adv, torch.ones(1, 2), clip_eps_low=0.5, clip_eps_high=0.5)
    s = math.exp(0.05)
    assert abs(out.loss.item() + s * 1.5) < 1e-12
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-s / 2, -s]], dtype=torch.float64), rtol=1e-9)
