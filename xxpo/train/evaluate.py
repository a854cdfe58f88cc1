"""Held-out accuracy and response length of a policy under greedy decoding.

Greedy decoding makes the score a property of the weights alone (no sampling noise), so two
checkpoints can be compared on the same examples. Lengths are reported split by correctness because
Dr. GRPO (arXiv 2503.20783, Sec. 3.1) claims that GRPO's per-response length normalization makes
*incorrect* responses grow longer while correct ones do not.
"""

from __future__ import annotations

import math
import random

import torch

from xxpo.rollout import decode_responses, sample
from xxpo.tasks.tokenizer import encode_prompts

SUBSET_SEED = 0
"""Seed of the fixed random subset drawn when ``n`` is given (the same ``n`` always gives the same examples)."""


def fixed_subset(task, n: int | None, split: str = "test") -> list:
    """``task.split(split)``, or the fixed random subset of ``n`` of its examples (same ``n``, same subset)."""
    examples = task.split(split)
    if n is None:
        return examples
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(examples):
        raise ValueError(f"n must be an int in [1, {len(examples)}] or None, got {n!r}")
    return [examples[i] for i in sorted(random.Random(SUBSET_SEED).sample(range(len(examples)), n))]


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    task,
    *,
    split: str = "test",
    n: int | None = None,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """Greedy-decode ``task.split(split)`` (or a fixed subset of ``n`` examples) and score it.

    Returns ``accuracy`` (fraction ``task.is_correct``), ``mean_reward``, ``mean_length`` (generated
    tokens per response, EOS included), ``mean_length_correct`` and ``mean_length_incorrect`` (NaN
    when there is no such response) and ``n`` (examples scored).
    ``max_new_tokens`` defaults to ``task.max_new_tokens``.
    """
    examples = fixed_subset(task, n, split)
    return score_examples(model, tokenizer, task, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)


@torch.no_grad()
def greedy_decode(model, tokenizer, examples: list, *, max_new_tokens: int, batch_size: int = 256):
    """The greedy response text and length (generated tokens, EOS included) of ``model`` for each example."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = next(model.parameters()).device
    texts: list[str] = []
    lengths: list[int] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [ex.prompt for ex in batch])  # (b, P), (b, P)
        rollout = sample(
            model,
            prompt_ids.to(device),
            prompt_mask.to(device),
            num_samples=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            greedy=True,
        )
        texts.extend(decode_responses(tokenizer, rollout))
        lengths.extend(rollout.lengths.tolist())
    return texts, lengths


def score_responses(task, examples: list, texts: list[str], lengths: list[int]) -> dict[str, float]:
    """The scores of :func:`evaluate` for responses already decoded (one per example)."""
    correct = [bool(task.is_correct(ex, text)) for ex, text in zip(examples, texts)]
    rewards = [float(task.reward(ex, text)) for ex, text in zip(examples, texts)]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    return {
        "accuracy": mean([float(c) for c in correct]),
        "mean_reward": mean(rewards),
        "mean_length": mean(lengths),
        "mean_length_correct": mean([n_tok for n_tok, c in zip(lengths, correct) if c]),
        "mean_length_incorrect": mean([n_tok for n_tok, c in zip(lengths, correct) if not c]),
        "n": len(examples),
    }


def score_examples(
    model: torch.nn.Module,
    tokenizer,
    task,
    examples: list,
    *,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """:func:`evaluate` on an explicit list of examples (e.g. a validation slice of the train split)."""
    if not examples:
        raise ValueError("examples must be a non-empty list")
    if max_new_tokens is None:
        max_new_tokens = task.max_new_tokens
    texts, lengths = greedy_decode(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return score_responses(task, examples, texts, lengths)
