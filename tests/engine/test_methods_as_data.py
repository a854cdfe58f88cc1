"""Methods are data: the loop reads each method's description (xxpo.presets), a method defined outside
xxpo trains by name, and DAPO's dynamic sampling and overlong shaping do what the paper describes."""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import pytest
import torch

import xxpo
from xxpo import objectives
from xxpo.cli import main
from xxpo.functional import aggregate
from xxpo.presets import PRESETS, MethodPreset, register
from xxpo.train import TrainConfig, train
from xxpo.train.sft import base_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TRAIN_DIR = Path(xxpo.__file__).parent / "train"
CALLS: list[tuple[int, float]] = []


def symmetric_clip_loss(logp, old_logp, advantages, mask, *, clip_eps=0.2, scale=1.0):
    """A method invented here: PPO's clipped token surrogate with a symmetric range, times ``scale``."""
    CALLS.append((logp.shape[0], scale))
    ratio = torch.exp(logp - old_logp)  # (B, T)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, T)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (B, T)
    return objectives.LossOutput(-scale * aggregate(surrogate, mask, "token-mean"), {"ratio_mean": ratio.detach().mean()})


SYMMETRIC_CLIP = MethodPreset(
    "test_symmetric_clip", "Symmetric clip (a test method)", "this test module", "grpo", "a symmetric clip times a scale",
    symmetric_clip_loss, "token", "clip r to [0.9, 1.1]", "token-mean", "group", "none", "none",
    dict(scale=0.5), samples_per_prompt=4, objective_args=("scale",),
)


@pytest.fixture(autouse=True)
def restore_registry():
    """Methods registered by a test are gone after it (the book tests compare PRESETS with the built book)."""
    saved = dict(PRESETS)
    yield
    PRESETS.clear()
    PRESETS.update(saved)


@pytest.fixture(scope="module")
def base():
    return base_model(TrainConfig().task, "tiny", seed=0)


def test_the_training_package_never_compares_a_method_name():
    pattern = re.compile(r"method (==|in|!=)")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted(TRAIN_DIR.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_every_description_names_arguments_its_objective_accepts():
    register(SYMMETRIC_CLIP)
    for name, preset in PRESETS.items():
        params = inspect.signature(preset.objective_fn).parameters
        kwargs = TrainConfig.from_preset(name).objective_kwargs({"ref_logp": None, "norm_len": 7})
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            assert set(kwargs) <= set(params), (name, set(kwargs) - set(params))


def test_a_method_defined_in_a_test_module_trains_by_name(base):
    register(SYMMETRIC_CLIP)
    CALLS.clear()
    config = TrainConfig.from_preset("test_symmetric_clip", steps=2, eval_every=2, eval_n=20, progress=False,
                                     minibatches=2, prompts_per_step=8, group_size=4)
    result = train(config)
    assert CALLS == [(16, 0.5)] * 4  # 8 prompts x G=4 in 2 minibatches, 2 steps; scale from the description
    assert result.metrics["ratio_mean"].notna().all()
    CALLS.clear()
    train(TrainConfig.from_preset("test_symmetric_clip", steps=1, eval_every=1, eval_n=10, progress=False,
                                  prompts_per_step=4, group_size=4, kl_coef=0.0))
    assert CALLS == [(16, 0.5)]


def test_a_method_defined_in_a_file_trains_through_the_cli(base, tmp_path, capsys):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(
        "from xxpo.objectives import grpo_loss\n"
        "from xxpo.presets import MethodPreset, register\n"
        "def tight_grpo(logp, old_logp, advantages, mask, *, clip_eps_low=0.05):\n"
        "    return grpo_loss(logp, old_logp, advantages, mask, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_low)\n"
        "register(MethodPreset('plugin_tight_grpo', 'Tight GRPO', 'a test', 'grpo', 'clip range 0.05',\n"
        "    tight_grpo, 'token', 'clip r to [0.95, 1.05]', 'seq-mean-token-mean', 'group', 'none', 'none',\n"
        "    dict(clip_eps_low=0.05), samples_per_prompt=4, objective_args=('clip_eps_low',)), replace=True)\n"
    )
    out = tmp_path / "run"
    code = main(["train", "--import", str(plugin), "--method", "plugin_tight_grpo", "--steps", "2", "--eval-every", "2",
                 "--eval-n", "10", "--prompts-per-step", "4", "--group-size", "4", "--minibatches", "2",
                 "--progress", "false", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "plugin_tight_grpo" and summary["config"]["clip_eps_low"] == 0.05
    assert main(["train", "--import", str(tmp_path / "missing.py"), "--out", str(out)]) == 2
    assert "missing.py" in capsys.readouterr().err


def test_register_rejects_duplicates_and_bad_descriptions():
    assert "test_symmetric_clip" not in PRESETS  # the registry fixture removed the earlier test's method
    with pytest.raises(ValueError, match="already registered"):
        register(PRESETS["grpo"])
    with pytest.raises(ValueError, match="advantage"):
        MethodPreset("x", "x", "x", None, "x", "grpo_loss", "token", "x", "token-mean", "z-score", "none", "none", {})
    with pytest.raises(ValueError, match="prox_logp"):
        MethodPreset("x", "x", "x", None, "x", "decoupled_ppo_loss", "token", "x", "token-mean", "group", "none",
                     "none", {}, proximal="recompute")
    with pytest.raises(ValueError, match="parent"):
        register(MethodPreset("x", "x", "x", "nope", "x", "grpo_loss", "token", "x", "token-mean", "group", "none",
                              "none", {}))


def test_kl_coef_on_a_method_without_a_kl_term_is_refused():
    with pytest.raises(ValueError, match="kl_coef"):
        TrainConfig.from_preset("gspo", kl_coef=0.1)
    with pytest.raises(ValueError, match="prox"):
        TrainConfig.from_preset("grpo", prox="recompute")


# ------------------------------------------------------------------ DAPO: dynamic sampling and overlong shaping


def test_dynamic_sampling_refills_the_batch_with_informative_groups(base):
    seen = []

    def keep_rows(step, row):
        seen.append(row)

    config = TrainConfig.from_preset("dapo", steps=3, eval_every=3, eval_n=20, progress=False, prompts_per_step=8,
                                     group_size=4, overlong_buffer=0)
    train(config, callback=keep_rows)
    for row in seen:
        # base accuracy ~0.3 with G = 4: some groups are all wrong, so one rollout rarely suffices
        assert row["groups_trained"] == 8 or row["rollouts"] == config.preset_value("max_sampling_rounds")
        assert row["samples_generated"] == row["rollouts"] * 8 * 4
    assert any(row["rollouts"] > 1 for row in seen)
    assert all(row["frac_zero_std_groups"] > 0 for row in seen if row["rollouts"] > 1)


def test_dynamic_sampling_trains_only_on_groups_with_mixed_answers(base, monkeypatch):
    from xxpo.train import loop

    batches = []
    original = loop.Trainer.advantages

    def spy(self, rollout, rewards):
        batches.append(rewards.reshape(-1, self.config.group_size).clone())
        return original(self, rollout, rewards)

    monkeypatch.setattr(loop.Trainer, "advantages", spy)
    train(TrainConfig.from_preset("dapo", steps=2, eval_every=2, eval_n=10, progress=False, prompts_per_step=8,
                                  group_size=4, overlong_buffer=0, max_sampling_rounds=2))
    for grouped in batches:
        assert ((grouped.amax(-1) > grouped.amin(-1))).all()  # no all-equal group reaches the loss
        assert len(grouped) <= 8


def test_dynamic_sampling_is_bounded(base):
    rows = []
    train(TrainConfig.from_preset("dapo", steps=2, eval_every=2, eval_n=10, progress=False, prompts_per_step=8,
                                  group_size=2, overlong_buffer=0, max_sampling_rounds=1), callback=lambda s, r: rows.append(r))
    assert all(r["rollouts"] == 1 and r["samples_generated"] == 16 for r in rows)
    assert all(r["groups_trained"] < 8 for r in rows)  # one round cannot fill 8 informative pairs at ~30 % accuracy


def test_overlong_penalty_enters_the_reward(base):
    rows = []
    # add2_scratch lets responses run to the budget; a 12-token budget truncates some of them
    config = TrainConfig.from_preset("dapo", task="add2_scratch", steps=1, eval_every=1, eval_n=10, progress=False,
                                     prompts_per_step=8, group_size=4, dynamic_sampling=False, max_new_tokens=12,
                                     overlong_buffer=0.5)
    train(config, callback=lambda s, r: rows.append(r))
    off = []
    train(TrainConfig.from_preset("dapo", task="add2_scratch", steps=1, eval_every=1, eval_n=10, progress=False,
                                  prompts_per_step=8, group_size=4, dynamic_sampling=False, max_new_tokens=12,
                                  overlong_buffer=0), callback=lambda s, r: off.append(r))
    [row], [plain] = rows, off
    assert row["frac_overlong_penalized"] > 0
    # same seed, same samples: the reward falls by the penalty and accuracy is unchanged
    assert row["train_accuracy"] == plain["train_accuracy"]
    assert row["reward_mean"] < plain["reward_mean"]
    assert "frac_overlong_penalized" not in plain


# ------------------------------------------------------------------ Routing Replay in the loop


def test_routing_replay_trains_an_moe_model_and_is_refused_on_a_dense_one():
    base_model(TrainConfig().task, "tiny-moe", seed=0)
    rows = []
    # one minibatch: every row is on-policy, so under a correct replay (each row given ITS OWN routing, in the
    # shuffled minibatch order) every ratio is 1 up to float rounding; a misaligned replay would route rows
    # through other rows' experts and move the ratios
    config = TrainConfig.from_preset("grpo", model="tiny-moe", steps=2, eval_every=2, eval_n=10, progress=False,
                                     prompts_per_step=4, group_size=4, minibatches=1, routing_replay=True)
    train(config, callback=lambda s, r: rows.append(r))
    assert all(r["time_routing"] > 0 for r in rows)
    assert all(abs(r["ratio_max"] - 1) < 1e-4 and abs(r["ratio_min"] - 1) < 1e-4 for r in rows), rows
    with pytest.raises(ValueError, match="routing_replay"):
        train(TrainConfig.from_preset("grpo", steps=1, progress=False, routing_replay=True))
