"""Dr. GRPO: "GRPO Done Right" (Liu et al. 2025, arXiv 2503.20783).

The paper removes GRPO's two biases (Sec. 3.1, Fig. 1):

1. the per-response 1/|o_i|, which lets a long wrong answer spread its penalty thin; the loss is a
   masked *sum* over tokens divided by a constant, ``B * norm_len`` (the authors' code divides by the
   generation budget ``generate_max_length``);
2. the division by the group std of rewards; use ``group_advantages(..., adv_norm="none")`` for A.

Deviations: none. TRL's ``dr_grpo`` divides by B * max_completion_length (as here); verl 0.9.1's
``seq-mean-token-sum-norm`` divides by the number of non-empty responses times ``loss_scale_factor``,
which defaults to the batch's padded width (a data-dependent constant): the same as here when the factor is
set to norm_len and no response is empty.
"""

from __future__ import annotations

import torch

from xxpo.objectives.grpo import grpo_loss
from xxpo.objectives.output import LossOutput


def dr_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    norm_len: int,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_is_correction: bool = False,
    dual_clip_c: float | None = None,
) -> LossOutput:
    """Dr. GRPO's loss: GRPO's per-token term summed and divided by ``B * norm_len`` (B, T tensors).

    ``norm_len`` is required: the generation budget (max new tokens). ``dual_clip_c``: the optional third
    clip of dual-clip PPO, as in ``grpo_loss`` (off by default; not part of the paper). Metrics as ``grpo_loss``.
    """
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
        dual_clip_c=dual_clip_c,
        loss_agg_mode="seq-mean-token-sum-norm",
        norm_len=norm_len,
    )
