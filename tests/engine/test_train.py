"""The RL training loop: determinism, resume, learning for every method, config validation, CLI."""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest
import torch

from xxpo import objectives
from xxpo.train import POLICY_METHODS, PREFERENCE_METHODS, TrainConfig, train
from xxpo.train.config import LEARNING_CHECK, LEARNING_CHECK_SEEDS, learning_check_config
from xxpo.train.sft import base_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TIME_COLUMNS = ("time_rollout", "time_reference", "time_prox", "time_update", "time_eval", "time_step", "tokens_per_second")


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in TIME_COLUMNS if c in df.columns])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The cached SFT base model of the default task (trained once per test session)."""
    return base_model(TrainConfig().task, "tiny", seed=0)


def test_same_config_and_seed_give_identical_metrics(base):
    config = TrainConfig.from_preset("grpo", steps=3, eval_every=3, eval_n=50, progress=False)
    a, b = train(config), train(config)
    pd.testing.assert_frame_equal(comparable(a.metrics), comparable(b.metrics))
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_different_seeds_differ(base):
    a = train(TrainConfig.from_preset("grpo", steps=2, eval_every=2, eval_n=20, progress=False, seed=0))
    b = train(TrainConfig.from_preset("grpo", steps=2, eval_every=2, eval_n=20, progress=False, seed=1))
    assert not comparable(a.metrics).equals(comparable(b.metrics))


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["grpo", "ppo", "a3po"])
def test_killed_run_resumes_to_the_same_metrics(base, tmp_path, method):
    config = TrainConfig.from_preset(method, steps=5, eval_every=2, eval_n=30, progress=False, checkpoint_every=2,
                                     minibatches=2, staleness=1 if method == "a3po" else 0)
    full = train(config, tmp_path / "full")

    def kill_after_step_2(step, row):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        train(config, tmp_path / "resumed", callback=kill_after_step_2)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "metrics.csv").exists()
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)  # no pickled objects
    assert state["step"] == 1 and state["prompt_rng"]["internal"].dtype == torch.int64
    resumed = train(config, tmp_path / "resumed", resume=True)
    pd.testing.assert_frame_equal(comparable(full.metrics), comparable(resumed.metrics))
    on_disk = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    assert len(on_disk) == config.steps


def test_resume_refuses_a_checkpoint_of_another_config(base, tmp_path):
    config = TrainConfig.from_preset("grpo", steps=2, eval_every=2, eval_n=20, progress=False, checkpoint_every=1)
    train(config, tmp_path)
    other = TrainConfig.from_preset("grpo", steps=2, eval_every=2, eval_n=20, progress=False, checkpoint_every=1, lr=1e-4)
    with pytest.raises(ValueError, match="different config"):
        train(other, tmp_path, resume=True)


def test_run_files_and_summary(base, tmp_path):
    result = train(TrainConfig.from_preset("dr_grpo", steps=2, eval_every=1, eval_n=20, progress=False), tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(metrics["step"]) == [0, 1]
    for column in ("reward_mean", "train_accuracy", "eval_accuracy", "response_length", "length_correct",
                   "length_incorrect", "kl_ref", "entropy", "clip_frac_low", "clip_frac_high", "ratio_mean",
                   "grad_norm", "time_rollout", "time_prox", "time_update", "tokens_per_second"):
        assert column in metrics.columns, column
    for key in ("base_eval_accuracy", "final_eval_accuracy", "seconds_per_step", "config", "seed", "environment"):
        assert key in summary, key
    assert summary["config"]["method"] == "dr_grpo"
    assert summary["final_eval_accuracy"] == pytest.approx(result.metrics["eval_accuracy"].iloc[-1])


def test_kl_to_reference_starts_at_zero_and_ratio_is_one_on_policy(base):
    result = train(TrainConfig.from_preset("grpo", steps=1, eval_every=1, eval_n=20, progress=False, minibatches=1))
    row = result.metrics.iloc[0]
    assert abs(row["kl_ref"]) < 1e-5  # the policy is the reference before the first update (logged at step 0)
    assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # one minibatch: on-policy
    assert row["clip_frac"] == 0.0


def test_later_minibatches_are_off_policy(base):
    on = train(TrainConfig.from_preset("grpo", steps=2, eval_every=2, eval_n=20, progress=False, minibatches=1))
    off = train(TrainConfig.from_preset("grpo", steps=2, eval_every=2, eval_n=20, progress=False, minibatches=4))
    assert on.metrics["ratio_max"].max() == pytest.approx(1.0, abs=1e-5)
    assert off.metrics["ratio_max"].max() > 1.0 + 1e-4


def test_staleness_is_recorded(base):
    result = train(TrainConfig.from_preset("decoupled_ppo", steps=4, eval_every=4, eval_n=20, progress=False,
                                           staleness=2, group_size=4, prompts_per_step=8))
    assert list(result.metrics["staleness_mean"]) == [0.0, 1.0, 2.0, 2.0]
    assert (result.metrics["time_prox"] > 0).all()


def test_every_method_has_a_learning_check():
    assert set(LEARNING_CHECK) == set(POLICY_METHODS) | set(PREFERENCE_METHODS)
    assert set(POLICY_METHODS) <= set(objectives.METHODS)


def test_one_sample_methods_see_as_many_completions_per_step_as_group_methods():
    for method in ("ppo", "trpo", "sppo_seq"):
        config = TrainConfig.from_preset(method)
        assert config.group_size == 1
        assert config.prompts_per_step == TrainConfig.from_preset("grpo").prompts_per_step * TrainConfig().group_size
    assert TrainConfig.from_preset("ppo", prompts_per_step=4).prompts_per_step == 4  # an override wins


@pytest.mark.slow
@pytest.mark.parametrize("method", POLICY_METHODS)
def test_each_method_learns_from_the_base_model(base, method):
    """LEARNING_CHECK raises mean held-out accuracy over the base model across seeds; every policy tensor moves."""
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    results = [train(learning_check_config(method, seed)) for seed in LEARNING_CHECK_SEEDS]
    base_accuracy = results[0].summary["base_eval_accuracy"]
    finals = [r.summary["final_eval_accuracy"] for r in results]
    assert sum(finals) / len(finals) > base_accuracy, f"{method}: base {base_accuracy:.3f} -> seeds {finals}"
    after = results[0].model.state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{method} left these tensors unchanged: {unchanged}"
    columns = ["kl", "surrogate_gain"] if method == "trpo" else ["loss"]  # TRPO steps without a loss
    assert all(math.isfinite(x) for r in results for c in columns for x in r.metrics[c])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(method="nope"), "method"),
        (dict(steps=0), "steps"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(top_p=0.0), "top_p"),
        (dict(loss_agg_mode="mean"), "loss_agg_mode"),
        (dict(adv_norm="z"), "adv_norm"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(staleness=-1), "staleness"),
        (dict(clip_eps_low=1.5), "clip_eps_low"),
        (dict(dual_clip_c=0.5), "dual_clip_c"),
        (dict(minibatches=3), "minibatches"),
        (dict(prox="exact"), "prox"),
        (dict(label_smoothing=0.5), "label_smoothing"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**overrides)


def test_group_methods_need_groups():
    with pytest.raises(ValueError, match="group_size"):
        TrainConfig(method="grpo", group_size=1)


def test_preset_values_flow_into_the_config():
    gspo = TrainConfig.from_preset("gspo")
    assert gspo.preset_value("clip_eps_low") == 3e-4 and gspo.preset_value("clip_eps_high") == 4e-4
    assert gspo.minibatches == 4
    assert TrainConfig.from_preset("sppo_seq").group_size == 1
    dapo = TrainConfig.from_preset("dapo")
    assert dapo.preset_value("dynamic_sampling") is True and dapo.preset_value("overlong_buffer") == 0.2
    assert TrainConfig.from_preset("grpo", clip_eps_low=0.1).preset_value("clip_eps_low") == 0.1


@pytest.mark.parametrize("method", ["cispo", "gmpo", "rloo", "reinforce_pp"])
def test_family_since_2025_trains_by_name(base, method, tmp_path):
    """The presets added for issue 16 run through the one loop (two off-policy minibatches, so CISPO's weight and
    GMPO's clip see r != 1) and through ``xxpo train --method``."""
    from xxpo.cli import main

    config = TrainConfig.from_preset(method, steps=2, eval_every=2, eval_n=10, progress=False, minibatches=2,
                                     prompts_per_step=4 if method != "reinforce_pp" else 16)
    metrics = train(config).metrics
    assert len(metrics) == 2 and metrics["loss"].notna().all() and metrics["ratio_max"].max() > 1.0 + 1e-6
    if method == "cispo":
        assert "is_weight_mean" in metrics.columns
    if method == "gmpo":
        assert "seq_ratio_mean" in metrics.columns
    if method in ("rloo", "reinforce_pp"):  # KL in the reward: the reference runs on every step
        assert metrics["kl_ref"].notna().all()
    assert main(["train", "--method", method, "--steps", "1", "--eval-every", "1", "--eval-n", "5", "--progress",
                 "false", "--prompts-per-step", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "metrics.csv").is_file()
