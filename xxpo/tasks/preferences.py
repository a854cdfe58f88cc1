"""Preference data for DPO (arXiv 2305.18290) and a preference oracle for self-play SPPO (arXiv 2405.00675).

Pairs come from the verifier: the chosen response is correct, the rejected one is not.

The oracle plays the role of SPPO's preference model P(y > y' | x). It is Bradley-Terry over a hidden
score that is known here instead of learned:

    s(y) = CORRECT_BONUS * [y is correct] - log(1 + |value(y) - answer|)
    P(y > y') = sigmoid(s(y) - s(y'))

so a correct answer beats a wrong one, and among wrong answers a closer number wins; a malformed
response counts as ``MALFORMED_DISTANCE`` away. P(y > y') + P(y' > y) = 1 and P(y > y) = 1/2 hold
exactly, by the symmetry of the sigmoid.
"""

from __future__ import annotations

import math
import random
from decimal import Decimal

from xxpo.tasks.base import Example, Task

CORRECT_BONUS = 2.0
MALFORMED_DISTANCE = 10**6


def _score(task: Task, example: Example, response: str) -> float:
    graded = task.final_answer(response)
    distance = MALFORMED_DISTANCE if graded is None else abs(Decimal(graded) - Decimal(example.answer))  # exact; integers as before
    return CORRECT_BONUS * task.is_correct(example, response) - math.log1p(min(distance, MALFORMED_DISTANCE))


def preference_prob(task: Task, example: Example, y: str, y_other: str) -> float:
    """P(``y`` beats ``y_other``) for the prompt of ``example``, in (0, 1)."""
    if not isinstance(example, Example):
        raise TypeError(f"example must be an Example, got {type(example).__name__}")
    for name, value in (("y", y), ("y_other", y_other)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    margin = _score(task, example, y) - _score(task, example, y_other)
    return 1.0 / (1.0 + math.exp(-margin))


def near_miss(task: Task, example: Example, rng: random.Random) -> str:
    """A plausible wrong response: the correct response with its answer moved by +-1, +-10 or +-100."""
    answer = int(example.answer)
    wrong = answer
    while wrong == answer or wrong < 0:
        wrong = answer + rng.choice((-1, 1)) * rng.choice((1, 10, 100))
    correct = task.sft_target(example, rng)
    return correct[: len(correct) - len(example.answer)] + str(wrong)


def preference_pairs(
    task: Task,
    examples: list[Example],
    rng: random.Random,
    responses: list[list[str]] | None = None,
) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` triples, chosen correct and rejected incorrect by ``task``'s verifier.

    Without ``responses`` (offline data): chosen is an SFT target, rejected a :func:`near_miss`.
    With ``responses`` (e.g. samples from a model, one list per example): chosen and rejected are
    drawn from that example's correct and incorrect responses; examples lacking either are skipped.
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if responses is not None and len(responses) != len(examples):
        raise ValueError(f"responses must have one list per example ({len(examples)}), got {len(responses)}")
    pairs = []
    for i, example in enumerate(examples):
        if responses is None:
            chosen, rejected = task.sft_target(example, rng), near_miss(task, example, rng)
        else:
            good = [y for y in responses[i] if task.is_correct(example, y)]
            bad = [y for y in responses[i] if not task.is_correct(example, y)]
            if not good or not bad:
                continue
            chosen, rejected = rng.choice(good), rng.choice(bad)
        pairs.append((example.prompt, chosen, rejected))
    return pairs
