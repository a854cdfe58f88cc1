"""gmpo_loss (Zhao et al. 2025, arXiv 2507.20673): the paper's product form computed literally, hand-computed
cases, gradcheck, and clear errors."""

import math

import pytest
import torch

from xxpo.objectives import gmpo_loss


def _paper_form(logp, old, adv, mask, eps_low, eps_high):
    """J in the paper's form: (prod_t |min(r A, clip(r, e^-eps_low, e^eps_high) A)|)^(1/|o|) sgn(A), mean over
    non-empty responses; returns L = -J. Plain Python; the min is taken on the products r A, not on log r."""
    total, rows = 0.0, 0
    for lp, o, a, m in zip(logp, old, adv, mask):
        idx = [t for t, v in enumerate(m) if v]
        if not idx:
            continue
        rows += 1
        logs = []
        for t in idx:
            r = math.exp(lp[t] - o[t])
            c = min(max(r, math.exp(-eps_low)), math.exp(eps_high))
            logs.append(math.log(abs(min(r * a, c * a))) if a != 0 else 0.0)
        geo = math.exp(sum(logs) / len(idx))
        total += geo * (1 if a > 0 else -1 if a < 0 else 0)
    return -total / max(rows, 1)


@pytest.mark.parametrize("eps", [(0.4, 0.4), (0.1, 0.3), (2.0, 2.0)])
def test_gmpo_is_the_papers_product_form(policy_batch, tl, eps):
    logp, old, adv, mask = policy_batch(71, spread=0.8, avoid=tuple(math.exp(x) for x in (-0.4, 0.4, -0.1, 0.3)))
    out = gmpo_loss(logp, old, adv, mask, clip_eps_low=eps[0], clip_eps_high=eps[1])
    assert abs(out.loss.item() - _paper_form(tl(logp), tl(old), tl(adv), tl(mask), *eps)) < 1e-10


def test_gmpo_hand_computed():
    # one response, A = +2, token log-ratios 0.1 and 0.9 with eps 0.4: the second is clipped to 0.4
    # s = exp((0.1 + 0.4) / 2) = e^0.25; loss = -2 e^0.25; gradient only on the first token: -2 e^0.25 / 2
    old = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    logp = (old + torch.tensor([[0.1, 0.9]], dtype=torch.float64)).requires_grad_()
    out = gmpo_loss(logp, old, torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 2))
    assert abs(out.loss.item() + 2 * math.exp(0.25)) < 1e-12
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-math.exp(0.25), 0.0]], dtype=torch.float64), atol=1e-12)
    assert out.metrics["clip_frac_high"].item() == 0.5 and out.metrics["clip_frac_low"].item() == 0.0
    assert abs(out.metrics["seq_ratio_mean"].item() - math.exp(0.25)) < 1e-6


def test_gmpo_clip_is_one_sided_by_the_sign_of_the_advantage():
    # A < 0: a token with log r = 0.9 > eps keeps its value and gradient (pessimistic side), one with
    # log r = -0.9 < -eps is clipped (no gradient): s = exp((0.9 - 0.4) / 2)
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.tensor([[0.9, -0.9]], dtype=torch.float64, requires_grad=True)
    out = gmpo_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 2))
    s = math.exp(0.25)
    assert abs(out.loss.item() - s) < 1e-12
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[s / 2, 0.0]], dtype=torch.float64), atol=1e-12)
    assert out.metrics["clip_frac_low"].item() == 0.5 and out.metrics["clip_frac_high"].item() == 0.0


def test_gmpo_outlier_moves_the_geometric_mean_less_than_grpos_arithmetic_mean():
    # 9 tokens at r = 1 and one at r = 20 (unclipped): arithmetic mean 2.9, geometric mean 20^(1/10) ~ 1.35
    old = torch.zeros(1, 10, dtype=torch.float64)
    logp = torch.zeros(1, 10, dtype=torch.float64)
    logp[0, 0] = math.log(20.0)
    out = gmpo_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 10), clip_eps_low=5.0)
    assert abs(-out.loss.item() - 20 ** 0.1) < 1e-12


def test_gmpo_empty_rows_and_padding(policy_batch):
    logp, old, adv, mask = policy_batch(72)
    mask[2] = 0
    poisoned = logp.clone()
    poisoned[mask == 0] = 30.0
    a, b = gmpo_loss(logp, old, adv, mask), gmpo_loss(poisoned, old, adv, mask)
    assert torch.equal(a.loss, b.loss)
    z = gmpo_loss(logp, old, adv, torch.zeros_like(mask))
    assert z.loss.item() == 0.0


def test_gmpo_gradcheck(policy_batch):
    logp, old, adv, mask = policy_batch(73, spread=0.3, avoid=(math.exp(-0.2), math.exp(0.2)))
    logp.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gmpo_loss(x, old, adv, mask, clip_eps_low=0.2).loss, (logp,))
    assert torch.autograd.gradcheck(lambda x: gmpo_loss(x, old, adv, mask, clip_eps_low=5.0).loss, (logp,))


@pytest.mark.parametrize("kwargs, name", [
    (dict(clip_eps_low=-0.1), "clip_eps_low"),
    (dict(clip_eps_high=float("nan")), "clip_eps_high"),
    (dict(clip_eps_low="0.4"), "clip_eps_low"),
])
def test_gmpo_bad_arguments_are_named(policy_batch, kwargs, name):
    logp, old, adv, mask = policy_batch(74)
    with pytest.raises((ValueError, TypeError), match=name):
        gmpo_loss(logp, old, adv, mask, **kwargs)


def test_gmpo_needs_one_advantage_per_response(policy_batch):
    logp, old, adv, mask = policy_batch(74, per_token_adv=True)
    with pytest.raises(ValueError, match="advantages must be per sequence"):
        gmpo_loss(logp, old, adv, mask)
