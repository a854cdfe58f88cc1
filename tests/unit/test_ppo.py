"""ppo_loss, value_loss and sppo_seq_loss against the plain-Python oracle (algorithms.md sections 4, 13.2)."""

import math

import pytest
import torch

from xxpo.objectives import LossOutput, ppo_loss, sppo_seq_loss, value_loss

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
PPO_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac", "dual_clip_frac", "ratio_mean", "ratio_min",
               "ratio_max", "approx_kl")


def _grad_tensor(g):
    return torch.tensor(g, dtype=torch.float64)


def _check_metrics(metrics, expected, names, tol=1e-6):  # metrics may be float32
    for name in names:
        assert name in metrics, name
        v = metrics[name]
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad, name
        assert abs(v.item() - expected[name]) <= tol * (1 + abs(expected[name])), (name, v.item(), expected[name])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps", [(0.2, None), (0.2, 0.28), (0.1, 0.3)])
@pytest.mark.parametrize("dual_c", [None, 1.5, 3.0])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_ppo_value_gradient_metrics(ref, policy_batch, tl, mode, eps, dual_c, per_token_adv):
    el, eh = eps
    eh_eff = el if eh is None else eh
    logp, old, adv, mask = policy_batch(11, spread=1.2, per_token_adv=per_token_adv,
                                        avoid=(1 - el, 1 + eh_eff) + ((dual_c,) if dual_c else ()))
    logp.requires_grad_()
    old.requires_grad_()
    norm_len = 7 if mode.endswith("norm") else None
    out = ppo_loss(logp, old, adv, mask, clip_eps_low=el, clip_eps_high=eh, dual_clip_c=dual_c,
                   loss_agg_mode=mode, norm_len=norm_len)
    assert isinstance(out, LossOutput)
    assert out.loss.dim() == 0
    e_loss, e_grad, e_metrics = ref.ppo(tl(logp), tl(old), tl(adv), tl(mask), el, eh, dual_c, mode, norm_len)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, _grad_tensor(e_grad), atol=1e-12, rtol=1e-9)
    assert old.grad is None  # old log-probs are constants
    _check_metrics(out.metrics, e_metrics, PPO_METRICS)


def test_ppo_batch_exercises_every_branch(ref, policy_batch, tl):
    """Guard: the random batch above really contains clipped-low, clipped-high, dual-clipped and free tokens."""
    logp, old, adv, mask = policy_batch(11, spread=1.2, per_token_adv=True, avoid=(0.8, 1.2, 1.5))
    _, _, m = ref.ppo(tl(logp), tl(old), tl(adv), tl(mask), 0.2, None, 1.5)
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0 and m["dual_clip_frac"] > 0
    assert m["clip_frac"] < 1


def test_ppo_hand_computed_single_batch():
    # two rows: row 0 = [r=1.5 (A=+1, clipped high), r=0.9 (A=+1, free)]; row 1 = [r=0.5 (A=-2, clipped low)]
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    lr = torch.tensor([[math.log(1.5), math.log(0.9)], [math.log(0.5), 0.0]], dtype=torch.float64)
    logp = (old + lr).requires_grad_()
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = ppo_loss(logp, old, adv, mask)
    # per-token losses: -min(1.5, 1.2) = -1.2 ; -0.9 ; -min(0.5*-2, 0.8*-2) = 1.6
    assert abs(out.loss.item() - (-1.2 - 0.9 + 1.6) / 3) < 1e-12
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.9 / 3], [0.0, 0.0]], dtype=torch.float64), rtol=1e-9)
    assert abs(out.metrics["clip_frac_low"].item() - 1 / 3) < 1e-6
    assert abs(out.metrics["clip_frac_high"].item() - 1 / 3) < 1e-6
    assert abs(out.metrics["clip_frac"].item() - 2 / 3) < 1e-6
    assert out.metrics["dual_clip_frac"].item() == 0.0
    assert abs(out.metrics["ratio_max"].item() - 1.5) < 1e-6
    assert abs(out.metrics["ratio_min"].item() - 0.5) < 1e-6
    assert abs(out.metrics["ratio_mean"].item() - 2.9 / 3) < 1e-6


def test_ppo_dual_clip_hand_value():
    # A = -1, r = 5: clipped loss max(5, 0.8) = 5, capped at c|A| = 3 with zero gradient
    logp = torch.tensor([[math.log(5.0)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    out = ppo_loss(logp, old, adv, torch.ones(1, 1), dual_clip_c=3.0)
    assert abs(out.loss.item() - 3.0) < 1e-12
    out.loss.backward()
    assert logp.grad.item() == 0.0
    assert out.metrics["dual_clip_frac"].item() == 1.0
    plain = ppo_loss(logp, old, adv, torch.ones(1, 1))
    assert abs(plain.loss.item() - 5.0) < 1e-12


def test_ppo_extreme_ratio_is_clamped():
    logp = torch.tensor([[0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-40.0]], dtype=torch.float64)
    out = ppo_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 1))
    assert abs(out.loss.item() - math.exp(20.0)) / math.exp(20.0) < 1e-12
    out.loss.backward()
    assert logp.grad.item() == 0.0


# ------------------------------------------------------------------------------------------- value loss


@pytest.mark.parametrize("clip_eps", [0.2, 0.05, None])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_value_loss(ref, tl, clip_eps, mode):
    g = torch.Generator().manual_seed(21)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.float64)
    old = torch.randn(4, 4, generator=g, dtype=torch.float64)
    delta = (2 * torch.rand(4, 4, generator=g, dtype=torch.float64) - 1) * 0.6
    delta = torch.where(delta.abs().sub(0.2).abs() < 1e-3, delta + 5e-3, delta)  # away from the clip edge
    delta = torch.where(delta.abs().sub(0.05).abs() < 1e-3, delta + 5e-3, delta)
    values = (old + delta).requires_grad_()
    returns = torch.randn(4, 4, generator=g, dtype=torch.float64)
    out = value_loss(values, old, returns, mask, clip_eps=clip_eps, loss_agg_mode=mode)
    e_loss, e_grad, e_metrics = ref.value_loss(tl(values), tl(old), tl(returns), tl(mask), clip_eps, mode)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(values.grad, _grad_tensor(e_grad), atol=1e-12, rtol=1e-9)
    _check_metrics(out.metrics, e_metrics, ("vf_clip_frac", "value_mean"))
    if clip_eps == 0.05:
        assert 0 < e_metrics["vf_clip_frac"] < 1  # the case exercises both branches


def test_value_loss_hand_value():
    # v = 1.0, old = 0.0, R = 0.0, eps = 0.2: unclipped (1)^2, clipped (0.2)^2 -> 0.5 * 1 ; grad v - R = 1
    # v = 1.0, old = 0.0, R = 2.0: unclipped 1, clipped (0.2 - 2)^2 = 3.24 -> 0.5 * 3.24, grad 0
    values = torch.tensor([[1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    returns = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    out = value_loss(values, old, returns, torch.ones(1, 2))
    assert abs(out.loss.item() - (0.5 + 1.62) / 2) < 1e-12
    out.loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[0.5, 0.0]], dtype=torch.float64), rtol=1e-9)
    assert out.metrics["vf_clip_frac"].item() == 0.5
    assert out.metrics["value_mean"].item() == 1.0


# ------------------------------------------------------------------------------------------- sppo_seq


@pytest.mark.parametrize("mode", MODES[:3])
@pytest.mark.parametrize("eps", [(0.2, None), (0.2, 0.3)])
@pytest.mark.parametrize("dual_c", [None, 2.0])
def test_sppo_seq_loss_is_ppo_clip(ref, policy_batch, tl, mode, eps, dual_c):
    el, eh = eps
    logp, old, adv, mask = policy_batch(12, spread=0.8 if dual_c is None else 1.5, avoid=(1 - el, 1 + (eh or el)))
    logp.requires_grad_()
    out = sppo_seq_loss(logp, old, adv, mask, clip_eps_low=el, clip_eps_high=eh, dual_clip_c=dual_c, loss_agg_mode=mode)
    e_loss, e_grad, e_metrics = ref.ppo(tl(logp), tl(old), tl(adv), tl(mask), el, eh, dual_c, mode)
    assert dual_c is None or e_metrics["dual_clip_frac"] > 0
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, _grad_tensor(e_grad), atol=1e-12, rtol=1e-9)
    _check_metrics(out.metrics, e_metrics, ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "dual_clip_frac"))


def test_sppo_seq_default_is_token_mean(ref, policy_batch, tl):
    logp, old, adv, mask = policy_batch(13)
    e_loss, _, _ = ref.ppo(tl(logp), tl(old), tl(adv), tl(mask), 0.2, None, None, "token-mean")
    assert abs(sppo_seq_loss(logp, old, adv, mask).loss.item() - e_loss) < 1e-10


def test_value_loss_has_the_factor_one_half():
    """Documented: 0.5 (V - R)^2 (baselines/verl convention), not the PPO paper's (V - V_targ)^2 of Eq. 9."""
    values = torch.tensor([[3.0, -1.0]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    out = value_loss(values, torch.zeros_like(values), returns, torch.ones(1, 2), clip_eps=None)
    assert abs(out.loss.item() - (0.5 * 4.0 + 0.5 * 2.25) / 2) < 1e-12
    out.loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[2.0 / 2, -1.5 / 2]], dtype=torch.float64), rtol=1e-12)


def test_value_clip_frac_ignores_rounding_inside_the_band():
    # Inside the band V_old + clip(V - V_old) is V again, but for rounding: with V_old = 0.1 and V = 1e-9,
    # V - V_old rounds to -0.1, so the "clipped" value is 0 and its error a hair larger. Not clipping (the
    # loss picks either branch, the gradient is the same); the PPO critic's values near 0 hit this.
    old = torch.tensor([[0.1, 0.0]])
    values = torch.tensor([[1e-9, 0.5]], requires_grad=True)  # in the band; out of it (|0.5 - 0| > 0.2)
    returns = torch.tensor([[1e-8, 1.0]])
    clipped_value = old + (values.detach() - old).clamp(-0.2, 0.2)
    assert (clipped_value[0, 0] - returns[0, 0]) ** 2 > (values[0, 0].detach() - returns[0, 0]) ** 2  # the rounding
    out = value_loss(values, old, returns, torch.ones(1, 2), clip_eps=0.2)
    assert out.metrics["vf_clip_frac"].item() == 0.5  # the second token only
