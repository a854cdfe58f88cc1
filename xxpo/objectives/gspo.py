"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, Qwen, arXiv 2507.18071).

The paper's argument: a token ratio r_it = pi_theta(y_it) / pi_old(y_it) is built from ONE sample of
each next-token distribution, so it cannot correct that distribution, and its noise accumulates over a
long response (each such term is still an unbiased one-sample estimate of the surrogate; the book's GSPO
chapter weighs the two views). The reward belongs to the whole sequence, so GSPO weights the whole
sequence with one ratio:

    s_i = (pi_theta(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp( 1/|y_i| sum_t log r_it )      (Eq. 7)
    J   = E[ 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) ]              (Eq. 5)

The 1/|y_i| keeps s_i in one numerical range whatever the length, so the clip range is tiny
(3e-4 / 4e-4, Sec. 5.1) and is applied to whole sequences: a clipped sequence contributes no gradient
from any of its tokens. Unclipped, the gradient is s_i A_i * 1/|y_i| sum_t grad log pi(y_it): every
token of a response gets the same weight (Eq. 10), unlike GRPO's per-token r_it.

``gspo_token_loss`` is GSPO-token (Eq. 13-14): s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)] has the value
s_i and the gradient s_i grad log pi(y_it), so per-token advantages can be used; with per-sequence
advantages it equals GSPO exactly. verl's ``gspo`` loss mode is this form.

Deviations: none. The log-ratio is a masked mean clamped to [-20, 20] before exp (verl clamps at 10).
"""

from __future__ import annotations

import torch

from xxpo.functional import aggregate, masked_mean, sequence_log_ratio
from xxpo.objectives.output import LossOutput, detached
from xxpo.objectives.ppo import check_clip, check_policy_inputs, clipped_surrogate, ratio_metrics


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
) -> LossOutput:
    """GSPO's loss L = -J (Eq. 5) with sequence ratios s_i; advantages must be (B,).

    Averaged over the responses that have at least one valid token (the paper's 1/G).
    Metrics: seq_clip_frac_low/high (fraction of sequences clipped), clip_frac_low/high and clip_frac
    (fraction of valid *tokens* in clipped sequences, the paper's count), ratio_mean/min/max of s_i.
    """
    adv, m = check_policy_inputs(logp, old_logp, advantages, mask, per_sequence_only=True)
    eps_low, eps_high = check_clip(clip_eps_low, clip_eps_high)
    seq_adv = adv[:, 0]  # (B,)
    log_s = sequence_log_ratio(logp, old_logp, m)  # (B,)
    s = torch.exp(log_s)  # (B,)
    seq_loss, low, high, _ = clipped_surrogate(s, seq_adv, eps_low, eps_high)  # each (B,)
    nonempty = m.sum(-1) > 0  # (B,)
    loss = masked_mean(seq_loss, nonempty)
    metrics = ratio_metrics(s, log_s, nonempty.to(m.dtype), low, high)
    tokens_low = masked_mean(low.to(m.dtype).unsqueeze(-1).expand_as(m), m)
    tokens_high = masked_mean(high.to(m.dtype).unsqueeze(-1).expand_as(m), m)
    metrics.update(
        detached(
            seq_clip_frac_low=metrics["clip_frac_low"],
            seq_clip_frac_high=metrics["clip_frac_high"],
            clip_frac_low=tokens_low,
            clip_frac_high=tokens_high,
            clip_frac=tokens_low + tokens_high,
        )
    )
    return LossOutput(loss, metrics)


def gspo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
) -> LossOutput:
    """GSPO-token's loss (Eq. 13): per-token terms with s_it = sg[s_i] pi(y_it)/sg[pi(y_it)].

    advantages (B,) or (B, T); aggregated as seq-mean-token-mean. Metrics as ``ppo_loss`` with the
    ratio s_it (whose value is s_i) in place of r_it.
    """
    adv, m = check_policy_inputs(logp, old_logp, advantages, mask)
    eps_low, eps_high = check_clip(clip_eps_low, clip_eps_high)
    log_s = sequence_log_ratio(logp, old_logp, m).detach()  # (B,)
    log_s_token = log_s.unsqueeze(-1) + logp - logp.detach()  # (B, T): value log s_i, gradient grad logp
    s_token = torch.exp(log_s_token)  # (B, T)
    loss_mat, low, high, _ = clipped_surrogate(s_token, adv, eps_low, eps_high)
    loss = aggregate(loss_mat, m, "seq-mean-token-mean")
    return LossOutput(loss, ratio_metrics(s_token, log_s_token, m, low, high))
