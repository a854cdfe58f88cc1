"""decoupled_ppo_loss, a3po_prox_logp and a3po_loss (algorithms.md sections 10, 11)."""

import math

import pytest
import torch

from xxpo.objectives import a3po_loss, a3po_prox_logp, decoupled_ppo_loss

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "approx_kl",
           "behav_weight_mean", "behav_weight_max")


def _check_metrics(metrics, expected, names, tol=1e-6):
    for name in names:
        v = metrics[name]
        assert v.dim() == 0 and not v.requires_grad, name
        assert abs(v.item() - expected[name]) <= tol * (1 + abs(expected[name])), (name, v.item(), expected[name])


def _three_policies(seed, policy_batch, spread=1.0, per_token_adv=False):
    """logp, behav, prox with prox between; the ratio logp/prox avoids the 0.8 and 1.2 clip edges."""
    logp, prox, adv, mask = policy_batch(seed, spread=spread, per_token_adv=per_token_adv)
    g = torch.Generator().manual_seed(seed + 1000)
    behav = prox - 0.7 * torch.randn(prox.shape, generator=g, dtype=torch.float64)  # stale policy
    return logp, behav, prox, adv, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cap", [None, 1.2, 3.0])
@pytest.mark.parametrize("eps", [(0.2, None), (0.2, 0.28)])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_decoupled_ppo_value_gradient_metrics(ref, policy_batch, tl, mode, cap, eps, per_token_adv):
    el, eh = eps
    if eh is not None:
        # re-draw with the right clip edges to avoid
        logp, prox, adv, mask = policy_batch(61, spread=1.0, per_token_adv=per_token_adv, avoid=(1 - el, 1 + eh))
        g = torch.Generator().manual_seed(1061)
        behav = prox - 0.7 * torch.randn(prox.shape, generator=g, dtype=torch.float64)
    else:
        logp, behav, prox, adv, mask = _three_policies(61, policy_batch, per_token_adv=per_token_adv)
    logp.requires_grad_()
    behav.requires_grad_()
    prox.requires_grad_()
    out = decoupled_ppo_loss(logp, behav, prox, adv, mask, clip_eps_low=el, clip_eps_high=eh,
                             behav_weight_cap=cap, loss_agg_mode=mode)
    e_loss, e_grad, e_m = ref.decoupled(tl(logp), tl(behav), tl(prox), tl(adv), tl(mask), el, eh, cap, mode)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    assert behav.grad is None and prox.grad is None  # the IS weight and the proximal policy are constants
    _check_metrics(out.metrics, e_m, METRICS)
    if cap is not None:
        assert e_m["behav_weight_max"] <= cap + 1e-12


def test_decoupled_hand_computed():
    # behav = -2, prox = -1.5, logp = -1.5 + log 1.1; A = 1: w = e^0.5, u = 1.1 (in range): l = -w * 1.1
    logp = torch.tensor([[-1.5 + math.log(1.1)]], dtype=torch.float64, requires_grad=True)
    out = decoupled_ppo_loss(logp, torch.tensor([[-2.0]], dtype=torch.float64),
                             torch.tensor([[-1.5]], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                             torch.ones(1, 1))
    w = math.exp(0.5)
    assert abs(out.loss.item() + w * 1.1) < 1e-12
    out.loss.backward()
    assert abs(logp.grad.item() + w * 1.1) < 1e-12
    assert abs(out.metrics["behav_weight_mean"].item() - w) < 1e-6
    assert abs(out.metrics["ratio_mean"].item() - 1.1) < 1e-6
    capped = decoupled_ppo_loss(logp, torch.tensor([[-2.0]], dtype=torch.float64),
                                torch.tensor([[-1.5]], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                                torch.ones(1, 1), behav_weight_cap=1.2)
    assert abs(capped.loss.item() + 1.2 * 1.1) < 1e-12


def test_decoupled_norm_mode_needs_norm_len(policy_batch):
    logp, behav, prox, adv, mask = _three_policies(62, policy_batch)
    with pytest.raises(ValueError, match="norm_len"):
        decoupled_ppo_loss(logp, behav, prox, adv, mask, loss_agg_mode="seq-mean-token-sum-norm")


# ------------------------------------------------------------------------------------------- A-3PO


def test_a3po_prox_logp_staleness_cases():
    g = torch.Generator().manual_seed(63)
    behav = torch.randn(3, 4, generator=g, dtype=torch.float64)
    logp = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    p0 = a3po_prox_logp(behav, logp, 0)
    assert torch.equal(p0, logp.detach()) and not p0.requires_grad  # on-policy: prox = logp, detached
    p1 = a3po_prox_logp(behav, logp, 1)
    assert torch.equal(p1, behav) and not p1.requires_grad  # one version old: prox = behav
    p4 = a3po_prox_logp(behav, logp, 4)
    assert torch.allclose(p4, 0.25 * behav + 0.75 * logp.detach(), atol=1e-15, rtol=1e-9)
    assert not p4.requires_grad


def test_a3po_prox_logp_per_token_and_per_row_staleness():
    g = torch.Generator().manual_seed(64)
    behav = torch.randn(3, 4, generator=g, dtype=torch.float64)
    logp = torch.randn(3, 4, generator=g, dtype=torch.float64)
    per_row = torch.tensor([[0], [1], [3]])  # (B, 1)
    out = a3po_prox_logp(behav, logp, per_row)
    assert torch.allclose(out[0], logp[0], rtol=1e-9) and torch.allclose(out[1], behav[1], rtol=1e-9)
    assert torch.allclose(out[2], behav[2] / 3 + logp[2] * 2 / 3, atol=1e-15, rtol=1e-9)
    per_token = torch.tensor([[0, 1, 2, 5]] * 3)  # (B, T)
    out = a3po_prox_logp(behav, logp, per_token)
    for t, d in enumerate([0, 1, 2, 5]):
        alpha = 0.0 if d == 0 else 1.0 / d
        assert torch.allclose(out[:, t], alpha * behav[:, t] + (1 - alpha) * logp[:, t], atol=1e-15, rtol=1e-9)


def test_a3po_prox_is_sandwiched():
    # min(behav, logp) <= prox <= max(behav, logp) (A-3PO blog)
    g = torch.Generator().manual_seed(65)
    behav = torch.randn(4, 6, generator=g, dtype=torch.float64)
    logp = torch.randn(4, 6, generator=g, dtype=torch.float64)
    stale = torch.randint(0, 9, (4, 6), generator=g)
    out = a3po_prox_logp(behav, logp, stale)
    assert torch.all(out >= torch.minimum(behav, logp) - 1e-15)
    assert torch.all(out <= torch.maximum(behav, logp) + 1e-15)


@pytest.mark.parametrize("staleness", [0, 1, 2, "per_row", "per_token"])
def test_a3po_loss_equals_decoupled_with_its_prox(ref, policy_batch, tl, staleness):
    logp, behav, _, adv, mask = _three_policies(66, policy_batch, spread=0.4)
    b, t = logp.shape
    if staleness == "per_row":
        stale = torch.arange(b).reshape(b, 1) % 4
    elif staleness == "per_token":
        stale = (torch.arange(b * t).reshape(b, t) % 5)
    else:
        stale = staleness
    st = torch.as_tensor(stale).expand(b, t).tolist()
    alpha = [[0.0 if d == 0 else 1.0 / d for d in row] for row in st]
    lp, bh = tl(logp), tl(behav)
    prox = [[a * x + (1 - a) * y for a, x, y in zip(ar, br, lr)] for ar, br, lr in zip(alpha, bh, lp)]
    logp.requires_grad_()
    out = a3po_loss(logp, behav, adv, mask, stale)
    e_loss, e_grad, e_m = ref.decoupled(lp, bh, prox, tl(adv), tl(mask))
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    _check_metrics(out.metrics, e_m, METRICS)
    valid = [alpha[i][k] for i in range(b) for k in range(t) if mask[i, k]]
    assert abs(out.metrics["prox_alpha_mean"].item() - sum(valid) / len(valid)) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_a3po_loss_forwards_decoupled_kwargs(ref, policy_batch, tl, mode):
    logp, behav, _, adv, mask = _three_policies(67, policy_batch, spread=0.4)
    stale = torch.tensor([[2], [1], [3], [0], [4]])
    alpha = [[0.0 if d == 0 else 1.0 / d] * logp.shape[1] for d in stale.reshape(-1).tolist()]
    prox = [[a * x + (1 - a) * y for a, x, y in zip(ar, br, lr)] for ar, br, lr in zip(alpha, tl(behav), tl(logp))]
    logp.requires_grad_()
    out = a3po_loss(logp, behav, adv, mask, stale, clip_eps_low=0.1, clip_eps_high=0.3, behav_weight_cap=1.0,
                    loss_agg_mode=mode)
    e_loss, e_grad, _ = ref.decoupled(tl(logp), tl(behav), prox, tl(adv), tl(mask), 0.1, 0.3, 1.0, mode)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
