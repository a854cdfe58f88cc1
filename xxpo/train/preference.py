"""Preference optimization: offline DPO / IPO, and iterated self-play SPPO.

DPO (arXiv 2305.18290) and IPO (arXiv 2310.12036) learn from a fixed set of pairs against a frozen
reference; self-play SPPO (arXiv 2405.00675) samples from the previous iterate pi_t, asks a preference
oracle how often each sample beats pi_t, and regresses log(pi / pi_t) onto that win rate.

    dpo / ipo:
        pairs = mine(base model samples, verifier)            (chosen correct, rejected incorrect)
        ref   = log pi_base(y | x) of every pair, once        (the frozen reference)
        for step in range(steps):
            batch = the next prompts_per_step pairs
            loss  = dpo_loss(log pi(y_w), log pi(y_l), ref)   (sums of token log-probs)
            step the optimizer

    sppo_selfplay:
        for t in range(iterations):
            pi_t = frozen copy of the policy
            for each of its share of the steps:
                y_1..y_K ~ pi_t(. | x)                        (K = group_size, for prompts_per_step prompts)
                P_k  = mean_j P(y_k > y_j | x)                (the preference oracle)
                loss = sppo_selfplay_loss(log pi(y_k), log pi_t(y_k), P_k; eta)
                step the optimizer

Choices made here (each is also a deviation to report in the book):

1. DPO's pairs are the base model's OWN samples, labelled by the verifier: ``group_size`` samples per
   training prompt at ``temperature``; chosen is one correct sample and rejected one incorrect sample
   (:func:`xxpo.tasks.preference_pairs`); prompts without both are skipped. This is the paper's recipe
   (pairs drawn from pi_SFT = pi_ref, Sec. 4) and current practice (on-policy pairs scored by a judge);
   the task's synthetic near misses would be off-policy negatives the model never produces. Prompts are
   mined in a seeded random order until there are ``steps * prompts_per_step / epochs`` pairs or the
   training split runs out; training then makes ``epochs`` passes over them, reshuffled every pass
   (``epochs`` counts passes over the offline dataset here, not over a rollout batch).
2. Sequence log-probs are SUMS of token log-probs (the papers' log pi(y|x)), also for IPO; TRL instead
   length-averages for IPO. A response is its text plus EOS, as in SFT.
3. SPPO applies the loss to ALL K samples of each prompt (the paper's Algorithm 1). The authors' code
   keeps only the best and the worst sample of each prompt. The win rate of sample k averages the oracle
   over all K samples of its prompt, itself included (P(y > y) = 1/2), as the authors' ``compute_prob.py``
   does; then the K win rates of a prompt average exactly 1/2, so the targets are centred.
4. ``steps`` is the total number of SPPO optimizer steps; iteration t runs steps t*S//I .. (t+1)*S//I - 1.
   Samples are drawn from pi_t step by step instead of as one dataset per iteration: pi_t is frozen
   within the iteration, so the distribution is the same.
5. One optimizer step per training step (``minibatches`` is for the RL loop only; so is ``epochs`` for SPPO).

Scale (a deviation to state wherever results are shown). The papers' beta = 0.1 (DPO) and eta = 1000
(SPPO, eta = 1/beta) suit responses of hundreds of tokens, whose log-ratios reach tens of nats. The
suite's answers are 2-5 tokens, where a log-ratio of a nat or two already changes the greedy answer.
The learning check (``xxpo.train.config.LEARNING_CHECK``) therefore uses beta = 1 for DPO (beta * h = O(1)
at h ~ 1 nat), beta = 0.5 for IPO (target margin 1 / (2 beta) = 1 nat) and eta = 2 for SPPO (targets
eta (P - 1/2) within +-1 nat); its results are in benchmarks/README.md. With the papers' values (add2,
tiny model, base 0.295, 30 steps, seeds 0-2, 200 held-out prompts): DPO with beta = 0.1 ended at
0.255-0.305 (its chosen log-probs fall while the rejected ones fall faster) against 0.36-0.45 with
beta = 1; IPO 0.325-0.385 with beta = 0.1; SPPO 0.23-0.245 with eta = 1000 against 0.35-0.36 with eta = 2.
The config defaults stay the papers' values.

Measured per step: the objective's metrics, ``grad_norm``, and ``kl_ref``, a k1 estimate of
KL(pi || pi_base) per token: one fresh sample per step prompt from the current policy (before the
update), mean over its tokens of log pi - log pi_base, the estimator the RL loop logs. SPPO adds
``kl_iter``, the same against pi_t. Evaluations (start, every ``eval_every`` steps, end): greedy held-out
accuracy as in the RL loop, and ``eval_win_rate``: the mean oracle probability that the policy's greedy
response beats the base model's greedy response to the same held-out prompt (0.5 = a tie).
"""

from __future__ import annotations

import copy
import math
import os
import random
import time

import pandas as pd
import torch

from xxpo.functional import masked_mean, masked_sum
from xxpo.models import resolve_device
from xxpo.presets import PRESETS
from xxpo.rollout import decode_responses, response_logprobs, sample, token_logprobs
from xxpo.tasks import encode_prompts, get_task, preference_pairs, preference_prob
from xxpo.tasks.base import Example, Task
from xxpo.train.config import TrainConfig
from xxpo.train.distributed import data_parallel_requested
from xxpo.train.evaluate import fixed_subset, greedy_decode, score_responses
from xxpo.train.run import Run, RunResult, load_start, sampling_budget

MINING_CHUNK = 256
"""Most prompts sampled per batch while mining DPO pairs from the base model."""
LOGPROB_CHUNK = 512
"""Rows per no-grad forward when scoring the pairs under the reference."""


# --------------------------------------------------------------------------------------------------
# Data: responses as tokens, mined pairs, win rates against the group
# --------------------------------------------------------------------------------------------------


def encode_responses(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Response texts + EOS as RIGHT-padded ``(ids (B, T), mask (B, T))``, the layout :func:`sample` produces."""
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    t = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (t - len(r)) for r in rows])  # (B, T)
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (t - len(r)) for r in rows])  # (B, T)
    return ids, mask


def sequence_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature: float = 1.0):
    """log pi(y | x) = sum of the response's token log-probs, ``(B,)`` (differentiable)."""
    logp = token_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature)  # (B, T)
    return masked_sum(logp, response_mask, dim=-1)  # (B,)


def sampled_pairs(model, tokenizer, task: Task, examples: list[Example], *, num_samples: int, max_new_tokens: int,
                  temperature: float, top_p: float, generator: torch.Generator,
                  rng: random.Random) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` from ``num_samples`` samples of ``model`` per example, labelled by the verifier.

    Examples whose samples are all correct or all incorrect give no pair.
    """
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [ex.prompt for ex in examples])  # (N, P)
    device = next(model.parameters()).device
    rollout = sample(model, prompt_ids.to(device), prompt_mask.to(device), num_samples=num_samples,
                     max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, generator=generator)
    texts = decode_responses(tokenizer, rollout)
    responses = [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(examples))]
    return preference_pairs(task, examples, rng, responses)


def group_win_rates(task: Task, examples: list[Example], texts: list[str], group_size: int) -> torch.Tensor:
    """P(y_k > pi_t | x) estimated as the mean oracle preference of y_k over its group's ``group_size`` samples.

    ``texts`` holds the samples group by group (``len(examples) * group_size``); returns ``(B,)`` float32.
    The mean runs over the whole group, y_k included (it ties with itself, 1/2), as the authors' code does.
    """
    if len(texts) != len(examples) * group_size:
        raise ValueError(f"texts must hold {group_size} samples per example, {len(examples) * group_size} in all, "
                         f"got {len(texts)}")
    rates = []
    for i, example in enumerate(examples):
        group = texts[i * group_size : (i + 1) * group_size]
        rates.extend(sum(preference_prob(task, example, y, other) for other in group) / group_size for y in group)
    return torch.tensor(rates, dtype=torch.float32)  # (B,)


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class PreferenceTrainer(Run):
    """Holds the state of one preference run; ``run()`` executes it. Use :func:`train_preference`."""

    stateful = ("policy", "optimizer")
    postfix_key = "loss"

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike | None = None, callback=None):
        self.preset = PRESETS[config.method]
        if not self.preset.is_preference:
            raise ValueError(f"method {config.method!r} is a policy-gradient method: train it with xxpo.train.train")
        if data_parallel_requested():
            raise ValueError(f"method {config.method!r} is a preference method, which trains in one process; data "
                             "parallelism (--nproc / torchrun) runs the policy-gradient loop only")
        self.self_play = self.preset.update == "self_play"
        if self.self_play and config.steps < config.iterations:
            raise ValueError(f"steps must be >= iterations for {config.method}, got steps={config.steps}, "
                             f"iterations={config.iterations}")
        self.loss_fn, self.loss_kwargs = self.preset.objective_fn, config.objective_kwargs()
        super().__init__(config, out_dir, callback)
        self.device = resolve_device(config.device)
        self.task = get_task(config.task)
        torch.manual_seed(config.seed)
        self.policy, self.base, self.tokenizer, self.base_info = load_start(config, self.device)
        self.max_new_tokens = sampling_budget(config, self.task, self.policy, self.tokenizer, self.base_info)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # sampling generators live on the sampling device (torch.multinomial on CUDA needs a CUDA generator)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(config.seed)
        self.kl_gen = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.prompt_rng = random.Random(config.seed)
        self.generators = (self.sample_gen, self.kl_gen)
        self.train_examples = self.task.split("train")
        self.eval_examples = fixed_subset(self.task, min(config.eval_n, len(self.task.split("test"))))
        with self.precision():  # bf16 autocast for a local model on CUDA, else nothing
            self.base_greedy, _ = greedy_decode(self.base, self.tokenizer, self.eval_examples,
                                                max_new_tokens=self.max_new_tokens)
        self.anchor = None  # SPPO's pi_t
        self.data_info: dict = {}
        if not self.self_play:  # offline pairs, mined once
            with self.precision():
                self.pairs = self.mine_pairs()
            n, shuffle_gen = len(self.pairs["ref_chosen"]), torch.Generator().manual_seed(config.seed)
            passes = math.ceil(config.steps * config.prompts_per_step / n)
            self.order = torch.cat([torch.randperm(n, generator=shuffle_gen) for _ in range(passes)])  # pass by pass

    # -------------------------------------------------------------- data
    def mine_pairs(self) -> dict[str, torch.Tensor]:
        """The offline DPO dataset: pairs from the base model's samples, tokenized and scored by the reference once."""
        c, t0 = self.config, time.perf_counter()
        target = math.ceil(c.steps * c.prompts_per_step / c.epochs)
        order = self.prompt_rng.sample(range(len(self.train_examples)), len(self.train_examples))
        pair_rng = random.Random(c.seed)
        pairs, used = [], 0
        while len(pairs) < target and used < len(order):
            chunk = min(MINING_CHUNK, 2 * (target - len(pairs)))  # about half the prompts give a pair at 30 % accuracy
            examples = [self.train_examples[i] for i in order[used : used + chunk]]
            used += len(examples)
            pairs += sampled_pairs(self.base, self.tokenizer, self.task, examples, num_samples=c.group_size,
                                   max_new_tokens=self.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                   generator=self.sample_gen, rng=pair_rng)
        pairs = pairs[:target]
        if not pairs:
            raise ValueError(f"the base model gave no prompt of task {c.task!r} both a correct and an incorrect sample "
                             f"in {c.group_size} tries (group_size): no DPO pairs")
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [p for p, _, _ in pairs])  # (N, P)
        responses, response_mask = encode_responses(self.tokenizer, [y for _, y, _ in pairs] + [y for _, _, y in pairs])
        n = len(pairs)
        data = {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "chosen_ids": responses[:n], "chosen_mask": response_mask[:n],  # (N, T)
            "rejected_ids": responses[n:], "rejected_mask": response_mask[n:],  # (N, T)
        }
        data = {k: v.to(self.device) for k, v in data.items()}
        with torch.no_grad():
            for side in ("chosen", "rejected"):
                parts = []
                for i in range(0, n, LOGPROB_CHUNK):
                    rows = slice(i, i + LOGPROB_CHUNK)
                    parts.append(sequence_logprobs(self.base, data["prompt_ids"][rows], data["prompt_mask"][rows],
                                                   data[f"{side}_ids"][rows], data[f"{side}_mask"][rows],
                                                   c.temperature))
                data[f"ref_{side}"] = torch.cat(parts)  # (N,)
        self.data_info = {"source": "base model samples, verifier-labelled", "pairs": n, "prompts_sampled": used,
                          "pair_yield": n / used, "seconds": time.perf_counter() - t0}
        return data

    def kl_to(self, prompt_ids, prompt_mask, models: dict[str, torch.nn.Module]) -> dict[str, float]:
        """k1 estimates of KL(policy || m) per token, one fresh policy sample per prompt (before the update)."""
        c = self.config
        rollout = sample(self.policy, prompt_ids, prompt_mask, num_samples=1,
                         max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                         pad_token_id=self.tokenizer.pad_token_id, temperature=c.temperature, top_p=c.top_p,
                         generator=self.kl_gen)
        out = {}
        with torch.no_grad():
            for name, model in models.items():
                other = response_logprobs(model, rollout, c.temperature)  # (B, T)
                out[name] = float(masked_mean(rollout.behav_logp - other, rollout.response_mask))
        return out

    # -------------------------------------------------------------- one step
    def step(self, step: int) -> dict:
        return self.sppo_step(step) if self.self_play else self.dpo_step(step)

    def optimize(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        self.optimizer.step()
        return float(grad_norm)

    def dpo_step(self, step: int) -> dict:
        c, data = self.config, self.pairs
        idx = self.order[step * c.prompts_per_step : (step + 1) * c.prompts_per_step].to(self.device)  # (b,)
        row: dict = {"epoch": step * c.prompts_per_step / len(data["ref_chosen"])}
        t0 = time.perf_counter()
        row["kl_ref"] = self.kl_to(data["prompt_ids"][idx], data["prompt_mask"][idx], {"base": self.base})["base"]
        row["time_kl"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        b = len(idx)
        logp = sequence_logprobs(
            self.policy,
            data["prompt_ids"][idx].repeat(2, 1), data["prompt_mask"][idx].repeat(2, 1),  # (2b, P)
            torch.cat([data["chosen_ids"][idx], data["rejected_ids"][idx]]),  # (2b, T)
            torch.cat([data["chosen_mask"][idx], data["rejected_mask"][idx]]),  # (2b, T)
            c.temperature,
        )  # (2b,): chosen rows, then rejected rows
        out = self.loss_fn(logp[:b], logp[b:], data["ref_chosen"][idx], data["ref_rejected"][idx], **self.loss_kwargs)
        row["grad_norm"] = self.optimize(out.loss)
        row["time_update"] = time.perf_counter() - t0
        row.update(loss=out.loss.item(), logp_chosen=logp[:b].mean().item(), logp_rejected=logp[b:].mean().item(),
                   **{k: float(v) for k, v in out.metrics.items()})
        return row

    def iteration_of(self, step: int) -> int:
        c = self.config
        return max(t for t in range(c.iterations) if t * c.steps // c.iterations <= step)

    def sppo_step(self, step: int) -> dict:
        c = self.config
        iteration = self.iteration_of(step)
        if self.anchor is None or iteration * c.steps // c.iterations == step:
            self.anchor = copy.deepcopy(self.policy).eval().requires_grad_(False)  # pi_t
        row: dict = {"iteration": iteration}
        picks = self.prompt_rng.sample(range(len(self.train_examples)), c.prompts_per_step)
        examples = [self.train_examples[i] for i in picks]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [ex.prompt for ex in examples])  # (n, P)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)

        t0 = time.perf_counter()
        kl = self.kl_to(prompt_ids, prompt_mask, {"ref": self.base, "iter": self.anchor})
        row.update(kl_ref=kl["ref"], kl_iter=kl["iter"], time_kl=time.perf_counter() - t0)

        t0 = time.perf_counter()
        rollout = sample(self.anchor, prompt_ids, prompt_mask, num_samples=c.group_size,
                         max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                         pad_token_id=self.tokenizer.pad_token_id, temperature=c.temperature, top_p=c.top_p,
                         generator=self.sample_gen)
        row["time_rollout"] = time.perf_counter() - t0
        texts = decode_responses(self.tokenizer, rollout)
        win = group_win_rates(self.task, examples, texts, c.group_size).to(self.device)  # (B,)
        groups = [examples[i] for i in rollout.prompt_index.tolist()]
        correct = torch.tensor([self.task.is_correct(ex, y) for ex, y in zip(groups, texts)])  # (B,) bool
        correct = correct.to(self.device)
        row.update(train_accuracy=float(correct.float().mean()), response_length=float(rollout.lengths.float().mean()),
                   win_prob_correct=float(win[correct].mean()) if bool(correct.any()) else math.nan,
                   win_prob_incorrect=float(win[~correct].mean()) if bool((~correct).any()) else math.nan)

        t0 = time.perf_counter()
        ref_seq = masked_sum(rollout.behav_logp, rollout.response_mask, dim=-1)  # (B,) log pi_t(y|x), as sampled
        logp = response_logprobs(self.policy, rollout, c.temperature)  # (B, T)
        logp_seq = masked_sum(logp, rollout.response_mask, dim=-1)  # (B,)
        out = self.loss_fn(logp_seq, ref_seq, win, **self.loss_kwargs)
        row["grad_norm"] = self.optimize(out.loss)
        row["time_update"] = time.perf_counter() - t0
        row.update(loss=out.loss.item(), **{k: float(v) for k, v in out.metrics.items()})
        return row

    # -------------------------------------------------------------- the run
    def evaluate(self) -> dict:
        self.policy.eval()
        try:  # one greedy decode serves both the accuracy and the win rate
            mine, lengths = greedy_decode(self.policy, self.tokenizer, self.eval_examples, max_new_tokens=self.max_new_tokens)
        finally:
            self.policy.train()
        scores = score_responses(self.task, self.eval_examples, mine, lengths)
        wins = [preference_prob(self.task, ex, y, y_base)
                for ex, y, y_base in zip(self.eval_examples, mine, self.base_greedy)]
        return {**scores, "win_rate": sum(wins) / len(wins)}

    def eval_columns(self, scores: dict) -> dict:
        return {"eval_accuracy": scores["accuracy"], "eval_win_rate": scores["win_rate"],
                "eval_length": scores["mean_length"]}

    def extra_state(self) -> dict:
        return {"anchor": self.anchor.state_dict() if self.anchor is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if state["anchor"] is not None:
            self.anchor = copy.deepcopy(self.policy).eval().requires_grad_(False)
            self.anchor.load_state_dict(state["anchor"])

    def summary_extra(self, metrics: pd.DataFrame) -> dict:
        c = self.config
        win = metrics["eval_win_rate"].dropna()
        if self.self_play:
            bounds = [t * c.steps // c.iterations for t in range(c.iterations + 1)]
            batch = {"prompts": c.prompts_per_step, "group_size": c.group_size}
            data = {"iterations": c.iterations, "steps_per_iteration": [b - a for a, b in zip(bounds, bounds[1:])]}
        else:
            batch, data = {"pairs": c.prompts_per_step}, self.data_info
        return {"final_win_rate_vs_base": float(win.iloc[-1]) if len(win) else None,
                "effective_batch": batch, "data": data}


def train_preference(config: TrainConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False,
                     callback=None) -> RunResult:
    """Train a preference method (``dpo``, ``ipo`` or ``sppo_selfplay``) from the base model; the same
    contract as :func:`xxpo.train.train`: with ``out_dir``, write metrics.csv and summary.json (and
    checkpoints when ``config.checkpoint_every``); ``resume=True`` continues from the checkpoint in
    ``out_dir``; ``callback(step, row)`` is called after every step."""
    return PreferenceTrainer(config, out_dir, callback).run(resume=resume)
