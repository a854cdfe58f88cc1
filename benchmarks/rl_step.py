"""Throughput of one GRPO step: xxpo's ``Trainer.step`` against TRL's ``GRPOTrainer``, side by side.

Both sides start from the same weights (xxpo's cached SFT base model for the default task, or a freshly
built "tiny" model), sample the same number of prompts per step from the task's train split, draw G
responses per prompt at temperature 1.0 with the same generation budget, score them with the task's
verifier, and take one AdamW step on the clipped GRPO loss (beta = 0, one update per generation), on CPU.
The steps interleave: TRL's training loop runs, and after each of its optimizer steps a callback runs one
xxpo step, so both see the same machine noise. TRL's step time is the wall time between the end of one
xxpo step and the start of the next one, so it covers all of TRL's loop (data loading, generation,
scoring, the update, its bookkeeping).

Run (offline; see benchmarks/README.md for the measured numbers):

    HF_HUB_OFFLINE=1 XXPO_CACHE=/tmp/xxpo_bench_cache python benchmarks/rl_step.py

The last line printed is ``xxpo/trl completions-per-second ratio: X.XX`` (median over median).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing is downloaded

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from xxpo.models import MODEL_PRESETS, build_model, save_model  # noqa: E402
from xxpo.tasks import DEFAULT_TASK, TASKS, Example, get_task, make_tokenizer  # noqa: E402
from xxpo.train.config import TrainConfig  # noqa: E402
from xxpo.train.loop import Trainer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="Measured steps per framework")
    p.add_argument("--warmup", type=int, default=3, help="Unmeasured steps per framework before the measured ones")
    p.add_argument("--group-size", type=int, default=8, help="G, responses per prompt (TRL's num_generations)")
    p.add_argument("--prompts", type=int, default=16, help="Prompts per step")
    p.add_argument("--task", default=DEFAULT_TASK, choices=TASKS, help="xxpo task (prompts and verifier)")
    p.add_argument("--init", default=None, choices=("sft", "scratch"),
                   help="'sft': xxpo's cached SFT base model of the task (trained on first use); 'scratch': a freshly "
                        "built model. Default: sft, or scratch with --quick")
    p.add_argument("--model", default="tiny", choices=sorted(MODEL_PRESETS), help="Model preset")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant) on both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for both sides; 0 keeps torch's default (see benchmarks/README.md)")
    p.add_argument("--trl-checkpointing", action="store_true",
                   help="Keep TRL's default activation checkpointing (recomputes the forward during backward; off by "
                        "default here because xxpo does not do it and memory is no concern for these models)")
    p.add_argument("--quick", action="store_true",
                   help="Smoke test: 2 warm-up + 3 measured steps of 4 prompts x G=4 from a scratch model (no SFT)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.prompts, args.group_size = 3, 2, 4, 4
    if args.init is None:
        args.init = "scratch" if args.quick else "sft"
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    for name in ("steps", "prompts", "group_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group_size < 2:
        raise ValueError(f"--group-size must be >= 2 for GRPO, got {args.group_size}")
    if args.warmup < 1:
        raise ValueError(f"--warmup must be >= 1 (the first step of each side pays one-off costs), got {args.warmup}")
    return args


# --------------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------------


def make_xxpo(args, workdir: str) -> Trainer:
    """xxpo's GRPO trainer: the paper's clipped loss, group z-score advantages, no KL term, one AdamW step."""
    model = args.model
    if args.init == "scratch":  # a local directory: the Trainer loads it instead of the cached SFT model
        model = os.path.join(workdir, "scratch_model")
        tokenizer = make_tokenizer()
        save_model(build_model(MODEL_PRESETS[args.model], tokenizer, seed=args.seed), tokenizer, model)
    config = TrainConfig(
        method="grpo", task=args.task, model=model, seed=args.seed, device="cpu",
        steps=args.warmup + args.steps, prompts_per_step=args.prompts, group_size=args.group_size,
        temperature=1.0, top_p=1.0, epochs=1, minibatches=1, lr=args.lr, weight_decay=0.0, grad_clip=1.0,
        clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, adv_norm="group", loss_agg_mode="seq-mean-token-mean",
        progress=False,
    )
    return Trainer(config)


def make_trl(args, policy, tokenizer, task, max_new_tokens: int, workdir: str, callback) -> GRPOTrainer:
    """TRL's GRPOTrainer set to the same objective, batch and optimizer as :func:`make_xxpo`."""
    train = task.split("train")
    dataset = Dataset.from_dict({"prompt": [ex.prompt for ex in train], "answer": [ex.answer for ex in train]})

    def verifier(prompts, completions, answer, **kwargs) -> list[float]:
        return [task.reward(Example(p, a), c) for p, c, a in zip(prompts, completions, answer)]

    config = GRPOConfig(
        output_dir=os.path.join(workdir, "trl"),
        per_device_train_batch_size=args.prompts * args.group_size,  # one generation batch = one optimizer step
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=args.warmup + args.steps,
        use_cpu=True, bf16=False, fp16=False, activation_checkpointing=args.trl_checkpointing,
        report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, seed=args.seed,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=verifier, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary would bury the table
    return trainer


class Interleave(TrainerCallback):
    """Runs one xxpo step after every TRL optimizer step and times both.

    TRL's time for step k is the wall time from the end of xxpo's step k-1 (or the start of training)
    to the end of TRL's step k; xxpo's is the duration of ``Trainer.step``.
    """

    def __init__(self, xxpo: Trainer):
        self.xxpo = xxpo
        self.trl = None  # the GRPOTrainer, set once it exists; its mean completion length is read every step
        self.trl_seconds: list[float] = []
        self.trl_lengths: list[float] = []
        self.xxpo_rows: list[dict] = []
        self.mark = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        start = time.perf_counter()
        self.trl_seconds.append(start - self.mark)
        self.trl_lengths.append(self.trl._metrics["train"]["completions/mean_length"][-1])  # EOS included
        row = self.xxpo.step(len(self.xxpo_rows))
        row["time_step"] = time.perf_counter() - start
        self.xxpo_rows.append(row)
        self.mark = time.perf_counter()


class Stopwatch:
    """Accumulates the wall time of calls to one bound method (attached to the instance, so only it is timed)."""

    def __init__(self, owner, name: str):
        self.seconds: list[float] = []
        inner = getattr(owner, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds.append(time.perf_counter() - t0)

        setattr(owner, name, timed)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="xxpo_rl_bench_") as workdir:
        xxpo = make_xxpo(args, workdir)
        policy = copy.deepcopy(xxpo.policy)  # the identical starting weights, trained separately by TRL
        callback = Interleave(xxpo)
        trl = make_trl(args, policy, xxpo.tokenizer, xxpo.task, xxpo.max_new_tokens, workdir, callback)
        callback.trl = trl
        generate = Stopwatch(trl.model, "generate")
        score = Stopwatch(trl, "_generate_and_score_completions")
        trl.train()

    n = args.prompts * args.group_size
    w = args.warmup
    trl_s, rows = callback.trl_seconds[w:], callback.xxpo_rows[w:]
    xxpo_s = [r["time_step"] for r in rows]
    trl_rate, xxpo_rate = median([n / s for s in trl_s]), median([n / s for s in xxpo_s])
    trl_len = median(callback.trl_lengths[w:])
    xxpo_len = median([r["response_length"] for r in rows])

    print(f"task {args.task}, model {args.model} ({args.init}), {args.prompts} prompts x G={args.group_size} = {n} "
          f"completions per step, max {xxpo.max_new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"{args.steps} measured steps after {w} warm-up (medians)")
    print(f"  {'':6} {'s/step':>8} {'compl/s':>9} {'mean len':>9}   breakdown (s)")
    print(f"  {'TRL':6} {median(trl_s):8.4f} {trl_rate:9.1f} {trl_len:9.2f}   "
          f"generate {median(generate.seconds[w:]):.4f}, rest of generate-and-score "
          f"{median([a - b for a, b in zip(score.seconds[w:], generate.seconds[w:])]):.4f}, "
          f"update and loop {median([t - s for t, s in zip(trl_s, score.seconds[w:])]):.4f}")
    ref_s = [r["time_reference"] for r in rows]  # 0 except on evaluation steps (kl_coef = 0)
    rest = [r["time_step"] - r["time_rollout"] - r["time_update"] - r["time_prox"] - r["time_reference"] for r in rows]
    print(f"  {'xxpo':6} {median(xxpo_s):8.4f} {xxpo_rate:9.1f} {xxpo_len:9.2f}   "
          f"rollout {median([r['time_rollout'] for r in rows]):.4f}, reference forward {median(ref_s):.4f}, "
          f"update {median([r['time_update'] for r in rows]):.4f}, rest {median(rest):.4f}")
    paired = median([t / x for t, x in zip(trl_s, xxpo_s)])  # per adjacent pair of steps: cancels slow drift
    print(f"  median over step pairs of TRL time / xxpo time: {paired:.2f}")
    ratio = xxpo_rate / trl_rate
    print(f"xxpo/trl completions-per-second ratio: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
