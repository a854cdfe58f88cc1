"""DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization (Yu et al. 2025, arXiv 2503.14476).

J = E[ 1/sum_i |o_i| sum_i sum_t min(r_it A_it, clip(r_it, 1 - eps_low, 1 + eps_high) A_it) ]   (Eq. 8)

DAPO has four techniques; this file implements the two that live in the loss, plus the shaping term as a
pure function:

- ``dapo_loss`` is ``grpo_loss`` with DAPO's defaults: *clip-higher* (eps_high = 0.28 > eps_low = 0.2,
  so unlikely tokens can grow and entropy does not collapse), the *token-level* loss (``token-mean``:
  every valid token of the batch it is given weighs the same, whatever its response's length) and no KL
  (``kl_coef = 0``). It computes Eq. 8 on the batch it receives and nothing else.
- ``overlong_penalty`` returns Eq. 13's soft overlong punishment for given lengths. It does not touch
  any reward by itself.

Not in this file: *dynamic sampling* (over-sample until the batch holds enough groups whose rewards
differ, Sec. 3.2) is done by the training loop (config ``dynamic_sampling``), and the overlong
punishment is added to the reward by the loop (config ``overlong_buffer``), not by the loss.

Deviations: none in the loss. Note TRL's ``dapo`` normalizes by the token count of the *global*
accumulated batch; here the caller's batch is the unit.
"""

from __future__ import annotations

import torch

from xxpo.functional.checks import check_number, check_tensor
from xxpo.objectives.grpo import grpo_loss
from xxpo.objectives.output import LossOutput


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = 0.28,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_is_correction: bool = False,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
    dual_clip_c: float | None = None,
) -> LossOutput:
    """DAPO's loss (arXiv 2503.14476 Eq. 8): GRPO with clip-higher and token-mean aggregation."""
    return grpo_loss(
        logp,
        old_logp,
        advantages,
        mask,
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        ref_logp=ref_logp,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_is_correction=kl_is_correction,
        loss_agg_mode=loss_agg_mode,
        norm_len=norm_len,
        dual_clip_c=dual_clip_c,
    )


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Eq. 13), added to the reward; ``lengths`` (B,) -> (B,).

    0 up to ``max_len - cache_len`` tokens, then a linear ramp down to -1 at ``max_len``, -1 beyond.
    """
    check_tensor("lengths", lengths, ndim=1, floating=False)
    check_number("max_len", max_len, low=1)
    check_number("cache_len", cache_len, low=1, high=max_len)
    lengths = lengths.to(torch.float32)
    soft_start = max_len - cache_len
    ramp = (soft_start - lengths) / cache_len  # (B,)
    return torch.where(lengths <= soft_start, torch.zeros_like(ramp), torch.where(lengths <= max_len, ramp, -torch.ones_like(ramp)))
