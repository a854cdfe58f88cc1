"""Seconds per RL step with 1 process and with N data-parallel processes, side by side.

Runs ``xxpo train`` (GRPO, the given model preset) alternately with ``--nproc 1`` and ``--nproc N``,
``--repeats`` times each, every process with one intra-op thread (``--single-threads`` gives the single
process more, so that both sides may use the same cores), and reports the median over runs of
each run's median ``time_step`` (and its parts), then the ratio. On a CPU machine N processes need N
free cores; the machine should be otherwise idle.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_parallel.py --model small --nproc 2

The last line is exactly ``1-process/N-process seconds-per-step ratio: X.XX`` (above 1: N processes are faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

PARTS = ("time_step", "time_rollout", "time_reference", "time_update")


def one_run(nproc: int, args, out: Path) -> pd.Series:
    threads = args.single_threads if nproc == 1 else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "xxpo.cli", "train", "--nproc", str(nproc), "--method", "grpo", "--model", args.model,
           "--task", args.task, "--steps", str(args.steps), "--prompts-per-step", str(args.prompts),
           "--group-size", str(args.group_size), "--eval-every", str(args.steps), "--eval-n", "20", "--progress",
           "false", "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    metrics = pd.read_csv(out / "metrics.csv").iloc[args.warmup:]
    return metrics[list(PARTS)].median()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="model preset (default: small, ~1M parameters)")
    parser.add_argument("--task", default="add2")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each run not counted")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single-threads", type=int, default=1,
                        help="intra-op threads of the one-process side (default 1; N gives it the N processes' cores)")
    args = parser.parse_args()
    runs = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for n in runs:  # alternate, so both sides share the machine's drift
                runs[n].append(one_run(n, args, Path(tmp) / f"n{n}_{i}"))
    print(f"GRPO, model {args.model}, task {args.task}, {args.prompts} prompts x G={args.group_size}, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.repeats} runs per side, one thread per process "
          f"({args.single_threads} for the single process)")
    medians = {n: pd.DataFrame(r).median() for n, r in runs.items()}
    print(pd.DataFrame(medians).rename(columns=lambda n: f"{n} process(es), s").to_string(float_format="%.4f"))
    ratio = statistics.median(runs[1][i]["time_step"] / runs[args.nproc][i]["time_step"] for i in range(args.repeats))
    print(f"1-process/{args.nproc}-process seconds-per-step ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
