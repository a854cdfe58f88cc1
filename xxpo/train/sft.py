"""Supervised fine-tuning: the base model every RL experiment starts from.

RL post-training needs a policy that already answers in the right format and is sometimes right:
with zero accuracy every group of G samples gets the same reward and GRPO's advantages are all zero.
:func:`sft_train` teaches a freshly initialised tiny model the task's answer format by maximizing the
log-likelihood of reference responses (prompt + ``task.sft_target`` + EOS, loss on response tokens
only). :func:`base_model` stops it early on purpose, at a partial held-out accuracy, to leave RL room
to improve, and caches the result on disk so every notebook and seed starts from the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from xxpo.functional.checks import check_number
from xxpo.models import MODEL_PRESETS, ModelConfig, build_model, load_model, resolve_device, save_model
from xxpo.rollout import token_logprobs
from xxpo.tasks import get_task
from xxpo.tasks.tokenizer import encode_prompts, make_tokenizer
from xxpo.train.evaluate import evaluate, score_examples

SFT_CODE_VERSION = 3
"""Bump when the SFT recipe changes in a way that changes the weights; it is part of the cache key."""

# Defaults, in one visible block.
SFT_BATCH_SIZE = 64
SFT_LR = 3e-3
SFT_WARMUP_STEPS = 200
"""Linear warmup steps. With 50, the tiny model stays at ~1 % on add3 after 2000 steps; with 200 it passes
50 % by step ~800 (seeds 0 and 1)."""
SFT_WEIGHT_DECAY = 0.0
SFT_GRAD_CLIP = 1.0
SFT_TARGET_ACCURACY = 0.3
""":func:`base_model` stops SFT at the first check where greedy accuracy on the validation slice reaches this:
RL needs a policy that is sometimes right (GRPO's group advantages vanish at 0 %) and room to improve."""
SFT_EVAL_EVERY = 50
"""Steps between two validation checks."""
SFT_VAL_N = 256
"""Size of the validation slice: the last examples of the train split, never trained on when stopping early."""
DEFAULT_SFT_STEPS: dict[str, int] = {
    # task: cap   measured with "tiny", seed 0, 1 thread: steps taken -> test accuracy, CPU seconds
    "add2": 1000,  # 350 -> 29 %, 9 s
    "sub2": 1500,  # 400 -> 40 %, 10 s
    "mul1": 1500,  # 600 -> 34 %, 16 s
    "add3": 2000,  # 600 -> 28 %, 19 s
    "mul2": 2400,  # 2400 (target not reached) -> 27 %, 51 s
    "add2_scratch": 2000,  # 1000 -> 37 %, 37 s
}
"""Per task: the most SFT steps :func:`base_model` takes; it usually stops earlier, at the target accuracy.
The caps also set the cosine schedule's length."""
SFT_STEPS_FALLBACK = 2000
"""Step cap for a task missing from :data:`DEFAULT_SFT_STEPS`."""


@dataclass
class SFTLog:
    """What :func:`sft_train` did."""

    losses: list[float] = field(default_factory=list)
    """Training loss of every step taken (its length is the number of steps)."""
    val_accuracy: list[tuple[int, float]] = field(default_factory=list)
    """``(steps done, greedy validation accuracy)`` at every check (empty without a target accuracy)."""


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def sft_batch(tokenizer, task, examples, rng: random.Random) -> tuple[torch.Tensor, ...]:
    """Tensors for one SFT step: LEFT-padded prompts ``(B, P)`` and RIGHT-padded targets + EOS ``(B, T)``.

    Returns ``prompt_ids, prompt_mask, response_ids, response_mask``, the layout :func:`sample` produces,
    so the loss is computed by the same forward (:func:`xxpo.rollout.token_logprobs`) as RL's.
    """
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [ex.prompt for ex in examples])  # (B, P), (B, P)
    targets = [task.sft_target(ex, rng) for ex in examples]
    encoded = tokenizer(targets, add_special_tokens=False)["input_ids"]
    rows = [ids + [tokenizer.eos_token_id] for ids in encoded]
    t = max(len(r) for r in rows)
    response_ids = torch.tensor([r + [tokenizer.pad_token_id] * (t - len(r)) for r in rows])  # (B, T)
    response_mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])  # (B, T)
    return prompt_ids, prompt_mask, response_ids, response_mask


def sft_loss(model, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens (targets and EOS); prompts are context only."""
    mask = response_mask.float()  # (B, T)
    logp = token_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)  # (B, T)
    return -(logp * mask).sum() / mask.sum()


def sft_train(
    model: torch.nn.Module,
    tokenizer,
    task,
    *,
    steps: int,
    batch_size: int = SFT_BATCH_SIZE,
    lr: float = SFT_LR,
    seed: int = 0,
    warmup_steps: int = SFT_WARMUP_STEPS,
    weight_decay: float = SFT_WEIGHT_DECAY,
    grad_clip: float = SFT_GRAD_CLIP,
    target_accuracy: float | None = None,
    eval_every: int = SFT_EVAL_EVERY,
    val_n: int = SFT_VAL_N,
) -> SFTLog:
    """Train ``model`` in place on ``task``'s train split for at most ``steps`` steps.

    Loss: :func:`sft_loss`. AdamW with a linear warmup over ``warmup_steps`` then cosine decay to 0 at
    ``steps`` (the decay matters: at a constant 3e-3 the tiny model never learns 3-digit carries),
    gradient-norm clipping.
    With ``target_accuracy``, the last ``val_n`` train examples are held out as a validation slice and
    training stops at the first check (every ``eval_every`` steps) where their greedy accuracy reaches
    the target. Batches (examples drawn without replacement within a batch) and targets come from
    ``random.Random(seed)``, so the same model, task and seed give bit-identical weights.
    """
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("eval_every", eval_every, 1)
    _check_int("val_n", val_n, 1)
    check_number("lr", lr, low=0.0, low_inclusive=False)
    check_number("weight_decay", weight_decay, low=0.0)
    check_number("grad_clip", grad_clip, low=0.0, low_inclusive=False)
    check_number("target_accuracy", target_accuracy, low=0.0, high=1.0, allow_none=True)
    train = task.split("train")
    val = []
    if target_accuracy is not None:
        if val_n >= len(train):
            raise ValueError(f"val_n must be < the {len(train)} training examples, got {val_n}")
        train, val = train[:-val_n], train[-val_n:]
    if batch_size > len(train):
        raise ValueError(f"batch_size must be <= the {len(train)} training examples, got {batch_size}")

    rng = random.Random(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    log = SFTLog()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, warmup_steps)
        batch = [t.to(device) for t in sft_batch(tokenizer, task, rng.sample(train, batch_size), rng)]
        loss = sft_loss(model, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        log.losses.append(loss.item())
        if val and (step + 1) % eval_every == 0:
            accuracy = score_examples(model, tokenizer, task, val)["accuracy"]
            log.val_accuracy.append((step + 1, accuracy))
            if accuracy >= target_accuracy:
                break
    model.eval()
    return log


# --------------------------------------------------------------------------------------------------
# The cached base model
# --------------------------------------------------------------------------------------------------


@dataclass
class BaseModel:
    """An SFT'd policy ready for RL: the model (eval mode), its tokenizer, and a record of how it was made.

    ``info`` keys: ``task``, ``model_config``, ``sft`` (hyper-parameters), ``seed``, ``sft_code_version``,
    ``config_hash``, ``eval`` (the :func:`evaluate` dict), ``eval_accuracy``, ``sft_seconds``,
    ``sft_steps_taken``, ``val_accuracy`` (the :class:`SFTLog` curve), ``final_loss``, ``created_at``
    (Unix time), ``versions`` (torch, transformers), ``path``, and ``from_cache`` (False when this call
    trained it).
    """

    model: torch.nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)


def default_cache_dir() -> Path:
    """``$XXPO_CACHE`` if set, else ``~/.cache/xxpo``."""
    return Path(os.environ.get("XXPO_CACHE") or Path.home() / ".cache" / "xxpo")


def config_hash(key: dict) -> str:
    """A short stable hash of a JSON-serialisable dict (sorted keys)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def base_model(
    task_name: str,
    model: str | ModelConfig = "tiny",
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    sft_steps: int | None = None,
    batch_size: int = SFT_BATCH_SIZE,
    lr: float = SFT_LR,
    target_accuracy: float | None = SFT_TARGET_ACCURACY,
    eval_n: int | None = None,
) -> BaseModel:
    """The SFT'd starting policy for ``task_name``: trained and saved on first use, loaded afterwards.

    ``model`` is a :data:`xxpo.models.MODEL_PRESETS` name or a :class:`ModelConfig`. Training stops
    when the validation accuracy reaches ``target_accuracy`` (``None``: never) or after ``sft_steps``
    steps (default: :data:`DEFAULT_SFT_STEPS` for the task), see :func:`sft_train`.
    ``info["eval_accuracy"]`` is the greedy accuracy on the test split (a fixed subset of ``eval_n``
    examples if given). The weights live in
    ``cache_dir/<config_hash>/`` (Hugging Face format plus ``info.json``); the hash covers the task,
    model config, SFT hyper-parameters, seed, tokenizer vocabulary and :data:`SFT_CODE_VERSION`.
    The directory is written under a temporary name and renamed when complete, so an interrupted
    run never leaves a half-written model that a later call would load.
    """
    if isinstance(model, str):
        if model not in MODEL_PRESETS:
            raise ValueError(f"model must be a ModelConfig or one of {sorted(MODEL_PRESETS)}, got {model!r}")
        cfg = MODEL_PRESETS[model]
    elif isinstance(model, ModelConfig):
        cfg = model
    else:
        raise TypeError(f"model must be a str or ModelConfig, got {type(model).__name__}")
    _check_int("seed", seed, 0)
    if eval_n is not None:
        _check_int("eval_n", eval_n, 1)
    task = get_task(task_name)
    steps = DEFAULT_SFT_STEPS.get(task_name, SFT_STEPS_FALLBACK) if sft_steps is None else sft_steps
    _check_int("sft_steps", steps, 1)
    tokenizer = make_tokenizer()
    sft = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": SFT_WARMUP_STEPS,
        "weight_decay": SFT_WEIGHT_DECAY,
        "grad_clip": SFT_GRAD_CLIP,
        "target_accuracy": target_accuracy,
        "eval_every": SFT_EVAL_EVERY,
        "val_n": SFT_VAL_N,
    }
    key = {
        "task": task_name,
        "model_config": cfg.to_dict(),
        "sft": sft,
        "seed": seed,
        "vocab": tokenizer.get_vocab(),
        "eval_n": eval_n,
        "sft_code_version": SFT_CODE_VERSION,
    }
    digest = config_hash(key)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / digest

    if (path / "info.json").is_file():
        loaded, tokenizer = load_model(path, device=device)
        info = json.loads((path / "info.json").read_text())
        return BaseModel(loaded, tokenizer, {**info, "path": str(path), "from_cache": True})

    net = build_model(cfg, tokenizer, seed).to(resolve_device(device))
    start = time.perf_counter()
    log = sft_train(net, tokenizer, task, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                    target_accuracy=target_accuracy)
    sft_seconds = time.perf_counter() - start
    scores = evaluate(net, tokenizer, task, n=eval_n)
    info = {
        "task": task_name,
        "model_config": cfg.to_dict(),
        "sft": sft,
        "seed": seed,
        "sft_code_version": SFT_CODE_VERSION,
        "config_hash": digest,
        "eval": scores,
        "eval_accuracy": scores["accuracy"],
        "sft_seconds": sft_seconds,
        "sft_steps_taken": len(log.losses),
        "val_accuracy": log.val_accuracy,
        "final_loss": log.losses[-1],
        "created_at": time.time(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    text = json.dumps(info, indent=2, sort_keys=True)
    info = json.loads(text)  # the same types a later load returns (tuples become lists)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
    try:
        save_model(net, tokenizer, tmp)
        (tmp / "info.json").write_text(text)
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "info.json").is_file():  # not a lost race with another process: a real failure
            raise
    return BaseModel(net, tokenizer, {**info, "path": str(path), "from_cache": False})
