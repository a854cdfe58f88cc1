"""Preference training (DPO, IPO, self-play SPPO): data, reference handling, determinism, resume, learning."""

from __future__ import annotations

import json
import math
import os
import random

import pandas as pd
import pytest
import torch

from xxpo.tasks import get_task, make_tokenizer, preference_prob
from xxpo.tasks.base import Example
from xxpo.train.config import LEARNING_CHECK_SEEDS, PREFERENCE_METHODS, TrainConfig, learning_check_config
from xxpo.train.preference import encode_responses, group_win_rates, sampled_pairs, train_preference
from xxpo.train.sft import base_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHORT = dict(steps=4, iterations=2, prompts_per_step=8, group_size=4, eval_every=2, eval_n=30, checkpoint_every=1,
             progress=False, eta=10.0)


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if c.startswith("time_")])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The SFT base model of the default task, trained once into a private cache shared by this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XXPO_CACHE", str(tmp_path_factory.mktemp("xxpo_cache")))
        yield base_model(TrainConfig().task, "tiny", seed=0)


# --------------------------------------------------------------------------------------------------
# data helpers (no model)
# --------------------------------------------------------------------------------------------------


def test_group_win_rates_average_the_oracle_over_the_whole_group():
    task = get_task("add3")
    examples = [Example("12+34=", "46"), Example("100+1=", "101")]
    texts = ["46", "45", "7", "101", "101", "x"]  # group size 3: correct, near miss, far miss; two correct, malformed
    rates = group_win_rates(task, examples, texts, 3).tolist()
    for i, example in enumerate(examples):
        group = texts[3 * i : 3 * i + 3]
        for k, y in enumerate(group):
            others = [preference_prob(task, example, y, z) for j, z in enumerate(group) if j != k]
            expected = (0.5 + sum(others)) / 3  # the sample ties with itself
            assert rates[3 * i + k] == pytest.approx(expected, abs=1e-6)
        assert sum(rates[3 * i : 3 * i + 3]) / 3 == pytest.approx(0.5, abs=1e-6)  # centred: mean win rate 1/2
    assert rates[0] > rates[1] > rates[2]  # correct beats near miss beats far miss
    assert rates[3] == rates[4] > rates[5]


def test_group_win_rates_reject_a_wrong_count():
    with pytest.raises(ValueError, match="texts"):
        group_win_rates(get_task("add3"), [Example("1+1=", "2")], ["2", "3"], 3)


def test_encode_responses_appends_eos_and_right_pads():
    tok = make_tokenizer()
    ids, mask = encode_responses(tok, ["46", "1234", ""])
    assert ids.shape == mask.shape == (3, 5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ids[0, 2] == ids[1, 4] == ids[2, 0] == tok.eos_token_id
    assert ids[0, 3] == ids[2, 4] == tok.pad_token_id
    assert tok.decode(ids[1, :4]) == "1234"


@pytest.mark.parametrize("overrides, field", [(dict(method="grpo"), "method"),
                                              (dict(method="sppo_selfplay", steps=2, iterations=3), "steps")])
def test_train_preference_rejects_bad_configs_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        train_preference(TrainConfig(**overrides))


# --------------------------------------------------------------------------------------------------
# with the base model
# --------------------------------------------------------------------------------------------------


def test_mined_pairs_are_base_samples_labelled_by_the_verifier(base):
    task = get_task(TrainConfig().task)
    examples = task.split("train")[:64]
    pairs = sampled_pairs(base.model, base.tokenizer, task, examples, num_samples=4, max_new_tokens=task.max_new_tokens,
                          temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0), rng=random.Random(0))
    assert pairs, "the base model should get some prompts partly right"
    by_prompt = {ex.prompt: ex for ex in examples}
    for prompt, chosen, rejected in pairs:
        assert task.is_correct(by_prompt[prompt], chosen)
        assert not task.is_correct(by_prompt[prompt], rejected)
    again = sampled_pairs(base.model, base.tokenizer, task, examples, num_samples=4, max_new_tokens=task.max_new_tokens,
                          temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0), rng=random.Random(0))
    assert again == pairs


@pytest.fixture(scope="module")
def short_runs(base):
    """One short run per method (no out_dir, so no checkpoint is written), shared by the tests below."""
    return {method: train_preference(TrainConfig(method=method, **SHORT)) for method in PREFERENCE_METHODS}


@pytest.mark.parametrize("method, expected_loss", [("dpo", math.log(2.0)), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_first_dpo_step_sits_at_the_frozen_reference(short_runs, method, expected_loss):
    """Before any update the policy is the reference: h = 0, so the loss is log 2 (DPO) or (1/(2 beta))^2 (IPO)."""
    m = short_runs[method].metrics
    assert short_runs[method].summary["config"]["dpo_beta"] == 0.1
    assert m["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    assert abs(m["reward_margin"][0]) < 1e-6 and abs(m["kl_ref"][0]) < 1e-5
    assert m["kl_ref"][1:].abs().min() > 1e-6  # the policy has moved (k1 is noisy, its sign is not fixed)
    assert (m["loss"][1:] - expected_loss).abs().min() > 1e-5  # ... and the frozen reference has not
    assert list(m["epoch"]) == [0.0, 0.25, 0.5, 0.75]  # steps * prompts_per_step pairs: one pass


def test_sppo_refreshes_its_reference_every_iteration(short_runs):
    m = short_runs["sppo_selfplay"].metrics
    assert list(m["iteration"]) == [0, 0, 1, 1]
    for step in (0, 2):  # first step of an iteration: pi = pi_t
        assert abs(m["log_ratio_mean"][step]) < 1e-4 and abs(m["kl_iter"][step]) < 1e-5
    assert abs(m["log_ratio_mean"][1]) > 1e-4 and abs(m["log_ratio_mean"][3]) > 1e-4
    assert abs(m["kl_ref"][2]) > 1e-4  # ... while the policy is no longer the base model
    assert (m["target_mean"].abs() < 1e-4).all()  # win rates of a group average 1/2: centred targets
    assert (m["win_prob_mean"] - 0.5).abs().max() < 1e-6


@pytest.mark.parametrize("method", ["dpo", "sppo_selfplay"])
def test_same_config_and_seed_give_identical_metrics(short_runs, method):
    a, b = short_runs[method], train_preference(TrainConfig(method=method, **SHORT))
    pd.testing.assert_frame_equal(comparable(a.metrics), comparable(b.metrics))
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_different_seeds_differ(short_runs):
    other = train_preference(TrainConfig(method="dpo", **{**SHORT, "seed": 1}))
    assert not comparable(short_runs["dpo"].metrics).equals(comparable(other.metrics))


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["dpo", "sppo_selfplay"])
def test_killed_run_resumes_to_the_same_metrics(short_runs, tmp_path, method):
    config = TrainConfig(method=method, **SHORT)

    def kill_after_step_2(step, row):  # SPPO: inside its second iteration, so pi_t must come back too
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        train_preference(config, tmp_path, callback=kill_after_step_2)
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "metrics.csv").exists()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no pickled objects
    assert state["step"] == 2 and (method != "sppo_selfplay" or state["anchor"] is not None)
    resumed = train_preference(config, tmp_path, resume=True)
    pd.testing.assert_frame_equal(comparable(short_runs[method].metrics), comparable(resumed.metrics))
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == config.steps


def test_resume_refuses_a_checkpoint_of_another_config(short_runs, tmp_path):
    config = TrainConfig(method="sppo_selfplay", **{**SHORT, "steps": 2})
    train_preference(config, tmp_path)
    with pytest.raises(ValueError, match="different config"):
        train_preference(TrainConfig(method="sppo_selfplay", **{**SHORT, "steps": 2, "eta": 3.0}), tmp_path, resume=True)


def test_run_files_and_summary(base, tmp_path):
    result = train_preference(TrainConfig(method="sppo_selfplay", **{**SHORT, "steps": 2, "eval_every": 1}), tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(metrics["step"]) == [0, 1]
    assert metrics["eval_accuracy"].notna().all()  # eval_every=1
    for column in ("loss", "grad_norm", "kl_ref", "kl_iter", "log_ratio_mean", "target_mean", "train_accuracy",
                   "eval_accuracy", "eval_win_rate", "time_rollout", "time_update", "time_step"):
        assert column in metrics.columns, column
    for key in ("base_eval_accuracy", "final_eval_accuracy", "final_win_rate_vs_base", "seconds_per_step", "config",
                "seed", "environment"):
        assert key in summary, key
    assert summary["final_win_rate_vs_base"] == pytest.approx(result.metrics["eval_win_rate"].iloc[-1])
    assert summary["data"]["steps_per_iteration"] == [1, 1]


# --------------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", PREFERENCE_METHODS)
def test_each_preference_method_learns_from_the_base_model(base, method):
    """LEARNING_CHECK beats the base model on held-out prompts (mean accuracy and mean win rate over seeds);
    every policy tensor moves. Why beta and eta differ from the papers: "Scale" in xxpo.train.preference."""
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    results = [train_preference(learning_check_config(method, seed)) for seed in LEARNING_CHECK_SEEDS]
    base_accuracy = results[0].summary["base_eval_accuracy"]
    finals = [r.summary["final_eval_accuracy"] for r in results]
    wins = [r.summary["final_win_rate_vs_base"] for r in results]
    assert sum(finals) / len(finals) > base_accuracy and sum(wins) / len(wins) > 0.5, (
        f"{method}: accuracy {base_accuracy:.3f} -> seeds {finals}, win rate vs base {wins}")
    after = results[0].model.state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{method} left these tensors unchanged: {unchanged}"
    assert all(math.isfinite(x) for r in results for x in r.metrics["loss"])
