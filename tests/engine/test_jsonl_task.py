"""Tasks from a local JSONL file: the parser, the numeric verifier, and the held-out split."""

from __future__ import annotations

import json
import random

import pytest

from xxpo.tasks import TASKS, JsonlTask, get_task
from xxpo.tasks.jsonl import canonical_number, final_number, parse_answer, parse_spec


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def problems(n, start=0):
    return [{"prompt": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)} for i in range(start, start + n)]


# ------------------------------------------------------------------------------------------ the parser


@pytest.mark.parametrize("value, answer, solution", [
    (42, "42", ""),
    (-3, "-3", ""),
    (2.5, "2.5", ""),
    ("42", "42", ""),
    (" 18.0 ", "18", ""),
    ("0.250", "0.25", ""),
    ("1,234", "1234", ""),
    ("She has 6 + 12 = <<6+12=18>>18 apples.\n#### 18", "18", "She has 6 + 12 = <<6+12=18>>18 apples.\n"),
    ("#### 1,000", "1000", ""),
    ("first #### 3\nthen #### -7", "-7", "first #### 3\nthen "),
])
def test_answers_are_numbers_and_a_gsm8k_tail_is_accepted(value, answer, solution):
    assert parse_answer(value) == (answer, solution)


@pytest.mark.parametrize("value", [True, None, [1], "forty-two", "42 apples", "#### forty", "1/2", "", float("nan")])
def test_answers_that_are_not_numbers_are_refused(value):
    with pytest.raises(ValueError, match="number"):
        parse_answer(value)


def test_a_file_gives_examples_in_order_and_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a?", "answer": 1, "id": 7}\n\n  \n{"prompt": "b?", "answer": "x\\n#### 2"}\n'
                    '{"prompt": "c?", "answer": "3"}\n', encoding="utf-8")
    task = JsonlTask(f"jsonl:{path}", n_test=1)
    rows = task.split("train") + task.split("test")
    assert sorted((ex.prompt, ex.answer) for ex in rows) == [("a?", "1"), ("b?", "2"), ("c?", "3")]
    b = next(ex for ex in rows if ex.prompt == "b?")
    assert task.sft_target(b, random.Random(0)) == "x\n#### 2"  # the worked solution, ending in the tail
    a = next(ex for ex in rows if ex.prompt == "a?")
    assert task.sft_target(a, random.Random(0)) == "1"


@pytest.mark.parametrize("line, message", [
    ("not json", r"line 2: not valid JSON"),
    ("[1, 2]", r"line 2: expected a JSON object"),
    ('{"answer": 3}', r"line 2: missing field 'prompt'"),
    ('{"question": "q?", "answer": 3}', r"line 2: missing field 'prompt' \(rename GSM8K's 'question'"),
    ('{"prompt": "q?"}', r"line 2: missing field 'answer'"),
    ('{"prompt": "", "answer": 3}', r"line 2: field 'prompt' must be a non-empty string"),
    ('{"prompt": 5, "answer": 3}', r"line 2: field 'prompt' must be a non-empty string"),
    ('{"prompt": "q?", "answer": "three"}', r"line 2: field 'answer' must be a number"),
    ('{"prompt": "q?", "answer": "work\\n#### x"}', r"line 2: field 'answer' must be a number after its last '####'"),
])
def test_bad_lines_are_named_by_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok?", "answer": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as err:
        get_task(f"jsonl:{path}")
    assert str(path) in str(err.value)


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"no such file .*nowhere\.jsonl"):
        get_task(f"jsonl:{tmp_path / 'nowhere.jsonl'}")
    train = write_jsonl(tmp_path / "train.jsonl", problems(5))
    with pytest.raises(ValueError, match=r"no such file .*missing-test\.jsonl"):
        get_task(f"jsonl:{train},{tmp_path / 'missing-test.jsonl'}")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no examples"):
        get_task(f"jsonl:{tmp_path / 'empty.jsonl'}")


@pytest.mark.parametrize("spec", ["jsonl:", "jsonl:a,b,c", "jsonl:a,", "jsonl:,b"])
def test_malformed_task_strings(spec):
    with pytest.raises(ValueError, match=r"jsonl:TRAIN or jsonl:TRAIN,TEST"):
        get_task(spec)


def test_task_strings_and_the_builtin_names():
    assert parse_spec("jsonl:/d/train.jsonl") == ("/d/train.jsonl", None)
    assert parse_spec("jsonl: /d/train.jsonl , /d/test.jsonl") == ("/d/train.jsonl", "/d/test.jsonl")
    assert not any(name.startswith("jsonl:") for name in TASKS)
    with pytest.raises(ValueError, match=r"jsonl:TRAIN\[,TEST\]"):
        get_task("gsm8k")


# ------------------------------------------------------------------------------------------ the verifier


@pytest.mark.parametrize("response, graded", [
    ("The answer is 42.", "42"),
    ("So x = -3", "-3"),
    ("5-3=2", "2"),
    ("from 3-5", "5"),  # a minus right after a digit is an operator, not a sign
    ("It costs $1,234,567 in total", "1234567"),
    ("12,3456", "3456"),  # commas group exactly three digits
    ("3.50 dollars", "3.5"),
    ("\\boxed{18}", "18"),
    ("**18**%", "18"),
    ("18.", "18"),
    ("3/4", "4"),
    ("first 7\n#### 18 because 3", "3"),  # only the text after the last ####, and its last number
    ("#### 18\n#### ", None),  # nothing after the last ####
    ("no number here", None),
    ("", None),
])
def test_final_number_rule(response, graded):
    assert final_number(response) == graded


def test_correct_means_numerically_equal(tmp_path):
    task = get_task(f"jsonl:{write_jsonl(tmp_path / 'd.jsonl', [{'prompt': 'p?', 'answer': '1,000'}, *problems(3)])}",
                    n_test=1)
    ex = next(e for e in task.split("train") + task.split("test") if e.prompt == "p?")
    for response in ("1000", "#### 1,000", "it is 1000.0", "so 01000", "1000.00 apples"):
        assert task.is_correct(ex, response) and task.reward(ex, response) == 1.0, response
    for response in ("100", "1000 then 1", "", "-1000"):
        assert not task.is_correct(ex, response) and task.reward(ex, response) == 0.0, response
    assert canonical_number("-0.0") == "0" and canonical_number("0.10") == "0.1"


# ------------------------------------------------------------------------------------------ the split


def test_carved_split_is_deterministic_disjoint_and_ignores_line_order(tmp_path):
    records = problems(40) + problems(5)  # 5 prompts appear twice
    a = get_task(f"jsonl:{write_jsonl(tmp_path / 'a.jsonl', records)}")
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    b = get_task(f"jsonl:{write_jsonl(tmp_path / 'b.jsonl', shuffled)}")
    test_a = {ex.prompt for ex in a.split("test")}
    assert len(test_a) == 4  # 10 % of the 40 distinct prompts
    assert test_a == {ex.prompt for ex in b.split("test")}  # chosen by the prompts, not their order
    assert not test_a & {ex.prompt for ex in a.split("train")}  # a repeated prompt is never on both sides
    assert len(a.split("train")) + len(a.split("test")) == len(records)
    again = get_task(f"jsonl:{tmp_path / 'a.jsonl'}")
    assert again.split("train") == a.split("train") and again.split("test") == a.split("test")
    assert [ex.prompt for ex in a.split("train")] == [r["prompt"] for r in records if r["prompt"] not in test_a]
    assert len(get_task(f"jsonl:{tmp_path / 'a.jsonl'}", n_test=10).split("test")) >= 10
    with pytest.raises(ValueError, match="leaves none to train on"):
        get_task(f"jsonl:{tmp_path / 'a.jsonl'}", n_test=40)


def test_a_second_file_is_the_test_split_and_overlap_leaves_train(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", problems(10))
    test = write_jsonl(tmp_path / "test.jsonl", problems(4, start=8))  # prompts 8 and 9 are in both
    with pytest.warns(UserWarning, match="2 line"):
        task = get_task(f"jsonl:{train},{test}")
    assert [ex.prompt for ex in task.split("test")] == [r["prompt"] for r in problems(4, start=8)]
    assert [ex.prompt for ex in task.split("train")] == [r["prompt"] for r in problems(8)]
    info = task.info()
    assert info["n_train"] == 8 and info["n_test"] == 4 and info["n_dropped_from_train"] == 2
    assert set(info["sha256"]) == {"train", "test"}
    with pytest.raises(ValueError, match="n_test"):
        get_task(f"jsonl:{train},{test}", n_test=3)


def test_the_preference_oracle_reads_decimal_answers(tmp_path):
    from xxpo.tasks import preference_prob

    task = get_task(f"jsonl:{write_jsonl(tmp_path / 'd.jsonl', [{'prompt': 'half of 5?', 'answer': 2.5}, *problems(3)])}",
                    n_test=1)
    ex = next(e for e in task.split("train") + task.split("test") if e.prompt == "half of 5?")
    assert preference_prob(task, ex, "#### 2.5", "3") > 0.5  # correct beats wrong
    assert preference_prob(task, ex, "2.4", "9") > 0.5  # closer beats farther
    assert preference_prob(task, ex, "2.4", "no idea") > 0.5  # any number beats none
