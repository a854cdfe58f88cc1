"""PPO: the clipped surrogate and the clipped value loss (Schulman et al. 2017, arXiv 1707.06347).

J^CLIP = E_t[ min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) ],  r_t = pi_theta / pi_old  (Eq. 7)

``clip_eps_high`` defaults to ``clip_eps_low`` (the paper's symmetric clip); a larger high side is
DAPO's clip-higher. ``dual_clip_c`` adds the third clip of dual-clip PPO (Ye et al. 2019, arXiv
1912.09729): for A < 0 the per-token loss is capped at ``-c A`` so a huge ratio cannot dominate.
Deviation from the paper: none in the loss; aggregation is a choice (``loss_agg_mode``), the paper
simply averages over timesteps (``token-mean``, the default). verl applies dual clip (c=3) by default;
here it is off unless ``dual_clip_c`` is given.
"""

from __future__ import annotations

import torch

from xxpo.functional import aggregate, masked_mean, token_log_ratio
from xxpo.functional.checks import check_advantages, check_mask, check_number, check_same_shape, check_tensor
from xxpo.objectives.output import LossOutput, detached


def check_policy_inputs(logp, old_logp, advantages, mask, old_name: str = "old_logp", per_sequence_only=False):
    """Validate the (B, T) tensors shared by the policy losses; returns (B, T) advantages and float mask."""
    check_tensor("logp", logp, ndim=2)
    check_tensor(old_name, old_logp, ndim=2)
    check_same_shape("logp", logp, **{old_name: old_logp})
    adv = check_advantages(advantages, logp, per_sequence_only=per_sequence_only)
    m = check_mask("mask", mask, logp.shape).to(logp.dtype)
    return adv.to(logp.dtype), m


def check_clip(clip_eps_low, clip_eps_high):
    """Returns the effective (low, high); high defaults to low."""
    check_number("clip_eps_low", clip_eps_low, low=0, high=1, high_inclusive=False)
    check_number("clip_eps_high", clip_eps_high, low=0, allow_none=True)
    return clip_eps_low, clip_eps_low if clip_eps_high is None else clip_eps_high


def clipped_surrogate(ratio, adv, clip_eps_low, clip_eps_high, dual_clip_c=None):
    """Per-token PPO loss ``-min(r A, clip(r) A)`` (+ dual clip) and the masks where each clip bites.

    Returns ``(loss_mat, clipped_low, clipped_high, dual_clipped)``, all (B, T). A token counts as
    clipped exactly when the clip zeroes its gradient: r < 1 - eps_low with A < 0, or r > 1 + eps_high
    with A > 0.
    """
    clipped_ratio = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)  # (B, T)
    loss_mat = torch.maximum(-ratio * adv, -clipped_ratio * adv)  # (B, T)
    clipped_low = (ratio < 1.0 - clip_eps_low) & (adv < 0)
    clipped_high = (ratio > 1.0 + clip_eps_high) & (adv > 0)
    dual_clipped = torch.zeros_like(clipped_low)
    if dual_clip_c is not None:
        capped = torch.minimum(loss_mat, -dual_clip_c * adv)  # binds only when A < 0 and r > c
        dual_clipped = (adv < 0) & (ratio > dual_clip_c)
        loss_mat = torch.where(adv < 0, capped, loss_mat)
    return loss_mat, clipped_low, clipped_high, dual_clipped


def ratio_metrics(ratio, log_ratio, mask, clipped_low, clipped_high, dual_clipped=None) -> dict:
    """The clip and ratio statistics every clipped objective logs (masked over valid tokens)."""
    valid = mask.bool()
    any_valid = bool(valid.any())
    low, high = masked_mean(clipped_low.to(mask.dtype), mask), masked_mean(clipped_high.to(mask.dtype), mask)
    zero = ratio.new_zeros(())
    return detached(
        clip_frac_low=low,
        clip_frac_high=high,
        clip_frac=low + high,
        dual_clip_frac=zero if dual_clipped is None else masked_mean(dual_clipped.to(mask.dtype), mask),
        ratio_mean=masked_mean(ratio, mask),
        ratio_min=ratio[valid].min() if any_valid else zero,
        ratio_max=ratio[valid].max() if any_valid else zero,
        approx_kl=masked_mean(ratio - 1.0 - log_ratio, mask),  # k3 estimate of KL(pi_old || pi_theta)
    )


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
) -> LossOutput:
    """PPO's clipped policy loss L = -J^CLIP (arXiv 1707.06347 Eq. 7), optionally dual-clipped.

    logp, old_logp, mask: (B, T); advantages: (B,) or (B, T).
    Metrics: clip_frac_low, clip_frac_high, clip_frac, dual_clip_frac, ratio_mean, ratio_min,
    ratio_max, approx_kl.
    """
    adv, m = check_policy_inputs(logp, old_logp, advantages, mask)
    eps_low, eps_high = check_clip(clip_eps_low, clip_eps_high)
    check_number("dual_clip_c", dual_clip_c, low=1, low_inclusive=False, allow_none=True)
    log_ratio = token_log_ratio(logp, old_logp)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    loss_mat, low, high, dual = clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip_c)
    loss = aggregate(loss_mat, m, loss_agg_mode, norm_len)
    return LossOutput(loss, ratio_metrics(ratio, log_ratio, m, low, high, dual))


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
) -> LossOutput:
    """Clipped value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2); ``clip_eps=None``
    gives 0.5 (V - R)^2.

    Deviations from the PPO paper: its L^VF (Eq. 9) is the plain squared error (V - V^targ)^2, without
    the clip and without the factor 1/2. Both come from OpenAI baselines' ppo2 (``vf_loss = .5 *
    reduce_mean(maximum(vf_losses1, vf_losses2))``), kept by verl's ``compute_value_loss`` and TRL's old
    PPOTrainer. The 1/2 is a constant scale: in the paper it would be absorbed by c1; here the critic has
    its own AdamW optimizer, which is almost invariant to it (only eps sees the scale). All inputs (B, T).
    Metrics: vf_clip_frac (tokens where the clip engaged, |V - V_old| > eps, and the clipped branch is the
    larger), value_mean.
    """
    check_tensor("values", values, ndim=2)
    check_tensor("old_values", old_values, ndim=2)
    check_tensor("returns", returns, ndim=2)
    check_same_shape("values", values, old_values=old_values, returns=returns)
    m = check_mask("mask", mask, values.shape).to(values.dtype)
    check_number("clip_eps", clip_eps, low=0, allow_none=True)
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns) ** 2  # (B, T)
    if clip_eps is None:
        loss_mat, clip_active = 0.5 * unclipped, torch.zeros_like(m)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = (v_clipped - returns) ** 2  # (B, T)
        # the clip engaged (|V - V_old| > eps) and made the error larger; inside the band the two branches are
        # equal but for the rounding of V_old + (V - V_old), which must not count as clipping
        engaged = (values - old_values).abs() > clip_eps  # (B, T)
        loss_mat, clip_active = 0.5 * torch.maximum(unclipped, clipped), ((clipped > unclipped) & engaged).to(m.dtype)
    loss = aggregate(loss_mat, m, loss_agg_mode)
    return LossOutput(loss, detached(vf_clip_frac=masked_mean(clip_active, m), value_mean=masked_mean(values, m)))
