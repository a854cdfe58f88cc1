"""TRPO: Trust Region Policy Optimization (Schulman et al. 2015, arXiv 1502.05477).

    max_theta  L(theta) = E[ pi_theta(a|s) / pi_old(a|s) A ]   s.t.  KL_bar(pi_old || pi_theta) <= delta   (Eq. 14)

Linearize L (gradient g) and take the quadratic model of the KL (Hessian H, the Fisher matrix at
theta_old). The step direction x = H^-1 g is found by conjugate gradient using only Hessian-vector
products Hv = grad((grad KL)^T v); the largest step inside the quadratic trust region is
sqrt(2 delta / x^T H x) x. Because the models are only local, a backtracking line search shrinks the
step by ``backtrack_coeff`` until the *true* KL is within ``max_kl`` and the surrogate improved
(Appendix C). Defaults follow Spinning Up (delta = 0.01, 10 CG iterations, damping 0.1, 10 backtracks
of 0.8).

Deviations: CG solves (H + damping I) x = g (damping stabilizes it, as in every implementation).
TRPO performs its own update, so ``trpo_step`` changes ``params`` in place instead of returning a loss
for an optimizer; its ``loss`` is -L after the step, for logging.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from xxpo.functional.checks import check_number
from xxpo.objectives.output import LossOutput, detached


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def conjugate_gradient(hvp: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, iters: int) -> torch.Tensor:
    """Solve H x = g for symmetric positive-definite H given only x -> Hx (Nocedal & Wright Alg. 5.2)."""
    x = torch.zeros_like(g)
    r, p = g.clone(), g.clone()
    rr = r @ r
    for _ in range(iters):
        if rr <= 1e-20:
            break
        hp = hvp(p)
        alpha = rr / (p @ hp)
        x, r = x + alpha * p, r - alpha * hp
        rr_new = r @ r
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def trpo_step(
    params: Sequence[torch.Tensor],
    surrogate_fn: Callable[[], torch.Tensor],
    kl_fn: Callable[[], torch.Tensor],
    *,
    max_kl: float = 0.01,
    cg_iters: int = 10,
    damping: float = 0.1,
    backtrack_iters: int = 10,
    backtrack_coeff: float = 0.8,
    fisher_vector_product: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LossOutput:
    """One TRPO update of ``params`` in place.

    surrogate_fn() -> scalar surrogate L to maximize; kl_fn() -> scalar mean KL(pi_old || pi_theta),
    both recomputed from the current ``params``. Metrics: kl, surrogate_gain, backtracks, accepted,
    step_norm. If no step passes the line search the parameters are restored (accepted = 0).

    ``fisher_vector_product``: ``v -> H v`` for flat ``v`` (the params concatenated), H the Hessian of
    kl_fn at the current params, i.e. the Fisher matrix at theta_old. Default (None): the double backward
    through ``kl_fn()``, which keeps the KL's whole graph; a caller that can form the product more cheaply
    (from hidden states, :func:`xxpo.functional.fisher_product_from_hidden`) passes it, and kl_fn is then
    only evaluated, in the line search.
    """
    params = list(params)
    if not params or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
        raise ValueError("params must be a non-empty sequence of tensors with requires_grad=True")
    check_number("max_kl", max_kl, low=0, low_inclusive=False)
    check_number("cg_iters", cg_iters, low=1)
    check_number("damping", damping, low=0)
    check_number("backtrack_iters", backtrack_iters, low=1)
    check_number("backtrack_coeff", backtrack_coeff, low=0, high=1, low_inclusive=False, high_inclusive=False)

    surrogate = surrogate_fn()
    g = _flat(torch.autograd.grad(surrogate, params, allow_unused=False)).detach()
    if fisher_vector_product is None:
        grad_kl = _flat(torch.autograd.grad(kl_fn(), params, create_graph=True))

        def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
            return _flat(torch.autograd.grad(grad_kl @ v, params, retain_graph=True)).detach()

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return fisher_vector_product(v) + damping * v

    x = conjugate_gradient(hvp, g, cg_iters)
    xhx = (x @ hvp(x)).clamp(min=1e-12)
    full_step = torch.sqrt(2.0 * max_kl / xhx) * x
    start = [p.detach().clone() for p in params]
    old_value = surrogate.detach()

    def set_params(step: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p, p0 in zip(params, start):
                n = p.numel()
                p.copy_(p0 + step[offset : offset + n].view_as(p))
                offset += n

    accepted, kl, new_value, backtracks = False, torch.zeros(()), old_value, 0
    for j in range(backtrack_iters):
        step = backtrack_coeff**j * full_step
        set_params(step)
        with torch.no_grad():
            kl, new_value = kl_fn().detach(), surrogate_fn().detach()
        backtracks = j
        if kl <= max_kl and new_value > old_value:
            accepted = True
            break
    if not accepted:
        set_params(torch.zeros_like(full_step))
        with torch.no_grad():
            kl, new_value = kl_fn().detach(), surrogate_fn().detach()
    step_norm = (backtrack_coeff**backtracks * full_step).norm() if accepted else torch.zeros(())
    metrics = detached(
        kl=kl,
        surrogate_gain=new_value - old_value,
        backtracks=torch.tensor(float(backtracks)),
        accepted=torch.tensor(float(accepted)),
        step_norm=step_norm,
    )
    return LossOutput(-new_value, metrics)
