"""ONE training loop for every policy-gradient method of xxpo.

    for step in range(steps):
        rollout   = sample G responses for each of P prompts      (from a policy <= eta versions old)
        rewards   = task.reward(prompt, response)                  (verifiable, in [0, 1])
        adv       = group z-score | leave-one-out | GAE | R - V(x) | whitened returns   (the method's estimator)
        [prox]    = recompute pi_prox | A-3PO interpolation        (decoupled PPO / A-3PO only)
        [mismatch] old_logp = trainer's recompute; adv *= mismatch_weights(old_logp, sampler's logp)  (opt-in)
        for epoch in range(mu): for minibatch in split(rollout, minibatches):
            logp  = policy forward on the minibatch
            loss  = objective(logp, old_logp, adv, mask, ...)      (xxpo.objectives)
            step the optimizer (and the critic, if any)
        publish the new weights as version step + 1

Methods differ only in data, their description in ``xxpo.presets``: which objective and which of its
arguments come from the config, which advantage estimator, whether there is a critic, a reference, a
proximal policy, dynamic sampling; the loop never looks at a method's name. TRPO's description replaces
the optimizer step with ``trpo_step``. Everything a step
measures is one row of the metrics DataFrame; what surrounds the step (resume, evaluation cadence,
checkpoints, result files) is :class:`xxpo.train.run.Run`, shared with the preference trainer.

Across N processes (``xxpo train --nproc N`` or torchrun; :mod:`xxpo.train.distributed`) each samples the
groups of its block of the step's prompts and the rollout is gathered; every forward over rollout rows goes
through :meth:`Trainer.rowwise` (this process's rows, gathered), the objective sees the whole minibatch, and
the gradients are summed across processes before the optimizer step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time

import pandas as pd
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from xxpo import objectives
from xxpo.functional import (
    aggregate,
    batch_whiten,
    gae,
    group_advantages,
    leave_one_out_advantages,
    masked_mean,
    masked_sum,
    reinforce_pp_advantages,
    fisher_product_from_hidden,
    kl_from_hidden,
    selective_log_softmax,
    sequence_value_advantages,
    token_rewards_from_outcome,
)
from xxpo.models import PromptValueModel, ValueModel, resolve_device, routing_decisions
from xxpo.rollout import (LaggedPolicy, Rollout, decode_responses, lm_head_of, response_hidden, response_logits,
                          response_logprobs, uses_chunked_logprobs)
from xxpo.tasks import encode_prompts, get_task
from xxpo.presets import PRESETS
from xxpo.train.config import TrainConfig
from xxpo.train.distributed import SAMPLING_SEED_STRIDE, DataParallel
from xxpo.train.evaluate import evaluate, fixed_subset, greedy_decode, score_responses
from xxpo.train.run import Run, RunResult, load_start, sampling_budget


def full_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log softmax over the whole vocabulary at every response position, (B, T, V) (TRPO's exact KL)."""
    logits = response_logits(model, rollout.prompt_ids, rollout.prompt_mask.long(), rollout.response_ids,
                             rollout.response_mask.long())  # (B, T, V)
    return (logits.float() / temperature).log_softmax(-1)


def trpo_from_hidden(model, rollout: Rollout, adv: torch.Tensor, temperature: float, chunk_rows: int | None):
    """TRPO's surrogate, exact KL and Fisher-vector product from hidden states: no ``(B, T, V)`` tensor.

    For a real vocabulary. The old policy is kept as its hidden states on the real response tokens ``(N, H)``
    and a copy of its LM head; the KL over the vocabulary (:func:`xxpo.functional.kl_from_hidden`) and the
    head's share of the Fisher product (:func:`xxpo.functional.fisher_product_from_hidden`) go a chunk of
    rows at a time. The Fisher product ``J^T F J v`` is formed at theta_old, where it equals the Hessian of
    the KL: ``J v`` of the hidden states by the double-backward trick (the gradient of ``(J^T u) . v`` in
    ``u``), the head's ``F J v`` in chunks, then one backward pass of its cotangent. Returns
    ``(surrogate_fn, kl_fn, fisher_vector_product)`` for :func:`xxpo.objectives.trpo_step`; ``adv`` ``(B, T)``.
    """
    m = rollout.response_mask
    real = m.bool()  # (B, T)
    params = [p for p in model.parameters() if p.requires_grad]
    weight, bias = lm_head_of(model)
    head_index = {id(p): i for i, p in enumerate(params)}

    def hidden() -> torch.Tensor:
        states = response_hidden(model, rollout.prompt_ids, rollout.prompt_mask.long(), rollout.response_ids, m.long())
        return states[real]  # (N, H)

    base = hidden()  # (N, H), with its graph: the Fisher matrix's base point theta_old
    old_hidden, old_weight = base.detach(), weight.detach().clone()
    old_bias = None if bias is None else bias.detach().clone()
    with torch.no_grad():
        old_logp = response_logprobs(model, rollout, temperature, chunk_rows=chunk_rows)  # (B, T)
    n_tokens = base.shape[0]

    def surrogate():
        logp = response_logprobs(model, rollout, temperature, chunk_rows=chunk_rows)  # (B, T)
        return aggregate(torch.exp(logp - old_logp) * adv, m, "token-mean")

    def kl():  # evaluated in the line search only
        return kl_from_hidden(old_hidden, old_weight, hidden(), weight, old_bias=old_bias, bias=bias,
                              temperature=temperature).sum() / n_tokens

    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        vs = list(torch.split(v, [p.numel() for p in params]))
        vs = [x.view_as(p) for x, p in zip(vs, params)]
        u = torch.zeros_like(base, requires_grad=True)  # (N, H)
        jt_u = torch.autograd.grad(base, params, grad_outputs=u, create_graph=True, allow_unused=True)
        jv = sum((g * x).sum() for g, x in zip(jt_u, vs) if g is not None)
        d_hidden = torch.autograd.grad(jv, u)[0]  # (N, H) J v
        d_bias = None if bias is None else vs[head_index[id(bias)]]
        g_hidden, g_weight, g_bias = fisher_product_from_hidden(
            base.detach(), weight.detach(), d_hidden, vs[head_index[id(weight)]], bias=None if bias is None else bias.detach(),
            d_bias=d_bias, temperature=temperature)
        grads = torch.autograd.grad(base, params, grad_outputs=g_hidden.to(base.dtype), retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        grads[head_index[id(weight)]] = grads[head_index[id(weight)]] + g_weight
        if g_bias is not None:
            grads[head_index[id(bias)]] = grads[head_index[id(bias)]] + g_bias
        return torch.cat([g.reshape(-1) for g in grads]).detach() / n_tokens

    return surrogate, kl, fisher_vector_product


def routing_change(rollout: Rollout, before: torch.Tensor, after: torch.Tensor) -> float:
    """Fraction of (layer, response token) routing decisions whose top-k expert set changed, before ->
    after, both ``(L, B, P+T, k)`` (:func:`xxpo.models.routing_decisions` on the rollout)."""
    p = rollout.prompt_ids.shape[1]
    changed = (before[:, :, p:].sort(-1).values != after[:, :, p:].sort(-1).values).any(-1)  # (L, B, T)
    mask = rollout.response_mask.bool().unsqueeze(0).expand_as(changed)
    return float(changed[mask].float().mean()) if bool(mask.any()) else 0.0


class Trainer(Run):
    """Holds the state of one run; ``run()`` executes it. Use :func:`train` unless you need the parts.

    Everything method-specific comes from the method's description, ``xxpo.presets.PRESETS[config.method]``:
    its objective and the config fields that become its arguments, its advantage estimator, its critic, how
    the reference enters, its proximal policy and its update rule.
    """

    stateful = ("policy", "optimizer", "critic", "critic_optimizer")

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike | None = None, callback=None):
        self.preset = PRESETS[config.method]
        if self.preset.is_preference:
            raise ValueError(f"method {config.method!r} is a preference method: use xxpo.train.train_preference")
        super().__init__(config, out_dir, callback)
        c = config
        self.dp = DataParallel.from_env(resolve_device(c.device))  # None in one process
        self.device = self.dp.device if self.dp else resolve_device(c.device)
        if self.dp and self.preset.update == "trpo":
            raise ValueError(f"method {c.method!r} updates by conjugate gradient (trpo_step), which runs in one "
                             "process; launch it without --nproc / torchrun")
        if self.dp and c.prompts_per_step < self.dp.size:
            raise ValueError(f"prompts_per_step={c.prompts_per_step} must be at least the number of processes "
                             f"({self.dp.size}): each process samples whole groups")
        self.task = get_task(c.task)
        torch.manual_seed(c.seed)
        with self.dp.rank_zero_first() if self.dp else contextlib.nullcontext():  # rank 0 fills the SFT cache
            self.policy, self.reference, self.tokenizer, self.base_info = load_start(c, self.device)
        self.max_new_tokens = sampling_budget(c, self.task, self.policy, self.tokenizer, self.base_info)
        self.is_moe = "moe" in type(self.policy).__name__.lower()
        if c.routing_replay and not self.is_moe:
            raise ValueError("routing_replay needs a mixture-of-experts model (e.g. model='tiny-moe')")
        self.loss_fn = self.preset.objective_fn
        self.optimizer = None
        if self.preset.update == "gradient":
            self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                               foreach=True)  # one fused pass over all tensors (the CPU default loops)
        critic_class = {"token": ValueModel, "prompt": PromptValueModel}.get(self.preset.critic)
        self.critic = critic_class.from_policy(self.policy, seed=c.seed).to(self.device) if critic_class else None
        self.critic_optimizer = (
            torch.optim.AdamW(self.critic.parameters(), lr=c.critic_lr) if self.critic is not None else None
        )
        if self.dp:  # every rank starts from rank 0's weights
            for module in (self.policy, self.reference, self.critic):
                if module is not None:
                    self.dp.broadcast(module)
        self.prox = c.preset_value("prox")  # None, "recompute" or "loglinear"
        self.kl_coef = c.preset_value("kl_coef", 0.0)
        self.dynamic_sampling = bool(c.preset_value("dynamic_sampling", False))
        self.max_sampling_rounds = c.preset_value("max_sampling_rounds", 10)
        buffer = c.preset_value("overlong_buffer")
        self.overlong_cache = max(1, round(buffer * self.max_new_tokens)) if buffer else None  # DAPO's L_cache
        # on the sampling device (torch.multinomial on CUDA needs a CUDA generator); each rank draws its responses
        # from its own stream, rank 0's being the one-process stream
        seed = c.seed + (self.dp.rank * SAMPLING_SEED_STRIDE if self.dp else 0)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(seed)
        self.shuffle_gen = torch.Generator().manual_seed(c.seed + 1)
        self.lag_gen = torch.Generator().manual_seed(c.seed + 2)
        self.prompt_rng = random.Random(c.seed)
        self.generators = (self.sample_gen, self.shuffle_gen, self.lag_gen)
        self.lagged = LaggedPolicy(self.policy, eta=c.staleness, mode=c.staleness_mode, generator=self.lag_gen)
        self.train_examples = self.task.split("train")
        if c.prompts_per_step > len(self.train_examples):
            raise ValueError(f"prompts_per_step={c.prompts_per_step} is more than the {len(self.train_examples)} "
                             f"training prompts of task {c.task!r}")

    # -------------------------------------------------------------- one step
    def advantages(self, rollout: Rollout, rewards: torch.Tensor):
        """(B,) or (B, T) advantages from the method's estimator, and extra tensors the critic update needs."""
        c, kind = self.config, self.preset.advantage
        kl_coef = self.kl_coef if self.preset.reference == "KL in reward" else 0.0
        kl = None if self.ref_logp is None or not kl_coef else rollout.behav_logp - self.ref_logp  # (B, T), k1
        if kind == "gae":
            with torch.no_grad():
                values = self.critic_forward(rollout)  # (B, P+T)
            p = rollout.prompt_ids.shape[1]
            values = values[:, p - 1 : -1]  # (B, T): V(state before token t)
            token_rewards = token_rewards_from_outcome(rewards, rollout.response_mask, kl, kl_coef)
            adv, returns = gae(token_rewards, values, rollout.response_mask, c.gamma, c.lam)
            return batch_whiten(adv, rollout.response_mask), {"values": values, "returns": returns}
        if kind == "seq_value":
            with torch.no_grad():
                value_logits = self.critic_forward(rollout)  # (B,)
            return sequence_value_advantages(rewards, torch.sigmoid(value_logits)), {}
        if kind == "group":
            return group_advantages(rewards, c.group_size, adv_norm=c.preset_value("adv_norm", "group"), eps=c.adv_eps), {}
        if kind == "leave_one_out":
            if kl is not None:  # the KL penalty of the whole response comes off its reward
                rewards = rewards - kl_coef * masked_sum(kl, rollout.response_mask, dim=-1)  # (B,)
            return leave_one_out_advantages(rewards, c.group_size), {}
        if kind == "reinforce_pp":
            return reinforce_pp_advantages(rewards, rollout.response_mask, kl=kl, kl_coef=kl_coef, gamma=c.gamma), {}
        raise ValueError(f"advantage estimator {kind!r} of method {c.method!r} is not one the RL loop has")

    def objective(self, mb: Rollout, logp, adv, extra, step: int):
        """The method's loss on one minibatch: its ``inputs`` positionally, its ``objective_args`` by keyword."""
        # old_logp: the sampler's log-probs (as recorded), or the trainer's recompute under a mismatch correction
        old_logp = extra.get("trainer_old_logp", mb.behav_logp)  # (b, T)
        tensors = {"logp": logp, "old_logp": old_logp, "advantages": adv, "mask": mb.response_mask}
        metrics = {}
        if self.prox == "loglinear":
            t0 = time.perf_counter()
            staleness = (step - mb.version).clamp(min=0)  # (B, T) policy versions behind the learner
            tensors["prox_logp"] = objectives.a3po_prox_logp(mb.behav_logp, logp, staleness)  # no forward pass
            self.prox_seconds += time.perf_counter() - t0
            if "prox_recomputed" in extra:  # how far the interpolation is from the recomputed pi_prox
                err = (tensors["prox_logp"] - extra["prox_recomputed"]).abs()  # (B, T)
                metrics["prox_abs_err"] = float(masked_mean(err, mb.response_mask))
        elif self.prox == "recompute":
            tensors["prox_logp"] = extra["prox_logp"]
        kwargs = self.config.objective_kwargs({"ref_logp": extra.get("ref_logp"), "norm_len": self.max_new_tokens})
        out = self.loss_fn(*(tensors[name] for name in self.preset.inputs), **kwargs)
        out.metrics.update(metrics)
        return out

    def rowwise(self, forward, rollout: Rollout, routing=None, dim: int = 0):
        """``forward(rows, their routing)`` over the rollout's rows: all of them in one process; under data
        parallelism this rank's block, gathered to every rank along ``dim`` (differentiably;
        :class:`xxpo.train.distributed.DataParallel`). ``forward`` returns a tensor or a tuple of them."""
        if self.dp is None:
            return forward(rollout, routing)
        rows, n = self.dp.rows(len(rollout)), len(rollout)
        out = forward(rollout.select(rows), None if routing is None else routing[:, rows])
        if isinstance(out, tuple):
            return tuple(self.dp.gather(o, n, dim) for o in out)
        return self.dp.gather(out, n, dim)

    def logprobs(self, model, rollout: Rollout, routing=None, with_entropy: bool = False):
        """``response_logprobs`` of ``model`` on the rollout (row by row across ranks): ``(B, T)`` [and entropy]."""
        c = self.config
        return self.rowwise(lambda r, rt: response_logprobs(model, r, c.temperature, with_entropy=with_entropy, routing=rt,
                                                            chunk_rows=c.logprob_chunk_rows), rollout, routing)

    def critic_forward(self, rollout: Rollout) -> torch.Tensor:
        """The critic on the rollout (row by row across ranks): values ``(B, P+T)`` over prompt + response for a
        token critic, value logits ``(B,)`` from the prompt for a prompt critic."""
        if self.preset.critic == "token":
            return self.rowwise(lambda r, _: self.critic(r.input_ids, r.attention_mask), rollout)
        return self.rowwise(lambda r, _: self.critic(r.prompt_ids, r.prompt_mask), rollout)

    def recompute(self, rollout: Rollout, routing) -> torch.Tensor:
        """log pi of the rollout's responses under the current weights, before the update: ``(B, T)``, no graph."""
        with torch.no_grad():
            return self.logprobs(self.policy, rollout, routing)

    def mismatch(self, rollout: Rollout, adv, extra: dict, routing, row: dict, recomputed=None):
        """Measure the sampler-trainer mismatch and, if ``mismatch_correction`` is on, correct it.

        The trainer recomputes log pi_old of the sampled responses with its weights before the update (those
        that sampled them when ``staleness`` is 0; one extra forward, as Decoupled PPO's proximal recompute) and compares them with the sampler's
        recorded ``behav_logp``. Uncorrected, the objective's old_logp stays the sampler's (GRPO as deployed
        with an inference engine); corrected, old_logp is the trainer's recompute and the advantages are
        multiplied by ``mismatch_weights(trainer old_logp, sampler logp)`` (B, T), constants. Returns the
        advantages the update uses. ``recomputed``: the same forward if the step already ran it for the
        proximal policy (then reused, and ``time_mismatch`` counts no forward).
        """
        c, m = self.config, rollout.response_mask
        t0 = time.perf_counter()
        trainer_old = recomputed if recomputed is not None else self.recompute(rollout, routing)  # (B, T)
        row["time_mismatch"] = time.perf_counter() - t0
        level, _, mode = c.mismatch_correction.partition("_")
        corr = objectives.mismatch_weights(trainer_old, rollout.behav_logp, m, level=level if mode else "token",
                                           mode=mode or "truncate", low=c.mismatch_low, high=c.mismatch_high)
        row["mismatch_abs_logp"] = float(masked_mean((rollout.behav_logp - trainer_old).abs(), m))
        row.update({k: float(v) for k, v in corr.metrics.items()})  # what the correction would do (applied if on)
        if c.mismatch_correction == "none":
            return adv
        extra["trainer_old_logp"] = trainer_old
        return (adv if adv.dim() == 2 else adv.unsqueeze(-1)) * corr.weights  # (B, T)

    def critic_step(self, mb: Rollout, rewards_mb, extra_mb) -> dict:
        c = self.config
        if self.preset.critic == "token":
            values = self.critic_forward(mb)  # (b, P+T)
            values = values[:, mb.prompt_ids.shape[1] - 1 : -1]  # (b, T)
            out = objectives.value_loss(values, extra_mb["values"], extra_mb["returns"], mb.response_mask, clip_eps=c.value_clip_eps)
        else:  # "prompt"
            value_logits = self.critic_forward(mb)  # (b,)
            out = objectives.sequence_value_loss(value_logits, rewards_mb)
        self.critic_optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.dp:
            self.dp.sum_gradients(self.critic)
        if c.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), c.grad_clip)
        self.critic_optimizer.step()
        return {"critic_loss": float(out.loss.detach()), **{f"critic_{k}": float(v) for k, v in out.metrics.items()}}

    def trpo_update(self, rollout: Rollout, adv) -> dict:
        c, m = self.config, rollout.response_mask
        head = lm_head_of(self.policy) if c.logprob_chunk_rows != 0 else None
        if head is not None and uses_chunked_logprobs(m.numel(), head[0].shape[0], c.logprob_chunk_rows):
            with sdpa_kernel(SDPBackend.MATH):  # a real vocabulary: no (B, T, V) tensor
                parts = trpo_from_hidden(self.policy, rollout, adv, c.temperature, c.logprob_chunk_rows)
                params = [p for p in self.policy.parameters() if p.requires_grad]
                out = self.loss_fn(params, parts[0], parts[1], fisher_vector_product=parts[2],
                                   **self.config.objective_kwargs())
            return {k: float(v) for k, v in out.metrics.items()}
        with torch.no_grad():
            old_full = full_logprobs(self.policy, rollout, c.temperature)  # (B, T, V)
        old_logp = old_full.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
        params = [p for p in self.policy.parameters() if p.requires_grad]

        def surrogate():
            logp = selective_log_softmax(full_logprobs(self.policy, rollout, c.temperature), rollout.response_ids)
            return aggregate(torch.exp(logp - old_logp) * adv, m, "token-mean")

        def kl():
            new_full = full_logprobs(self.policy, rollout, c.temperature)  # (B, T, V)
            per_token = (old_full.exp() * (old_full - new_full)).sum(-1)  # (B, T) exact KL(old || new)
            return masked_mean(per_token, m)

        # Hessian-vector products need a double backward, which only the math SDPA kernel implements on CPU.
        with sdpa_kernel(SDPBackend.MATH):
            out = self.loss_fn(params, surrogate, kl, **self.config.objective_kwargs())
        return {k: float(v) for k, v in out.metrics.items()}

    def sample_round(self, step: int) -> tuple[list, Rollout, torch.Tensor, torch.Tensor]:
        """One rollout of ``prompts_per_step`` fresh prompts x G: (examples per row, rollout, rewards (B,), correct (B,))."""
        c = self.config
        picks = self.prompt_rng.sample(range(len(self.train_examples)), c.prompts_per_step)
        examples = [self.train_examples[i] for i in picks]
        if self.dp:  # this rank samples the groups of its block of prompts
            examples = examples[self.dp.rows(len(examples))]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [ex.prompt for ex in examples])
        rollout = self.lagged.sample(
            step, prompt_ids.to(self.device), prompt_mask.to(self.device), num_samples=c.group_size,
            max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, temperature=c.temperature, top_p=c.top_p, generator=self.sample_gen,
            logit_noise=c.sampler_logit_noise,
        )
        texts = decode_responses(self.tokenizer, rollout)
        rows = [examples[i] for i in rollout.prompt_index.tolist()]
        rewards = torch.tensor([self.task.reward(ex, y) for ex, y in zip(rows, texts)], device=self.device)  # (B,)
        correct = torch.tensor([self.task.is_correct(ex, y) for ex, y in zip(rows, texts)], device=self.device)
        if self.overlong_cache is not None:  # DAPO's soft overlong punishment is part of the reward (Sec. 3.4)
            rewards = rewards + objectives.overlong_penalty(rollout.lengths, self.max_new_tokens, self.overlong_cache)
        if self.dp:
            return self.gather_round(rows, rollout, rewards, correct)
        return rows, rollout, rewards, correct

    def gather_round(self, rows: list, rollout: Rollout, rewards, correct):
        """Every rank's groups of one round, in rank order (which is prompt order), on every rank."""
        parts = self.dp.gather_objects((rows, rollout.to("cpu"), rewards.cpu(), correct.cpu()))
        offset, rollouts = 0, []
        for _, part, _, _ in parts:  # each rank numbered its own prompts from 0
            rollouts.append(dataclasses.replace(part, prompt_index=part.prompt_index + offset))
            offset += int(part.prompt_index.max()) + 1 if len(part) else 0
        return ([ex for part in parts for ex in part[0]], Rollout.cat(rollouts).to(self.device),
                torch.cat([p[2] for p in parts]).to(self.device), torch.cat([p[3] for p in parts]).to(self.device))

    def collect(self, step: int, row: dict) -> tuple[Rollout, torch.Tensor]:
        """The step's training batch (rollout, rewards), and its sampling metrics in ``row``.

        With dynamic sampling (DAPO, Sec. 3.2) only groups whose answers are neither all correct nor all
        wrong are kept, and further rollouts of fresh prompts are drawn until ``prompts_per_step`` such
        groups exist or ``max_sampling_rounds`` rollouts were made; extra groups are dropped, and after the
        last round the step trains on the informative groups it has (possibly fewer, possibly none).
        """
        c, g = self.config, self.config.group_size
        kept, all_rewards, all_correct, all_lengths, rounds = [], [], [], [], 0
        n_groups = 0
        while True:
            rounds += 1
            _, rollout, rewards, correct = self.sample_round(step)
            all_rewards.append(rewards), all_correct.append(correct), all_lengths.append(rollout.lengths)
            if not self.dynamic_sampling:
                kept.append((rollout, rewards))
                break
            hits = correct.reshape(-1, g).sum(-1)  # (n,) correct answers per group
            informative = ((hits > 0) & (hits < g)).nonzero().squeeze(-1)[: c.prompts_per_step - n_groups]  # (k,)
            if len(informative):
                rows = (informative.unsqueeze(-1) * g + torch.arange(g, device=informative.device)).reshape(-1)
                kept.append((rollout.select(rows), rewards[rows]))
                n_groups += len(informative)
            if n_groups >= c.prompts_per_step or rounds >= self.max_sampling_rounds:
                break
        rewards, correct, lengths = torch.cat(all_rewards), torch.cat(all_correct), torch.cat(all_lengths).float()
        grouped = rewards.reshape(-1, g)
        row.update(
            reward_mean=float(rewards.mean()),
            train_accuracy=float(correct.float().mean()),
            response_length=float(lengths.mean()),
            length_correct=float(lengths[correct].mean()) if bool(correct.any()) else math.nan,
            length_incorrect=float(lengths[~correct].mean()) if bool((~correct).any()) else math.nan,
            frac_truncated=float((lengths >= self.max_new_tokens).float().mean()),
            frac_zero_std_groups=float((grouped.amax(-1) == grouped.amin(-1)).float().mean()) if g > 1 else math.nan,
            rollouts=rounds,
            samples_generated=len(rewards),
        )
        if self.overlong_cache is not None:
            row["frac_overlong_penalized"] = float((lengths > self.max_new_tokens - self.overlong_cache).float().mean())
        if not kept:  # dynamic sampling found no informative group within its budget
            row["groups_trained"] = 0
            return None, None
        if len(kept) == 1:
            rollout, rewards = kept[0]
        else:  # rows stay group by group; each part numbered its own prompts, so number the groups afresh
            rollout = Rollout.cat([r for r, _ in kept])
            n = len(rollout) // g
            rollout = dataclasses.replace(rollout, prompt_index=torch.arange(n, device=rollout.prompt_index.device).repeat_interleave(g))
            rewards = torch.cat([w for _, w in kept])
        row["groups_trained"] = len(rollout) // g
        return rollout, rewards

    def step(self, step: int) -> dict:
        c = self.config
        row: dict = {"step": step}
        t0 = time.perf_counter()
        rollout, rewards = self.collect(step, row)
        row["time_rollout"] = time.perf_counter() - t0
        if rollout is None:  # nothing to learn from this step; the policy version still advances
            self.lagged.publish(self.policy, step + 1)
            return row
        row["staleness_mean"] = float(masked_mean((step - rollout.version).float(), rollout.response_mask))
        row["tokens_per_second"] = float(rollout.response_mask.sum()) / max(row["time_rollout"], 1e-9)
        # The reference forward costs ~15% of a step: run it when the loss or the reward needs it, and on
        # evaluation steps so that kl_ref (a k1 estimate of KL(pi || pi_ref)) is logged at that cadence.
        self.ref_logp, t0 = None, time.perf_counter()
        if self.kl_coef > 0 or step == 0 or (step + 1) % c.eval_every == 0 or step + 1 == c.steps:
            with torch.no_grad():
                self.ref_logp = self.logprobs(self.reference, rollout)  # (B, T)
        row["time_reference"] = time.perf_counter() - t0
        row["kl_ref"] = (math.nan if self.ref_logp is None
                         else float(masked_mean(rollout.behav_logp - self.ref_logp, rollout.response_mask)))

        adv, extra = self.advantages(rollout, rewards)  # (B,) or (B, T)
        if self.ref_logp is not None:
            extra["ref_logp"] = self.ref_logp

        routing = None  # Routing Replay: the experts the behaviour policy chose, reused by every training forward
        if c.routing_replay:
            t0 = time.perf_counter()
            routing = self.rowwise(lambda r, _: self.lagged.routing(r), rollout, dim=1)  # (L, B, P+T, k)
            row["time_routing"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        recomputed = None  # log pi of the rollout under the policy at the start of this update, (B, T)
        if self.prox == "recompute" or c.prox_error:
            recomputed = self.recompute(rollout, routing)  # pi_prox: one extra forward
            extra["prox_logp" if self.prox == "recompute" else "prox_recomputed"] = recomputed
        self.prox_seconds = time.perf_counter() - t0 if self.prox == "recompute" else 0.0
        if c.mismatch_correction != "none" or c.sampler_logit_noise > 0:
            adv = self.mismatch(rollout, adv, extra, routing, row, recomputed)

        routing_before = None
        decisions = lambda r, _: routing_decisions(self.policy, r.input_ids, r.attention_mask)  # noqa: E731  (L, b, P+T, k)
        if c.track_routing and self.is_moe:
            routing_before = self.rowwise(decisions, rollout, dim=1)

        t0 = time.perf_counter()
        mb_metrics: list[dict] = []
        if self.preset.update == "trpo":
            mb_metrics.append(self.trpo_update(rollout, adv if adv.dim() == 2 else adv.unsqueeze(-1)))
            mb_metrics[-1].update(self.critic_step(rollout, rewards, extra))
        else:
            n_mb = min(c.minibatches, len(rollout))
            for _ in range(c.epochs):
                perm = torch.randperm(len(rollout), generator=self.shuffle_gen).to(self.device)
                for idx in perm.chunk(n_mb):
                    mb = rollout.select(idx)
                    extra_mb = {k: v[idx] for k, v in extra.items()}
                    logp, entropy = self.logprobs(self.policy, mb, None if routing is None else routing[:, idx],
                                                  with_entropy=True)  # (b, T), (b, T)
                    out = self.objective(mb, logp, adv[idx], extra_mb, step)
                    self.optimizer.zero_grad(set_to_none=True)
                    out.loss.backward()
                    if self.dp:  # each rank's gradient is its rows' share; their sum is the whole minibatch's
                        self.dp.sum_gradients(self.policy)
                    max_norm = c.grad_clip if c.grad_clip is not None else float("inf")
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
                    self.optimizer.step()
                    metrics = {k: float(v) for k, v in out.metrics.items()}
                    metrics.update(loss=float(out.loss.detach()), grad_norm=float(grad_norm),
                                   entropy=float(masked_mean(entropy.detach(), mb.response_mask)))
                    if self.critic is not None:
                        metrics.update(self.critic_step(mb, rewards[idx], extra_mb))
                    mb_metrics.append(metrics)
        row["time_update"] = time.perf_counter() - t0
        row["time_prox"] = self.prox_seconds  # recompute: one forward pass; A-3PO: the interpolation
        for key in sorted({k for mm in mb_metrics for k in mm}):
            values = [mm[key] for mm in mb_metrics if key in mm]
            row[key] = max(values) if key.endswith("_max") else min(values) if key.endswith("_min") else sum(values) / len(values)
        if routing_before is not None:
            row["routing_change"] = routing_change(rollout, routing_before, self.rowwise(decisions, rollout, dim=1))
        self.lagged.publish(self.policy, step + 1)
        return row

    # -------------------------------------------------------------- the run
    def evaluate(self) -> dict:
        """Greedy held-out accuracy (:func:`xxpo.train.evaluate.evaluate`); across ranks, each decodes its block."""
        n = min(self.config.eval_n, len(self.task.split("test")))
        self.policy.eval()
        try:
            if self.dp is None:
                return evaluate(self.policy, self.tokenizer, self.task, n=n, max_new_tokens=self.max_new_tokens)
            examples = fixed_subset(self.task, n)
            decoded = greedy_decode(self.policy, self.tokenizer, examples[self.dp.rows(len(examples))],
                                    max_new_tokens=self.max_new_tokens)
            parts = self.dp.gather_objects(decoded)  # [(texts, lengths)] in rank order
            return score_responses(self.task, examples, [t for p in parts for t in p[0]], [k for p in parts for k in p[1]])
        finally:
            self.policy.train()

    def eval_columns(self, scores: dict) -> dict:
        return {"eval_accuracy": scores["accuracy"], "eval_length": scores["mean_length"],
                "eval_length_correct": scores["mean_length_correct"],
                "eval_length_incorrect": scores["mean_length_incorrect"]}

    def extra_state(self) -> dict:
        if self.dp is None:
            return {"snapshots": self.lagged.snapshots}
        return {"snapshots": self.lagged.snapshots, "world_size": self.dp.size,  # each rank's sampling stream
                "sample_gen_by_rank": self.dp.gather_objects(self.sample_gen.get_state())}

    def load_extra_state(self, state: dict) -> None:
        size = self.dp.size if self.dp else 1
        if state.get("world_size", 1) != size:
            raise ValueError(f"the checkpoint was written by {state.get('world_size', 1)} processes; resume it with "
                             f"as many (this run has {size})")
        self.lagged.snapshots, self.lagged.loaded_version = state["snapshots"], None
        if self.dp:
            self.sample_gen.set_state(state["sample_gen_by_rank"][self.dp.rank])

    def summary_extra(self, metrics: pd.DataFrame) -> dict:
        c = self.config
        return {"effective_batch": {"prompts": c.prompts_per_step, "group_size": c.group_size,
                                    "minibatches": c.minibatches, "epochs": c.epochs},
                "max_new_tokens": self.max_new_tokens, "world_size": self.dp.size if self.dp else 1}


def train(config: TrainConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False, callback=None) -> RunResult:
    """Train ``config.method`` and return its :class:`RunResult`; with ``out_dir``, write metrics.csv,
    summary.json (and checkpoints when ``config.checkpoint_every``). ``resume=True`` continues from the
    checkpoint in ``out_dir`` and ends with the same metrics as an uninterrupted run. ``callback(step, row)``
    is called after every step (in every process of a data-parallel run; rank 0 writes the files)."""
    return Trainer(config, out_dir, callback).run(resume=resume)
