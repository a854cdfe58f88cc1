"""Tasks from a local JSONL file: your own prompts with numeric answers (e.g. GSM8K exported to JSONL).

Selected by the task string ``jsonl:TRAIN`` or ``jsonl:TRAIN,TEST`` (``TrainConfig(task=...)``,
``xxpo train --task``, the notebooks' ``task`` parameter); :func:`xxpo.tasks.get_task` builds it.

The file. One JSON object per line with the fields ``prompt`` (a non-empty string) and ``answer``; other
fields are ignored and blank lines are skipped. The answer is a number: a JSON number (``42``, ``2.5``) or
a string holding one (``"42"``, ``"-3"``, ``"1,234"``, ``"0.25"``). A GSM8K-style worked solution is
accepted too: a string that contains ``####`` is graded on the number after its last ``####``
(``"... so she has 6 + 12 = 18 apples.\\n#### 18"`` has the answer 18), and its text becomes the task's
SFT target. Nothing else is guessed: an answer that is not a number is an error. Every error names the
file and, for a bad line, its line number and the field.

The split (deterministic, the same on every machine and for every order of the lines):

- ``jsonl:TRAIN,TEST``: the train split is TRAIN and the test split is TEST. Lines of TRAIN whose prompt
  also occurs in TEST are dropped from the train split (with a warning), so no test problem is trained on.
- ``jsonl:TRAIN``: a held-out test split is carved from the file. The distinct prompts are ranked by the
  SHA-256 of their UTF-8 text; the first ``n_test`` of them (default :data:`TEST_FRACTION` of the distinct
  prompts, at least 1) and every line that repeats one of them form the test split, everything else the
  train split. Both keep the order of the file. Which prompts are held out depends on the prompts alone,
  not on the line order, and a duplicated prompt is never on both sides.

The paths cannot contain a comma (the comma separates TRAIN from TEST). A relative path is resolved
against the working directory of the process that builds the task (for ``xxpo reproduce`` that is
``notebooks/``), so absolute paths are the safe choice.

The verifier (:meth:`JsonlTask.final_answer`), in order:

1. If the response contains ``####``, only the text after its LAST ``####`` is searched; otherwise the
   whole response.
2. A number is: an optional minus sign, counted only when the character before it is not a letter or a
   digit (``5-3`` holds the numbers 5 and 3, ``x = -3`` the number -3); digits, where commas are read as
   thousands separators only in groups of exactly three (``1,234,567``); an optional decimal part
   (``.`` and at least one digit).
3. The LAST number found is the graded answer; none found means malformed (reward 0).
4. It is correct when it equals the answer as a decimal number: ``18``, ``18.0``, ``018`` and ``18.00``
   are all 18, ``1,000`` is 1000.

Symbols around a number are ignored (``$18``, ``18%``, ``\\boxed{18}``, ``**18**`` are all 18). Not
interpreted: fractions (``3/4`` ends with the number 4), scientific notation, numbers written in words,
and a leading dot (``.5`` is the number 5).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import warnings
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from xxpo.tasks.base import SPLITS, Example, Task

PREFIX = "jsonl:"
TEST_FRACTION = 0.1
"""Share of the distinct prompts held out as the test split when no TEST file is given."""
DEFAULT_MAX_NEW_TOKENS = 512
"""Generation budget of a JSONL task, EOS included: room for a worked solution of a few hundred tokens.
Override with ``TrainConfig.max_new_tokens``; the metric ``frac_truncated`` shows whether it is enough.
The trainer lowers this default when a model's context cannot hold the longest prompt plus the budget."""
SEPARATOR = "####"

_DIGITS = r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"
NUMBER = re.compile(r"(?:(?<![0-9A-Za-z])-)?" + _DIGITS)
"""A number inside a response (rule 2 of the module docstring)."""
_ANSWER = re.compile(r"-?" + _DIGITS)


@dataclass(frozen=True)
class JsonlExample(Example):
    """An :class:`Example` whose answer came with a worked ``solution`` (the text before ``####``, or "")."""

    solution: str = ""


def canonical_number(text: str) -> str:
    """The decimal ``text`` (commas as thousands separators allowed) in one canonical spelling:
    integers without a decimal part (``"18.0"`` -> ``"18"``, ``"-0"`` -> ``"0"``), others without
    trailing zeros (``"2.50"`` -> ``"2.5"``). Two spellings of one number give the same string."""
    value = Decimal(text.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def final_number(response: str) -> str | None:
    """The graded number of ``response`` in :func:`canonical_number` form, or None (the module's rule)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if SEPARATOR in response:
        response = response.rsplit(SEPARATOR, 1)[1]
    found = NUMBER.findall(response)
    return canonical_number(found[-1]) if found else None


def parse_answer(value) -> tuple[str, str]:
    """``(canonical answer, solution text)`` of a JSONL ``answer`` value; ``ValueError`` if it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a number or a string holding one, got {json.dumps(value)}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return canonical_number(repr(value) if isinstance(value, float) else str(value)), ""
    solution, separator, tail = value.rpartition(SEPARATOR)
    number = tail.strip()
    if not _ANSWER.fullmatch(number):
        where = f"after its last {SEPARATOR!r}" if separator else ""
        raise ValueError(f"must be a number{' ' + where if where else ''}, got {value!r}")
    return canonical_number(number), solution if separator else ""


def read_jsonl(path: str) -> list[JsonlExample]:
    """The examples of the JSONL file ``path``, in file order; ``ValueError`` naming the file, line and field."""
    if not os.path.isfile(path):
        raise ValueError(f"jsonl task: no such file {path!r} (working directory {os.getcwd()!r})")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with fields 'prompt' and 'answer', "
                                 f"got {type(record).__name__}")
            for field in ("prompt", "answer"):
                if field not in record:
                    hint = " (rename GSM8K's 'question' to 'prompt')" if field == "prompt" and "question" in record else ""
                    raise ValueError(f"{where}: missing field {field!r}{hint}")
            prompt = record["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got {json.dumps(prompt)[:80]}")
            try:
                answer, solution = parse_answer(record["answer"])
            except ValueError as err:
                raise ValueError(f"{where}: field 'answer' {err}") from None
            examples.append(JsonlExample(prompt=prompt, answer=answer, solution=solution))
    if not examples:
        raise ValueError(f"jsonl task: {path!r} holds no examples")
    return examples


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"jsonl:TRAIN[,TEST]"`` -> ``(TRAIN, TEST or None)``; ``ValueError`` for another form."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        raise ValueError(f"a jsonl task is written {PREFIX}TRAIN or {PREFIX}TRAIN,TEST, got {spec!r}")
    paths = spec[len(PREFIX):].split(",")
    if len(paths) > 2 or not all(p.strip() for p in paths):
        raise ValueError(f"a jsonl task is written {PREFIX}TRAIN or {PREFIX}TRAIN,TEST (paths without commas), "
                         f"got {spec!r}")
    paths = [os.path.expanduser(p.strip()) for p in paths]
    return paths[0], paths[1] if len(paths) == 2 else None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _prompt_rank(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


class JsonlTask(Task):
    """Prompts and numeric answers from a local JSONL file; the module docstring has the format, split and verifier."""

    def __init__(self, spec: str, *, n_test: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        train_path, test_path = parse_spec(spec)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 2:
            raise ValueError(f"max_new_tokens must be an int >= 2 (a number and EOS), got {max_new_tokens!r}")
        if n_test is not None and (isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 1):
            raise ValueError(f"n_test must be a positive int or None, got {n_test!r}")
        if test_path is not None and n_test is not None:
            raise ValueError("n_test applies when the test split is carved from the file; a TEST file was given")
        self.name = spec
        self.max_new_tokens = max_new_tokens
        self.train_path, self.test_path = train_path, test_path
        rows = read_jsonl(train_path)
        if test_path is not None:
            test = read_jsonl(test_path)
            held_out = {ex.prompt for ex in test}
            train = [ex for ex in rows if ex.prompt not in held_out]
            self.n_dropped = len(rows) - len(train)
            if self.n_dropped:
                warnings.warn(f"jsonl task: {self.n_dropped} line(s) of {train_path!r} repeat a prompt of "
                              f"{test_path!r} and are left out of the train split", stacklevel=2)
        else:
            distinct = sorted({ex.prompt for ex in rows}, key=_prompt_rank)
            k = max(1, round(TEST_FRACTION * len(distinct))) if n_test is None else n_test
            if k >= len(distinct):
                raise ValueError(f"jsonl task: {train_path!r} has {len(distinct)} distinct prompt(s); carving a test "
                                 f"split of {k} leaves none to train on (give a TEST file: {PREFIX}TRAIN,TEST)")
            held_out = set(distinct[:k])
            test = [ex for ex in rows if ex.prompt in held_out]
            train = [ex for ex in rows if ex.prompt not in held_out]
            self.n_dropped = 0
        if not train:
            raise ValueError(f"jsonl task: no training example is left in {train_path!r} "
                             f"(every prompt also occurs in {test_path!r})")
        self._splits = {"train": train, "test": test}

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"name must be one of {SPLITS}, got {name!r}")
        return list(self._splits[name])

    def final_answer(self, response: str) -> str | None:
        return final_number(response)

    def sft_target(self, example: Example, rng: random.Random) -> str:
        """The worked solution ending in ``#### <answer>`` when the file gave one, else the answer alone."""
        solution = getattr(example, "solution", "")
        return f"{solution}{SEPARATOR} {example.answer}" if solution else example.answer

    def info(self) -> dict:
        """What a run record needs to tell which data it used: the paths, the files' SHA-256, split sizes."""
        files = {"train": self.train_path, **({"test": self.test_path} if self.test_path else {})}
        return {
            "files": {k: os.path.abspath(p) for k, p in files.items()},
            "sha256": {k: file_sha256(p) for k, p in files.items()},
            "n_train": len(self._splits["train"]),
            "n_test": len(self._splits["test"]),
            "n_dropped_from_train": self.n_dropped,
        }


def is_jsonl_spec(name) -> bool:
    """True for a task string of the form ``jsonl:...``."""
    return isinstance(name, str) and name.startswith(PREFIX)
