"""A-3PO: staleness-aware proximal policy approximation (Li, Wu, Shen 2025, arXiv 2512.06547).

Decoupled PPO needs log pi_prox, which AReaL recomputes with an extra forward pass. A-3PO observes that
pi_prox only anchors the trust region, so it can be interpolated in log space between the behaviour
policy and the current one, per token, from the token's staleness d = v(pi_theta) - v(pi_behav):

    log pi_prox = alpha log pi_behav + (1 - alpha) log pi_theta,   alpha = 1 / max(d, 1).

Consequences: pi_prox lies between pi_behav and pi_theta; the trust-region ratio is
(pi_theta/pi_behav)^alpha and the behaviour weight pi_prox/pi_behav is (pi_theta/pi_behav)^(1 - alpha).
log pi_theta enters detached, so pi_prox is a constant, as in AReaL.

d = 0 (fresh data). pi_prox stands for the policy at the start of the update. The authors' blog post
writes alpha = 0 there (pi_prox = pi_theta), which holds for one gradient step per batch, where
pi_theta = pi_behav. With several minibatches it does not: the version advances once per rollout step,
so from the second minibatch on pi_theta has moved while d is still 0, and pi_prox = pi_theta makes the
clipped ratio exactly 1 and the weight pi_theta/pi_behav: an unclipped, uncapped importance-weighted
policy gradient. We take alpha = 1 (pi_prox = pi_behav), as AReaL's code does
(``compute_prox_logp_approximations`` puts weight 0 on log pi_theta when v_theta = v_behav). With fresh
data pi_behav IS the policy at the start of the update, so the ratio keeps its bound, the weight is 1
and the loss is PPO's. Deviation: from the blog post's alpha at d = 0, not from AReaL's code.

Relation to recompute (AReaL ``prox_logp_method="recompute"``; ``prox="recompute"`` here), which
evaluates the current weights, version v = v(pi_theta), once before the update. The two agree only at
d = 0 (both are pi_behav, up to sampler/trainer log-prob differences). At d = 1 A-3PO's pi_prox is
pi_behav = pi_{v-1}: plain PPO around the behaviour policy, one version older than recompute's anchor
pi_v, and with weight 1 where recompute weights by pi_v / pi_behav. For any d >= 1, at the start of the
update (pi_theta = pi_v), the interpolation equals pi_{v-1} if log-probs drift linearly in the version
(exactly so for d = 1), which is how AReaL's code reads it (``v_proximal = current_version - 1``):
A-3PO approximates the version before the one recompute uses.
"""

from __future__ import annotations

import torch

from xxpo.functional import masked_mean
from xxpo.functional.checks import check_tensor
from xxpo.objectives.decoupled_ppo import decoupled_ppo_loss
from xxpo.objectives.output import LossOutput, detached


def _alpha(staleness, like: torch.Tensor) -> torch.Tensor:
    if isinstance(staleness, bool):
        raise TypeError("staleness must be an integer or an integer tensor, got bool")
    if isinstance(staleness, int):
        staleness = torch.full_like(like, float(staleness))
    elif isinstance(staleness, torch.Tensor):
        if staleness.dtype.is_floating_point and not bool((staleness == staleness.round()).all()):
            raise ValueError("staleness must hold whole numbers of policy versions")
        try:
            staleness = torch.broadcast_to(staleness, like.shape).to(like.dtype)
        except RuntimeError as err:
            raise ValueError(f"staleness of shape {tuple(staleness.shape)} does not broadcast to {tuple(like.shape)}") from err
    else:
        raise TypeError(f"staleness must be an int or a torch.Tensor, got {type(staleness).__name__}")
    if bool((staleness < 0).any()):
        raise ValueError("staleness must be >= 0")
    return 1.0 / staleness.clamp(min=1)  # (B, T): 1/d, and 1 at d = 0 (pi_prox = pi_behav)


def a3po_prox_logp(behav_logp: torch.Tensor, logp: torch.Tensor, staleness) -> torch.Tensor:
    """A-3PO's log pi_prox (B, T), detached; ``staleness`` int or int tensor broadcastable to (B, T).

    d = 0 gives log pi_behav (see the module docstring), d >= 1 the interpolation with alpha = 1/d.
    """
    check_tensor("behav_logp", behav_logp, ndim=2)
    check_tensor("logp", logp, ndim=2)
    if behav_logp.shape != logp.shape:
        raise ValueError(f"logp must have the same shape as behav_logp {tuple(behav_logp.shape)}, got {tuple(logp.shape)}")
    alpha = _alpha(staleness, logp)  # (B, T)
    behav, cur = behav_logp.detach(), logp.detach()
    return torch.where(alpha == 1.0, behav, alpha * behav + (1.0 - alpha) * cur)  # (B, T); d <= 1: exactly behav


def a3po_loss(
    logp: torch.Tensor,
    behav_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    staleness,
    **decoupled_kwargs,
) -> LossOutput:
    """Decoupled PPO's loss with A-3PO's approximate pi_prox; kwargs go to ``decoupled_ppo_loss``.

    Metrics: those of ``decoupled_ppo_loss`` plus prox_alpha_mean (mean interpolation weight).
    """
    prox = a3po_prox_logp(behav_logp, logp, staleness)
    out = decoupled_ppo_loss(logp, behav_logp, prox, advantages, mask, **decoupled_kwargs)
    m = mask.to(logp.dtype)
    out.metrics.update(detached(prox_alpha_mean=masked_mean(_alpha(staleness, logp), m)))
    return out
