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
    assert torch.equal(p0, behav) and not p0.requires_grad  # fresh data: prox = behav (the start of the update)
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
    assert torch.equal(out[0], behav[0]) and torch.equal(out[1], behav[1])  # d = 0 and d = 1: behav
    assert torch.allclose(out[2], behav[2] / 3 + logp[2] * 2 / 3, atol=1e-15, rtol=1e-9)
    per_token = torch.tensor([[0, 1, 2, 5]] * 3)  # (B, T)
    out = a3po_prox_logp(behav, logp, per_token)
    for t, d in enumerate([0, 1, 2, 5]):
        alpha = 1.0 / max(d, 1)
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
    alpha = [[1.0 / max(d, 1) for d in row] for row in st]
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
    alpha = [[1.0 / max(d, 1)] * logp.shape[1] for d in stale.reshape(-1).tolist()]
    prox = [[a * x + (1 - a) * y for a, x, y in zip(ar, br, lr)] for ar, br, lr in zip(alpha, tl(behav), tl(logp))]
    logp.requires_grad_()
    out = a3po_loss(logp, behav, adv, mask, stale, clip_eps_low=0.1, clip_eps_high=0.3, behav_weight_cap=1.0,
                    loss_agg_mode=mode)
    e_loss, e_grad, _ = ref.decoupled(tl(logp), tl(behav), prox, tl(adv), tl(mask), 0.1, 0.3, 1.0, mode)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)


# ------------------------------------------- A-3PO with fresh data (d = 0) keeps PPO's trust region


def test_a3po_fresh_data_is_ppo_around_the_behaviour_policy(ref, policy_batch, tl):
    """d = 0: pi_prox = pi_behav, the policy at the start of the update, so the loss is PPO's (weight 1)."""
    logp, behav, adv, mask = policy_batch(68, spread=0.8)  # ratios logp/behav on both sides of the clip edges
    logp.requires_grad_()
    out = a3po_loss(logp, behav, adv, mask, 0)
    e_loss, e_grad, e_m = ref.ppo(tl(logp), tl(behav), tl(adv), tl(mask))
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    _check_metrics(out.metrics, e_m, ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_min", "ratio_max"))
    assert e_m["clip_frac"] > 0 and e_m["ratio_max"] > 1.2  # the batch does exercise the clip
    assert out.metrics["behav_weight_max"].item() == 1.0 and out.metrics["prox_alpha_mean"].item() == 1.0


def test_a3po_fresh_data_clips_a_large_move():
    """Every token moved to 3x its behaviour probability with A > 0: all clipped, zero gradient, loss -1.2 A."""
    behav = torch.full((2, 3), -2.0, dtype=torch.float64)
    logp = (behav + math.log(3.0)).requires_grad_()
    adv = torch.tensor([1.0, 0.5], dtype=torch.float64)
    out = a3po_loss(logp, behav, adv, torch.ones(2, 3), 0)
    assert abs(out.metrics["ratio_max"].item() - 3.0) < 1e-6 and out.metrics["clip_frac"].item() == 1.0
    assert abs(out.loss.item() + 1.2 * 0.75) < 1e-12  # token-mean of -1.2 A over 3 + 3 tokens
    out.loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_a3po_fresh_data_bounds_later_minibatches():
    """Two minibatches of one fresh rollout through a shared linear policy: after the first optimizer step
    the second minibatch's ratio to pi_prox is no longer 1, and a large step is clipped."""
    g = torch.Generator().manual_seed(69)
    vocab, dim, b, t = 5, 4, 8, 6
    feats = torch.randn(b, t, dim, generator=g, dtype=torch.float64)  # (B, T, D) token states
    weight = torch.zeros(dim, vocab, dtype=torch.float64, requires_grad=True)  # uniform policy at the start

    def logprobs(rows, tokens):
        return torch.log_softmax(feats[rows] @ weight, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (b, T)

    with torch.no_grad():
        tokens = torch.multinomial(torch.full((b * t, vocab), 1.0 / vocab), 1, generator=g).reshape(b, t)
        behav = logprobs(torch.arange(b), tokens)  # (B, T): the behaviour policy = the start of the update
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t)
    opt = torch.optim.SGD([weight], lr=20.0)
    metrics = []
    for rows in (torch.arange(0, 4), torch.arange(4, 8)):  # d = 0 for both minibatches
        out = a3po_loss(logprobs(rows, tokens[rows]), behav[rows], adv[rows], mask[rows], 0)
        metrics.append({k: v.item() for k, v in out.metrics.items()})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert metrics[0]["ratio_max"] == 1.0 and metrics[0]["clip_frac"] == 0.0  # nothing has moved yet
    second = metrics[1]
    assert second["ratio_max"] > 1.2 or second["ratio_min"] < 0.8  # the shared weights moved
    assert second["clip_frac"] > 0  # and the clip bounds the move
    assert second["behav_weight_max"] == 1.0  # pi_prox = pi_behav: no importance weight with fresh data


def test_decoupled_ppo_dual_clip(ref, policy_batch, tl):
    logp, behav, prox, adv, mask = _three_policies(63, policy_batch, per_token_adv=True)
    logp = (logp.detach() + 1.0 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(5),
                                              dtype=torch.float64)).requires_grad_()  # ratios u far past c
    out = decoupled_ppo_loss(logp, behav, prox, adv, mask, dual_clip_c=2.0, behav_weight_cap=3.0)
    e_loss, e_grad, e_m = ref.decoupled(tl(logp), tl(behav), tl(prox), tl(adv), tl(mask), 0.2, None, 3.0,
                                        "token-mean", None, 2.0)
    assert e_m["dual_clip_frac"] > 0  # the third clip binds somewhere
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    _check_metrics(out.metrics, e_m, METRICS)
    with pytest.raises(ValueError, match="dual_clip_c"):
        decoupled_ppo_loss(logp, behav, prox, adv, mask, dual_clip_c=1.0)
