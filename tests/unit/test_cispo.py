"""cispo_loss (MiniMax-M1, arXiv 2506.13585 Sec. 3.1): hand-computed values and gradients, an independent
plain-Python oracle, gradcheck, and clear errors."""

import math

import pytest
import torch

from xxpo.objectives import cispo_loss

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _oracle(logp, old, adv, mask, eps_low, eps_high, mode):
    """Plain Python: per-token value -w A logp and gradient -w A with w = clip(r, lo, hi), then aggregation."""
    lo = 0.0 if eps_low is None else 1.0 - eps_low
    rows, cols = len(mask), len(mask[0])
    value_terms, grad_terms = [[0.0] * cols for _ in range(rows)], [[0.0] * cols for _ in range(rows)]
    for i in range(rows):
        for j in range(cols):
            a = adv[i][j] if isinstance(adv[i], list) else adv[i]
            r = math.exp(max(-20.0, min(20.0, logp[i][j] - old[i][j])))
            w = min(max(r, lo), 1.0 + eps_high)
            value_terms[i][j], grad_terms[i][j] = -w * a * logp[i][j], -w * a
    weights = [[0.0] * cols for _ in range(rows)]
    if mode == "token-mean":
        n = sum(sum(row) for row in mask)
        weights = [[m / max(n, 1) for m in row] for row in mask]
    else:
        nonempty = [i for i, row in enumerate(mask) if sum(row) > 0]
        for i in nonempty:
            per_row = sum(mask[i]) if mode == "seq-mean-token-mean" else 1.0
            weights[i] = [m / per_row / len(nonempty) for m in mask[i]]
    value = sum(weights[i][j] * value_terms[i][j] for i in range(rows) for j in range(cols))
    grad = [[weights[i][j] * grad_terms[i][j] for j in range(cols)] for i in range(rows)]
    return value, grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps", [(None, 4.0), (0.2, 0.28), (None, 0.1), (0.5, 0.0)])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_cispo_value_and_gradient_match_the_oracle(policy_batch, tl, mode, eps, per_token_adv):
    logp, old, adv, mask = policy_batch(61, spread=1.5, per_token_adv=per_token_adv, avoid=(0.5, 0.8, 1.0, 1.1, 1.28))
    logp.requires_grad_()
    out = cispo_loss(logp, old, adv, mask, clip_eps_low=eps[0], clip_eps_high=eps[1], loss_agg_mode=mode)
    value, grad = _oracle(tl(logp), tl(old), tl(adv), tl(mask), eps[0], eps[1], mode)
    assert abs(out.loss.item() - value) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)


def test_cispo_hand_computed():
    # two tokens of one response, A = +1: r = 3 (weight 3, under the default cap 5) and r = 8 (capped at 5).
    # loss = -(3 logp_0 + 5 logp_1) / 2, gradient -(3, 5) / 2: the capped token still learns, at weight 5.
    old = torch.tensor([[-2.0, -3.0]], dtype=torch.float64)
    logp = (old + torch.tensor([[math.log(3.0), math.log(8.0)]], dtype=torch.float64)).requires_grad_()
    out = cispo_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2))
    expected = -(3 * logp[0, 0].item() + 5 * logp[0, 1].item()) / 2
    assert abs(out.loss.item() - expected) < 1e-12
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.5, -2.5]], dtype=torch.float64), atol=1e-12)
    assert out.metrics["clip_frac_high"].item() == 0.5 and out.metrics["clip_frac_low"].item() == 0.0
    assert abs(out.metrics["is_weight_mean"].item() - 4.0) < 1e-6
    assert abs(out.metrics["ratio_max"].item() - 8.0) < 1e-5


def test_cispo_keeps_the_gradient_where_ppo_drops_it():
    # r = 1.5 > 1 + 0.2 with A > 0: PPO/GRPO give exactly 0, CISPO (cap 1.2) gives -1.2 A
    from xxpo.objectives import grpo_loss

    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.full((1, 1), math.log(1.5), dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([2.0], dtype=torch.float64)
    grpo_loss(logp, old, adv, torch.ones(1, 1)).loss.backward()
    assert logp.grad.item() == 0.0
    logp.grad = None
    cispo_loss(logp, old, adv, torch.ones(1, 1), clip_eps_high=0.2).loss.backward()
    assert abs(logp.grad.item() + 1.2 * 2.0) < 1e-12


def test_cispo_no_lower_bound_by_default():
    # r = 0.01 with A < 0: the weight stays 0.01 (PPO with eps 0.2 would have clipped it at 0.8)
    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.full((1, 1), math.log(0.01), dtype=torch.float64, requires_grad=True)
    out = cispo_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 1))
    out.loss.backward()
    assert abs(logp.grad.item() - 0.01) < 1e-12
    assert out.metrics["clip_frac_low"].item() == 0.0
    logp.grad = None
    out = cispo_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 1), clip_eps_low=0.2)
    out.loss.backward()
    assert abs(logp.grad.item() - 0.8) < 1e-12 and out.metrics["clip_frac_low"].item() == 1.0


def test_cispo_padding_does_not_leak(policy_batch):
    logp, old, adv, mask = policy_batch(62)
    poisoned = logp.clone()
    poisoned[mask == 0] = -50.0
    a = cispo_loss(logp, old, adv, mask).loss
    b = cispo_loss(poisoned, old, adv, mask).loss
    assert torch.equal(a, b)


def test_cispo_gradcheck(policy_batch):
    """The stop-gradient makes CISPO's gradient differ from the derivative of its value by design, so gradcheck
    freezes the weight: old_logp moves with the input (r fixed at its value), leaving the log pi path."""
    logp, old, adv, mask = policy_batch(63, spread=1.0)
    log_ratio = (logp - old).detach()
    logp.requires_grad_()
    for mode in MODES:
        def f(x):
            return cispo_loss(x, x.detach() - log_ratio, adv, mask, clip_eps_high=0.3, loss_agg_mode=mode).loss

        assert torch.autograd.gradcheck(f, (logp,))
        # and the frozen-weight gradient is CISPO's own gradient
        assert torch.allclose(torch.autograd.grad(f(logp), logp)[0],
                              torch.autograd.grad(cispo_loss(logp, old, adv, mask, clip_eps_high=0.3,
                                                             loss_agg_mode=mode).loss, logp)[0], atol=1e-14)


@pytest.mark.parametrize("kwargs, name", [
    (dict(clip_eps_high=-1.0), "clip_eps_high"),
    (dict(clip_eps_high=None), "clip_eps_high"),
    (dict(clip_eps_low=1.5), "clip_eps_low"),
    (dict(loss_agg_mode="sum"), "loss_agg_mode"),
    (dict(loss_agg_mode="seq-mean-token-sum-norm"), "norm_len"),
])
def test_cispo_bad_arguments_are_named(policy_batch, kwargs, name):
    logp, old, adv, mask = policy_batch(64)
    with pytest.raises((ValueError, TypeError), match=name):
        cispo_loss(logp, old, adv, mask, **kwargs)


def test_cispo_bad_tensors_are_named(policy_batch):
    logp, old, adv, mask = policy_batch(64)
    with pytest.raises(ValueError, match="old_logp"):
        cispo_loss(logp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        cispo_loss(logp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="mask"):
        cispo_loss(logp, old, adv, mask * 2)
