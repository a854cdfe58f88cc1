"""Tasks: registry, deterministic disjoint splits, verifiers, SFT targets, preference data and oracle."""

import operator
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xxpo.tasks import (
    ALPHABET,
    DEFAULT_TASK,
    TASKS,
    Example,
    get_task,
    preference_pairs,
    preference_prob,
)

PROMPT = re.compile(r"(\d+)([+*-])(\d+)=")
PY_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def solve(prompt: str) -> int:
    a, op, b = PROMPT.fullmatch(prompt).groups()
    return PY_OPS[op](int(a), int(b))


@pytest.fixture(scope="module")
def tasks():
    return {name: get_task(name) for name in TASKS}


def test_registry_names_and_default():
    assert {"add2", "add3", "mul1", "add2_scratch"} <= set(TASKS)
    assert DEFAULT_TASK in TASKS
    with pytest.raises(ValueError, match=r"task must be one of .*add2.*got 'nope'"):
        get_task("nope")


def test_kwargs_override_split_sizes():
    task = get_task("add2", n_train=100, n_test=20)
    assert len(task.split("train")) == 100 and len(task.split("test")) == 20
    with pytest.raises(ValueError, match="n_train"):
        get_task("add2", n_train=0)
    with pytest.raises(ValueError, match="n_train"):
        get_task("add2", n_train=20000)  # more than the 2-digit grid holds


@pytest.mark.parametrize("name", TASKS)
def test_split_answers_are_right_and_formatted(tasks, name):
    task = tasks[name]
    for split in ("train", "test"):
        examples = task.split(split)
        assert examples and all(isinstance(ex, Example) for ex in examples)
        for ex in examples:
            value = solve(ex.prompt)
            assert value >= 0 and ex.answer == str(value)
            assert set(ex.prompt) <= set(ALPHABET)


@pytest.mark.parametrize("name", TASKS)
def test_splits_are_disjoint_even_up_to_operand_order(tasks, name):
    task = tasks[name]
    train, test = task.split("train"), task.split("test")
    assert len({ex.prompt for ex in train}) == len(train)
    assert len({ex.prompt for ex in test}) == len(test)

    def pairs(examples):
        return {tuple(sorted(map(int, PROMPT.fullmatch(ex.prompt).group(1, 3)))) for ex in examples}

    assert not pairs(train) & pairs(test)


@pytest.mark.parametrize("name", TASKS)
def test_splits_are_deterministic(tasks, name):
    fresh = get_task(name)
    assert fresh.split("train") == tasks[name].split("train")
    assert fresh.split("test") == tasks[name].split("test")


def test_scratch_task_poses_the_problems_of_its_plain_twin(tasks):
    assert tasks["add2_scratch"].split("test") == tasks["add2"].split("test")
    assert tasks["add2_scratch"].split("train") == tasks["add2"].split("train")


def test_test_split_does_not_depend_on_n_train():
    assert get_task("add3", n_train=50).split("test") == get_task("add3", n_train=80).split("test")


def test_split_returns_a_copy_and_rejects_bad_names(tasks):
    tasks["add2"].split("train").clear()
    assert len(tasks["add2"].split("train")) == 4000
    with pytest.raises(ValueError, match="name"):
        tasks["add2"].split("validation")


def test_plain_reward_is_exact_match(tasks):
    task = tasks["add2"]
    ex = Example("23+45=", "68")
    assert task.reward(ex, "68") == 1.0 and task.is_correct(ex, "68")
    for wrong in ("67", "068", "68 ", " 68", "6", "", "6 8", "68|", "-68", "sixty-eight", "|68"):
        assert task.reward(ex, wrong) == 0.0, wrong
    with pytest.raises(TypeError, match="response"):
        task.reward(ex, None)


def test_scratch_reward_grades_only_the_text_after_the_last_separator(tasks):
    task = tasks["add2_scratch"]
    ex = Example("23+45=", "68")
    for right in ("|68", "....|68", "12|34|68", "7+8=15|68"):
        assert task.reward(ex, right) == 1.0, right
    for wrong in ("68", "....68", "|67", "68|", "|68.", "", "|"):
        assert task.reward(ex, wrong) == 0.0, wrong


SMALL = {name: get_task(name, n_train=1, n_test=1) for name in ("add2", "add2_scratch")}


@settings(max_examples=200, deadline=None)
@given(response=st.text(max_size=40))
def test_any_text_gets_a_reward_in_0_1_without_raising(response):
    ex = Example("23+45=", "68")
    for task in SMALL.values():
        assert task.reward(ex, response) in (0.0, 1.0)


@pytest.mark.parametrize("name", TASKS)
def test_sft_targets_are_correct_and_fit_the_budget(tasks, name):
    task = tasks[name]
    rng = random.Random(0)
    for ex in task.split("train")[:300]:
        target = task.sft_target(ex, rng)
        assert task.reward(ex, target) == 1.0
        assert len(target) + 1 <= task.max_new_tokens  # + EOS
        if name != "add2_scratch":
            assert target == ex.answer and len(target) <= 12


def test_scratch_targets_vary_in_length_and_leave_room_to_grow(tasks):
    task = tasks["add2_scratch"]
    rng = random.Random(1)
    lengths = [len(task.sft_target(ex, rng)) for ex in task.split("train")[:400]]
    assert len(set(lengths)) >= 6
    assert task.max_new_tokens >= 2 * max(lengths)
    assert task.sft_target(Example("1+1=", "2"), random.Random(5)) == task.sft_target(
        Example("1+1=", "2"), random.Random(5)
    )


def test_preference_pairs_offline_are_verified_and_deterministic(tasks):
    for name in ("add2", "add2_scratch"):
        task = tasks[name]
        examples = task.split("train")[:100]
        pairs = preference_pairs(task, examples, random.Random(3))
        assert pairs == preference_pairs(task, examples, random.Random(3))
        assert len(pairs) == len(examples)
        for ex, (prompt, chosen, rejected) in zip(examples, pairs):
            assert prompt == ex.prompt
            assert task.is_correct(ex, chosen) and not task.is_correct(ex, rejected)
            assert task.final_answer(rejected) is not None  # a plausible, well-formed mistake


def test_preference_pairs_from_sampled_responses(tasks):
    task = tasks["add2"]
    examples = [Example("1+2=", "3"), Example("2+2=", "4"), Example("5+5=", "10")]
    responses = [["3", "4", "x"], ["4", "4"], ["11", "10"]]
    pairs = preference_pairs(task, examples, random.Random(0), responses=responses)
    assert [p[0] for p in pairs] == ["1+2=", "5+5="]  # "2+2=" has no incorrect response
    assert pairs[0][1] == "3" and pairs[0][2] in ("4", "x")
    assert pairs[1][1:] == ("10", "11")
    with pytest.raises(ValueError, match="responses"):
        preference_pairs(task, examples, random.Random(0), responses=responses[:2])


@settings(max_examples=200, deadline=None)
@given(a=st.text(alphabet="0123456789|.-x", max_size=8), b=st.text(alphabet="0123456789|.-x", max_size=8))
def test_preference_prob_is_a_symmetric_probability(a, b):
    ex = Example("23+45=", "68")
    for task in SMALL.values():
        p, q = preference_prob(task, ex, a, b), preference_prob(task, ex, b, a)
        assert 0.0 <= p <= 1.0
        assert p + q == pytest.approx(1.0, abs=1e-12)
    assert preference_prob(task, ex, a, a) == 0.5


def test_preference_prob_orders_correct_close_far_malformed(tasks):
    task = tasks["add2"]
    ex = Example("23+45=", "68")
    assert preference_prob(task, ex, "68", "69") > 0.5
    assert preference_prob(task, ex, "68", "10") > preference_prob(task, ex, "68", "69")
    assert preference_prob(task, ex, "69", "90") > 0.5  # closer wrong answer wins
    assert preference_prob(task, ex, "90", "abc") > 0.5  # any number beats a malformed response
    assert preference_prob(task, ex, "68", "068") > 0.5  # same value, but only the canonical text is correct
