"""Masked reductions and the four loss-aggregation modes.

The aggregation mode is the main thing the GRPO variants change (fact sheet, section 2.1). With
per-token losses ``l[i, t]``, mask ``m[i, t]`` and ``B`` rows:

======================== ==================================================================
``token-mean``           sum_{i,t} m l / sum_{i,t} m              (DAPO, AReaL; verl default)
``seq-mean-token-mean``  mean_i [ sum_t m l / sum_t m ]             (GRPO, GSPO, SAPO)
``seq-mean-token-sum``   mean_i [ sum_t m l ]
``seq-mean-token-sum-norm`` sum_{i,t} m l / (B * norm_len)          (Dr. GRPO, constant normalizer)
======================== ==================================================================

Rows with no valid token never produce NaN: the two ``seq-mean`` modes average over the rows
that have at least one valid token (an empty batch gives 0); ``seq-mean-token-sum-norm`` keeps
``B`` = all rows, because its normalizer must not depend on the data. verl's
``seq-mean-token-sum-norm`` divides by ``loss_scale_factor`` only (no ``1/B``); TRL's ``dr_grpo``
divides by ``B * max_completion_length`` like we do.
"""

from __future__ import annotations

import torch

from xxpo.functional.checks import check_choice, check_mask, check_number, check_tensor


def _check_pair(x: torch.Tensor, mask: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError("x and mask must be torch.Tensors")
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1. Masked entries are zeroed *before* summing (no NaN leaks)."""
    _check_pair(x, mask)
    m = mask.to(x.dtype)
    x = torch.where(m.bool(), x, torch.zeros_like(x))
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1; 0 where there are none."""
    _check_pair(x, mask)
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    norm_len: int | float | None = None,
) -> torch.Tensor:
    """Reduce per-token losses ``loss_mat`` (B, T) to a scalar with aggregation ``mode``.

    ``norm_len`` is the constant of ``seq-mean-token-sum-norm`` (Dr. GRPO uses the generation
    budget, ``max_new_tokens``); it is required for that mode and ignored by the others.
    """
    check_tensor("loss_mat", loss_mat, ndim=2, finite=False)
    check_mask("mask", mask, loss_mat.shape)
    check_choice("loss_agg_mode", mode, LOSS_AGG_MODES)
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return masked_mean(loss_mat, m)
    if mode == "seq-mean-token-sum-norm":
        if norm_len is None:
            raise ValueError("norm_len is required for loss_agg_mode='seq-mean-token-sum-norm'")
        check_number("norm_len", norm_len, low=0, low_inclusive=False)
        return masked_sum(loss_mat, m) / (loss_mat.shape[0] * norm_len)
    row_has_tokens = m.sum(-1) > 0  # (B,)
    if mode == "seq-mean-token-mean":
        per_row = masked_mean(loss_mat, m, dim=-1)  # (B,)
    else:  # seq-mean-token-sum
        per_row = masked_sum(loss_mat, m, dim=-1)  # (B,)
    return masked_mean(per_row, row_has_tokens)
