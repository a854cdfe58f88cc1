"""Every method's CPU learning check as a table: base vs trained held-out accuracy and seconds per step.

Runs ``xxpo.train.config.LEARNING_CHECK`` (the setting the learning tests assert on) for each method and
seed, from the same cached SFT base model, and prints one markdown row per method: the base model's
held-out accuracy, the trained accuracy of each seed, their mean and the gain, the win rate against the
base model (preference methods), and the median seconds per training step.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/methods.py [--methods grpo gspo] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from xxpo.train import train, train_preference  # noqa: E402
from xxpo.train.config import (  # noqa: E402
    LEARNING_CHECK,
    LEARNING_CHECK_BUDGET,
    LEARNING_CHECK_SEEDS,
    PREFERENCE_METHODS,
    learning_check_config,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(LEARNING_CHECK), choices=list(LEARNING_CHECK))
    p.add_argument("--seeds", nargs="+", type=int, default=list(LEARNING_CHECK_SEEDS))
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 keeps torch's default)")
    return p.parse_args(argv)


def run_method(method: str, seeds: list[int]) -> dict:
    runs = []
    for seed in seeds:
        config = learning_check_config(method, seed)
        runs.append((train_preference if method in PREFERENCE_METHODS else train)(config).summary)
    finals = [r["final_eval_accuracy"] for r in runs]
    wins = [r.get("final_win_rate_vs_base") for r in runs]
    config = runs[0]["config"]
    pairs = method in ("dpo", "ipo")  # offline pairs; every other method samples prompts x group_size
    return {
        "method": method,
        "setting": ", ".join(f"{k}={v}" for k, v in LEARNING_CHECK[method].items()) or "preset",
        "samples": f"{config['prompts_per_step']} pairs" if pairs else f"{config['prompts_per_step']} x {config['group_size']}",
        "steps": config["steps"],
        "base": runs[0]["base_eval_accuracy"],
        "finals": finals,
        "mean": statistics.mean(finals),
        "win": statistics.mean(wins) if all(w is not None for w in wins) else None,
        "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),
    }


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}; seeds {args.seeds}; budget {LEARNING_CHECK_BUDGET}")
    print("| method | overrides | samples/step | steps | base acc | trained acc per seed | mean | gain | "
          "win rate vs base | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows, started = [], time.perf_counter()
    for method in args.methods:
        r = run_method(method, args.seeds)
        rows.append(r)
        win = f"{r['win']:.3f}" if r["win"] is not None else "-"
        print(f"| {method} | {r['setting']} | {r['samples']} | {r['steps']} | {r['base']:.3f} | "
              f"{' / '.join(f'{f:.3f}' for f in r['finals'])} | {r['mean']:.3f} | {r['mean'] - r['base']:+.3f} | "
              f"{win} | {r['seconds_per_step']:.3f} |", flush=True)
    learned = sum(r["mean"] > r["base"] for r in rows)
    print(f"{learned}/{len(rows)} methods raised mean held-out accuracy over the base model "
          f"({time.perf_counter() - started:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
