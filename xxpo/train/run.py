"""What every xxpo training run shares: the starting model, resume, the step loop, checkpoints, the summary.

The RL loop (:mod:`xxpo.train.loop`) and the preference trainer (:mod:`xxpo.train.preference`) differ
in what ONE step does; :class:`Run` owns everything around the step, once:

    [resume from out_dir/checkpoint.pt]
    base_eval = evaluate()                       (the starting model, before any update)
    for step in range(start, steps):
        row = step(step)                         (the subclass: one optimizer step, its metrics)
        every eval_every steps and at the end: row += evaluate()
        every checkpoint_every steps: atomically save model, optimizer, RNG states, rows
    write metrics.csv and summary.json

A subclass sets the attributes :meth:`Run.state` saves (``stateful``: names of modules and
optimizers; ``generators``; ``prompt_rng``) and implements ``step``, ``evaluate`` and
``eval_columns``; ``extra_state`` / ``load_extra_state`` and ``summary_extra`` add what only it has.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from xxpo.models import load_model
from xxpo.results import atomic_torch_save, environment_snapshot, write_run
from xxpo.train.config import TrainConfig
from xxpo.train.sft import base_model

CHECKPOINT = "checkpoint.pt"
BASE_INFO_KEYS = ("path", "config_hash", "eval_accuracy", "sft")


@dataclass
class RunResult:
    """What a training run returns: the per-step metrics, a summary, and the trained policy."""

    metrics: pd.DataFrame
    summary: dict
    model: torch.nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)


def load_start(config: TrainConfig, device: torch.device):
    """(policy to train, frozen reference, tokenizer, base info): the cached SFT model, or a local directory."""
    if os.path.isdir(config.model):
        model, tokenizer = load_model(config.model, device=str(device))
        info = {"path": config.model, "eval_accuracy": None}
    else:
        base = base_model(config.task, config.model, seed=config.base_seed, sft_steps=config.sft_steps, device=str(device))
        model, tokenizer, info = base.model, base.tokenizer, base.info
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    policy = model.train().requires_grad_(True)
    return policy, reference, tokenizer, info


class Run:
    """The loop around a trainer's ``step``: resume, evaluation cadence, checkpoints, result files."""

    stateful: tuple[str, ...] = ()  # attributes (modules, optimizers; None allowed) saved by state_dict
    postfix_key = "reward_mean"  # the step metric shown next to accuracy in the progress bar

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike | None, callback):
        self.config, self.callback = config, callback
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.rows: list[dict] = []
        self.start_step = 0
        self.base_eval: dict | None = None
        self.generators: tuple[torch.Generator, ...] = ()
        self.prompt_rng = None
        self.base_info: dict = {}

    # ---------------------------------------------------------------- what a subclass provides
    def step(self, step: int) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def eval_columns(self, scores: dict) -> dict:
        """The columns an evaluation adds to a step's row (NaN on steps without one)."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def summary_extra(self, metrics: pd.DataFrame) -> dict:
        return {}

    # ---------------------------------------------------------------- checkpoints
    def state(self, step: int) -> dict:
        modules = {name: getattr(self, name) for name in self.stateful}
        return {
            "step": step,
            **{name: m.state_dict() if m is not None else None for name, m in modules.items()},
            "generators": [g.get_state() for g in self.generators],
            "prompt_rng": self.prompt_rng.getstate(),
            "rows": self.rows,
            "base_eval": self.base_eval,
            "config": self.config.to_dict(),
            **self.extra_state(),
        }

    def restore(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["config"] != self.config.to_dict():
            raise ValueError(f"checkpoint {path} was written by a different config; refusing to resume")
        for name in self.stateful:
            if getattr(self, name) is not None:
                getattr(self, name).load_state_dict(state[name])
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)
        self.prompt_rng.setstate(state["prompt_rng"])
        self.load_extra_state(state)
        self.rows, self.base_eval, self.start_step = state["rows"], state["base_eval"], state["step"] + 1

    # ---------------------------------------------------------------- the run
    def run(self, resume: bool = False) -> RunResult:
        c = self.config
        ckpt = self.out_dir / CHECKPOINT if self.out_dir is not None else None
        if resume and ckpt is not None and ckpt.is_file():
            self.restore(ckpt)
        started = time.perf_counter()
        if self.base_eval is None:
            self.base_eval = self.evaluate()
        nan_eval = {k: math.nan for k in self.eval_columns(self.base_eval)}
        bar = tqdm(range(self.start_step, c.steps), desc=f"{c.method} seed {c.seed}", disable=not c.progress,
                   initial=self.start_step, total=c.steps)
        for step in bar:
            t0 = time.perf_counter()
            row = {"step": step, **self.step(step), **nan_eval}
            if (step + 1) % c.eval_every == 0 or step + 1 == c.steps:
                t_eval = time.perf_counter()
                row.update(self.eval_columns(self.evaluate()), time_eval=time.perf_counter() - t_eval)
            row["time_step"] = time.perf_counter() - t0
            self.rows.append(row)
            bar.set_postfix({self.postfix_key: f"{row.get(self.postfix_key, math.nan):.3f}",
                             "acc": f"{row['eval_accuracy']:.2f}"})
            if ckpt is not None and c.checkpoint_every and (step + 1) % c.checkpoint_every == 0:
                atomic_torch_save(self.state(step), ckpt)
            if self.callback is not None:
                self.callback(step, row)
        metrics = pd.DataFrame(self.rows)
        final = metrics["eval_accuracy"].dropna()
        summary = {
            "method": c.method,
            "task": c.task,
            "seed": c.seed,
            "base_eval_accuracy": self.base_eval["accuracy"],
            "final_eval_accuracy": float(final.iloc[-1]) if len(final) else None,
            **self.summary_extra(metrics),
            "seconds_per_step": float(metrics["time_step"].median()) if "time_step" in metrics else None,
            "wall_seconds_this_call": time.perf_counter() - started,
            "base_model": {k: v for k, v in self.base_info.items() if k in BASE_INFO_KEYS},
            "config": c.to_dict(),
            "environment": environment_snapshot(),
        }
        if self.out_dir is not None:
            write_run(self.out_dir, metrics, summary)
        return RunResult(metrics, summary, self.policy, self.tokenizer)
