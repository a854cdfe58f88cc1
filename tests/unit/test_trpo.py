"""trpo_step on a 3-state x 4-action tabular softmax policy (algorithms.md section 3)."""

import math

import pytest
import torch

from xxpo.objectives import LossOutput, trpo_step

S, A = 3, 4


def _problem(seed=81, penalty=0.0, constant_adv=False):
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(S, A, generator=g, dtype=torch.float64)
    adv = torch.randn(S, A, generator=g, dtype=torch.float64)
    if constant_adv:
        adv = adv[:, :1].expand(S, A).clone()  # same advantage for every action: zero policy gradient
    old_logp = torch.log_softmax(theta0, -1)
    old_p = old_logp.exp()
    theta = theta0.clone().requires_grad_()

    def surrogate():
        # E_s E_{a~old}[pi/old * A] = mean_s sum_a pi(a|s) A(s,a), minus an optional trust-killing penalty
        pi = torch.softmax(theta, -1)
        return (pi * adv).sum(-1).mean() - penalty * ((theta - theta0) ** 2).sum()

    def kl():
        return (old_p * (old_logp - torch.log_softmax(theta, -1))).sum(-1).mean()

    return theta, theta0, adv, surrogate, kl


def _plain_kl_and_j(theta, theta0, adv):
    kl, j = 0.0, 0.0
    for s in range(S):
        def probs(row):
            m = max(row)
            e = [math.exp(v - m) for v in row]
            return [x / sum(e) for x in e]
        p_old, p_new = probs(theta0[s].tolist()), probs(theta[s].tolist())
        kl += sum(a * math.log(a / b) for a, b in zip(p_old, p_new)) / S
        j += sum(p * a for p, a in zip(p_new, adv[s].tolist())) / S
    return kl, j


def _exact_direction(theta0, adv, damping):
    """Solve (H + damping I) x = g exactly; H = Fisher of mean_s KL(old||new), g = grad of the surrogate."""
    p = torch.softmax(theta0, -1)
    h = torch.zeros(S * A, S * A, dtype=torch.float64)
    gvec = torch.zeros(S * A, dtype=torch.float64)
    for s in range(S):
        blk = (torch.diag(p[s]) - torch.outer(p[s], p[s])) / S
        h[s * A:(s + 1) * A, s * A:(s + 1) * A] = blk
        gvec[s * A:(s + 1) * A] = p[s] * (adv[s] - (p[s] * adv[s]).sum()) / S
    x = torch.linalg.solve(h + damping * torch.eye(S * A, dtype=torch.float64), gvec)
    return x, h


@pytest.mark.parametrize("max_kl", [0.01, 0.05, 1e-3])
@pytest.mark.parametrize("damping", [0.1, 1e-3])
def test_trpo_step_respects_kl_and_improves(max_kl, damping):
    theta, theta0, adv, surrogate, kl = _problem()
    _, j0 = _plain_kl_and_j(theta0, theta0, adv)
    out = trpo_step([theta], surrogate, kl, max_kl=max_kl, damping=damping)
    assert isinstance(out, LossOutput)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["accepted"] == 1.0
    kl_new, j_new = _plain_kl_and_j(theta.detach(), theta0, adv)
    assert 0 < kl_new <= max_kl * (1 + 1e-9)
    assert j_new > j0
    # metrics may be stored in float32
    assert abs(m["kl"] - kl_new) <= 1e-6 * kl_new
    assert abs(m["surrogate_gain"] - (j_new - j0)) <= 1e-6 * (j_new - j0)
    assert abs(out.loss.item() + j_new) < 1e-10
    assert not out.loss.requires_grad
    step = (theta.detach() - theta0).reshape(-1)
    assert abs(m["step_norm"] - step.norm().item()) <= 1e-6 * step.norm().item()
    # the step follows the damped natural gradient (H + damping I)^-1 g ...
    x, h = _exact_direction(theta0, adv, damping)
    cos = (step @ x / (step.norm() * x.norm())).item()
    assert cos > 0.9999
    # ... with length 0.8^j * sqrt(2 max_kl / x^T M x) |x|, M = H or H + damping I (either convention)
    scale = 0.8 ** m["backtracks"]
    candidates = [scale * math.sqrt(2 * max_kl / (x @ mm @ x).item()) * x.norm().item()
                  for mm in (h, h + damping * torch.eye(S * A, dtype=torch.float64))]
    assert min(abs(step.norm().item() - c) / c for c in candidates) < 1e-4
    # backtracking accepts the first admissible step: one more shrink was not needed
    assert m["backtracks"] == int(m["backtracks"]) and 0 <= m["backtracks"] < 10


def test_trpo_tiny_max_kl_accepts_small_step():
    theta, theta0, adv, surrogate, kl = _problem(82)
    _, j0 = _plain_kl_and_j(theta0, theta0, adv)
    out = trpo_step([theta], surrogate, kl, max_kl=1e-10)
    kl_new, j_new = _plain_kl_and_j(theta.detach(), theta0, adv)
    if out.metrics["accepted"].item() == 1.0:
        assert kl_new <= 1e-10 * (1 + 1e-6) and j_new > j0
        assert 0 < out.metrics["step_norm"].item() < 1e-3
    else:
        assert torch.equal(theta.detach(), theta0)


def test_trpo_rejects_and_restores_params():
    # a huge penalty on any move: no backtracked step improves J, so parameters are restored exactly
    theta, theta0, adv, surrogate, kl = _problem(83, penalty=1e4)
    with torch.no_grad():
        j0 = surrogate().item()
    out = trpo_step([theta], surrogate, kl, max_kl=0.01, backtrack_iters=10)
    assert out.metrics["accepted"].item() == 0.0
    assert torch.equal(theta.detach(), theta0)
    assert abs(out.loss.item() + j0) < 1e-12
    assert torch.isfinite(torch.stack(list(out.metrics.values()))).all()


def test_trpo_zero_gradient_takes_no_step():
    theta, theta0, _, surrogate, kl = _problem(84, constant_adv=True)
    out = trpo_step([theta], surrogate, kl)
    assert torch.isfinite(theta).all()
    assert torch.allclose(theta.detach(), theta0, atol=1e-12, rtol=1e-9)
    assert torch.isfinite(out.loss)


def test_trpo_updates_several_parameter_tensors_in_place():
    g = torch.Generator().manual_seed(85)
    w0 = torch.randn(S, A, generator=g, dtype=torch.float64)
    b0 = torch.randn(A, generator=g, dtype=torch.float64)
    adv = torch.randn(S, A, generator=g, dtype=torch.float64)
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    old_logp = torch.log_softmax(w0 + b0, -1)

    def surrogate():
        return (torch.softmax(w + b, -1) * adv).sum(-1).mean()

    def kl():
        return (old_logp.exp() * (old_logp - torch.log_softmax(w + b, -1))).sum(-1).mean()

    with torch.no_grad():
        j0 = surrogate().item()
    w_id, b_id = id(w), id(b)
    out = trpo_step([w, b], surrogate, kl, max_kl=0.02)
    assert id(w) == w_id and id(b) == b_id
    assert out.metrics["accepted"].item() == 1.0
    assert not torch.equal(w.detach(), w0) and not torch.equal(b.detach(), b0)
    with torch.no_grad():
        assert kl().item() <= 0.02 * (1 + 1e-9)
        assert surrogate().item() > j0
    assert w.requires_grad and b.requires_grad


def test_kl_and_fisher_product_from_hidden_states_match_the_explicit_softmax():
    from xxpo.functional import fisher_product_from_hidden, kl_from_hidden

    g = torch.Generator().manual_seed(0)
    n, h, v, temperature = 7, 5, 11, 0.7
    hid, w, b = (torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64),
                 torch.randn(v, generator=g, dtype=torch.float64))
    hid2, w2, b2 = hid + 0.3 * torch.randn_like(hid), w + 0.3 * torch.randn_like(w), b + 0.3 * torch.randn_like(b)

    def logp(x, weight, bias):
        return ((x @ weight.t() + bias) / temperature).log_softmax(-1)  # (n, V), built explicitly

    expected = (logp(hid, w, b).exp() * (logp(hid, w, b) - logp(hid2, w2, b2))).sum(-1)
    for rows in (None, 1, 3):
        got = kl_from_hidden(hid, w, hid2, w2, old_bias=b, bias=b2, temperature=temperature, chunk_rows=rows)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    # the Fisher product is the Hessian-vector product of sum_rows KL(p_old || p) at p = p_old, by double backward
    d = [torch.randn_like(x) for x in (hid, w, b)]
    x = [t.clone().requires_grad_(True) for t in (hid, w, b)]
    old = logp(hid, w, b).detach()
    kl = (old.exp() * (old - logp(*x))).sum()
    grads = torch.autograd.grad(kl, x, create_graph=True)
    hvp = torch.autograd.grad(sum((gi * di).sum() for gi, di in zip(grads, d)), x)
    for rows in (None, 2):
        got = fisher_product_from_hidden(hid, w, d[0], d[1], bias=b, d_bias=d[2], temperature=temperature, chunk_rows=rows)
        for a, e in zip(got, hvp):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    no_bias = fisher_product_from_hidden(hid, w, d[0], d[1], temperature=temperature)
    assert no_bias[2] is None
    with pytest.raises(ValueError, match="d_bias"):
        fisher_product_from_hidden(hid, w, d[0], d[1], bias=b, temperature=temperature)
    with pytest.raises(ValueError, match="weight"):
        kl_from_hidden(hid, w, hid2, w2[:, :3], temperature=temperature)
