"""SAPO: Soft Adaptive Policy Optimization (Gao et al. 2025, Qwen, arXiv 2511.20347).

A hard clip switches a token's gradient off at 1 +- eps. SAPO replaces min/clip with a smooth gate:

    J = E[ 1/G sum_i 1/|y_i| sum_t f(r_it) A_it ],  f(x) = (4 / tau) sigmoid(tau (x - 1))      (Eq. 5-6)

with tau = tau_pos for A > 0 and tau_neg otherwise. Its gradient is w_it r_it A_it grad log pi with
w = 4 p (1 - p) = sech^2(tau (r - 1) / 2) (Eq. 7-8): exactly 1 on-policy (so SAPO equals GRPO at r = 1,
which is what the 4/tau factor is for) and decaying smoothly as r leaves 1. tau_neg > tau_pos narrows
the gate for negative advantages, whose updates spread mass over the whole vocabulary and are less stable
(Eq. 9).

Deviations: none. A = 0 takes tau_neg, as in TRL, verl and AReaL. The log-ratio is clamped to [-20, 20].
"""

from __future__ import annotations

import torch

from xxpo.functional import aggregate, masked_mean, token_log_ratio
from xxpo.functional.checks import check_number
from xxpo.objectives.output import LossOutput, detached
from xxpo.objectives.ppo import check_policy_inputs, ratio_metrics


def sapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    loss_agg_mode: str = "seq-mean-token-mean",
    norm_len: int | None = None,
) -> LossOutput:
    """SAPO's loss L = -J (Eq. 5) for (B, T) tensors; advantages (B,) or (B, T).

    Metrics: gate_mean (f(r)), gate_weight_mean (sech^2 gradient weight w), ratio_mean/min/max, and
    clip fractions (always 0: nothing is clipped) so every method logs the same columns.
    """
    adv, m = check_policy_inputs(logp, old_logp, advantages, mask)
    check_number("tau_pos", tau_pos, low=0, low_inclusive=False)
    check_number("tau_neg", tau_neg, low=0, low_inclusive=False)
    log_ratio = token_log_ratio(logp, old_logp)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    tau = torch.where(adv > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))  # (B, T)
    gate = 4.0 / tau * torch.sigmoid(tau * (ratio - 1.0))  # (B, T), f(r)
    loss = aggregate(-gate * adv, m, loss_agg_mode, norm_len)
    p = torch.sigmoid(tau * (ratio - 1.0))
    none = torch.zeros_like(m, dtype=torch.bool)
    metrics = ratio_metrics(ratio, log_ratio, m, none, none)
    metrics.update(detached(gate_mean=masked_mean(gate, m), gate_weight_mean=masked_mean(4 * p * (1 - p), m)))
    return LossOutput(loss, metrics)
