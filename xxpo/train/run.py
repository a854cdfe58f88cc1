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

Checkpoints hold only what ``torch.load(..., weights_only=True)`` reads (tensors, Python numbers, strings,
None, and dicts, lists and tuples of them) and are loaded that way, so a checkpoint someone hands you
cannot run code when resumed: :func:`checkpoint_safe` converts on save (the Python ``random.Random`` state
becomes a tensor, NumPy scalars Python numbers) and refuses anything else; :func:`load_checkpoint`
refuses a file that holds any other object.

A subclass sets the attributes :meth:`Run.state` saves (``stateful``: names of modules and
optimizers; ``generators``; ``prompt_rng``) and implements ``step``, ``evaluate`` and
``eval_columns``; ``extra_state`` / ``load_extra_state`` and ``summary_extra`` add what only it has.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import random
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from xxpo.models import MODEL_PRESETS, context_length, load_model, precision_context, training_precision
from xxpo.results import atomic_torch_save, environment_snapshot, write_run
from xxpo.train.config import TrainConfig
from xxpo.tasks.jsonl import is_jsonl_spec
from xxpo.tasks.tokenizer import prompt_lengths
from xxpo.train.sft import base_model

CHECKPOINT = "checkpoint.pt"
BASE_INFO_KEYS = ("path", "config_hash", "eval_accuracy", "sft", "precision")


@dataclass
class RunResult:
    """What a training run returns: the per-step metrics, a summary, and the trained policy."""

    metrics: pd.DataFrame
    summary: dict
    model: torch.nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)


def checkpoint_safe(obj, where: str = "state"):
    """``obj`` in the forms ``torch.load(..., weights_only=True)`` reads, or a TypeError naming the entry.

    Tensors, bool/int/float/str and None pass; NumPy scalars become Python numbers; dicts (str or int
    keys; an OrderedDict keeps its type and a module state_dict's ``_metadata``), lists and tuples are
    converted entry by entry. Anything else would need the unsafe unpickler, so it is refused at save time.
    """
    if isinstance(obj, np.generic) and type(obj.item()) in (bool, int, float, str):
        return obj.item()  # np.float64 subclasses float but pickles as a NumPy object
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return obj
    if type(obj) in (dict, OrderedDict):
        out = type(obj)()
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"checkpoint entry {where} has a key of type {type(k).__name__}; "
                                "keys must be str or int")
            out[k] = checkpoint_safe(v, f"{where}[{k!r}]")
        if hasattr(obj, "_metadata"):
            out._metadata = checkpoint_safe(obj._metadata, f"{where}._metadata")
        return out
    if type(obj) in (list, tuple):
        return type(obj)(checkpoint_safe(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"checkpoint entry {where} is a {type(obj).__name__}; a checkpoint holds only tensors, numbers, "
                    "strings, None and dicts/lists/tuples of them (torch.load weights_only=True)")


def random_state_to_checkpoint(rng: random.Random) -> dict:
    """A ``random.Random`` state as {version, internal (int64 tensor of the Mersenne Twister words), gauss_next}."""
    version, internal, gauss_next = rng.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def random_state_from_checkpoint(state) -> tuple:
    """Inverse of :func:`random_state_to_checkpoint`; a tuple (checkpoints written before it) passes unchanged."""
    if isinstance(state, tuple):
        return state
    return state["version"], tuple(int(x) for x in state["internal"].tolist()), state["gauss_next"]


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """``torch.load(path, weights_only=True)``; a file holding any other object is refused, not executed."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "unsupported" in ln.lower()), lines[-1] if lines else type(err).__name__)
        raise pickle.UnpicklingError(
            f"checkpoint {path} holds objects other than tensors, numbers, strings and containers; refusing to "
            f"load it (torch.load weights_only=True: {reason})") from err


def load_start(config: TrainConfig, device: torch.device):
    """(policy to train, frozen reference, tokenizer, base info): the cached SFT model, or a local directory.

    ``config.model`` names a local Hugging Face model directory (loaded with its own tokenizer, float32
    weights, ``info["precision"]`` from :func:`xxpo.models.training_precision`) or a model preset, for
    which the SFT base model of the task is trained or loaded from the cache. A JSONL task has no SFT
    base (the presets are built with the character tokenizer for the built-in tasks), so it needs a
    model directory.
    """
    model_dir = os.path.expanduser(config.model)
    if os.path.isdir(model_dir):
        model, tokenizer = load_model(model_dir, device=str(device))
        info = {"path": model_dir, "eval_accuracy": None, "precision": training_precision(device)}
    elif config.model not in MODEL_PRESETS:
        raise ValueError(f"model must be a model preset {tuple(MODEL_PRESETS)} or a local Hugging Face model "
                         f"directory; there is no directory {config.model!r} (working directory {os.getcwd()!r})")
    elif is_jsonl_spec(config.task):
        raise ValueError(f"task {config.task!r} has no SFT base model: model presets ({config.model!r}) are trained "
                         "from scratch on the built-in tasks with a character tokenizer. Start from a model "
                         "directory instead: model=<local Hugging Face model directory> (xxpo train --model DIR)")
    else:
        base = base_model(config.task, config.model, seed=config.base_seed, sft_steps=config.sft_steps, device=str(device))
        model, tokenizer, info = base.model, base.tokenizer, base.info
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    policy = model.train().requires_grad_(True)
    return policy, reference, tokenizer, info


def sampling_budget(config: TrainConfig, task, model, tokenizer, base_info: dict) -> int:
    """The generation budget of a run: ``config.max_new_tokens``, else the task's, made to fit the model.

    For a local model directory (``"precision"`` in ``base_info``) the longest prompt of the task (chat
    template included) plus the budget must fit the model's context (``max_position_embeddings``). A
    task default that does not fit is lowered to what fits, with a warning; an explicit
    ``max_new_tokens`` that does not fit is an error. Model presets keep the budget as it is (they are
    sized for the built-in tasks).
    """
    budget = config.max_new_tokens or task.max_new_tokens
    context = context_length(model)
    if "precision" not in base_info or context is None:
        return budget
    examples = task.split("train") + task.split("test")
    lengths = prompt_lengths(tokenizer, [ex.prompt for ex in examples])
    longest = max(lengths)
    room = context - longest
    if room < 1:
        prompt = examples[lengths.index(longest)].prompt
        raise ValueError(f"the longest prompt of task {config.task!r} is {longest} tokens, which leaves no room to "
                         f"answer within the model's context of {context} tokens: {prompt[:80]!r}")
    if budget <= room:
        return budget
    if config.max_new_tokens is not None:
        raise ValueError(f"max_new_tokens={budget} does not fit: the model's context is {context} tokens and the "
                         f"longest prompt takes {longest}, leaving {room}")
    warnings.warn(f"max_new_tokens lowered from the task's {budget} to {room}: the model's context is {context} "
                  f"tokens and the longest prompt takes {longest}", stacklevel=2)
    return room


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
        self.dp = None  # xxpo.train.distributed.DataParallel when the subclass trains across processes

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
        """Everything a resume needs, in :func:`checkpoint_safe` form."""
        modules = {name: getattr(self, name) for name in self.stateful}
        return checkpoint_safe({
            "step": step,
            **{name: m.state_dict() if m is not None else None for name, m in modules.items()},
            "generators": [g.get_state() for g in self.generators],
            "prompt_rng": random_state_to_checkpoint(self.prompt_rng),
            "rows": self.rows,
            "base_eval": self.base_eval,
            "config": self.config.to_dict(),
            **self.extra_state(),
        })

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if state["config"] != self.config.to_dict():
            raise ValueError(f"checkpoint {path} was written by a different config; refusing to resume")
        for name in self.stateful:
            if getattr(self, name) is not None:
                getattr(self, name).load_state_dict(state[name])
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)
        self.prompt_rng.setstate(random_state_from_checkpoint(state["prompt_rng"]))
        self.load_extra_state(state)
        self.rows, self.base_eval, self.start_step = state["rows"], state["base_eval"], state["step"] + 1

    # ---------------------------------------------------------------- the run
    def precision(self):
        """The context of every step and evaluation: bfloat16 autocast for a local model on a CUDA device
        with bfloat16 (``base_info["precision"]``, :func:`xxpo.models.training_precision`), else nothing.
        The backward passes of a step run inside it too; every gradient still has its parameter's dtype (float32)."""
        return precision_context(self.base_info.get("precision", "fp32"), self.device)

    def run(self, resume: bool = False) -> RunResult:
        c = self.config
        ckpt = self.out_dir / CHECKPOINT if self.out_dir is not None else None
        found = resume and ckpt is not None and ckpt.is_file()
        if self.dp is not None and len(set(self.dp.gather_objects(found))) > 1:
            raise ValueError(f"{ckpt} is visible to some processes only; resuming needs it on every machine "
                             "(a shared filesystem)")
        if found:
            self.restore(ckpt)
        started = time.perf_counter()
        if self.base_eval is None:
            with self.precision():
                self.base_eval = self.evaluate()
        nan_eval = {k: math.nan for k in self.eval_columns(self.base_eval)}
        writer = self.dp is None or self.dp.is_writer  # under data parallelism rank 0 writes; all ranks hold the rows
        bar = tqdm(range(self.start_step, c.steps), desc=f"{c.method} seed {c.seed}", disable=not (c.progress and writer),
                   initial=self.start_step, total=c.steps)
        for step in bar:
            t0 = time.perf_counter()
            with self.precision():
                row = {"step": step, **self.step(step), **nan_eval}
            if (step + 1) % c.eval_every == 0 or step + 1 == c.steps:
                t_eval = time.perf_counter()
                with self.precision():
                    scores = self.evaluate()
                row.update(self.eval_columns(scores), time_eval=time.perf_counter() - t_eval)
            row["time_step"] = time.perf_counter() - t0
            self.rows.append(row)
            bar.set_postfix({self.postfix_key: f"{row.get(self.postfix_key, math.nan):.3f}",
                             "acc": f"{row['eval_accuracy']:.2f}"})
            if ckpt is not None and c.checkpoint_every and (step + 1) % c.checkpoint_every == 0:
                state = self.state(step)  # every rank takes part (each has its own sampling stream)
                if writer:
                    atomic_torch_save(state, ckpt)
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
            **({"task_data": self.task.info()} if hasattr(getattr(self, "task", None), "info") else {}),
            "config": c.to_dict(),
            "environment": environment_snapshot(),
        }
        if self.out_dir is not None and writer:
            write_run(self.out_dir, metrics, summary)
        return RunResult(metrics, summary, self.policy, self.tokenizer)
