"""Importance ratios between the current policy and the policy that produced the data.

``log r = logp - old_logp`` is clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` before ``exp`` (verl
uses 20 for token ratios), so one wild token cannot overflow the loss. Outside the clamp the
gradient is zero, which is what a clipped objective would give there anyway.
"""

from __future__ import annotations

import torch

from xxpo.functional.aggregation import masked_mean
from xxpo.functional.checks import check_mask, check_same_shape

LOG_RATIO_CLAMP = 20.0


def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """log r_{i,t} = log pi_theta(o_t) - log pi_old(o_t), clamped; shape (B, T). ``old_logp`` is detached."""
    check_same_shape("logp", logp, old_logp=old_logp)
    return (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = (1/|o_i|) sum_t log r_{i,t}: GSPO's length-normalized sequence ratio (arXiv 2507.18071 Eq. 7).

    A *masked* mean over valid tokens (padding never leaks in); shape (B,); 0 for an empty row.
    """
    check_same_shape("logp", logp, old_logp=old_logp)
    check_mask("mask", mask, logp.shape)
    raw = logp - old_logp.detach()  # (B, T)
    return masked_mean(raw, mask, dim=-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B,)

