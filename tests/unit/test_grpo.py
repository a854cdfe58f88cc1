"""grpo_loss, dr_grpo_loss, dapo_loss and overlong_penalty (algorithms.md sections 6, 7, 8)."""

import math

import pytest
import torch

from xxpo.objectives import dapo_loss, dr_grpo_loss, grpo_loss, overlong_penalty

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
CLIP_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "approx_kl")


def _check_metrics(metrics, expected, names, tol=1e-6):
    for name in names:
        v = metrics[name]
        assert v.dim() == 0 and not v.requires_grad, name
        assert abs(v.item() - expected[name]) <= tol * (1 + abs(expected[name])), (name, v.item(), expected[name])


def _ref_logp(logp, seed):
    g = torch.Generator().manual_seed(seed)
    return (logp.detach() + 0.5 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).requires_grad_()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kl", [(None, 0.0), ("k1", 0.1), ("k2", 0.05), ("k3", 0.04), ("k3", 0.0)])
@pytest.mark.parametrize("eps", [(0.2, None), (0.2, 0.27)])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_grpo_value_gradient_metrics(ref, policy_batch, tl, mode, kl, eps, per_token_adv):
    estimator, coef = kl
    el, eh = eps
    logp, old, adv, mask = policy_batch(31, spread=0.9, per_token_adv=per_token_adv, avoid=(1 - el, 1 + (eh or el)))
    logp.requires_grad_()
    ref_logp = None if estimator is None else _ref_logp(logp, 32)
    norm_len = 8 if mode.endswith("norm") else None
    kwargs = {} if estimator is None else dict(ref_logp=ref_logp, kl_coef=coef, kl_estimator=estimator)
    out = grpo_loss(logp, old, adv, mask, clip_eps_low=el, clip_eps_high=eh, loss_agg_mode=mode,
                    norm_len=norm_len, **kwargs)
    e_loss, e_grad, e_metrics = ref.grpo(tl(logp), tl(old), tl(adv), tl(mask), el, eh,
                                         None if ref_logp is None else tl(ref_logp), coef, estimator or "k3", mode,
                                         norm_len)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    if ref_logp is not None:
        assert ref_logp.grad is None  # the reference is a constant
        _check_metrics(out.metrics, e_metrics, CLIP_METRICS + ("kl",))
    else:
        _check_metrics(out.metrics, e_metrics, CLIP_METRICS)


def test_grpo_default_mode_is_seq_mean_token_mean(ref, policy_batch, tl):
    logp, old, adv, mask = policy_batch(33)
    e_loss, _, _ = ref.grpo(tl(logp), tl(old), tl(adv), tl(mask), mode="seq-mean-token-mean")
    other, _, _ = ref.grpo(tl(logp), tl(old), tl(adv), tl(mask), mode="token-mean")
    assert abs(e_loss - other) > 1e-3  # the two modes differ on this batch
    assert abs(grpo_loss(logp, old, adv, mask).loss.item() - e_loss) < 1e-10


def test_grpo_dual_clip(ref, policy_batch, tl):
    logp, old, adv, mask = policy_batch(34, spread=1.5, per_token_adv=True, avoid=(0.8, 1.2, 2.0))
    logp.requires_grad_()
    out = grpo_loss(logp, old, adv, mask, dual_clip_c=2.0)
    e_loss, e_grad, e_metrics = ref.grpo(tl(logp), tl(old), tl(adv), tl(mask), dual_c=2.0)
    assert e_metrics["dual_clip_frac"] > 0
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    _check_metrics(out.metrics, e_metrics, ("dual_clip_frac",))


def test_grpo_hand_computed_k3():
    # one row, two tokens at ratio 1, A = 1; ref = logp + log 2 on token 0 and logp on token 1
    # k3(token 0) = 2 - 1 - log 2 ; k3(token 1) = 0 ; loss = mean(-1 + 0.1*k3) per token, seq-mean-token-mean
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.tensor([[-1.0 + math.log(2), -2.0]], dtype=torch.float64)
    out = grpo_loss(logp, logp.detach(), torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2),
                    ref_logp=ref_logp, kl_coef=0.1)
    k3 = 1 - math.log(2)
    assert abs(out.loss.item() - (-2 + 0.1 * k3) / 2) < 1e-12
    out.loss.backward()
    # d/dlogp: -A*r + 0.1*(1 - ref/pi) per token, / 2
    assert torch.allclose(logp.grad, torch.tensor([[(-1 + 0.1 * (1 - 2)) / 2, -1 / 2]], dtype=torch.float64), rtol=1e-9)
    assert abs(out.metrics["kl"].item() - k3 / 2) < 1e-6


# ------------------------------------------------------------------------------------------- Dr. GRPO


@pytest.mark.parametrize("norm_len", [5, 8, 100])
@pytest.mark.parametrize("kl", [(None, 0.0), ("k3", 0.04)])
def test_dr_grpo(ref, policy_batch, tl, norm_len, kl):
    estimator, coef = kl
    logp, old, adv, mask = policy_batch(35, spread=0.9, avoid=(0.8, 1.2))
    logp.requires_grad_()
    ref_logp = None if estimator is None else _ref_logp(logp, 36)
    kwargs = {} if estimator is None else dict(ref_logp=ref_logp, kl_coef=coef, kl_estimator=estimator)
    out = dr_grpo_loss(logp, old, adv, mask, norm_len=norm_len, **kwargs)
    e_loss, e_grad, e_metrics = ref.grpo(tl(logp), tl(old), tl(adv), tl(mask), 0.2, None,
                                         None if ref_logp is None else tl(ref_logp), coef, "k3",
                                         "seq-mean-token-sum-norm", norm_len)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    _check_metrics(out.metrics, e_metrics, CLIP_METRICS)


def test_dr_grpo_divides_by_all_rows_times_norm_len():
    # 3 rows (one empty), at ratio 1 with A = [1, 2, 5]: loss = -(1*2 + 2*1) / (3 * 4)
    logp = torch.full((3, 4), -1.0, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    out = dr_grpo_loss(logp, logp.detach(), torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), mask, norm_len=4)
    assert abs(out.loss.item() + 4 / 12) < 1e-12
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1, -1, 0, 0], [-2, 0, 0, 0], [0, 0, 0, 0]],
                                                  dtype=torch.float64) / 12, rtol=1e-9)


# ------------------------------------------------------------------------------------------- DAPO


@pytest.mark.parametrize("mode", (None,) + MODES)
def test_dapo_defaults_and_value(ref, policy_batch, tl, mode):
    logp, old, adv, mask = policy_batch(37, spread=0.9, avoid=(0.8, 1.28))
    logp.requires_grad_()
    norm_len = 6 if mode == MODES[3] else None
    kwargs = {} if mode is None else {"loss_agg_mode": mode, "norm_len": norm_len}
    out = dapo_loss(logp, old, adv, mask, **kwargs)
    e_loss, e_grad, e_metrics = ref.grpo(tl(logp), tl(old), tl(adv), tl(mask), 0.2, 0.28,
                                         mode=mode or "token-mean", norm_len=norm_len)
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    _check_metrics(out.metrics, e_metrics, CLIP_METRICS)


def test_dapo_clip_higher_keeps_gradient_between_1_2_and_1_28():
    logp = torch.tensor([[math.log(1.25)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    adv = torch.tensor([2.0], dtype=torch.float64)
    out = dapo_loss(logp, old, adv, torch.ones(1, 1))
    out.loss.backward()
    assert abs(out.loss.item() + 2.5) < 1e-12
    assert abs(logp.grad.item() + 2.5) < 1e-12
    logp.grad = None
    g = grpo_loss(logp, old, adv, torch.ones(1, 1))
    g.loss.backward()
    assert abs(g.loss.item() + 2.4) < 1e-12 and logp.grad.item() == 0.0


def test_dapo_kl_term(ref, policy_batch, tl):
    logp, old, adv, mask = policy_batch(38, avoid=(0.8, 1.28))
    logp.requires_grad_()
    ref_logp = _ref_logp(logp, 39)
    out = dapo_loss(logp, old, adv, mask, ref_logp=ref_logp, kl_coef=0.1, kl_estimator="k2")
    e_loss, e_grad, e_metrics = ref.grpo(tl(logp), tl(old), tl(adv), tl(mask), 0.2, 0.28, tl(ref_logp), 0.1, "k2",
                                         "token-mean")
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    _check_metrics(out.metrics, e_metrics, ("kl",))


def _overlong(length, max_len, cache_len):
    if length <= max_len - cache_len:
        return 0.0
    if length <= max_len:
        return ((max_len - cache_len) - length) / cache_len
    return -1.0


@pytest.mark.parametrize("max_len,cache_len", [(20, 4), (16384 + 4096, 4096), (10, 10)])
def test_overlong_penalty(max_len, cache_len):
    lengths = sorted({0, 1, max_len - cache_len - 1, max_len - cache_len, max_len - cache_len + 1,
                      max_len - cache_len // 2, max_len - 1, max_len, max_len + 1, 3 * max_len})
    lengths = [x for x in lengths if x >= 0]
    for dtype in (torch.int64, torch.float64):
        out = overlong_penalty(torch.tensor(lengths, dtype=dtype), max_len, cache_len)
        assert out.shape == (len(lengths),)
        assert out.is_floating_point()
        for x, v in zip(lengths, out.tolist()):
            assert abs(v - _overlong(x, max_len, cache_len)) < 1e-6, (x, v)


def test_overlong_penalty_hand_values():
    out = overlong_penalty(torch.tensor([16, 17, 18, 20, 21]), 20, 4)
    assert torch.allclose(out.double(), torch.tensor([0.0, -0.25, -0.5, -1.0, -1.0], dtype=torch.float64), rtol=1e-9)


def test_grpo_function_default_kl_coef_is_zero_and_the_preset_keeps_the_papers_beta():
    """Documented deviation: the function's default has no KL term; the grpo preset uses DeepSeekMath's 0.04."""
    import inspect

    from xxpo.presets import PRESETS

    assert inspect.signature(grpo_loss).parameters["kl_coef"].default == 0.0
    assert PRESETS["grpo"].hparams["kl_coef"] == 0.04


def test_kl_is_correction_restores_the_reverse_kl_gradient_on_off_policy_samples():
    """Issue 8 item 5: on samples from pi_old, the k3 term's gradient is biased; weighted by pi_theta/pi_old,
    its expectation is the exact gradient of KL(pi_theta || pi_ref). Checked on a 5-token vocabulary by
    enumerating every token (the exact expectation under pi_old), against autograd of the closed-form KL."""
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    old = torch.randn(5, dtype=torch.float64).log_softmax(-1)  # pi_old: the sampler
    ref = torch.randn(5, dtype=torch.float64).log_softmax(-1)
    logp_all = theta.log_softmax(-1)
    exact = torch.autograd.grad((logp_all.exp() * (logp_all - ref)).sum(), theta)[0]  # grad KL(pi_theta || pi_ref)

    def expected_grad(correct: bool) -> torch.Tensor:
        total = torch.zeros(5, dtype=torch.float64)
        for y in range(5):  # every token is a one-token response, weighted by its sampling probability pi_old(y)
            logp = theta.log_softmax(-1)[y].reshape(1, 1)
            out = grpo_loss(logp, old[y].reshape(1, 1), torch.zeros(1, dtype=torch.float64),
                            torch.ones(1, 1, dtype=torch.float64), ref_logp=ref[y].reshape(1, 1), kl_coef=1.0,
                            kl_is_correction=correct)
            total += old[y].exp() * torch.autograd.grad(out.loss, theta)[0]
        return total

    assert torch.allclose(expected_grad(True), exact, atol=1e-12)
    assert not torch.allclose(expected_grad(False), exact, atol=1e-3)  # uncorrected: biased off-policy


def test_kl_is_correction_value_is_ratio_times_k3_and_rejects_non_bool():
    torch.manual_seed(1)
    logp, old, ref_logp = (torch.randn(3, 4, dtype=torch.float64) * 0.3 - 1 for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    adv = torch.zeros(3, dtype=torch.float64)
    out = grpo_loss(logp, old, adv, mask, ref_logp=ref_logp, kl_coef=0.5, kl_is_correction=True)
    log_rho = ref_logp - logp
    expected = torch.exp(logp - old) * (torch.exp(log_rho) - 1 - log_rho)  # r * k3, written out
    assert float(out.metrics["kl"]) == pytest.approx(float((expected * mask).sum() / mask.sum()), rel=1e-6)
    with pytest.raises(TypeError, match="kl_is_correction"):
        grpo_loss(logp, old, adv, mask, ref_logp=ref_logp, kl_coef=0.5, kl_is_correction=1)


def test_dr_grpo_dual_clip(ref, policy_batch, tl):
    # the oracle's GRPO with dual clip c = 2, aggregated by seq-mean-token-sum-norm
    logp, old, adv, mask = policy_batch(37, spread=1.2, avoid=(0.8, 1.2))
    logp.requires_grad_()
    out = dr_grpo_loss(logp, old, adv, mask, norm_len=6, dual_clip_c=2.0)
    e_loss, e_grad, e_metrics = ref.grpo(tl(logp), tl(old), tl(adv), tl(mask), 0.2, None, None, 0.0, "k3",
                                         "seq-mean-token-sum-norm", 6, dual_c=2.0)
    assert e_metrics["dual_clip_frac"] > 0  # the case has tokens where the third clip binds
    assert abs(out.loss.item() - e_loss) < 1e-10
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(e_grad, dtype=torch.float64), atol=1e-12, rtol=1e-9)
