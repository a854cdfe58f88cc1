"""Bad input raises ValueError/TypeError whose message names the argument (common.md standards)."""

import math

import pytest
import torch

import xxpo.functional as F
import xxpo.objectives as O

B, T = 3, 4
NAN = float("nan")


def _f(*shape, value=-1.0):
    return torch.full(shape, value, dtype=torch.float64)


def _mask():
    return torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


def _policy():
    return dict(logp=_f(B, T), old_logp=_f(B, T, value=-1.1), advantages=torch.tensor([1.0, -1.0, 0.5],
                dtype=torch.float64), mask=_mask())


# objective -> (function, base kwargs builder, tensor arguments that must be floating, extra fixed kwargs)
OBJECTIVES = {
    "ppo_loss": (O.ppo_loss, _policy, {}),
    "grpo_loss": (O.grpo_loss, _policy, {}),
    "dr_grpo_loss": (O.dr_grpo_loss, _policy, {"norm_len": 8}),
    "dapo_loss": (O.dapo_loss, _policy, {}),
    "gspo_loss": (O.gspo_loss, _policy, {}),
    "gspo_token_loss": (O.gspo_token_loss, _policy, {}),
    "sapo_loss": (O.sapo_loss, _policy, {}),
    "sppo_seq_loss": (O.sppo_seq_loss, _policy, {}),
    "decoupled_ppo_loss": (
        O.decoupled_ppo_loss,
        lambda: dict(logp=_f(B, T), behav_logp=_f(B, T, value=-1.2), prox_logp=_f(B, T, value=-1.1),
                     advantages=torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64), mask=_mask()),
        {},
    ),
    "a3po_loss": (
        O.a3po_loss,
        lambda: dict(logp=_f(B, T), behav_logp=_f(B, T, value=-1.2),
                     advantages=torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64), mask=_mask(),
                     staleness=torch.tensor([[1], [2], [0]])),
        {},
    ),
    "value_loss": (
        O.value_loss,
        lambda: dict(values=_f(B, T, value=0.5), old_values=_f(B, T, value=0.4), returns=_f(B, T, value=1.0),
                     mask=_mask()),
        {},
    ),
    "dpo_loss": (
        O.dpo_loss,
        lambda: dict(chosen_logp=_f(B, value=-3.0), rejected_logp=_f(B, value=-4.0), ref_chosen_logp=_f(B, value=-3.5),
                     ref_rejected_logp=_f(B, value=-3.5)),
        {},
    ),
    "sppo_selfplay_loss": (
        O.sppo_selfplay_loss,
        lambda: dict(logp_seq=_f(B, value=-3.0), ref_logp_seq=_f(B, value=-3.2),
                     win_prob=torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)),
        {},
    ),
    "sequence_value_loss": (
        O.sequence_value_loss,
        lambda: dict(value_logits=_f(B, value=0.3), rewards=torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)),
        {},
    ),
}

FLOAT_ARGS = {
    "ppo_loss": ("logp", "old_logp", "advantages"),
    "decoupled_ppo_loss": ("logp", "behav_logp", "prox_logp", "advantages"),
    "a3po_loss": ("logp", "behav_logp", "advantages"),
    "value_loss": ("values", "old_values", "returns"),
    "dpo_loss": ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp"),
    "sppo_selfplay_loss": ("logp_seq", "ref_logp_seq", "win_prob"),
    "sequence_value_loss": ("value_logits", "rewards"),
}
for _name in ("grpo_loss", "dr_grpo_loss", "dapo_loss", "gspo_loss", "gspo_token_loss", "sapo_loss", "sppo_seq_loss"):
    FLOAT_ARGS[_name] = FLOAT_ARGS["ppo_loss"]


def _call(name, **override):
    fn, build, fixed = OBJECTIVES[name]
    kwargs = {**build(), **fixed, **override}
    return fn(**kwargs)


def test_every_base_call_is_valid():
    for name in OBJECTIVES:
        assert torch.isfinite(_call(name).loss), name


def _tensor_cases():
    cases = []
    for name, args in FLOAT_ARGS.items():
        _, build, _ = OBJECTIVES[name]
        base = build()
        for i, arg in enumerate(args):
            x = base[arg]
            cases.append((name, arg, "list", x.tolist(), TypeError))
            cases.append((name, arg, "int", x.round().to(torch.int64), TypeError))
            bad = x.clone()
            bad.view(-1)[0] = NAN
            cases.append((name, arg, "nan", bad, ValueError))
            bad = x.clone()
            bad.view(-1)[-1] = math.inf
            cases.append((name, arg, "inf", bad, ValueError))
            if i > 0:
                cases.append((name, arg, "shape", torch.cat([x, x[:1]]), ValueError))
        if "mask" in base:
            m = base["mask"]
            cases.append((name, "mask", "list", m.tolist(), TypeError))
            cases.append((name, "mask", "shape", m[:, :2], ValueError))
            cases.append((name, "mask", "nonbinary", m.double() * 0.5, ValueError))
    return cases


@pytest.mark.parametrize("name,arg,kind,value,exc", _tensor_cases(),
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in _tensor_cases()])
def test_bad_tensor_argument(name, arg, kind, value, exc):
    with pytest.raises(exc, match=arg):
        _call(name, **{arg: value})


def test_advantages_wrong_shapes():
    for name in ("ppo_loss", "grpo_loss", "sapo_loss", "gspo_token_loss", "dapo_loss"):
        with pytest.raises(ValueError, match="advantages"):
            _call(name, advantages=_f(B + 1))
        with pytest.raises(ValueError, match="advantages"):
            _call(name, advantages=_f(B, T + 1))
        with pytest.raises(ValueError, match="advantages"):
            _call(name, advantages=_f(B, T, 2))


CLIPPED = ("ppo_loss", "grpo_loss", "dr_grpo_loss", "dapo_loss", "gspo_loss", "gspo_token_loss", "sppo_seq_loss",
           "decoupled_ppo_loss", "a3po_loss")
WITH_MODE = ("ppo_loss", "grpo_loss", "dapo_loss", "sapo_loss", "sppo_seq_loss", "decoupled_ppo_loss", "a3po_loss",
             "value_loss")
WITH_KL = ("grpo_loss", "dr_grpo_loss", "dapo_loss")


def _hyper_cases():
    cases = []
    for name in CLIPPED:
        for v in (-0.1, NAN, 1.0, 1.5, math.inf):
            cases.append((name, {"clip_eps_low": v}, ValueError, "clip_eps_low"))
        for v in (-0.1, NAN, math.inf):
            cases.append((name, {"clip_eps_high": v}, ValueError, "clip_eps_high"))
        cases.append((name, {"clip_eps_low": "0.2"}, TypeError, "clip_eps_low"))
    for name in ("ppo_loss", "grpo_loss", "dapo_loss"):
        for v in (1.0, 0.5, -3.0, NAN):
            cases.append((name, {"dual_clip_c": v}, ValueError, "dual_clip_c"))
    for name in WITH_MODE:
        cases.append((name, {"loss_agg_mode": "token_mean"}, ValueError, "loss_agg_mode"))
        cases.append((name, {"loss_agg_mode": "mean"}, ValueError, "loss_agg_mode"))
    for name in ("ppo_loss", "grpo_loss", "dapo_loss"):
        cases.append((name, {"loss_agg_mode": "seq-mean-token-sum-norm"}, ValueError, "norm_len"))
        for v in (0, -5, NAN):
            cases.append((name, {"loss_agg_mode": "seq-mean-token-sum-norm", "norm_len": v}, ValueError, "norm_len"))
    for v in (0, -1, NAN):
        cases.append(("dr_grpo_loss", {"norm_len": v}, ValueError, "norm_len"))
    for name in WITH_KL:
        ref = _f(B, T, value=-1.3)
        for v in (-0.1, NAN, math.inf):
            cases.append((name, {"kl_coef": v, "ref_logp": ref}, ValueError, "kl_coef"))
        cases.append((name, {"kl_coef": 0.1}, ValueError, "ref_logp"))
        cases.append((name, {"kl_coef": 0.1, "ref_logp": ref, "kl_estimator": "k4"}, ValueError, "kl_estimator"))
        cases.append((name, {"kl_coef": 0.1, "ref_logp": ref[:, :2]}, ValueError, "ref_logp"))
        bad = ref.clone()
        bad[0, 0] = NAN
        cases.append((name, {"kl_coef": 0.1, "ref_logp": bad}, ValueError, "ref_logp"))
        cases.append((name, {"kl_coef": 0.1, "ref_logp": ref.long()}, TypeError, "ref_logp"))
    for arg in ("tau_pos", "tau_neg"):
        for v in (0.0, -1.0, NAN, math.inf):
            cases.append(("sapo_loss", {arg: v}, ValueError, arg))
    for v in (0.0, -1.0, NAN):
        cases.append(("decoupled_ppo_loss", {"behav_weight_cap": v}, ValueError, "behav_weight_cap"))
        cases.append(("a3po_loss", {"behav_weight_cap": v}, ValueError, "behav_weight_cap"))
    cases.append(("a3po_loss", {"staleness": torch.tensor([[1], [-1], [0]])}, ValueError, "staleness"))
    cases.append(("a3po_loss", {"staleness": -2}, ValueError, "staleness"))
    cases.append(("a3po_loss", {"staleness": torch.tensor([[1.5], [2.0], [0.0]])}, ValueError, "staleness"))
    cases.append(("a3po_loss", {"staleness": True}, TypeError, "staleness"))
    cases.append(("a3po_loss", {"staleness": 1.0}, TypeError, "staleness"))
    cases.append(("a3po_loss", {"staleness": [1, 2, 0]}, TypeError, "staleness"))
    cases.append(("a3po_loss", {"staleness": torch.ones(B, T + 1, dtype=torch.int64)}, ValueError, "staleness"))
    for v in (-0.1, NAN):
        cases.append(("value_loss", {"clip_eps": v}, ValueError, "clip_eps"))
    for v in (0.0, -0.1, NAN, math.inf):
        cases.append(("dpo_loss", {"dpo_beta": v}, ValueError, "dpo_beta"))
    for v in (0.5, 0.7, -0.1, NAN):
        cases.append(("dpo_loss", {"label_smoothing": v}, ValueError, "label_smoothing"))
    cases.append(("dpo_loss", {"variant": "hinge"}, ValueError, "variant"))
    for v in (-1.0, NAN, math.inf):
        cases.append(("sppo_selfplay_loss", {"eta": v}, ValueError, "eta"))
    for v in (1.5, -0.1):
        cases.append(("sppo_selfplay_loss", {"win_prob": torch.tensor([0.2, v, 0.9], dtype=torch.float64)},
                      ValueError, "win_prob"))
        cases.append(("sequence_value_loss", {"rewards": torch.tensor([0.0, v, 1.0], dtype=torch.float64)},
                      ValueError, "rewards"))
    return cases


@pytest.mark.parametrize("name,override,exc,match", _hyper_cases(),
                         ids=[f"{c[0]}-{'-'.join(c[1])}-{i}" for i, c in enumerate(_hyper_cases())])
def test_bad_hyperparameter(name, override, exc, match):
    with pytest.raises(exc, match=match):
        _call(name, **override)


def test_dr_grpo_norm_len_is_required():
    fn, build, _ = OBJECTIVES["dr_grpo_loss"]
    with pytest.raises(TypeError, match="norm_len"):
        fn(**build())


def test_gspo_refuses_token_advantages():
    with pytest.raises(ValueError, match="gspo_token_loss"):
        _call("gspo_loss", advantages=_f(B, T))


def test_a3po_prox_logp_validation():
    behav, logp = _f(B, T), _f(B, T, value=-0.5)
    with pytest.raises(ValueError, match="staleness"):
        O.a3po_prox_logp(behav, logp, -1)
    with pytest.raises(ValueError, match="staleness"):
        O.a3po_prox_logp(behav, logp, torch.tensor([[0, -3, 1, 1]]))
    with pytest.raises(ValueError, match="logp"):
        O.a3po_prox_logp(behav, logp[:, :2], 1)
    with pytest.raises(TypeError, match="behav_logp"):
        O.a3po_prox_logp(behav.long(), logp, 1)


def test_overlong_penalty_validation():
    lengths = torch.tensor([3, 9, 12])
    with pytest.raises(ValueError, match="max_len"):
        O.overlong_penalty(lengths, 0, 4)
    with pytest.raises(ValueError, match="cache_len"):
        O.overlong_penalty(lengths, 10, -1)
    with pytest.raises(ValueError, match="cache_len"):
        O.overlong_penalty(lengths, 10, 11)
    with pytest.raises(TypeError, match="lengths"):
        O.overlong_penalty([3, 9], 10, 4)


def _trpo_problem():
    theta = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.0, 0.0]], dtype=torch.float64)
    old = torch.log_softmax(torch.zeros(2, 3, dtype=torch.float64), -1)
    return ([theta], lambda: (torch.softmax(theta, -1) * adv).sum(-1).mean(),
            lambda: (old.exp() * (old - torch.log_softmax(theta, -1))).sum(-1).mean())


@pytest.mark.parametrize("kwargs,match", [
    ({"max_kl": 0.0}, "max_kl"), ({"max_kl": -0.01}, "max_kl"), ({"max_kl": NAN}, "max_kl"),
    ({"damping": -0.1}, "damping"), ({"damping": NAN}, "damping"),
    ({"cg_iters": 0}, "cg_iters"), ({"backtrack_iters": 0}, "backtrack_iters"),
    ({"backtrack_coeff": 0.0}, "backtrack_coeff"), ({"backtrack_coeff": 1.5}, "backtrack_coeff"),
])
def test_trpo_bad_hyperparameters(kwargs, match):
    params, surrogate, kl = _trpo_problem()
    with pytest.raises(ValueError, match=match):
        O.trpo_step(params, surrogate, kl, **kwargs)
    assert torch.equal(params[0].detach(), torch.zeros(2, 3, dtype=torch.float64))


def test_trpo_bad_params():
    _, surrogate, kl = _trpo_problem()
    with pytest.raises((TypeError, ValueError), match="params"):
        O.trpo_step("theta", surrogate, kl)
    with pytest.raises(ValueError, match="params"):
        O.trpo_step([], surrogate, kl)


def test_get_unknown_method_names_argument():
    with pytest.raises(ValueError, match="method"):
        O.get("xxpo")


# ------------------------------------------------------------------------------------------- functional


_LOSS, _MASK = _f(B, T), _mask()
_REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
_LOGITS = torch.randn(2, 3, 5)
_IDX = torch.zeros(2, 3, dtype=torch.long)
_VALUES = _f(B, T, value=0.1)

FUNCTIONAL_CASES = [
    ("aggregate-mode", lambda: F.aggregate(_LOSS, _MASK, "sum"), ValueError, "mode"),
    ("aggregate-no-norm_len", lambda: F.aggregate(_LOSS, _MASK, "seq-mean-token-sum-norm"), ValueError, "norm_len"),
    ("aggregate-norm_len-0", lambda: F.aggregate(_LOSS, _MASK, "seq-mean-token-sum-norm", norm_len=0), ValueError,
     "norm_len"),
    ("aggregate-mask-shape", lambda: F.aggregate(_LOSS, _MASK[:, :2]), ValueError, "mask"),
    ("group-size-1", lambda: F.group_advantages(_REWARDS, 1), ValueError, "group_size"),
    ("group-size-not-divisor", lambda: F.group_advantages(_REWARDS, 3), ValueError, "group_size"),
    ("adv_norm", lambda: F.group_advantages(_REWARDS, 2, adv_norm="std"), ValueError, "adv_norm"),
    ("eps", lambda: F.group_advantages(_REWARDS, 2, eps=-1e-6), ValueError, "eps"),
    ("rewards-nan", lambda: F.group_advantages(torch.tensor([1.0, NAN], dtype=torch.float64), 2), ValueError,
     "rewards"),
    ("rewards-int", lambda: F.group_advantages(torch.tensor([1, 0]), 2), TypeError, "rewards"),
    ("group-size-float", lambda: F.group_advantages(_REWARDS, 2.0), ValueError, "group_size"),
    ("group-size-bool", lambda: F.group_advantages(_REWARDS, True), ValueError, "group_size"),
    ("adv-mask-rows", lambda: F.group_advantages(_REWARDS, 2, mask=torch.ones(3, 2)), ValueError, "mask"),
    ("adv-mask-1d", lambda: F.group_advantages(_REWARDS, 2, mask=torch.ones(4)), ValueError, "mask"),
    ("adv-mask-values", lambda: F.group_advantages(_REWARDS, 2, mask=torch.full((4, 2), 2.0)), ValueError, "mask"),
    ("adv-mask-list", lambda: F.group_advantages(_REWARDS, 2, mask=[[1, 1]] * 4), TypeError, "mask"),
    ("aggregate-complex-mask", lambda: F.aggregate(_LOSS, _MASK.to(torch.complex64)), TypeError, "mask"),
    ("loo-group-size-1", lambda: F.leave_one_out_advantages(_REWARDS, 1), ValueError, "group_size"),
    ("kl-estimator", lambda: F.kl_penalty(_LOSS, _LOSS, "k4"), ValueError, "estimator"),
    ("kl-ref-shape", lambda: F.kl_penalty(_LOSS, _LOSS[:, :2], "k3"), ValueError, "ref_logp"),
    ("sls-chunk_size", lambda: F.selective_log_softmax(_LOGITS, _IDX, chunk_size=0), ValueError, "chunk_size"),
    ("sls-float-index", lambda: F.selective_log_softmax(_LOGITS, _IDX.float()), TypeError, "index"),
    ("sls-int-logits", lambda: F.selective_log_softmax(_LOGITS.long(), _IDX), TypeError, "logits"),
    ("sls-index-shape", lambda: F.selective_log_softmax(_LOGITS, torch.zeros(2, 4, dtype=torch.long)), ValueError,
     "index"),
    ("entropy-chunk_size", lambda: F.entropy_from_logits(_LOGITS, chunk_size=0), ValueError, "chunk_size"),
    ("gae-gamma", lambda: F.gae(_LOSS, _VALUES, _MASK, gamma=-0.1), ValueError, "gamma"),
    ("gae-lam", lambda: F.gae(_LOSS, _VALUES, _MASK, lam=NAN), ValueError, "lam"),
    ("gae-values-shape", lambda: F.gae(_LOSS, _VALUES[:, :2], _MASK), ValueError, "values"),
    ("token_log_ratio-shape", lambda: F.token_log_ratio(_LOSS, _LOSS[:, :2]), ValueError, "old_logp"),
    ("token_log_ratio-broadcast", lambda: F.token_log_ratio(_LOSS, _LOSS[:, :1]), ValueError, "old_logp"),
    ("sequence_log_ratio-mask", lambda: F.sequence_log_ratio(_LOSS, _LOSS, _MASK[:, :1]), ValueError, "mask"),
    ("is_corrected_k3-old-shape", lambda: F.is_corrected_k3(_LOSS, _LOSS, _LOSS[:, :1]), ValueError, "old_logp"),
    ("masked_mean-mask-shape", lambda: F.masked_mean(_LOSS, _MASK[:, :1]), ValueError, "mask"),
    ("kl-ref-broadcast", lambda: F.kl_penalty(_LOSS, _LOSS[:, :1], "k3"), ValueError, "ref_logp"),
]


@pytest.mark.parametrize("case,call,exc,match", FUNCTIONAL_CASES, ids=[c[0] for c in FUNCTIONAL_CASES])
def test_functional_validation(case, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_zero_row_inputs_give_empty_outputs():
    out = F.selective_log_softmax(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32
    assert F.entropy_from_logits(torch.zeros(0, 3, 7, dtype=torch.float64)).shape == (0, 3)
