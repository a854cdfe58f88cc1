"""Decoupled PPO (Hilton, Cobbe, Schulman 2021, arXiv 2110.00641), as used by AReaL (arXiv 2505.24298).

PPO's pi_old does two jobs: it *corrects* for sampling from another policy, and it *anchors* the trust
region. In asynchronous RL the sampling (behaviour) policy can be several versions old, so the two are
split: a recent *proximal* policy pi_prox anchors the clip, and a constant weight pi_prox / pi_behav
corrects for the behaviour policy (AReaL Eq. 5):

    J = E_{a ~ pi_behav}[ pi_prox/pi_behav * min(u_t A_t, clip(u_t, 1 - eps_low, 1 + eps_high) A_t) ],
    u_t = pi_theta / pi_prox.

With pi_prox = pi_behav it is PPO. AReaL takes pi_prox = the parameters before the current update (one
extra forward pass); A-3PO approximates it without that pass (``a3po.py``).

Deviations: the weight is optionally capped (``behav_weight_cap``, like Hilton et al.'s
``imp_samp_max``, applied to pi_prox/pi_behav rather than to pi_theta/pi_behav). Note AReaL's code only
multiplies by the weight when ``rejection_sampling`` is configured; here it is always applied.
"""

from __future__ import annotations

import torch

from xxpo.functional import LOG_RATIO_CLAMP, aggregate, masked_mean, token_log_ratio
from xxpo.functional.checks import check_number, check_same_shape, check_tensor
from xxpo.objectives.output import LossOutput, detached
from xxpo.objectives.ppo import check_clip, check_policy_inputs, clipped_surrogate, ratio_metrics


def decoupled_ppo_loss(
    logp: torch.Tensor,
    behav_logp: torch.Tensor,
    prox_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    behav_weight_cap: float | None = None,
    dual_clip_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
) -> LossOutput:
    """Decoupled PPO's loss L = -J (AReaL Eq. 5); logp, behav_logp, prox_logp, mask (B, T).

    ``dual_clip_c``: the optional third clip of dual-clip PPO on u (off by default; not in AReaL's Eq. 5),
    what verl's vanilla loss applies in its decoupled mode.
    Metrics: those of ``ppo_loss`` for the trust-region ratio u = pi_theta / pi_prox, plus
    behav_weight_mean and behav_weight_max of the (capped) pi_prox / pi_behav.
    """
    adv, m = check_policy_inputs(logp, behav_logp, advantages, mask, old_name="behav_logp")
    check_tensor("prox_logp", prox_logp, ndim=2)
    check_same_shape("logp", logp, prox_logp=prox_logp)
    eps_low, eps_high = check_clip(clip_eps_low, clip_eps_high)
    check_number("behav_weight_cap", behav_weight_cap, low=1, allow_none=True)
    check_number("dual_clip_c", dual_clip_c, low=1, low_inclusive=False, allow_none=True)
    prox_logp = prox_logp.detach()
    log_u = token_log_ratio(logp, prox_logp)  # (B, T)
    u = torch.exp(log_u)  # (B, T)
    behav_weight = torch.exp((prox_logp - behav_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (B, T)
    if behav_weight_cap is not None:
        behav_weight = behav_weight.clamp(max=behav_weight_cap)
    loss_mat, low, high, dual = clipped_surrogate(u, adv, eps_low, eps_high, dual_clip_c)
    loss = aggregate(behav_weight * loss_mat, m, loss_agg_mode, norm_len)
    metrics = ratio_metrics(u, log_u, m, low, high, dual)
    valid = m.bool()
    w_max = behav_weight[valid].max() if bool(valid.any()) else behav_weight.new_zeros(())
    metrics.update(detached(behav_weight_mean=masked_mean(behav_weight, m), behav_weight_max=w_max))
    return LossOutput(loss, metrics)
