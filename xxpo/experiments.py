"""The experiment protocol every notebook follows: claims declared first, a cached grid of runs, fair
hyper-parameters, and verdicts decided by code.

A complete notebook, top to bottom::

    import math
    from xxpo.experiments import Claim, Rules, decide, publish, run_grid, select_hparams
    from xxpo.train import TrainConfig

    # 1. Before any run: the claims (ids from CLAIMS), the decision rules, the seeds.
    CLAIMS_HERE = [
        Claim("C6a", "GSPO clips at least 10x more tokens than GRPO", metric="clip_frac",
              a="GSPO", b="GRPO", kind="superiority", margin=math.log(10), scale="log-ratio"),
        Claim("C6b", "GSPO's held-out accuracy is at least GRPO's - 0.02", metric="final_eval_accuracy",
              a="GSPO", b="GRPO", kind="non-inferiority", margin=0.02),
    ]
    RULES = Rules()                               # >= 5 seeds, 90% bootstrap CI, learned / collapse gates
    TUNING_SEEDS, REPORTED_SEEDS = [100, 101, 102], [0, 1, 2, 3, 4]
    ARMS = {
        "GRPO": TrainConfig(method="grpo", clip_eps_low=0.2, clip_eps_high=0.27, minibatches=4, steps=60),
        "GSPO": TrainConfig(method="gspo", minibatches=4, steps=60),
    }

    # 2. One grid and one rule for every arm, decided on the tuning seeds only.
    tuned = select_hparams(ARMS, {"lr": [1e-4, 3e-4, 1e-3]}, tuning_seeds=TUNING_SEEDS,
                           reported_seeds=REPORTED_SEEDS)
    display(tuned.table)                          # the tuning table is part of the record

    # 3. The reported runs: arms x seeds, one progress bar, every run cached on disk.
    result = run_grid(tuned.configs, REPORTED_SEEDS)
    result.steps                                  # one row per (arm, seed, step): every logged metric
    runs = result.per_run(clip_frac=("clip_frac", "mean"))   # one row per (arm, seed)

    # 4. Verdicts: shown to the reader, and copied into the notebook's metadata by `xxpo reproduce`.
    publish([decide(claim, runs, RULES) for claim in CLAIMS_HERE])

**The cache.** Each run is stored in ``<cache>/<key>/`` (``metrics.csv``, ``summary.json`` via
:mod:`xxpo.results`, and ``key.json`` saying what the key covers). ``<cache>`` is ``cache_dir`` if given,
else ``$XXPO_CACHE/runs`` (the Makefile sets ``XXPO_CACHE``; default ``~/.cache/xxpo``). The key hashes
the run's full :class:`~xxpo.train.TrainConfig` (seed included), ``xxpo.__version__``, the torch and
transformers versions, the device type, and :func:`engine_hash`: the source of every engine file. So a
changed parameter recomputes only the runs it changes, an interrupted ``xxpo reproduce`` resumes at the
first unfinished run (mid-run too when the config sets ``checkpoint_every``), and **any edit of the
engine, even a comment, recomputes everything**: the cache never serves numbers that the current code
might not produce. Files that cannot change a number are outside the hash (:data:`NOT_ENGINE`).

**Verdicts** are decided by :func:`decide`; its docstring has the rules as a table. The family's claims
(C1, C2, ...) are registered once, in :data:`CLAIMS`; the book's claims ledger lists them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
from tqdm import tqdm

import xxpo
from xxpo.results import atomic_write_bytes, read_run
from xxpo.presets import PRESETS
from xxpo.train import TrainConfig, train, train_preference
from xxpo.train.sft import default_cache_dir
from xxpo.verdicts import (CLAIMS, VERDICT_MIME, Claim, PaperClaim, Rules, Verdict, bootstrap_ci, decide,
                           publish, verdict_table)

__all__ = ["CLAIMS", "VERDICT_MIME", "Claim", "GridResult", "PaperClaim", "Rules", "Selection", "Verdict",
           "bootstrap_ci", "decide", "engine_hash", "publish", "run_grid", "select_hparams", "verdict_table"]


# --------------------------------------------------------------------------------------------------
# A notebook's parameters
# --------------------------------------------------------------------------------------------------


def _fits(value, like, zero_ok: bool = False) -> bool:
    """Whether ``value`` has the form of a profile's value ``like``: a non-empty list of such values, a dict with
    the same keys, an int >= 1 (>= 0 where the profile's own list holds a 0), a positive finite float, or a
    value of the same type (a non-empty string)."""
    if isinstance(like, dict):
        return isinstance(value, dict) and set(value) == set(like) and all(_fits(value[k], like[k]) for k in like)
    if isinstance(like, list):
        return isinstance(value, list) and len(value) > 0 and all(_fits(v, like[0], 0 in like) for v in value)
    if isinstance(value, bool) or isinstance(like, bool):
        return type(value) is type(like)
    if isinstance(like, int):
        return isinstance(value, int) and value >= (0 if zero_ok or like == 0 else 1)
    if isinstance(like, float):
        return isinstance(value, (int, float)) and 0 < value < math.inf
    return isinstance(value, type(like)) and bool(value)


def profile_with_overrides(profile: dict, overrides: dict | None, *, name: str, own: Sequence[str] = ()) -> dict:
    """A notebook's profile ``profile`` (named ``name``) with its ``profile_overrides`` parameter merged in.

    Every key of ``overrides`` must be a key of the profile, not one of ``own`` (keys the notebook sets with
    a parameter of their own, such as ``seeds`` or ``model``), and its value must have the form of the
    profile's value (:func:`_fits`); otherwise a ``ValueError`` names the key. ``None`` changes nothing.
    """
    if overrides is None:
        return dict(profile)
    if not isinstance(overrides, dict):
        raise ValueError(f"profile_overrides must be a dict {{profile key: value}}, got {overrides!r}")
    for key, value in overrides.items():
        if key in own:
            raise ValueError(f"profile_overrides[{key!r}]: set {key} with its own notebook parameter")
        if key not in profile:
            raise ValueError(f"profile_overrides has an unknown key {key!r}; the keys of profile {name!r} are "
                             f"{sorted(k for k in profile if k not in own)}")
        if not _fits(value, profile[key]):
            raise ValueError(f"profile_overrides[{key!r}] must have the form of the profile's value {profile[key]!r} "
                             f"(positive numbers, non-empty lists), got {value!r}")
    return {**profile, **overrides}


def check_jsonl_task(task: str, model: str, parameter: str = "task") -> None:
    """For a JSONL task, stop a notebook before its first run when it cannot start: the model must be a local
    model directory (a JSONL task has no SFT base model) and the files must parse (a bad line is reported
    now, not in the first run). ``ValueError`` naming ``parameter``; a built-in task passes."""
    from xxpo.tasks import get_task
    from xxpo.tasks.jsonl import is_jsonl_spec

    if not is_jsonl_spec(task):
        return
    if not os.path.isdir(os.path.expanduser(model)):
        raise ValueError(f"{parameter}={task!r} is a JSONL task, which has no SFT base model: model must be a "
                         f"local Hugging Face model directory, got model={model!r}")
    try:
        get_task(task)
    except ValueError as err:
        raise ValueError(f"{parameter}={task!r}: {err}") from None


# --------------------------------------------------------------------------------------------------
# The grid: arms x seeds, cached on disk
# --------------------------------------------------------------------------------------------------

NOT_ENGINE = ("cli.py", "experiments.py", "integrations", "plotting.py", "reproduce.py", "verdicts.py")
"""Files and folders of ``xxpo/`` left out of :func:`engine_hash`: they never change a run's numbers."""


def engine_hash() -> str:
    """sha256 of every ``.py`` file of the package except ``NOT_ENGINE`` (sorted paths + contents)."""
    root = Path(xxpo.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in NOT_ENGINE:
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def run_key(config: TrainConfig) -> tuple[str, dict]:
    """(16-hex key, what it hashes) of one run; see the module docstring."""
    import torch
    import transformers

    from xxpo.models import resolve_device

    material = {"config": config.to_dict(), "xxpo": xxpo.__version__, "engine": engine_hash(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "device": resolve_device(config.device).type}
    material.update(_local_inputs(config))
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16], material


def _local_inputs(config: TrainConfig) -> dict:
    """What the key adds for inputs that live in the user's files, so that editing them recomputes the run:
    a JSONL task's files (their SHA-256) and a local model directory (its file names and sizes, and the
    SHA-256 of its small files: config, tokenizer, chat template; hashing gigabytes of weights per run is
    not worth it, so weights rewritten with the same size are not noticed). Built-in tasks and model
    presets add nothing."""
    from xxpo.tasks.jsonl import file_sha256, is_jsonl_spec, parse_spec

    extra = {}
    if is_jsonl_spec(config.task):
        extra["task_files"] = [file_sha256(p) if os.path.isfile(p) else None for p in parse_spec(config.task) if p]
    model_dir = Path(os.path.expanduser(config.model))
    if model_dir.is_dir():
        files = sorted(p for p in model_dir.rglob("*") if p.is_file())
        extra["model_files"] = {p.relative_to(model_dir).as_posix(): p.stat().st_size if p.stat().st_size > 1 << 20
                                else hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    return extra


@dataclass
class GridResult:
    """The runs of a grid: ``steps`` (one row per arm, seed, step) and ``runs`` (one row per arm, seed)."""

    steps: pd.DataFrame
    runs: pd.DataFrame

    def per_run(self, **aggregations) -> pd.DataFrame:
        """``runs`` plus per-run aggregates of step metrics, pandas' named aggregation:
        ``per_run(clip_frac=("clip_frac", "mean"), last_reward=("reward_mean", "last"))``."""
        if not aggregations:
            return self.runs.copy()
        extra = self.steps.groupby(["arm", "seed"], sort=False).agg(**aggregations).reset_index()
        clash = set(extra.columns) & set(self.runs.columns) - {"arm", "seed"}
        if clash:
            raise ValueError(f"aggregation names {sorted(clash)} are already columns of runs")
        return self.runs.merge(extra, on=["arm", "seed"], how="left", validate="one_to_one")


def _check_arms(arms) -> dict:
    if not isinstance(arms, Mapping) or not arms:
        raise ValueError("arms must be a non-empty dict {label: TrainConfig}")
    for label, config in arms.items():
        if not isinstance(label, str) or not label:
            raise ValueError(f"arm labels must be non-empty strings, got {label!r}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"arms[{label!r}] must be a TrainConfig, got {type(config).__name__}")
    return dict(arms)


def _check_seeds(name: str, seeds) -> list[int]:
    seeds = list(seeds) if isinstance(seeds, (list, tuple, range)) else None
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"{name} must be a non-empty list of distinct non-negative ints")
    return seeds


def _run_row(arm: str, config: TrainConfig, key: str, metrics: pd.DataFrame, summary: dict, cached: bool) -> dict:
    evals = metrics["eval_accuracy"].dropna() if "eval_accuracy" in metrics else pd.Series(dtype=float)
    base, final = summary["base_eval_accuracy"], summary["final_eval_accuracy"]
    best = max([base, *evals.tolist()]) if base is not None else math.nan
    scalars = {k: v for k, v in summary.items()
               if isinstance(v, (int, float, str, bool)) and k not in ("seed", "method", "wall_seconds_this_call")}
    return {"arm": arm, "seed": config.seed, "method": config.method, "model": config.model, **scalars,
            "best_eval_accuracy": best,
            "gain": (final - base) if final is not None and base is not None else math.nan,
            "wall_seconds": summary.get("wall_seconds_this_call"), "from_cache": cached, "key": key}


def run_grid(arms: Mapping[str, TrainConfig], seeds: Sequence[int], *, cache_dir: str | os.PathLike | None = None,
             progress: bool = True) -> GridResult:
    """Train every arm on every seed (the arm's config with ``seed`` replaced), or load it from the cache.

    Preference methods go to :func:`xxpo.train.train_preference`, the others to :func:`xxpo.train.train`.
    One tqdm bar counts all runs. ``runs`` has ``arm, seed, method, model``, the summary's numbers
    (``base_eval_accuracy``, ``final_eval_accuracy``, ``seconds_per_step``, ...), ``best_eval_accuracy``
    (the best evaluation, base included), ``gain`` (final - base), ``wall_seconds`` (of the call that
    finished the run), ``from_cache`` and ``key``. Fresh and cached runs are both read back from disk, so
    they give identical tables.
    """
    arms, seeds = _check_arms(arms), _check_seeds("seeds", seeds)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "runs"
    frames, rows = [], []
    bar = tqdm(total=len(arms) * len(seeds), desc="runs", unit="run", disable=not progress)
    for arm, base_config in arms.items():
        for seed in seeds:
            config = dataclasses.replace(base_config, seed=seed, progress=False)
            key, material = run_key(config)
            run_dir = root / key
            cached = (run_dir / "summary.json").is_file()
            bar.set_postfix_str(f"{arm} seed {seed}" + (" (cached)" if cached else ""))
            if not cached:
                # the registry at call time, so methods registered after import dispatch too
                trainer = train_preference if PRESETS[config.method].is_preference else train
                trainer(config, run_dir, resume=True)
                atomic_write_bytes(run_dir / "key.json", json.dumps(material, indent=2, sort_keys=True).encode())
                (run_dir / "checkpoint.pt").unlink(missing_ok=True)
            metrics, summary = read_run(run_dir)
            frames.append(metrics.assign(arm=arm, seed=seed))
            rows.append(_run_row(arm, config, key, metrics, summary, cached))
            bar.update(1)
    bar.close()
    steps = pd.concat(frames, ignore_index=True)
    steps = steps[["arm", "seed", *[c for c in steps.columns if c not in ("arm", "seed")]]]
    return GridResult(steps, pd.DataFrame(rows))


# --------------------------------------------------------------------------------------------------
# Fair hyper-parameters: one grid, one rule, every arm, on tuning seeds
# --------------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """What ``select_hparams`` chose, and the record of how."""

    chosen: dict[str, dict]
    """Per arm: the grid values chosen, e.g. ``{"GRPO": {"lr": 1e-4}}``."""
    configs: dict[str, TrainConfig]
    """The arms with their chosen values, ready for :func:`run_grid` on the reported seeds."""
    table: pd.DataFrame
    """One row per (arm, grid point): the values, the budget, the score per tuning seed, its mean, chosen."""
    grid: GridResult
    """Every tuning run (arm labels are ``"<arm> [lr=0.0001]"``)."""
    rule: str


def _samples_per_step(config: TrainConfig) -> int:
    """What one step trains on: pairs for offline preference methods (mined once, ``prompts_per_step``
    per step), responses (``prompts_per_step * group_size``) for every other method."""
    if PRESETS[config.method].update == "offline_pairs":
        return config.prompts_per_step
    return config.prompts_per_step * config.group_size


def select_hparams(arms: Mapping[str, TrainConfig], grid: Mapping[str, Sequence], *, tuning_seeds: Sequence[int],
                   reported_seeds: Sequence[int], score: str | Callable[[pd.DataFrame], float] = "final_eval_accuracy",
                   cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Selection:
    """Choose each arm's values from ``grid`` by one rule, on ``tuning_seeds`` only.

    Every arm is run at every grid point (the product of the lists, in the order given) on every tuning
    seed; the point with the highest mean ``score`` over the tuning seeds wins. ``score`` is a column of
    the per-run table (default: held-out accuracy at the last evaluation) or a function of one grid
    point's per-run rows returning a number; higher is better. Ties (equal to 1e-12) go to the point
    listed first, so list the conservative value first (e.g. the smallest learning rate).
    ``tuning_seeds`` and ``reported_seeds`` must be disjoint: choosing on the seeds that are then
    reported would let the choice fit their noise.
    """
    arms = _check_arms(arms)
    tuning, reported = _check_seeds("tuning_seeds", tuning_seeds), _check_seeds("reported_seeds", reported_seeds)
    overlap = sorted(set(tuning) & set(reported))
    if overlap:
        raise ValueError(f"tuning_seeds and reported_seeds must be disjoint; both contain {overlap}")
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed", "method"}
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError("grid must be a non-empty dict {TrainConfig field: [values]}")
    for name, values in grid.items():
        if name not in names:
            raise ValueError(f"grid key {name!r} is not a TrainConfig field one may vary")
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"grid[{name!r}] must be a non-empty list of values")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    labels = {}
    for arm, config in arms.items():
        for i, point in enumerate(points):
            label = f"{arm} [" + ", ".join(f"{k}={v!r}" for k, v in point.items()) + "]"
            labels[label] = (arm, i, dataclasses.replace(config, **point))
    result = run_grid({label: cfg for label, (_, _, cfg) in labels.items()}, tuning, cache_dir=cache_dir,
                      progress=progress)
    if isinstance(score, str) and score not in result.runs.columns:
        raise ValueError(f"score {score!r} is not a column of the runs table: {list(result.runs.columns)}")
    rows = []
    for label, (arm, i, config) in labels.items():
        part = result.runs[result.runs["arm"] == label]
        per_seed = part.set_index("seed")[score] if isinstance(score, str) else None
        value = float(per_seed.mean()) if per_seed is not None else float(score(part))
        row = {"arm": arm, **points[i], "steps": config.steps, "samples_per_step": _samples_per_step(config)}
        if per_seed is not None:
            row.update({f"seed {s}": float(per_seed[s]) for s in tuning})
        rows.append({**row, "score": value, "point": i})
    table = pd.DataFrame(rows)
    if table["score"].isna().any():
        raise ValueError(f"score is undefined (NaN) for {table.loc[table['score'].isna(), 'arm'].tolist()}")
    chosen, configs = {}, {}
    for arm in arms:
        part = table[table["arm"] == arm]
        best = part["score"].round(12).max()
        i = int(part.loc[part["score"].round(12) == best, "point"].min())  # first listed among ties
        chosen[arm] = dict(points[i])
        configs[arm] = dataclasses.replace(arms[arm], **points[i])
    table["chosen"] = [chosen[a] == points[i] for a, i in zip(table["arm"], table["point"])]
    rule = (f"highest mean {score if isinstance(score, str) else getattr(score, '__name__', 'score')} over tuning "
            f"seeds {tuning}; ties go to the first listed grid point")
    return Selection(chosen, configs, table.drop(columns="point"), result, rule)
