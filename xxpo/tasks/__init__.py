"""Verifiable tasks, the character tokenizer, and preference data.

``get_task(name)`` returns a :class:`Task`; ``TASKS`` lists the built-in names, plain tasks easiest
first, then the free-length ``add2_scratch``. Formats and measured difficulty are in
:mod:`xxpo.tasks.arithmetic`. A name ``jsonl:TRAIN[,TEST]`` reads your own prompts and numeric answers
from local JSONL files (:mod:`xxpo.tasks.jsonl`).
"""

from __future__ import annotations

from xxpo.tasks.arithmetic import ArithmeticTask, ScratchArithmeticTask
from xxpo.tasks.base import SPLITS, Example, Task
from xxpo.tasks.jsonl import JsonlTask, is_jsonl_spec
from xxpo.tasks.preferences import preference_pairs, preference_prob
from xxpo.tasks.tokenizer import ALPHABET, encode_prompts, make_tokenizer

# name -> (class, op, a_range, b_range, default n_train, default n_test); plain tasks easiest first
# (measured difficulty in the docstring of xxpo.tasks.arithmetic)
_SPECS = {
    "add2": (ArithmeticTask, "+", (0, 99), (0, 99), 4000, 500),
    "sub2": (ArithmeticTask, "-", (0, 99), (0, 99), 4000, 500),
    "mul1": (ArithmeticTask, "*", (0, 999), (0, 9), 6000, 500),
    "mul2": (ArithmeticTask, "*", (0, 99), (0, 99), 4000, 500),
    "add3": (ArithmeticTask, "+", (0, 999), (0, 999), 20000, 500),
    "add2_scratch": (ScratchArithmeticTask, "+", (0, 99), (0, 99), 4000, 500),
}
TASKS = tuple(_SPECS)
DEFAULT_TASK = "add2"
"""2-digit addition: the tiny model reaches a partial accuracy after a few hundred SFT steps, and RL
steps are cheapest with its short prompts and answers."""


def get_task(name: str, **kwargs) -> Task:
    """The task called ``name``; ``kwargs`` override its constructor defaults (e.g. ``n_train``).

    ``name`` is one of :data:`TASKS` or ``jsonl:TRAIN[,TEST]`` (a :class:`JsonlTask`; its ``kwargs`` are
    ``n_test`` and ``max_new_tokens``).
    """
    if is_jsonl_spec(name):
        return JsonlTask(name, **kwargs)
    if name not in _SPECS:
        raise ValueError(f"task must be one of {TASKS} or jsonl:TRAIN[,TEST] (a local JSONL file), got {name!r}")
    cls, op, a_range, b_range, n_train, n_test = _SPECS[name]
    kwargs.setdefault("n_train", n_train)
    kwargs.setdefault("n_test", n_test)
    return cls(name, op, a_range, b_range, **kwargs)


__all__ = [
    "ALPHABET",
    "DEFAULT_TASK",
    "SPLITS",
    "TASKS",
    "ArithmeticTask",
    "Example",
    "JsonlTask",
    "ScratchArithmeticTask",
    "Task",
    "encode_prompts",
    "get_task",
    "make_tokenizer",
    "preference_pairs",
    "preference_prob",
]
