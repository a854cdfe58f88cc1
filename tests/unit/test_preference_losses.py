"""dpo_loss, sppo_selfplay_loss and sequence_value_loss (algorithms.md sections 5, 13)."""

import math

import pytest
import torch

from xxpo.objectives import dpo_loss, sequence_value_loss, sppo_selfplay_loss


def _pairs(seed, b=6):
    g = torch.Generator().manual_seed(seed)
    t = lambda: (-5 - 5 * torch.rand(b, generator=g, dtype=torch.float64)).requires_grad_()  # noqa: E731
    return t(), t(), t(), t()


@pytest.mark.parametrize("variant,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3),
                                                     ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_value_gradient_metrics(ref, tl, variant, beta, label_smoothing):
    c, r, c0, r0 = _pairs(71)
    out = dpo_loss(c, r, c0, r0, dpo_beta=beta, variant=variant, label_smoothing=label_smoothing)
    e_loss, e_gc, e_gr, e_m = ref.dpo(tl(c), tl(r), tl(c0), tl(r0), beta, variant, label_smoothing)
    assert abs(out.loss.item() - e_loss) < 1e-10 * (1 + abs(e_loss))
    out.loss.backward()
    assert torch.allclose(c.grad, torch.tensor(e_gc, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    assert torch.allclose(r.grad, torch.tensor(e_gr, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    assert c0.grad is None and r0.grad is None  # the reference model is frozen
    for name in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
        v = out.metrics[name]
        assert v.dim() == 0 and not v.requires_grad
        assert abs(v.item() - e_m[name]) < 1e-6, name
    assert 0 < e_m["reward_accuracy"] < 1  # the batch has both signs of the margin


def test_dpo_hand_computed():
    # h = (chosen - ref) - (rejected - ref) = 2 - (-1) = 3, so beta h = 0.3
    c = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-4.0], dtype=torch.float64, requires_grad=True)
    c0 = torch.tensor([-3.0], dtype=torch.float64)
    r0 = torch.tensor([-3.0], dtype=torch.float64)
    out = dpo_loss(c, r, c0, r0, dpo_beta=0.1)
    assert abs(out.loss.item() - math.log1p(math.exp(-0.3))) < 1e-12
    out.loss.backward()
    s = 1 / (1 + math.exp(0.3))  # sigmoid(-beta h)
    assert abs(c.grad.item() + 0.1 * s) < 1e-12 and abs(r.grad.item() - 0.1 * s) < 1e-12
    assert abs(out.metrics["reward_margin"].item() - 0.3) < 1e-6
    assert out.metrics["reward_accuracy"].item() == 1.0
    ipo = dpo_loss(c, r, c0, r0, dpo_beta=0.1, variant="ipo")
    assert abs(ipo.loss.item() - (3 - 5) ** 2) < 1e-12


# ------------------------------------------------------------------------------------------- SPPO self-play


@pytest.mark.parametrize("eta", [1000.0, 1.0, 0.5])
def test_sppo_selfplay(ref, tl, eta):
    g = torch.Generator().manual_seed(72)
    logp = (-3 - torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_()
    ref_lp = (-3 - torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_()
    win = torch.rand(5, generator=g, dtype=torch.float64)
    out = sppo_selfplay_loss(logp, ref_lp, win, eta=eta)
    e_loss, e_grad, e_m = ref.sppo_selfplay(tl(logp), tl(ref_lp), tl(win), eta)
    assert abs(out.loss.item() - e_loss) < 1e-10 * (1 + e_loss)
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert ref_lp.grad is None
    for name in ("log_ratio_mean", "target_mean"):
        assert abs(out.metrics[name].item() - e_m[name]) < 1e-6 * (1 + abs(e_m[name])), name


def test_sppo_selfplay_hand_value():
    # log-ratio 0.5, P = 0.6, eta = 10: (0.5 - 1)^2 = 0.25; default eta = 1000: (0.5 - 100)^2
    logp = torch.tensor([-1.0], dtype=torch.float64)
    ref_lp = torch.tensor([-1.5], dtype=torch.float64)
    win = torch.tensor([0.6], dtype=torch.float64)
    assert abs(sppo_selfplay_loss(logp, ref_lp, win, eta=10.0).loss.item() - 0.25) < 1e-12
    assert abs(sppo_selfplay_loss(logp, ref_lp, win).loss.item() - 99.5 ** 2) < 1e-8


# ------------------------------------------------------------------------------------------- sequence value


def test_sequence_value_loss(ref, tl):
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0, 20.0], dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 1.0], dtype=torch.float64)
    out = sequence_value_loss(logits, rewards)
    e_loss, e_grad, e_m = ref.sequence_value(tl(logits), tl(rewards))
    assert abs(out.loss.item() - e_loss) < 1e-12
    out.loss.backward()
    assert torch.allclose(logits.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-14, rtol=1e-9)
    for name in ("value_mean", "calibration_error"):
        assert abs(out.metrics[name].item() - e_m[name]) < 1e-6, name


def test_sequence_value_loss_hand_value():
    out = sequence_value_loss(torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert abs(out.loss.item() - math.log(2)) < 1e-12
    assert abs(out.metrics["value_mean"].item() - 0.5) < 1e-6
    assert abs(out.metrics["calibration_error"].item()) < 1e-6
