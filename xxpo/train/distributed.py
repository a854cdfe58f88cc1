"""Data-parallel training over ``torch.distributed``: N processes, one global batch, one process's update.

Launch with ``xxpo train --nproc N ...`` (one machine) or ``torchrun ... -m xxpo.cli train ...`` (any
number of machines); each process finds its rank in the environment torchrun sets. Gloo on CPU, NCCL on
CUDA (each process on GPU ``LOCAL_RANK``). One step of the RL loop (:mod:`xxpo.train.loop`) on N ranks:

    prompts    the step's P prompts, drawn by the same generator on every rank
    sample     rank r samples the G responses of its share of the prompts (whole groups), from its own
               sampling stream (seed + r * 2**32; rank 0's is the one-process stream)
    gather     every rank receives every rank's groups: all ranks hold the global rollout (token ids and
               per-token log-probs, small beside one forward pass over them)
    rewards, advantages, the minibatch split: computed from the global rollout, the same on every rank
    forwards   every model forward over rollout rows (reference, proximal recompute, critic values, Routing
               Replay, the training forward) runs on this rank's rows only (:meth:`DataParallel.rows`) and
               is gathered (:meth:`DataParallel.gather`); the training forward's gather is differentiable
    loss       the objective sees the global minibatch, so every normalizer (tokens for token-mean,
               sequences for seq-mean, a sequence-level ratio's mean) is the one-process normalizer
    backward   each rank's gradient is the gradient through its own rows; an all-reduce SUMS them
               (:meth:`DataParallel.sum_gradients`), which is the gradient of the one-process loss
    update     gradient clipping and AdamW then see the same gradient on every rank: the weights stay
               identical without being broadcast again

Why the loss is computed on the gathered minibatch instead of per rank: a per-rank loss must be rescaled
by the rank's share of the global normalizer, which differs by aggregation mode (tokens, sequences,
non-empty sequences, a constant) and by method; peers have shipped bugs there (a seq-mean denominator
too small by a factor dp_size^2). Here no objective knows about ranks. The price is small: the objective's
element-wise work on (B, T) tensors is repeated on every rank, and log-probs are all-gathered (B * T
floats per minibatch). What this module does not do: overlap the gradient all-reduce with the backward
pass (DDP's gradient buckets), shard optimizer states or weights (ZeRO / FSDP), or run the rollout on a
separate inference engine; for those, run the objectives inside verl (:mod:`xxpo.integrations.verl`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

SAMPLING_SEED_STRIDE = 2**32
"""Rank r samples with ``torch.Generator().manual_seed(seed + r * SAMPLING_SEED_STRIDE)``."""


def world_size_from_env() -> int:
    """The ``WORLD_SIZE`` torchrun sets (1 when unset), validated."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE must be an int, got {text!r}") from None
    if size < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {size}")
    return size


def data_parallel_requested() -> bool:
    """Whether this process is one of several (launched by torchrun, or in an initialized group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return world_size_from_env() > 1


class DataParallel:
    """This process's place among the ranks, and the four collectives the RL loop needs."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":  # one GPU per process on each machine, chosen before NCCL starts
            local_rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))
            self.device = torch.device("cuda", int(local_rank) % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    @classmethod
    def from_env(cls, device: torch.device) -> DataParallel | None:
        """The data-parallel group of a process launched by torchrun (or already initialized), else None."""
        return cls(device) if data_parallel_requested() else None

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes results, checkpoints and the progress bar."""
        return self.rank == 0

    # ------------------------------------------------------------------ which rows are this rank's
    def sizes(self, n: int) -> list[int]:
        """How ``n`` rows split over the ranks: contiguous blocks whose sizes differ by at most one."""
        return [n // self.size + (r < n % self.size) for r in range(self.size)]

    def rows(self, n: int) -> slice:
        """This rank's block of ``n`` rows."""
        sizes = self.sizes(n)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    # ------------------------------------------------------------------ collectives
    def gather(self, local: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
        """This rank's block of an ``n``-row tensor (rows along ``dim``) -> the whole tensor, on every rank.

        Differentiable: the backward pass returns this rank's block of the incoming gradient. Every rank
        computes the same loss from the gathered tensor, so that block is this rank's rows' share of the
        gradient, and :meth:`sum_gradients` adds the shares up.
        """
        return _GatherRows.apply(local, self, n, dim)

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sum_gradients(self, module: torch.nn.Module, bucket_elements: int = 2**25) -> None:
        """Replace each parameter's ``.grad`` with its sum over the ranks (a missing gradient counts as zero).

        Gradients are flattened into buckets of at most ``bucket_elements`` numbers (128 MB in float32),
        one all-reduce per bucket.
        """
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket, count = [], 0
        for p in params + [None]:
            if p is not None and (count + p.numel() <= bucket_elements or not bucket):
                bucket.append(p)
                count += p.numel()
                continue
            if bucket:
                flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                for q, g in zip(bucket, flat.split([q.numel() for q in bucket])):
                    q.grad.copy_(g.view_as(q.grad))
            bucket, count = ([p], p.numel()) if p is not None else ([], 0)

    def broadcast(self, module: torch.nn.Module) -> None:
        """Make ``module``'s parameters and buffers rank 0's."""
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    @contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the block before the others (it may fill a cache the others then read)."""
        if not self.is_writer:
            dist.barrier()
        yield
        if self.is_writer:
            dist.barrier()


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of unequal size (padded to the largest, trimmed after)."""

    @staticmethod
    def forward(ctx, local, group: DataParallel, n: int, dim: int):
        sizes = group.sizes(n)
        if local.shape[dim] != sizes[group.rank]:
            raise ValueError(f"rank {group.rank} holds {local.shape[dim]} rows along dim {dim}; its block of {n} "
                             f"rows has {sizes[group.rank]}")
        ctx.block, ctx.dim = group.rows(n), dim
        pad = [0, 0] * (local.dim() - 1 - dim) + [0, max(sizes) - sizes[group.rank]]
        padded = torch.nn.functional.pad(local, pad).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes)], dim=dim)

    @staticmethod
    def backward(ctx, grad):
        block = grad.narrow(ctx.dim, ctx.block.start, ctx.block.stop - ctx.block.start)
        return block.contiguous(), None, None, None
