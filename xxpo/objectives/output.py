"""The one return type of every objective."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    """``loss``: a scalar to minimize (``L = -J``), ready for ``backward()``.
    ``metrics``: detached 0-dim tensors, named in each objective's docstring."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def detached(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics dict of detached float32 scalars."""
    return {k: v.detach().float() for k, v in values.items()}
