"""Data-parallel training (xxpo.train.distributed) equals one process on the same global batch.

Two CPU processes (gloo, started by torchrun) train each case of ``data_parallel_worker.CASES`` for a
few steps and store every step's global batch. One process then trains the same config on those same
batches (the replay below) and must end with the same weights and the same per-step metrics, up to float
rounding: the forwards ran on halves of the batch there and the gradients were summed across processes.
The cases cover the normalizers where data parallelism goes wrong (token-mean, seq-mean-token-mean,
a sequence-level ratio, batch-whitened GAE and batch-normalized advantages) and every extra forward the
loop runs across ranks (critic, proximal recompute, mismatch correction, Routing Replay on an MoE model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from data_parallel_worker import CASES, STEPS, case_config
from xxpo.train import TrainConfig
from xxpo.train.distributed import DataParallel
from xxpo.train.loop import Trainer
from xxpo.train.sft import base_model

# Meant to keep the module on one xdist worker (--dist loadgroup); with pytest-xdist 3.8.0 here the tests are still
# spread over the workers, so each worker that runs one of them makes the record once (the fixture below).
pytestmark = pytest.mark.xdist_group("data_parallel")

WORKER = Path(__file__).with_name("data_parallel_worker.py")
ROOT = Path(__file__).resolve().parents[2]
NOT_COMPARED = ("time_", "tokens_per_second")  # wall-clock columns


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")  # once per test process
def record(tmp_path_factory) -> Path:
    """The worker's output directory after two processes ran it."""
    for model in ("tiny", "tiny-moe"):  # the SFT bases the processes load (trained once, cached)
        base_model(TrainConfig().task, model, seed=0)
    out = tmp_path_factory.mktemp("data_parallel")
    done = torchrun(2, str(WORKER), str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


class ReplayTrainer(Trainer):
    """One process that trains on the batches the data-parallel run recorded instead of sampling."""

    def __init__(self, config: TrainConfig, record_dir: Path):
        super().__init__(config)
        self.record_dir = record_dir

    def collect(self, step: int, row: dict):
        batch = torch.load(self.record_dir / f"batch_{step}.pt", weights_only=False)
        row.update(batch["row"])
        return batch["rollout"].to(self.device), batch["rewards"].to(self.device)


def compared(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics[[c for c in metrics.columns if not c.startswith(NOT_COMPARED)]]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_the_same_global_batch(record, case):
    record_dir = record / case
    config = case_config(case)
    assert DataParallel.from_env(torch.device("cpu")) is None  # this pytest process is one process
    replay = ReplayTrainer(config, record_dir)
    one = replay.run()
    ranks = json.loads((record_dir / "ranks.json").read_text())
    assert ranks["world_size"] == ranks["summary_world_size"] == 2 and one.summary["world_size"] == 1
    assert ranks["weights_equal_across_ranks"]
    # each rank sampled its own block of the prompts (7 prompts: 4 and 3), never the whole batch
    total = config.prompts_per_step
    for rank, counts in enumerate(ranks["prompts_sampled"]):
        assert counts and all(c == (total + 1) // 2 - rank * (total % 2) for c in counts), (rank, counts)

    # The weights after the steps: the update of each module within 1e-3 of its norm, and every entry within
    # 1e-5. (A parameter whose gradient is zero in exact arithmetic, such as a key bias, which the softmax
    # ignores, gets float noise for a gradient; Adam scales any gradient to steps of about lr, so such entries
    # can differ by a few lr-sized steps of noise while everything else agrees to float rounding.)
    weights = torch.load(record_dir / "weights.pt", weights_only=True)
    start = base_model(config.task, config.model, seed=config.base_seed).model.state_dict()
    modules = {"policy": (replay.policy, start)}
    if replay.critic is not None:
        modules["critic"] = (replay.critic, None)
    for key, (module, initial) in modules.items():
        one_weights = module.state_dict()
        for name, value in one_weights.items():
            torch.testing.assert_close(value, weights[key][name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key} {name}: {m}")
        if initial is not None:  # the relative difference of the two updates
            update = torch.cat([(one_weights[k] - initial[k]).reshape(-1) for k in one_weights])
            gap = torch.cat([(one_weights[k] - weights[key][k]).reshape(-1) for k in one_weights])
            assert update.norm() > 0  # the steps moved the weights: equal weights are not equal starting points
            assert float(gap.norm() / update.norm()) < 1e-3, float(gap.norm() / update.norm())

    two = pd.read_csv(record_dir / "metrics.csv")
    assert len(two) == len(one.metrics) == STEPS
    one_df, two_df = compared(one.metrics), compared(two)
    assert sorted(one_df.columns) == sorted(two_df.columns)
    pd.testing.assert_frame_equal(one_df[sorted(one_df.columns)], two_df[sorted(two_df.columns)], check_exact=False,
                                  rtol=1e-4, atol=1e-6, check_dtype=False)


def test_a_killed_data_parallel_run_resumes_to_the_same_metrics(record):
    full = pd.read_csv(record / "resume_full" / "metrics.csv")
    resumed = pd.read_csv(record / "resume_killed" / "metrics.csv")
    pd.testing.assert_frame_equal(compared(full), compared(resumed))
    assert json.loads((record / "resume_full" / "summary.json").read_text())["world_size"] == 2


def test_the_cli_trains_with_two_processes_and_rank_0_writes(tmp_path):
    base_model(TrainConfig().task, "tiny", seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "xxpo.cli", "train", "--nproc", "2", "--method", "grpo", "--steps", "2",
           "--eval-every", "2", "--eval-n", "20", "--prompts-per-step", "4", "--progress", "false", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count('"final_eval_accuracy"') == 1  # rank 0 reports, once
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["prompts_per_step"] == 4
    assert list(pd.read_csv(tmp_path / "metrics.csv")["step"]) == [0, 1]


@pytest.mark.parametrize("method", ["trpo", "dpo"])
def test_methods_that_train_in_one_process_refuse_nproc(tmp_path, method):
    from xxpo.cli import main

    assert main(["train", "--nproc", "2", "--method", method, "--out", str(tmp_path)]) == 2


def test_nproc_is_stripped_from_what_each_process_is_given():
    from xxpo.cli import without_nproc

    assert without_nproc(["train", "--nproc", "2", "--steps", "3"]) == ["train", "--steps", "3"]
    assert without_nproc(["train", "--nproc=4", "--out", "d"]) == ["train", "--out", "d"]


def test_row_blocks_cover_every_row_once():
    group = DataParallel.__new__(DataParallel)  # the row arithmetic needs no process group
    for size in (1, 2, 3, 8):
        group.size = size
        for n in (0, 1, 7, 16, 29):
            blocks = []
            for rank in range(size):
                group.rank = rank
                block = range(n)[group.rows(n)]
                assert len(block) in (n // size, n // size + 1)
                blocks.extend(block)
            assert blocks == list(range(n)), (size, n)
