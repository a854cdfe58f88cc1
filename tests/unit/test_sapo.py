"""sapo_loss (algorithms.md section 12)."""

import math

import pytest
import torch

from xxpo.objectives import sapo_loss

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@pytest.mark.parametrize("mode", MODES[:3])
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0), (3.0, 3.0)])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_sapo_value_gradient_metrics(ref, policy_batch, tl, mode, taus, per_token_adv):
    tp, tn = taus
    logp, old, adv, mask = policy_batch(51, spread=2.0, per_token_adv=per_token_adv)
    logp.requires_grad_()
    out = sapo_loss(logp, old, adv, mask, tau_pos=tp, tau_neg=tn, loss_agg_mode=mode)
    e_loss, e_grad, e_m = ref.sapo(tl(logp), tl(old), tl(adv), tl(mask), tp, tn, mode)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    for name in ("gate_mean", "gate_weight_mean", "ratio_mean", "ratio_min", "ratio_max"):
        v = out.metrics[name]
        assert v.dim() == 0 and not v.requires_grad
        assert abs(v.item() - e_m[name]) <= 1e-6 * (1 + abs(e_m[name])), name


def test_sapo_norm_mode_needs_norm_len(policy_batch):
    # sapo_loss takes no norm_len (API), so the constant-normalizer mode must be refused, not guessed
    logp, old, adv, mask = policy_batch(51)
    with pytest.raises(ValueError, match="norm_len"):
        sapo_loss(logp, old, adv, mask, loss_agg_mode=MODES[3])


def test_sapo_default_mode_and_temperatures(ref, policy_batch, tl):
    logp, old, adv, mask = policy_batch(52, spread=1.0)
    e_loss, _, _ = ref.sapo(tl(logp), tl(old), tl(adv), tl(mask), 1.0, 1.05, "seq-mean-token-mean")
    assert abs(sapo_loss(logp, old, adv, mask).loss.item() - e_loss) < 1e-10


def test_sapo_hand_computed():
    # one token r = 2, A = +1, tau_pos = 1: l = -4 * sigmoid(1); dl/dlogp = -4 p (1-p) * r
    logp = torch.tensor([[math.log(2.0)]], dtype=torch.float64, requires_grad=True)
    out = sapo_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                    torch.ones(1, 1))
    p = 1 / (1 + math.exp(-1))
    assert abs(out.loss.item() + 4 * p) < 1e-12
    out.loss.backward()
    assert abs(logp.grad.item() + 4 * p * (1 - p) * 2) < 1e-12
    assert abs(out.metrics["gate_mean"].item() - 4 * p) < 1e-6
    assert abs(out.metrics["gate_weight_mean"].item() - 1 / math.cosh(0.5) ** 2) < 1e-6


def test_sapo_zero_advantage_uses_tau_neg():
    # A = 0: the loss is 0 whatever tau, but the gate metric reveals which temperature was used
    logp = torch.zeros(1, 1, dtype=torch.float64)
    out = sapo_loss(logp, logp, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1), tau_pos=1.0, tau_neg=2.0)
    assert out.loss.item() == 0.0
    assert abs(out.metrics["gate_mean"].item() - 4 / 2.0 * 0.5) < 1e-6


def test_sapo_no_clipping_gradient_never_vanishes_abruptly():
    # PPO's gradient is exactly 0 at r = 1.3 with A > 0; SAPO's is still sech^2-weighted
    logp = torch.tensor([[math.log(1.3)]], dtype=torch.float64, requires_grad=True)
    out = sapo_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                    torch.ones(1, 1))
    out.loss.backward()
    w = 1 / math.cosh(0.15) ** 2
    assert abs(logp.grad.item() + w * 1.3) < 1e-12
