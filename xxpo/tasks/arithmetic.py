"""Verifiable integer arithmetic at several difficulty levels.

Format (one character per token, see :mod:`xxpo.tasks.tokenizer`):

- Plain tasks. Prompt ``"23+45="``, response ``"68"``. Operands and results are written in decimal
  without leading zeros; ``-`` tasks put the larger operand first so results are never negative.
  The response is graded by exact string match with the answer: ``"68"`` earns 1, ``"068"``,
  ``"68 "`` or ``"6"`` earn 0. Anything that is not a decimal number is malformed and earns 0.
- Scratch task (``add2_scratch``). The response is ``<scratch>|<answer>``: any characters, then the
  separator ``|``, then the answer, e.g. ``"....|68"`` or ``"|68"``. Only the text after the LAST
  ``|`` is graded; a response without ``|`` is malformed (reward 0). The scratch carries no
  information, it only lets the response length vary independently of correctness, which is what
  Dr. GRPO's length-bias argument (arXiv 2503.20783, Sec. 3.1) is about. SFT targets draw the
  scratch length uniformly from ``0..max_scratch`` dots, so the fine-tuned model starts with real
  length variance, and ``max_new_tokens`` leaves room for responses much longer than that.

Splits. Problems are drawn from the operand grid by a ``random.Random`` seeded with the operator and
the operand ranges, so they are the same on every machine and run, and ``add2_scratch`` poses exactly
the problems of ``add2``. The test split is drawn first; a training problem is kept only if its
operand pair, taken unordered, is not in the test split, so neither ``23+45=`` nor ``45+23=``
appears in train when ``23+45=`` is a test problem.

Difficulty. Greedy accuracy on 300 held-out problems of the ``tiny`` preset (~125k parameters) after
``xxpo.train.sft.sft_train`` with batch 64 and lr 3e-3 (seed 0, one run each, so only a rough ladder):

=================  ========================  ================================
task               operands                  accuracy after 300 / 600 / 1200 SFT steps
=================  ========================  ================================
``add2``           0-99 + 0-99               14% / 80% / -
``sub2``           0-99 - 0-99               - / 24% / -
``mul1``           0-999 * 0-9               - / 15% / -
``mul2``           0-99 * 0-99               - / 6% / -
``add3``           0-999 + 0-999             - / 1% / -
``add2_scratch``   as ``add2``, scratch 0-8  - / 4% / 68%
=================  ========================  ================================

Learning is abrupt (``add2`` goes from 14% to 80% between 300 and 600 steps), so a base model with a
partial accuracy is best made by stopping SFT at a target accuracy rather than after fixed steps.
"""

from __future__ import annotations

import random
import re

from xxpo.tasks.base import SPLITS, Example, Task

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
SEPARATOR = "|"
FILLER = "."
_NUMBER = re.compile(r"-?[0-9]+")


class ArithmeticTask(Task):
    """``a <op> b =`` with ``a`` in ``a_range`` and ``b`` in ``b_range`` (inclusive integer ranges)."""

    def __init__(
        self,
        name: str,
        op: str,
        a_range: tuple[int, int],
        b_range: tuple[int, int],
        *,
        n_train: int,
        n_test: int = 500,
        max_new_tokens: int | None = None,
    ) -> None:
        if op not in OPS:
            raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")
        for arg, bounds in (("a_range", a_range), ("b_range", b_range)):
            if not (isinstance(bounds, tuple) and len(bounds) == 2 and all(type(v) is int for v in bounds)):
                raise TypeError(f"{arg} must be a (low, high) tuple of ints, got {bounds!r}")
            low, high = bounds
            if not 0 <= low <= high:
                raise ValueError(f"{arg} must satisfy 0 <= low <= high, got {(low, high)}")
        for arg, value in (("n_train", n_train), ("n_test", n_test)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        self.name = name
        self.op = op
        self.a_range = a_range
        self.b_range = b_range
        self.n_train = n_train
        self.n_test = n_test
        # +, - and * are monotone in each operand, so the widest answer sits at a corner of the grid.
        self.answer_width = max(len(str(OPS[op](max(a, b), min(a, b)))) for a in a_range for b in b_range)
        budget = self.answer_width + 2 if max_new_tokens is None else max_new_tokens  # answer, EOS, one spare
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < self.answer_width + 1:
            raise ValueError(f"max_new_tokens must be an int >= {self.answer_width + 1} (answer + EOS), got {budget!r}")
        self.max_new_tokens = budget
        self._splits = self._draw_splits()

    def example(self, a: int, b: int) -> Example:
        """The problem for operands ``a``, ``b`` (swapped for ``-`` so that the result is >= 0)."""
        if self.op == "-" and a < b:
            a, b = b, a
        return Example(prompt=f"{a}{self.op}{b}=", answer=str(OPS[self.op](a, b)))

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"name must be one of {SPLITS}, got {name!r}")
        return list(self._splits[name])

    def _draw_splits(self) -> dict[str, list[Example]]:
        (a_low, a_high), (b_low, b_high) = self.a_range, self.b_range
        b_count = b_high - b_low + 1
        grid = (a_high - a_low + 1) * b_count
        rng = random.Random(f"xxpo-split:{self.op}:{self.a_range}:{self.b_range}")
        order = rng.sample(range(grid), min(grid, 3 * (self.n_train + self.n_test)))
        test, train = [], []
        test_pairs: set[tuple[int, int]] = set()
        seen_prompts: set[str] = set()
        for index in order:
            a, b = a_low + index // b_count, b_low + index % b_count
            pair = (min(a, b), max(a, b))  # unordered: a+b and b+a are the same problem
            example = self.example(a, b)
            if example.prompt in seen_prompts:
                continue
            if len(test) < self.n_test:
                test.append(example)
                test_pairs.add(pair)
            elif pair not in test_pairs:
                train.append(example)
            else:
                continue
            seen_prompts.add(example.prompt)
            if len(train) == self.n_train:
                break
        if len(train) < self.n_train:
            raise ValueError(
                f"n_train={self.n_train} is more than the {len(train)} problems of task {self.name!r} "
                "left after its test split"
            )
        return {"train": train, "test": test}

    def final_answer(self, response: str) -> str | None:
        if not isinstance(response, str):
            raise TypeError(f"response must be a str, got {type(response).__name__}")
        return response if _NUMBER.fullmatch(response) else None

    def sft_target(self, example: Example, rng: random.Random) -> str:
        return example.answer


class ScratchArithmeticTask(ArithmeticTask):
    """Free-length variant: ``<scratch>|<answer>``; only the text after the last ``|`` is graded."""

    def __init__(self, *args, max_scratch: int = 8, max_new_tokens: int = 32, **kwargs) -> None:
        if isinstance(max_scratch, bool) or not isinstance(max_scratch, int) or max_scratch < 0:
            raise ValueError(f"max_scratch must be a non-negative int, got {max_scratch!r}")
        super().__init__(*args, max_new_tokens=max_new_tokens, **kwargs)
        if max_scratch + self.answer_width + 2 > self.max_new_tokens:  # scratch, separator, answer, EOS
            raise ValueError(f"max_new_tokens={self.max_new_tokens} leaves no room for max_scratch={max_scratch}")
        self.max_scratch = max_scratch

    def final_answer(self, response: str) -> str | None:
        if not isinstance(response, str):
            raise TypeError(f"response must be a str, got {type(response).__name__}")
        _, separator, answer = response.rpartition(SEPARATOR)
        if not separator:
            return None
        return super().final_answer(answer)

    def sft_target(self, example: Example, rng: random.Random) -> str:
        return FILLER * rng.randint(0, self.max_scratch) + SEPARATOR + example.answer
