"""Importance ratios between the current policy and the policy that produced the data.

``log r = logp - old_logp`` is clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` before ``exp`` (verl
uses 20 for token ratios), so one wild token cannot overflow the loss. Outside the clamp the value is
frozen at e^(+-20) and the gradient is zero. Where that changes the result:

- PPO/GRPO/DAPO clip: only on the side the clip leaves open. A < 0 with log r > 20 keeps PPO's unclipped
  term -r A (gradient -A r grad log pi); the clamp caps the value at -e^20 A and zeroes the gradient.
  With ``dual_clip_c`` (< e^20) the loss is capped at -c A there already, so the clamp changes nothing.
  A > 0 with log r < -20 drops a gradient r A < 2.1e-9 A. In the clipped regions it changes nothing.
- SAPO's gate saturates far before e^(+-20): the clamp removes gradients below float noise.
- Decoupled PPO / A-3PO: the trust-region ratio u behaves as PPO's r; the behaviour weight
  pi_prox/pi_behav is clamped with the same constant and nothing else bounds it (unless
  ``behav_weight_cap``), so beyond e^20 the clamp changes the weight of those tokens' loss and gradient.
- GSPO: the clamp is on the mean log-ratio of a sequence, so beyond it every token of that sequence loses
  its gradient (on the open side, as for PPO). GSPO-token clamps the detached s_i: the gradient still flows
  through log pi and the clamp caps its weight at e^20 instead of zeroing it.
- Logged ratio_mean/min/max and approx_kl are computed from the clamped values.
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

