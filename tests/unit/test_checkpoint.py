"""Checkpoints of xxpo.train.run.Run: written in forms torch.load(weights_only=True) reads, loaded that way,
a file with any other object refused before it can run, and an exact resume (a toy Run on a linear model,
so no language model is needed)."""

from __future__ import annotations

import math
import os
import pickle
import random

import numpy as np
import pytest
import torch

from xxpo.train.config import TrainConfig
from xxpo.train.run import (
    CHECKPOINT,
    Run,
    checkpoint_safe,
    load_checkpoint,
    random_state_from_checkpoint,
    random_state_to_checkpoint,
)


class ToyRun(Run):
    """A Run whose step draws from a torch generator and a random.Random and logs NumPy and string values."""

    stateful = ("policy", "optimizer")

    def __init__(self, config, out_dir, callback=None):
        super().__init__(config, out_dir, callback)
        self.device = torch.device("cpu")
        init = torch.Generator().manual_seed(config.seed)
        self.policy = torch.nn.Linear(3, 2).double()
        with torch.no_grad():
            for p in self.policy.parameters():
                p.copy_(torch.randn(p.shape, generator=init, dtype=torch.float64))
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=0.05)
        self.data_gen = torch.Generator().manual_seed(config.seed + 1)
        self.generators = (self.data_gen,)
        self.prompt_rng = random.Random(config.seed)
        self.tokenizer = None

    def step(self, step):
        x = torch.randn(4, 3, generator=self.data_gen, dtype=torch.float64)
        pick = self.prompt_rng.randrange(1000)
        loss = (self.policy(x) - pick / 1000).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"reward_mean": float(loss.detach()), "pick": pick, "np_value": np.float64(pick) / 7,
                "np_count": np.int64(pick), "label": "toy", "missing": math.nan}

    def evaluate(self):
        return {"accuracy": float(self.policy.weight.detach().sum())}

    def eval_columns(self, scores):
        return {"eval_accuracy": scores["accuracy"]}


class Killed(Exception):
    pass


def _config(**kw):
    return TrainConfig(**{"steps": 4, "eval_every": 2, "checkpoint_every": 1, "progress": False, **kw})


def _rows(result):
    return result.metrics.drop(columns=[c for c in result.metrics.columns if c.startswith("time_")])


def test_checkpoint_loads_with_weights_only(tmp_path):
    ToyRun(_config(), tmp_path).run()
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 3 and len(state["rows"]) == 4
    rng = state["prompt_rng"]
    assert rng["internal"].dtype == torch.int64 and rng["internal"].shape == (625,)
    row = state["rows"][0]
    assert type(row["np_value"]) is float and type(row["np_count"]) is int and row["label"] == "toy"
    assert math.isnan(row["missing"])


def test_killed_run_resumes_exactly(tmp_path):
    full = ToyRun(_config(), tmp_path / "full").run()

    def kill_after_step_1(step, row):
        if step == 1:
            raise Killed

    with pytest.raises(Killed):
        ToyRun(_config(), tmp_path / "resumed", kill_after_step_1).run()
    resumed = ToyRun(_config(), tmp_path / "resumed").run(resume=True)
    assert _rows(full).equals(_rows(resumed))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


class _MakeDir:
    """A pickle payload: unpickling it with the full unpickler calls os.mkdir(path)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_checkpoint_with_a_malicious_pickle_is_refused_before_it_runs(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "payload_ran"
    ToyRun(_config(steps=2), run_dir).run()
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)  # a genuine checkpoint ...
    state["rows"][0]["extra"] = _MakeDir(marker)  # ... with one object that runs code when unpickled
    torch.save(state, run_dir / CHECKPOINT)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        ToyRun(_config(steps=2), run_dir).run(resume=True)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="posix.mkdir"):
        load_checkpoint(run_dir / CHECKPOINT)
    assert not marker.exists()


def test_checkpoint_safe_converts_numpy_and_refuses_other_objects():
    out = checkpoint_safe({"a": [np.float32(0.5), np.bool_(True), (1, "x", None)], 3: torch.zeros(2)})
    assert type(out["a"][0]) is float and type(out["a"][1]) is bool and out["a"][2] == (1, "x", None)
    sd = torch.nn.Linear(2, 2).state_dict()
    assert checkpoint_safe(sd)._metadata == sd._metadata  # module state_dicts keep their version info
    with pytest.raises(TypeError, match=r"state\['rows'\]\[0\]\['bad'\] is a object"):
        checkpoint_safe({"rows": [{"bad": object()}]})
    with pytest.raises(TypeError, match="key of type float"):
        checkpoint_safe({1.5: 0})


def test_random_state_round_trip_and_legacy_tuple():
    rng = random.Random(7)
    rng.random()
    rng.gauss(0, 1)  # sets gauss_next
    saved = random_state_to_checkpoint(rng)
    assert random_state_from_checkpoint(saved) == rng.getstate()
    assert random_state_from_checkpoint(rng.getstate()) == rng.getstate()  # checkpoints written before the change
