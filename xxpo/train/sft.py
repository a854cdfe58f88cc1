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
from xxpo.train.evaluate import evaluate

SFT_CODE_VERSION = 1
"""Bump when the SFT recipe changes in a way that changes the weights; it is part of the cache key."""

# Defaults, in one visible block. Steps are chosen per task so the "tiny" model stops at a partial
# held-out accuracy (roughly 20-60 %) in under a minute on 2 CPU cores; see benchmarks/README.md.
SFT_BATCH_SIZE = 64
SFT_LR = 3e-3
SFT_WARMUP_FRACTION = 0.1
SFT_WEIGHT_DECAY = 0.0
SFT_GRAD_CLIP = 1.0
DEFAULT_SFT_STEPS: dict[str, int] = {}
SFT_STEPS_FALLBACK = 300
"""Steps for a task missing from :data:`DEFAULT_SFT_STEPS`."""


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
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
    warmup_fraction: float = SFT_WARMUP_FRACTION,
    weight_decay: float = SFT_WEIGHT_DECAY,
    grad_clip: float = SFT_GRAD_CLIP,
) -> list[float]:
    """Train ``model`` in place on ``task``'s train split; returns the loss of every step.

    Loss: :func:`sft_loss`. AdamW, linear warmup then cosine decay, gradient-norm clipping.
    Batches (examples drawn without replacement within a batch) and targets come from
    ``random.Random(seed)``, so the same model, task and seed give bit-identical weights.
    """
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    check_number("lr", lr, low=0.0, low_inclusive=False)
    check_number("warmup_fraction", warmup_fraction, low=0.0, high=1.0, high_inclusive=False)
    check_number("weight_decay", weight_decay, low=0.0)
    check_number("grad_clip", grad_clip, low=0.0, low_inclusive=False)
    train = task.split("train")
    if batch_size > len(train):
        raise ValueError(f"batch_size must be <= the {len(train)} training examples, got {batch_size}")

    rng = random.Random(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = int(warmup_fraction * steps)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, warmup)
        batch = [t.to(device) for t in sft_batch(tokenizer, task, rng.sample(train, batch_size), rng)]
        loss = sft_loss(model, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------
# The cached base model
# --------------------------------------------------------------------------------------------------


@dataclass
class BaseModel:
    """An SFT'd policy ready for RL: the model (eval mode), its tokenizer, and a record of how it was made.

    ``info`` keys: ``task``, ``model_config``, ``sft`` (hyper-parameters), ``seed``, ``sft_code_version``,
    ``config_hash``, ``eval`` (the :func:`evaluate` dict), ``eval_accuracy``, ``sft_seconds``,
    ``final_loss``, ``created_at`` (Unix time), ``versions`` (torch, transformers), ``path``, and
    ``from_cache`` (False when this call trained it).
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
    eval_n: int | None = None,
) -> BaseModel:
    """The SFT'd starting policy for ``task_name``: trained and saved on first use, loaded afterwards.

    ``model`` is a :data:`xxpo.models.MODEL_PRESETS` name or a :class:`ModelConfig`. ``sft_steps``
    defaults to :data:`DEFAULT_SFT_STEPS` for the task. ``info["eval_accuracy"]`` is the greedy accuracy
    on the test split (a fixed subset of ``eval_n`` examples if given). The weights live in
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
        "warmup_fraction": SFT_WARMUP_FRACTION,
        "weight_decay": SFT_WEIGHT_DECAY,
        "grad_clip": SFT_GRAD_CLIP,
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
    losses = sft_train(net, tokenizer, task, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
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
        "final_loss": losses[-1],
        "created_at": time.time(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
    try:
        save_model(net, tokenizer, tmp)
        (tmp / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "info.json").is_file():  # not a lost race with another process: a real failure
            raise
    return BaseModel(net, tokenizer, {**info, "path": str(path), "from_cache": False})
