"""Cross-cutting checks for xxpo.objectives: registry, the LossOutput contract, float64 gradcheck."""

import math

import pytest
import torch

import xxpo.objectives as O

NAMES = ("ppo", "trpo", "grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "sapo", "decoupled_ppo", "a3po", "dpo",
         "sppo_selfplay", "sppo_seq", "cispo", "gmpo", "rloo", "reinforce_pp")
FUNCS = {
    "ppo": "ppo_loss", "trpo": "trpo_step", "grpo": "grpo_loss", "dr_grpo": "dr_grpo_loss", "dapo": "dapo_loss",
    "gspo": "gspo_loss", "gspo_token": "gspo_token_loss", "sapo": "sapo_loss", "decoupled_ppo": "decoupled_ppo_loss",
    "a3po": "a3po_loss", "dpo": "dpo_loss", "sppo_selfplay": "sppo_selfplay_loss", "sppo_seq": "sppo_seq_loss",
    "cispo": "cispo_loss", "gmpo": "gmpo_loss", "rloo": "ppo_loss", "reinforce_pp": "ppo_loss",  # the last two
}  # change the advantage estimator only


def test_methods_tuple():
    assert isinstance(O.METHODS, tuple)
    assert set(O.METHODS) == set(NAMES) and len(O.METHODS) == len(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_get_returns_the_objective(name):
    assert O.get(name) is getattr(O, FUNCS[name])


@pytest.mark.parametrize("bad", ["PPO", "grpo ", "", "gspo-token", "sppo"])
def test_get_unknown_method(bad):
    with pytest.raises(ValueError, match="method"):
        O.get(bad)


def test_loss_output_is_a_namedtuple():
    out = O.LossOutput(torch.tensor(1.0), {})
    loss, metrics = out
    assert out.loss is loss and out.metrics is metrics
    assert O.LossOutput._fields == ("loss", "metrics")


# ------------------------------------------------------------------------------------------- float64 points


def _policy_point(seed, b=3, t=4, spread=0.15):
    """A point well inside the clip range (|r - 1| <= 0.16 < 0.2) and away from every kink."""
    g = torch.Generator().manual_seed(seed)
    old = -1 - torch.rand(b, t, generator=g, dtype=torch.float64)
    logp = (old + spread * (2 * torch.rand(b, t, generator=g, dtype=torch.float64) - 1)).requires_grad_()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]][:b], dtype=torch.float64)
    return logp, old, adv, mask


def _clipped_point(seed):
    """Ratios far outside the clip range (r in [1.5, 2] or [0.4, 0.6]) so the clipped branches are exercised."""
    logp, old, adv, mask = _policy_point(seed)
    g = torch.Generator().manual_seed(seed + 1)
    sign = torch.where(torch.rand(old.shape, generator=g) < 0.5, -1.0, 1.0).double()
    mag = 0.5 + 0.2 * torch.rand(old.shape, generator=g, dtype=torch.float64)
    return (old + sign * mag).requires_grad_(), old, adv, mask


POLICY_CASES = {
    "ppo": lambda lp, o, a, m: O.ppo_loss(lp, o, a, m),
    "ppo_dual": lambda lp, o, a, m: O.ppo_loss(lp, o, a, m, dual_clip_c=1.7, clip_eps_high=0.28),
    "ppo_norm": lambda lp, o, a, m: O.ppo_loss(lp, o, a, m, loss_agg_mode="seq-mean-token-sum-norm", norm_len=5),
    "grpo": lambda lp, o, a, m: O.grpo_loss(lp, o, a, m),
    "grpo_kl": lambda lp, o, a, m: O.grpo_loss(lp, o, a, m, ref_logp=o - 0.3, kl_coef=0.1),
    "grpo_k2_sum": lambda lp, o, a, m: O.grpo_loss(lp, o, a, m, ref_logp=o + 0.2, kl_coef=0.1, kl_estimator="k2",
                                                   loss_agg_mode="seq-mean-token-sum"),
    "dr_grpo": lambda lp, o, a, m: O.dr_grpo_loss(lp, o, a, m, norm_len=6),
    "dapo": lambda lp, o, a, m: O.dapo_loss(lp, o, a, m),
    "gspo": lambda lp, o, a, m: O.gspo_loss(lp, o, a, m, clip_eps_low=0.3, clip_eps_high=0.3),
    "gspo_token": lambda lp, o, a, m: O.gspo_token_loss(lp, o, a, m, clip_eps_low=0.3, clip_eps_high=0.3),
    "sapo": lambda lp, o, a, m: O.sapo_loss(lp, o, a, m),
    "sapo_token_mean": lambda lp, o, a, m: O.sapo_loss(lp, o, a, m, tau_pos=2.0, tau_neg=0.5,
                                                       loss_agg_mode="token-mean"),
    "decoupled_ppo": lambda lp, o, a, m: O.decoupled_ppo_loss(lp, o - 0.1, o, a, m, behav_weight_cap=2.0),
    # staleness 1 makes prox = behav: a3po's prox is computed from logp *values* (detached), so for any
    # other staleness the finite differences see a dependence the gradient deliberately ignores.
    "a3po": lambda lp, o, a, m: O.a3po_loss(lp, o, a, m, 1),
    "sppo_seq": lambda lp, o, a, m: O.sppo_seq_loss(lp, o, a, m),
    # CISPO's stop-gradient weight is not differentiated, so finite differences see it; test_cispo.py gradchecks
    # it with the weight frozen. GMPO is differentiable almost everywhere (per-token clips in log space).
    "gmpo": lambda lp, o, a, m: O.gmpo_loss(lp, o, a, m, clip_eps_low=0.3),
}
STOP_GRADIENT_CASES = {"cispo": lambda lp, o, a, m: O.cispo_loss(lp, o, a, m, clip_eps_high=0.1)}
"""Objectives whose gradient is by design not the derivative of their value (gradchecked in their own files)."""
ALL_CASES = {**POLICY_CASES, **STOP_GRADIENT_CASES}


@pytest.mark.parametrize("case", sorted(POLICY_CASES))
@pytest.mark.parametrize("point", ["inside", "clipped"])
def test_gradcheck_policy_objectives(case, point):
    if point == "clipped" and case in ("gspo", "gspo_token", "sapo", "sapo_token_mean"):
        logp, old, adv, mask = _clipped_point(91)
        logp = (old + 0.5 * (logp.detach() - old)).requires_grad_()  # sequence ratios away from the 0.7/1.3 edges
    elif point == "clipped":
        logp, old, adv, mask = _clipped_point(91)
    else:
        logp, old, adv, mask = _policy_point(92)
    fn = POLICY_CASES[case]
    assert torch.autograd.gradcheck(lambda lp: fn(lp, old, adv, mask).loss, (logp,), eps=1e-6, atol=1e-7)


def test_gradcheck_token_advantages():
    # gspo_token_loss is left out on purpose: with per-token advantages its stop-gradient construction
    # (value s_i, gradient s_i * grad logp_t) is not the derivative of its value; see test_gspo.py.
    logp, old, _, mask = _policy_point(93)
    adv = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for fn in (O.ppo_loss, O.grpo_loss, O.sapo_loss, O.dapo_loss, O.sppo_seq_loss):
        assert torch.autograd.gradcheck(lambda lp: fn(lp, old, adv, mask).loss, (logp,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_gradcheck_value_loss(clip_eps):
    g = torch.Generator().manual_seed(94)
    old = torch.randn(3, 4, generator=g, dtype=torch.float64)
    # half the values move by 0.05 (inside the clip), half by 0.5 (outside)
    step = torch.tensor([[0.05, -0.5, 0.5, -0.05]] * 3, dtype=torch.float64)
    values = (old + step).requires_grad_()
    returns = old + torch.tensor([[1.0, 0.3, -2.0, -0.4]] * 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]])
    assert torch.autograd.gradcheck(
        lambda v: O.value_loss(v, old, returns, mask, clip_eps=clip_eps).loss, (values,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_gradcheck_dpo(variant, ls):
    g = torch.Generator().manual_seed(95)
    c, r = (torch.randn(4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    c0, r0 = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.autograd.gradcheck(
        lambda x, y: O.dpo_loss(x, y, c0, r0, dpo_beta=0.5, variant=variant, label_smoothing=ls).loss, (c, r))


def test_gradcheck_sppo_selfplay_and_sequence_value():
    g = torch.Generator().manual_seed(96)
    logp = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    ref_lp = torch.randn(4, generator=g, dtype=torch.float64)
    win = torch.rand(4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: O.sppo_selfplay_loss(x, ref_lp, win, eta=3.0).loss, (logp,))
    z = (3 * torch.randn(5, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.rand(5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: O.sequence_value_loss(v, y).loss, (z,))


# ------------------------------------------------------------------------------------------- LossOutput contract


def _all_calls():
    logp, old, adv, mask = _policy_point(97)
    c, r, c0, r0 = (torch.randn(3, dtype=torch.float64) for _ in range(4))
    c.requires_grad_()
    r.requires_grad_()
    calls = {name: (lambda f=f: f(logp, old, adv, mask)) for name, f in ALL_CASES.items()}
    calls["value_loss"] = lambda: O.value_loss(logp, old, old + 1, mask)
    calls["value_loss_unclipped"] = lambda: O.value_loss(logp, old, old + 1, mask, clip_eps=None)
    calls["dpo"] = lambda: O.dpo_loss(c, r, c0, r0)
    calls["dpo_ipo"] = lambda: O.dpo_loss(c, r, c0, r0, variant="ipo")
    calls["sppo_selfplay"] = lambda: O.sppo_selfplay_loss(c, c0, torch.full((3,), 0.7, dtype=torch.float64))
    calls["sequence_value"] = lambda: O.sequence_value_loss(r, torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    return calls


@pytest.mark.parametrize("name", sorted(_all_calls()))
def test_loss_output_contract(name):
    out = _all_calls()[name]()
    assert isinstance(out, O.LossOutput)
    assert isinstance(out.loss, torch.Tensor) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.loss.requires_grad
    assert isinstance(out.metrics, dict) and out.metrics
    for key, value in out.metrics.items():
        assert isinstance(key, str)
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert not value.requires_grad and value.grad_fn is None, key
        assert math.isfinite(value.item()), key


@pytest.mark.parametrize("name", ["ppo", "grpo", "dapo", "sapo", "gspo", "gspo_token", "decoupled_ppo", "a3po",
                                  "sppo_seq", "dr_grpo", "cispo", "gmpo"])
def test_empty_batch_gives_zero_loss_and_finite_metrics(name):
    logp, old, adv, _ = _policy_point(98)
    out = ALL_CASES[name](logp, old, adv, torch.zeros(3, 4))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    for key, value in out.metrics.items():
        assert math.isfinite(value.item()), key
    for key in ("ratio_mean", "ratio_min", "ratio_max"):  # "0 if none"
        assert out.metrics[key].item() == 0.0, key


@pytest.mark.parametrize("name", ["ppo", "grpo_kl", "gspo", "gspo_token", "sapo", "a3po", "dr_grpo", "cispo", "gmpo"])
def test_mask_dtypes_agree(name):
    logp, old, adv, mask = _policy_point(99)
    losses = [ALL_CASES[name](logp, old, adv, m).loss for m in (mask, mask.bool(), mask.long(), mask.float())]
    assert all(torch.equal(losses[0], x) for x in losses[1:])
