"""What every task provides: examples, a deterministic train/test split, and a verifier.

A task is a verifiable problem set in the sense of RL with verifiable rewards (e.g. DeepSeekMath /
GRPO, arXiv 2402.03300; Tulu 3's RLVR, arXiv 2411.15124): the reward of a response is computed by a
program that checks the final answer, so no reward model is trained.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One problem: the prompt the model reads and the canonical answer text."""

    prompt: str
    answer: str


class Task:
    """Base class. Subclasses set ``name`` and ``max_new_tokens`` and implement the methods below.

    ``response`` arguments are decoded text without special tokens (generation stops at EOS).
    """

    name: str
    max_new_tokens: int
    """Generation budget in tokens, EOS included; also Dr. GRPO's constant normaliser (arXiv 2503.20783)."""

    def split(self, name: str) -> list[Example]:
        """The ``"train"`` or ``"test"`` examples: deterministic, and no test problem occurs in train."""
        raise NotImplementedError

    def final_answer(self, response: str) -> str | None:
        """The part of ``response`` that is graded, or ``None`` if the response is malformed."""
        raise NotImplementedError

    def sft_target(self, example: Example, rng: random.Random) -> str:
        """A correct response to train on in the SFT stage (the SFT code appends EOS)."""
        raise NotImplementedError

    def is_correct(self, example: Example, response: str) -> bool:
        """True when the graded part of ``response`` equals the canonical answer exactly."""
        if not isinstance(example, Example):
            raise TypeError(f"example must be an Example, got {type(example).__name__}")
        if not isinstance(response, str):
            raise TypeError(f"response must be a str, got {type(response).__name__}")
        return self.final_answer(response) == example.answer

    def reward(self, example: Example, response: str) -> float:
        """Binary verifiable reward: 1.0 if correct, else 0.0 (malformed responses score 0)."""
        return 1.0 if self.is_correct(example, response) else 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, max_new_tokens={self.max_new_tokens})"
