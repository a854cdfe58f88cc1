"""Input validation shared by every public function.

Bad input gets a clear error that names the argument; nothing is silently coerced.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    x,
    *,
    ndim: int | Iterable[int] | None = None,
    floating: bool = True,
    finite: bool = True,
) -> torch.Tensor:
    """Return ``x`` unchanged after checking it is a tensor of the right rank and dtype.

    ``floating=True`` asks for a float dtype, ``False`` for a bool/int mask-like tensor is NOT
    checked here (use :func:`check_mask`). ``finite`` rejects NaN and +-inf.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if finite and floating and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_mask(name: str, mask, shape: torch.Size) -> torch.Tensor:
    """Check a ``(B, T)`` mask of 0/1 values (bool, int or float) and return it as the float dtype later used.

    Returns the mask unchanged; callers convert with ``mask.to(dtype)``.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must contain only 0 and 1")
    return mask


def check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.shape != ref.shape:
            raise ValueError(f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def check_number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_none: bool = False,
) -> None:
    """Check a scalar hyperparameter: a real, finite number inside [low, high] (bounds optional)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {op} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {op} {high}, got {value}")


def check_choice(name: str, value, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_advantages(advantages, ref: torch.Tensor, *, per_sequence_only: bool = False) -> torch.Tensor:
    """Accept ``(B,)`` per-sequence or ``(B, T)`` per-token advantages and return them as ``(B, T)``."""
    check_tensor("advantages", advantages, ndim=(1, 2))
    if advantages.dim() == 1:
        if advantages.shape[0] != ref.shape[0]:
            raise ValueError(f"advantages of shape (B,) must have B={ref.shape[0]}, got {advantages.shape[0]}")
        return advantages.unsqueeze(-1).expand_as(ref)  # (B, T)
    if per_sequence_only:
        raise ValueError("advantages must be per sequence, shape (B,); use gspo_token_loss for per-token advantages")
    check_same_shape("logp", ref, advantages=advantages)
    return advantages
