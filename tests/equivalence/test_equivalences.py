"""Equivalences that hold by construction between the objectives (algorithms.md sections 4, 9-12).

Each test compares two xxpo computations *and* anchors at least one side to an independent formula,
so a bug shared by both sides still fails.
"""

import math

import pytest
import torch

import xxpo.objectives as O

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
MASK = [
    [1, 1, 1, 1, 1],
    [1, 1, 0, 0, 0],
    [1, 0, 1, 1, 0],
    [0, 0, 0, 0, 0],
    [1, 0, 0, 0, 0],
]
NORM_LEN = 7


def _agg_weights(mode):
    """w[i][t] such that aggregate(l) = sum w * l, written out per mode."""
    n = [sum(r) for r in MASK]
    nonempty = sum(1 for k in n if k)
    denom = {
        "token-mean": lambda i: sum(n),
        "seq-mean-token-mean": lambda i: n[i] * nonempty,
        "seq-mean-token-sum": lambda i: nonempty,
        "seq-mean-token-sum-norm": lambda i: len(MASK) * NORM_LEN,
    }[mode]
    return torch.tensor([[m / denom(i) if m else 0.0 for m in row] for i, row in enumerate(MASK)], dtype=torch.float64)


def _batch(seed, per_token_adv=False, spread=0.0):
    g = torch.Generator().manual_seed(seed)
    b, t = len(MASK), len(MASK[0])
    old = -0.3 - 2 * torch.rand(b, t, generator=g, dtype=torch.float64)
    logp = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn((b, t) if per_token_adv else (b,), generator=g, dtype=torch.float64)
    return logp.requires_grad_(), old, adv, torch.tensor(MASK, dtype=torch.float64)


def _kw(mode):
    return {"loss_agg_mode": mode, "norm_len": NORM_LEN if mode.endswith("norm") else None}


def _grad(fn, logp):
    logp.grad = None
    out = fn(logp)
    out.loss.backward()
    g = logp.grad.clone()
    logp.grad = None
    return out, g


# ------------------------------------------------------------------------------------------- ratio 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("objective", ["ppo", "grpo", "ppo_dual", "dapo"])
def test_ratio_one_is_vanilla_policy_gradient(mode, per_token_adv, objective):
    logp, _, adv, mask = _batch(1, per_token_adv)
    old = logp.detach().clone()  # ratio exactly 1
    fn = {
        "ppo": lambda lp: O.ppo_loss(lp, old, adv, mask, **_kw(mode)),
        "ppo_dual": lambda lp: O.ppo_loss(lp, old, adv, mask, dual_clip_c=3.0, **_kw(mode)),
        "grpo": lambda lp: O.grpo_loss(lp, old, adv, mask, **_kw(mode)),
        "dapo": lambda lp: O.dapo_loss(lp, old, adv, mask, **_kw(mode)),
    }[objective]
    out, grad = _grad(fn, logp)
    a = adv if per_token_adv else adv[:, None].expand_as(logp)
    w = _agg_weights(mode)
    assert torch.allclose(out.loss, -(w * a).sum(), atol=1e-12, rtol=1e-9)  # minus the aggregated advantage
    assert torch.allclose(grad, -a * w, atol=1e-12, rtol=1e-9)  # -A * mask / normalizer per token
    for key in ("clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac"):
        assert out.metrics[key].item() == 0.0
    assert abs(out.metrics["ratio_mean"].item() - 1) < 1e-6 and abs(out.metrics["approx_kl"].item()) < 1e-6


def test_dr_grpo_at_ratio_one():
    logp, _, adv, mask = _batch(2)
    out, grad = _grad(lambda lp: O.dr_grpo_loss(lp, logp.detach(), adv, mask, norm_len=NORM_LEN), logp)
    w = _agg_weights("seq-mean-token-sum-norm")
    assert torch.allclose(grad, -adv[:, None] * w, atol=1e-12, rtol=1e-9)
    assert out.metrics["clip_frac"].item() == 0.0


# ------------------------------------------------------------------------------------------- aliases


@pytest.mark.parametrize("seed", [3, 4])
def test_dr_grpo_is_grpo_with_constant_normalizer(seed):
    logp, old, adv, mask = _batch(seed, spread=0.4)
    ref = old - 0.2
    a, ga = _grad(lambda lp: O.dr_grpo_loss(lp, old, adv, mask, norm_len=9, ref_logp=ref, kl_coef=0.05), logp)
    b, gb = _grad(lambda lp: O.grpo_loss(lp, old, adv, mask, ref_logp=ref, kl_coef=0.05,
                                         loss_agg_mode="seq-mean-token-sum-norm", norm_len=9), logp)
    assert torch.allclose(a.loss, b.loss, atol=1e-14, rtol=1e-9) and torch.allclose(ga, gb, atol=1e-14, rtol=1e-9)


def test_dapo_is_grpo_with_clip_higher_and_token_mean():
    logp, old, adv, mask = _batch(5, spread=0.4)
    with torch.no_grad():
        logp[0, 0] = old[0, 0] + math.log(1.25)  # between 1 + 0.2 and 1 + 0.28
        adv[0] = abs(adv[0]) + 0.5
    a, ga = _grad(lambda lp: O.dapo_loss(lp, old, adv, mask), logp)
    b, gb = _grad(lambda lp: O.grpo_loss(lp, old, adv, mask, clip_eps_high=0.28, loss_agg_mode="token-mean"), logp)
    assert torch.allclose(a.loss, b.loss, atol=1e-14, rtol=1e-9) and torch.allclose(ga, gb, atol=1e-14, rtol=1e-9)
    c, _ = _grad(lambda lp: O.grpo_loss(lp, old, adv, mask, loss_agg_mode="token-mean"), logp)
    assert abs(a.loss.item() - c.loss.item()) > 1e-6  # clip-higher matters on this batch


@pytest.mark.parametrize("mode", MODES[:3])
def test_sppo_seq_is_ppo(mode):
    logp, old, adv, mask = _batch(6, spread=0.4)
    a, ga = _grad(lambda lp: O.sppo_seq_loss(lp, old, adv, mask, loss_agg_mode=mode), logp)
    b, gb = _grad(lambda lp: O.ppo_loss(lp, old, adv, mask, loss_agg_mode=mode), logp)
    assert torch.allclose(a.loss, b.loss, atol=1e-14, rtol=1e-9) and torch.allclose(ga, gb, atol=1e-14, rtol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_grpo_without_kl_is_ppo(mode):
    logp, old, adv, mask = _batch(7, spread=0.4)
    a, ga = _grad(lambda lp: O.grpo_loss(lp, old, adv, mask, clip_eps_high=0.3, **_kw(mode)), logp)
    b, gb = _grad(lambda lp: O.ppo_loss(lp, old, adv, mask, clip_eps_high=0.3, **_kw(mode)), logp)
    assert torch.allclose(a.loss, b.loss, atol=1e-14, rtol=1e-9) and torch.allclose(ga, gb, atol=1e-14, rtol=1e-9)


# ------------------------------------------------------------------------------------------- GSPO


@pytest.mark.parametrize("spread", [0.01, 0.5, 2.0])
@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.2, 0.2), (0.1, 0.3)])
@pytest.mark.parametrize("one_token_layout", ["T=1", "padded"])
def test_gspo_equals_grpo_for_one_token_responses(spread, eps, one_token_layout):
    el, eh = eps
    g = torch.Generator().manual_seed(8)
    b = 6
    if one_token_layout == "T=1":
        mask = torch.ones(b, 1, dtype=torch.float64)
    else:  # one valid token per row, at different positions, with padding elsewhere
        mask = torch.zeros(b, 4, dtype=torch.float64)
        mask[torch.arange(b), torch.tensor([0, 3, 1, 2, 0, 3])] = 1
    old = -1 - torch.rand(mask.shape, generator=g, dtype=torch.float64)
    logp = (old + spread * torch.randn(mask.shape, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    a, ga = _grad(lambda lp: O.gspo_loss(lp, old, adv, mask, clip_eps_low=el, clip_eps_high=eh), logp)
    b_, gb = _grad(lambda lp: O.grpo_loss(lp, old, adv, mask, clip_eps_low=el, clip_eps_high=eh,
                                          loss_agg_mode="seq-mean-token-mean"), logp)
    assert torch.allclose(a.loss, b_.loss, atol=1e-12, rtol=1e-9)
    assert torch.allclose(ga, gb, atol=1e-12, rtol=1e-9)
    # anchor: the value is the plain mean of per-response clipped terms
    r = torch.exp((logp.detach() - old)[mask.bool()])
    expected = -torch.minimum(r * adv, r.clamp(1 - el, 1 + eh) * adv).mean()
    assert torch.allclose(a.loss, expected, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (1e-3, 1e-3), (0.2, 0.2)])
@pytest.mark.parametrize("spread", [2e-4, 3e-3, 0.3])
@pytest.mark.parametrize("adv_shape", ["(B,)", "(B,T) constant rows"])
def test_gspo_token_equals_gspo_for_sequence_advantages(eps, spread, adv_shape):
    el, eh = eps
    logp, old, adv, mask = _batch(9, spread=spread)
    with torch.no_grad():
        logp[mask == 0] = old[mask == 0] + 5.0  # padding poison
    a_tok = adv if adv_shape == "(B,)" else adv[:, None].expand_as(logp).clone()
    a, ga = _grad(lambda lp: O.gspo_loss(lp, old, adv, mask, clip_eps_low=el, clip_eps_high=eh), logp)
    b, gb = _grad(lambda lp: O.gspo_token_loss(lp, old, a_tok, mask, clip_eps_low=el, clip_eps_high=eh), logp)
    assert torch.allclose(a.loss, b.loss, atol=1e-12, rtol=1e-9)
    assert torch.allclose(ga, gb, atol=1e-12, rtol=1e-9)
    assert abs(a.metrics["clip_frac"].item() - b.metrics["clip_frac"].item()) < 1e-6
    # anchor the gradient: -A_i s_i / (n_i * nonempty) on valid unclipped tokens, 0 elsewhere
    n = mask.sum(-1)
    s = torch.exp(((logp.detach() - old) * mask).sum(-1) / n.clamp(min=1))
    free = torch.where(adv > 0, s <= 1 + eh, s >= 1 - el) & (n > 0)
    expected = torch.where(free[:, None] & mask.bool(), (-adv * s / n.clamp(min=1))[:, None] / (n > 0).sum(),
                           torch.zeros_like(logp))
    assert torch.allclose(ga, expected, atol=1e-12, rtol=1e-9)


# ------------------------------------------------------------------------------------------- SAPO


@pytest.mark.parametrize("mode", MODES[:3])
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.3, 5.0)])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_sapo_gradient_equals_grpo_at_ratio_one(mode, taus, per_token_adv):
    logp, _, adv, mask = _batch(10, per_token_adv)
    old = logp.detach().clone()
    a, ga = _grad(lambda lp: O.sapo_loss(lp, old, adv, mask, tau_pos=taus[0], tau_neg=taus[1], loss_agg_mode=mode),
                  logp)
    b, gb = _grad(lambda lp: O.grpo_loss(lp, old, adv, mask, loss_agg_mode=mode), logp)
    assert torch.allclose(ga, gb, atol=1e-12, rtol=1e-9)
    assert abs(a.metrics["gate_weight_mean"].item() - 1.0) < 1e-6


SAPO_TABLE_R = [0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0]
SAPO_TABLE = {  # algorithms.md section 12, three decimals
    ("w", 1.0): [0.940, 0.990, 1, 0.990, 0.940, 0.786, 0.420, 0.071],
    ("w", 1.05): [0.934, 0.989, 1, 0.989, 0.934, 0.768, 0.389, 0.058],
    ("wr", 1.0): [0.470, 0.792, 1, 1.188, 1.410, 1.573, 1.260, 0.353],
}


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sapo_gradient_weight_table(sign):
    """Extract w * r = -(d loss / d logp) / A for single tokens and compare with the fact-sheet table."""
    old = torch.zeros(len(SAPO_TABLE_R), 1, dtype=torch.float64)
    logp = torch.log(torch.tensor(SAPO_TABLE_R, dtype=torch.float64)).reshape(-1, 1).requires_grad_()
    adv = torch.full((len(SAPO_TABLE_R),), sign, dtype=torch.float64)
    mask = torch.ones_like(old)
    for tau in (1.0, 1.05):
        # the table's tau applies to the sign at hand: tau_pos for A > 0, tau_neg for A < 0
        kwargs = {"tau_pos": tau, "tau_neg": 2.0} if sign > 0 else {"tau_pos": 2.0, "tau_neg": tau}
        _, grad = _grad(lambda lp: O.sapo_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-sum", **kwargs),
                        logp)
        wr = (-grad.reshape(-1) / sign).tolist()  # seq-mean over B rows: d loss/d logp_i = -w_i r_i A_i / B
        wr = [x * len(SAPO_TABLE_R) for x in wr]
        w = [x / r for x, r in zip(wr, SAPO_TABLE_R)]
        for got, want in zip(w, SAPO_TABLE[("w", tau)]):
            assert abs(got - want) <= 5e-4 + 1e-9, (tau, got, want)
        if tau == 1.0:
            for got, want in zip(wr, SAPO_TABLE[("wr", 1.0)]):
                assert abs(got - want) <= 5e-4 + 1e-9, (got, want)
        for got, r in zip(w, SAPO_TABLE_R):  # and the closed form sech^2(tau (r - 1) / 2)
            assert abs(got - 1 / math.cosh(tau * (r - 1) / 2) ** 2) < 1e-12


# ------------------------------------------------------------------------------------------- decoupled / A-3PO


@pytest.mark.parametrize("mode", MODES[:3])
@pytest.mark.parametrize("eps", [(0.2, None), (0.1, 0.3)])
def test_decoupled_ppo_equals_ppo_when_prox_is_behav(mode, eps):
    logp, old, adv, mask = _batch(11, spread=0.5)
    kw = dict(clip_eps_low=eps[0], clip_eps_high=eps[1], loss_agg_mode=mode)
    a, ga = _grad(lambda lp: O.decoupled_ppo_loss(lp, old, old.clone(), adv, mask, **kw), logp)
    b, gb = _grad(lambda lp: O.ppo_loss(lp, old, adv, mask, **kw), logp)
    assert torch.allclose(a.loss, b.loss, atol=1e-14, rtol=1e-9) and torch.allclose(ga, gb, atol=1e-14, rtol=1e-9)
    for key in ("clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl"):
        assert abs(a.metrics[key].item() - b.metrics[key].item()) < 1e-6, key
    assert abs(a.metrics["behav_weight_mean"].item() - 1) < 1e-6
    assert abs(a.metrics["behav_weight_max"].item() - 1) < 1e-6


def test_a3po_staleness_one_is_ppo_against_behav():
    logp, old, adv, mask = _batch(12, spread=0.5)
    a, ga = _grad(lambda lp: O.a3po_loss(lp, old, adv, mask, torch.ones(len(MASK), 1, dtype=torch.long)), logp)
    b, gb = _grad(lambda lp: O.ppo_loss(lp, old, adv, mask), logp)
    assert torch.allclose(a.loss, b.loss, atol=1e-14, rtol=1e-9) and torch.allclose(ga, gb, atol=1e-14, rtol=1e-9)
    assert abs(a.metrics["prox_alpha_mean"].item() - 1) < 1e-6


@pytest.mark.parametrize("mode", MODES[:3])
def test_a3po_staleness_zero_is_ppo_against_behav(mode):
    """Fresh data: pi_prox = pi_behav (the policy at the start of the update), so A-3PO is PPO, clip included.
    (Before the fix pi_prox was sg(pi_theta): ratio 1, no clip, weight pi_theta/pi_behav.)"""
    logp, behav, adv, mask = _batch(13, spread=0.5)
    assert torch.equal(O.a3po_prox_logp(behav, logp, 0), behav)
    a, ga = _grad(lambda lp: O.a3po_loss(lp, behav, adv, mask, 0, loss_agg_mode=mode), logp)
    b, gb = _grad(lambda lp: O.ppo_loss(lp, behav, adv, mask, loss_agg_mode=mode), logp)
    assert torch.allclose(a.loss, b.loss, atol=1e-14, rtol=1e-9) and torch.allclose(ga, gb, atol=1e-14, rtol=1e-9)
    for key in ("clip_frac", "ratio_max", "ratio_min"):
        assert a.metrics[key].item() == b.metrics[key].item(), key
    assert b.metrics["clip_frac"].item() > 0  # the batch reaches the clip, so the equality is not vacuous


# ------------------------------------------------------------------------------------------- dual clip


@pytest.mark.parametrize("c", [1.5, 3.0, 10.0])
def test_dual_clip_bounds_negative_advantage_loss(c):
    lrs = torch.linspace(-4, 4, 81, dtype=torch.float64)
    advs = torch.tensor([-3.0, -1.0, -0.01], dtype=torch.float64)
    logp = lrs.repeat(3).reshape(-1, 1)  # one token per row
    adv = advs.repeat_interleave(81)
    old = torch.zeros_like(logp)
    mask = torch.ones_like(logp)
    # seq-mean-token-sum with one token per row: B * loss is the sum of per-token losses; probe each row alone
    per_token = torch.stack([O.ppo_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                                        dual_clip_c=c).loss for i in range(logp.shape[0])])
    assert torch.all(per_token <= c * adv.abs() + 1e-12)
    plain = torch.stack([O.ppo_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1]).loss
                         for i in range(logp.shape[0])])
    assert torch.any(plain > c * adv.abs() + 1e-6)  # without dual clip the bound is violated
    assert torch.allclose(per_token, torch.minimum(plain, c * adv.abs()), atol=1e-12, rtol=1e-9)


def test_dual_clip_leaves_positive_advantages_alone():
    logp = torch.linspace(-3, 3, 61, dtype=torch.float64).reshape(-1, 1)
    old = torch.zeros_like(logp)
    adv = torch.full((61,), 2.0, dtype=torch.float64)
    mask = torch.ones_like(logp)
    a = O.ppo_loss(logp, old, adv, mask, dual_clip_c=1.5, loss_agg_mode="seq-mean-token-sum")
    b = O.ppo_loss(logp, old, adv, mask, loss_agg_mode="seq-mean-token-sum")
    assert torch.equal(a.loss, b.loss)


# ------------------------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("variant", ["sigmoid", "ipo"])
@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo_gradient_raises_chosen_lowers_rejected(variant, ls):
    g = torch.Generator().manual_seed(14)
    c = (-20 + torch.randn(8, generator=g, dtype=torch.float64)).requires_grad_()
    r = (-20 + torch.randn(8, generator=g, dtype=torch.float64)).requires_grad_()
    c0 = c.detach() + torch.randn(8, generator=g, dtype=torch.float64)
    r0 = r.detach() + torch.randn(8, generator=g, dtype=torch.float64)
    ls = ls if variant == "sigmoid" else 0.0
    out = O.dpo_loss(c, r, c0, r0, dpo_beta=0.1, variant=variant, label_smoothing=ls)
    out.loss.backward()
    # gradient descent moves chosen log-probs up and rejected ones down (IPO: while h < 1/(2 beta) = 5)
    assert torch.all(c.grad < 0) and torch.all(r.grad > 0)
    assert torch.allclose(c.grad, -r.grad, atol=1e-15, rtol=1e-9)  # the loss depends on chosen - rejected only
    with torch.no_grad():
        after = O.dpo_loss(c - 0.5 * c.grad, r - 0.5 * r.grad, c0, r0, dpo_beta=0.1, variant=variant,
                           label_smoothing=ls)
    assert after.loss.item() < out.loss.item()
    assert after.metrics["reward_margin"].item() > out.metrics["reward_margin"].item()


# ------------------------------------------------------------------------------------------- the family since 2025


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_cispo_at_ratio_one_is_vanilla_policy_gradient(mode, per_token_adv):
    """r = 1: CISPO's gradient is -A grad log pi on every token, aggregated (REINFORCE)."""
    logp, old, adv, mask = _batch(91, per_token_adv=per_token_adv)
    _, g = _grad(lambda x: O.cispo_loss(x, old.clone(), adv, mask, **_kw(mode)), logp)
    a = adv if per_token_adv else adv[:, None].expand_as(mask)
    assert torch.allclose(g, -_agg_weights(mode) * a, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_cispo_equals_grpo_gradient_when_nothing_is_clipped(mode, per_token_adv):
    """Off-policy but inside both clip ranges: sg(r) A grad log pi = grad (r A), GRPO's unclipped gradient."""
    logp, old, adv, mask = _batch(92, per_token_adv=per_token_adv, spread=0.5)
    kw = dict(clip_eps_low=0.99, clip_eps_high=100.0)
    _, g_cispo = _grad(lambda x: O.cispo_loss(x, old, adv, mask, **kw, **_kw(mode)), logp)
    out, g_grpo = _grad(lambda x: O.grpo_loss(x, old, adv, mask, **kw, **_kw(mode)), logp)
    assert out.metrics["clip_frac"].item() == 0.0
    assert torch.allclose(g_cispo, g_grpo, atol=1e-12)
    r = (logp.detach() - old).exp()
    a = adv if per_token_adv else adv[:, None].expand_as(mask)
    assert torch.allclose(g_cispo, -_agg_weights(mode) * r * a, atol=1e-12)  # anchored to the formula


def test_cispo_differs_from_grpo_exactly_on_the_clipped_tokens():
    """Where GRPO's clip switches a token off (r > 1 + eps, A > 0), CISPO keeps -(1 + eps) A; elsewhere equal."""
    logp, old, adv, mask = _batch(93, spread=0.6)
    adv = adv.abs() + 0.1  # A > 0 everywhere: the high side bites
    _, g_cispo = _grad(lambda x: O.cispo_loss(x, old, adv, mask, clip_eps_low=0.99, clip_eps_high=0.2), logp)
    _, g_grpo = _grad(lambda x: O.grpo_loss(x, old, adv, mask, clip_eps_low=0.99, clip_eps_high=0.2,
                                            loss_agg_mode="token-mean"), logp)
    r = (logp.detach() - old).exp()
    clipped = (r > 1.2) & mask.bool()
    assert clipped.any() and (~clipped & mask.bool()).any()
    assert torch.all(g_grpo[clipped] == 0)
    w = _agg_weights("token-mean")
    assert torch.allclose(g_cispo[clipped], (-w * 1.2 * adv[:, None])[clipped], atol=1e-12)
    assert torch.allclose(g_cispo[~clipped], g_grpo[~clipped], atol=1e-12)


@pytest.mark.parametrize("spread", [0.0, 0.3])
def test_gmpo_equals_gspo_when_nothing_is_clipped(spread):
    """Unclipped, GMPO's clipped geometric mean is GSPO's s_i: same loss and gradient."""
    logp, old, adv, mask = _batch(94, spread=spread)
    out_g, g_gmpo = _grad(lambda x: O.gmpo_loss(x, old, adv, mask, clip_eps_low=50.0), logp)
    out_s, g_gspo = _grad(lambda x: O.gspo_loss(x, old, adv, mask, clip_eps_low=0.99, clip_eps_high=1e9), logp)
    assert out_g.metrics["clip_frac"].item() == 0.0
    assert torch.allclose(out_g.loss, out_s.loss, atol=1e-12) and torch.allclose(g_gmpo, g_gspo, atol=1e-12)
    s = torch.tensor([math.exp(sum((logp[i, t] - old[i, t]).item() for t in range(5) if MASK[i][t]) / max(sum(MASK[i]), 1))
                      for i in range(len(MASK))], dtype=torch.float64)
    rows = [i for i in range(len(MASK)) if sum(MASK[i])]
    assert abs(out_g.loss.item() + sum(s[i].item() * adv[i].item() for i in rows) / len(rows)) < 1e-12


def test_gmpo_at_ratio_one_is_grpo_gradient():
    """r = 1: A_i 1/|o_i| sum_t grad log pi, GRPO's seq-mean-token-mean gradient (whatever the clip range)."""
    logp, old, adv, mask = _batch(95)
    _, g_gmpo = _grad(lambda x: O.gmpo_loss(x, old.clone(), adv, mask), logp)
    _, g_grpo = _grad(lambda x: O.grpo_loss(x, old.clone(), adv, mask, loss_agg_mode="seq-mean-token-mean"), logp)
    assert torch.allclose(g_gmpo, g_grpo, atol=1e-12)
    assert torch.allclose(g_gmpo, -_agg_weights("seq-mean-token-mean") * adv[:, None], atol=1e-12)


def test_gmpo_clips_tokens_where_gspo_drops_the_response():
    """A response whose sequence ratio GSPO clips loses all gradient there; GMPO keeps its unclipped tokens."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[0.05, 0.05, 0.9]], dtype=torch.float64, requires_grad=True)  # mean log r = 1/3
    adv = torch.tensor([1.0], dtype=torch.float64)
    _, g_gspo = _grad(lambda x: O.gspo_loss(x, old, adv, torch.ones(1, 3), clip_eps_low=0.2, clip_eps_high=0.2), logp)
    _, g_gmpo = _grad(lambda x: O.gmpo_loss(x, old, adv, torch.ones(1, 3), clip_eps_low=0.2), logp)
    assert torch.all(g_gspo == 0)
    s = math.exp((0.05 + 0.05 + 0.2) / 3)
    assert torch.allclose(g_gmpo, torch.tensor([[-s / 3, -s / 3, 0.0]], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("g", [2, 3, 8])
def test_rloo_is_the_group_mean_baseline_scaled_by_g_over_g_minus_1(g):
    import xxpo.functional as F

    rewards = torch.randn(4 * g, generator=torch.Generator().manual_seed(g), dtype=torch.float64)
    loo = F.leave_one_out_advantages(rewards, g)
    assert torch.allclose(loo, g / (g - 1) * F.group_advantages(rewards, g, adv_norm="none"), atol=1e-12)
    grouped = rewards.view(-1, g)  # anchored: R_i - mean of the others, written out
    others = torch.stack([torch.cat([grouped[:, :i], grouped[:, i + 1:]], 1).mean(1) for i in range(g)], 1)
    assert torch.allclose(loo, (grouped - others).reshape(-1), atol=1e-12)


def test_reinforce_pp_without_kl_is_a_token_weighted_batch_z_score():
    """gamma = 1, no KL: every token of a response carries R_i, so the advantage is batch_whiten of R over tokens;
    with the group baseline it is the same over R - group mean."""
    import xxpo.functional as F

    rewards = torch.tensor([1.0, 0.0, 1.0, 0.3, 0.7, 0.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    tokens = rewards[:, None] * mask
    assert torch.allclose(F.reinforce_pp_advantages(rewards, mask),
                          F.batch_whiten(tokens, mask, unbiased=True), atol=1e-12)
    centred = (rewards.view(-1, 3) - rewards.view(-1, 3).mean(-1, keepdim=True)).reshape(-1)
    assert torch.allclose(F.reinforce_pp_advantages(rewards, mask, group_size=3),
                          F.batch_whiten(centred[:, None] * mask, mask, unbiased=True), atol=1e-12)
