"""A-3PO: staleness-aware proximal policy approximation (Li, Wu, Shen 2025, arXiv 2512.06547).

Decoupled PPO needs log pi_prox, which AReaL recomputes with an extra forward pass. A-3PO observes that
pi_prox only anchors the trust region, so it can be interpolated in log space between the behaviour
policy and the current one, per token, from the token's staleness d = v(pi_theta) - v(pi_behav):

    log pi_prox = alpha log pi_behav + (1 - alpha) log pi_theta,   alpha = 1/d (d >= 1), 0 (d = 0).

Consequences: pi_prox lies between pi_behav and pi_theta; d = 1 gives pi_prox = pi_behav (plain PPO, as
AReaL's recompute does for one-version-old data); the trust-region ratio becomes (pi_theta/pi_behav)^alpha.

Deviations: at d = 0 we follow the paper (pi_prox = pi_theta, alpha = 0); AReaL's code falls back to
pi_behav there, which agrees only when trainer and sampler log-probs match exactly. log pi_theta enters
detached, so pi_prox is a constant, as in AReaL.
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
    return torch.where(staleness > 0, 1.0 / staleness.clamp(min=1), torch.zeros_like(staleness))  # (B, T)


def a3po_prox_logp(behav_logp: torch.Tensor, logp: torch.Tensor, staleness) -> torch.Tensor:
    """A-3PO's log pi_prox (B, T), detached; ``staleness`` int or int tensor broadcastable to (B, T)."""
    check_tensor("behav_logp", behav_logp, ndim=2)
    check_tensor("logp", logp, ndim=2)
    if behav_logp.shape != logp.shape:
        raise ValueError(f"logp must have the same shape as behav_logp {tuple(behav_logp.shape)}, got {tuple(logp.shape)}")
    alpha = _alpha(staleness, logp)
    return (alpha * behav_logp.detach() + (1.0 - alpha) * logp.detach()).detach()


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
