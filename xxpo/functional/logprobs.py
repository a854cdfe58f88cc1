"""Per-token log-probabilities and entropy from logits, without a full float32 log-softmax.

A naive ``logits.float().log_softmax(-1).gather(...)`` materializes a float32 ``(B, T, V)`` tensor.
We instead compute ``logit[token] - logsumexp(logits)`` one chunk of rows at a time, so the
extra memory is ``chunk_size * V`` floats whatever ``B * T`` is.
"""

from __future__ import annotations

import torch

from xxpo.functional.checks import check_number, check_tensor


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits)[..., index] for ``logits`` (..., V) and integer ``index`` (...).

    Works in float32 (or float64 for float64 logits) one chunk of ``chunk_size`` rows at a time and
    returns that dtype, shape ``index.shape``. Gradients flow to ``logits``.
    """
    check_tensor("logits", logits, ndim=range(2, 5), finite=False)
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise TypeError("index must be an integer (int64 or int32) tensor")
    if index.shape != logits.shape[:-1]:
        raise ValueError(f"index must have shape {tuple(logits.shape[:-1])}, got {tuple(index.shape)}")
    check_number("chunk_size", chunk_size, low=1)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_index = index.reshape(-1, 1).long()  # (N, 1)
    pieces = []
    for start in range(0, flat_logits.shape[0], chunk_size):
        chunk = flat_logits[start : start + chunk_size].to(out_dtype)  # (n, V)
        picked = chunk.gather(-1, flat_index[start : start + chunk_size]).squeeze(-1)  # (n,)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    if not pieces:
        return flat_logits.new_zeros(index.shape, dtype=out_dtype)
    return torch.cat(pieces).reshape(index.shape)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, shape ``logits.shape[:-1]``, chunked like above."""
    check_tensor("logits", logits, ndim=range(2, 5), finite=False)
    check_number("chunk_size", chunk_size, low=1)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    pieces = []
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start : start + chunk_size].to(out_dtype)  # (n, V)
        logp = chunk.log_softmax(-1)
        pieces.append(-(logp.exp() * logp).sum(-1))
    if not pieces:
        return flat.new_zeros(logits.shape[:-1], dtype=out_dtype)
    return torch.cat(pieces).reshape(logits.shape[:-1])
