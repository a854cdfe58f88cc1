"""A real (tiny) grid through xxpo.experiments.run_grid: the on-disk cache, resume after an interruption,
recomputing only what changed, and the cache key.

The trainers are wrapped to count calls: a cached run must not call them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import pandas as pd
import pytest

import xxpo
import xxpo.experiments as ex
from xxpo.experiments import run_grid
from xxpo.train import TrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUDGET = dict(steps=3, prompts_per_step=4, group_size=4, eval_every=3, eval_n=20)
ARMS = {"GRPO": TrainConfig.from_preset("grpo", **BUDGET), "GSPO": TrainConfig.from_preset("gspo", **BUDGET)}
SEEDS = [0, 1]


class Killed(Exception):
    pass


class Calls(list):
    kill_at: int | None = None


@pytest.fixture
def calls(monkeypatch):
    """Every trainer call as (method, seed, lr); ``calls.kill_at = n`` raises on the n-th call (1-based)."""
    log = Calls()

    def wrap(real):
        def counted(config, out_dir=None, **kw):
            log.append((config.method, config.seed, config.lr))
            if log.kill_at == len(log):
                raise Killed
            return real(config, out_dir, **kw)
        return counted

    monkeypatch.setattr(ex, "train", wrap(ex.train))
    monkeypatch.setattr(ex, "train_preference", wrap(ex.train_preference))
    return log


@pytest.mark.slow
def test_second_call_reads_the_cache_and_a_changed_arm_recomputes_only_itself(tmp_path, calls):
    first = run_grid(ARMS, SEEDS, cache_dir=tmp_path, progress=False)
    assert sorted(calls) == sorted((c.method, s, c.lr) for c in ARMS.values() for s in SEEDS)
    assert not first.runs["from_cache"].any()

    # The tables: one row per (arm, seed, step) and per (arm, seed).
    assert len(first.steps) == len(ARMS) * len(SEEDS) * BUDGET["steps"]
    assert list(first.steps.columns[:3]) == ["arm", "seed", "step"]
    assert {"reward_mean", "clip_frac", "eval_accuracy"} <= set(first.steps.columns)
    runs = first.runs.set_index(["arm", "seed"])
    assert set(runs.index) == {(a, s) for a in ARMS for s in SEEDS}
    for (arm, seed), row in runs.iterrows():
        steps = first.steps[(first.steps.arm == arm) & (first.steps.seed == seed)]
        evals = steps["eval_accuracy"].dropna()
        assert row["final_eval_accuracy"] == evals.iloc[-1]
        assert row["best_eval_accuracy"] == max(row["base_eval_accuracy"], evals.max())
        assert row["gain"] == pytest.approx(row["final_eval_accuracy"] - row["base_eval_accuracy"])
        assert row["method"] == ARMS[arm].method and row["wall_seconds"] > 0
    assert runs["key"].nunique() == len(runs)

    second = run_grid(ARMS, SEEDS, cache_dir=tmp_path, progress=False)
    assert len(calls) == 4  # nothing trained again
    assert second.runs["from_cache"].all()
    pd.testing.assert_frame_equal(first.steps, second.steps)
    pd.testing.assert_frame_equal(first.runs.drop(columns="from_cache"), second.runs.drop(columns="from_cache"))

    changed = {**ARMS, "GSPO": dataclasses.replace(ARMS["GSPO"], lr=1e-4)}
    third = run_grid(changed, SEEDS, cache_dir=tmp_path, progress=False)
    assert calls[4:] == [("gspo", 0, 1e-4), ("gspo", 1, 1e-4)]
    assert third.runs.set_index("arm")["from_cache"].to_dict() == {"GRPO": True, "GSPO": False}
    pd.testing.assert_frame_equal(third.steps[third.steps.arm == "GRPO"], first.steps[first.steps.arm == "GRPO"])
    # The cache directory holds one finished run per key, with what its key covers.
    assert len([d for d in tmp_path.iterdir() if (d / "summary.json").is_file() and (d / "key.json").is_file()]) == 6


@pytest.mark.slow
def test_an_interrupted_grid_resumes_where_it_stopped(tmp_path, calls):
    calls.kill_at = 3  # dies while training the third run (GSPO seed 0)
    with pytest.raises(Killed):
        run_grid(ARMS, SEEDS, cache_dir=tmp_path, progress=False)
    assert len(calls) == 3
    calls.kill_at = None
    result = run_grid(ARMS, SEEDS, cache_dir=tmp_path, progress=False)
    assert calls[3:] == [("gspo", 0, ARMS["GSPO"].lr), ("gspo", 1, ARMS["GSPO"].lr)]
    assert result.runs["from_cache"].tolist() == [True, True, False, False]


@pytest.mark.slow
def test_preference_arms_go_to_the_preference_trainer(tmp_path, calls):
    arms = {"DPO": TrainConfig.from_preset("dpo", steps=2, prompts_per_step=8, eval_every=2, eval_n=20)}
    result = run_grid(arms, [0], cache_dir=tmp_path, progress=False)
    assert calls == [("dpo", 0, arms["DPO"].lr)]
    assert result.runs.loc[0, "method"] == "dpo" and "eval_win_rate" in result.steps.columns
    assert "final_win_rate_vs_base" in result.runs.columns


def test_dispatch_and_budget_read_the_registry_at_call_time(tmp_path, monkeypatch):
    """A preference method registered after import goes to the preference trainer (the import-time
    PREFERENCE_METHODS tuple would not list it), and the tuning table counts pairs for offline pairs."""
    from xxpo.presets import PRESETS, register

    def trainer(name):
        def called(config, out_dir=None, **kw):
            raise Killed(name)
        return called

    monkeypatch.setattr(ex, "train", trainer("policy"))
    monkeypatch.setattr(ex, "train_preference", trainer("preference"))
    register(dataclasses.replace(PRESETS["dpo"], name="dpo_copy_for_test"))
    try:
        config = TrainConfig.from_preset("dpo", steps=1, prompts_per_step=8, eval_every=1, eval_n=10)
        config = dataclasses.replace(config, method="dpo_copy_for_test")
        with pytest.raises(Killed, match="preference"):
            run_grid({"copy": config}, [0], cache_dir=tmp_path, progress=False)
        assert ex._samples_per_step(config) == 8  # pairs, not prompts x group_size
        assert ex._samples_per_step(ARMS["GRPO"]) == BUDGET["prompts_per_step"] * BUDGET["group_size"]
    finally:
        PRESETS.pop("dpo_copy_for_test", None)


@pytest.mark.slow
def test_select_hparams_runs_the_grid_on_tuning_seeds_and_records_it(tmp_path, calls):
    arms = {"GRPO": ARMS["GRPO"]}
    sel = ex.select_hparams(arms, {"lr": [1e-4, 1e-3]}, tuning_seeds=[7], reported_seeds=SEEDS, cache_dir=tmp_path,
                            progress=False)
    assert sorted(calls) == [("grpo", 7, 1e-4), ("grpo", 7, 1e-3)]
    runs = sel.grid.runs.set_index("arm")["final_eval_accuracy"]
    expected = 1e-4 if runs["GRPO [lr=0.0001]"] >= runs["GRPO [lr=0.001]"] else 1e-3
    assert sel.chosen == {"GRPO": {"lr": expected}} and sel.configs["GRPO"].lr == expected
    assert list(sel.table.columns) == ["arm", "lr", "steps", "samples_per_step", "seed 7", "score", "chosen"]
    assert sel.table["score"].tolist() == [runs["GRPO [lr=0.0001]"], runs["GRPO [lr=0.001]"]]
    # The reported runs then reuse nothing of the tuning runs (other seeds).
    ex.run_grid(sel.configs, [0], cache_dir=tmp_path, progress=False)
    assert calls[2:] == [("grpo", 0, expected)]


def test_the_key_covers_the_config_and_the_engine_source(tmp_path, monkeypatch):
    config = dataclasses.replace(ARMS["GRPO"], seed=0, progress=False)
    key, material = ex.run_key(config)
    assert material["config"] == config.to_dict() and material["xxpo"] == xxpo.__version__
    assert ex.run_key(config)[0] == key  # stable
    assert ex.run_key(dataclasses.replace(config, seed=1))[0] != key
    assert ex.run_key(dataclasses.replace(config, lr=1e-4))[0] != key

    # A copy of the package: an edit of the engine changes the hash, an edit of plotting.py does not.
    root = tmp_path / "xxpo"
    shutil.copytree(os.path.dirname(xxpo.__file__), root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(xxpo, "__file__", str(root / "__init__.py"))
    before = ex.engine_hash()
    assert ex.run_key(config)[0] == key  # same source, same key
    with open(root / "plotting.py", "a") as fh:
        fh.write("\n# a comment\n")
    assert ex.engine_hash() == before
    with open(root / "train" / "loop.py", "a") as fh:
        fh.write("\n# a comment\n")
    assert ex.engine_hash() != before
    assert ex.run_key(config)[0] != key


def test_bad_arms_and_seeds_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="arms"):
        run_grid({}, SEEDS, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="TrainConfig"):
        run_grid({"GRPO": {"method": "grpo"}}, SEEDS, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="seeds"):
        run_grid(ARMS, [0, 0], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="seeds"):
        run_grid(ARMS, [-1], cache_dir=tmp_path)
