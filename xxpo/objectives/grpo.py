"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300).

J = E[ 1/G sum_i 1/|o_i| sum_t { min(r_it A_it, clip(r_it, 1-eps, 1+eps) A_it) - beta D_KL[pi_theta || pi_ref] } ]
(Eq. 3). GRPO is PPO without a critic: the advantage is the group z-score of the outcome rewards
(``xxpo.functional.group_advantages``), and the KL to the reference sits in the *loss*, estimated per
token with k3 (Eq. 4), not in the reward.

Deviation of the function's default: ``kl_coef`` defaults to 0 (no KL term, no reference model needed),
while the paper's beta is 0.04 (DeepSeekMath Sec. 4.2; R1 used 0.001; TRL now defaults to 0, as most
recipes since drop the reference model). The ``grpo`` preset (``xxpo.presets``) passes the paper's 0.04.
The loss itself follows Eq. 3. Note the k3 term's gradient is that of the *forward* KL (see
``xxpo.functional.kl``); pass ``kl_estimator="k2"`` for the reverse-KL gradient.
"""

from __future__ import annotations

import torch

from xxpo.functional import aggregate, kl_penalty, masked_mean, token_log_ratio
from xxpo.functional.checks import check_number, check_same_shape, check_tensor
from xxpo.objectives.output import LossOutput, detached
from xxpo.objectives.ppo import check_clip, check_policy_inputs, clipped_surrogate, ratio_metrics


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_is_correction: bool = False,
    loss_agg_mode: str = "seq-mean-token-mean",
    norm_len: int | None = None,
    dual_clip_c: float | None = None,
) -> LossOutput:
    """GRPO's loss L = -J (arXiv 2402.03300 Eq. 3) for (B, T) tensors; advantages (B,) or (B, T).

    ``seq-mean-token-mean`` is the paper's 1/G sum_i 1/|o_i| sum_t. With ``kl_coef > 0``, ``ref_logp``
    (B, T) is required and ``kl_coef * KL_t`` is added to every token's loss before aggregation.
    The KL estimators assume tokens sampled from pi_theta; on every minibatch after the first (or with
    stale data) they come from pi_old. ``kl_is_correction=True`` multiplies the per-token estimate by
    r = pi_theta / pi_old (with its gradient), which makes k3's expected gradient the reverse-KL gradient
    again (DeepSeek-V3.2; TRL ``use_bias_correction_kl``); the paper and the default leave it uncorrected.
    Metrics: those of ``ppo_loss`` plus ``kl`` (mean per-token estimate) when ``ref_logp`` is given.
    """
    adv, m = check_policy_inputs(logp, old_logp, advantages, mask)
    eps_low, eps_high = check_clip(clip_eps_low, clip_eps_high)
    check_number("kl_coef", kl_coef, low=0)
    if not isinstance(kl_is_correction, bool):
        raise TypeError(f"kl_is_correction must be a bool, got {type(kl_is_correction).__name__}")
    check_number("dual_clip_c", dual_clip_c, low=1, low_inclusive=False, allow_none=True)
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when kl_coef > 0")
    log_ratio = token_log_ratio(logp, old_logp)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    loss_mat, low, high, dual = clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip_c)
    metrics = ratio_metrics(ratio, log_ratio, m, low, high, dual)
    if ref_logp is not None:
        check_tensor("ref_logp", ref_logp, ndim=2)
        check_same_shape("logp", logp, ref_logp=ref_logp)
        kl = kl_penalty(logp, ref_logp, kl_estimator)  # (B, T), unbiased only for samples from pi_theta
        if kl_is_correction:  # samples come from pi_old: weight by pi_theta / pi_old (ratio keeps its gradient)
            kl = ratio * kl  # (B, T)
        loss_mat = loss_mat + kl_coef * kl
        metrics.update(detached(kl=masked_mean(kl, m)))
    return LossOutput(aggregate(loss_mat, m, loss_agg_mode, norm_len), metrics)
