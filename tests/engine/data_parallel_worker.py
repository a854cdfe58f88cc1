"""One process of the data-parallel tests (tests/engine/test_data_parallel.py starts two with torchrun).

For each case it trains ``STEPS`` steps across the processes and rank 0 stores, per step, the global
batch the step trained on (rollout, rewards, the sampling metrics), then the final weights and the
metrics; the test replays those batches in ONE process and compares. Every rank also reports how many
prompts it sampled per round and checks that its weights equal rank 0's. Last, a run killed after step 1
and resumed is stored beside an uninterrupted one.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/engine/data_parallel_worker.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from xxpo.train import TrainConfig, train
from xxpo.train.loop import Trainer

STEPS = 3
# case -> (method, config overrides). One per normalizer: seq-mean-token-mean (GRPO), token-mean with dynamic
# sampling and the overlong reward (DAPO), a sequence-level ratio (GSPO), a critic with batch-whitened GAE
# (PPO), batch-normalized advantages (REINFORCE++), a prompt-value critic (sequence-level PPO); then the extra forwards: a recomputed proximal policy
# (Decoupled PPO), A-3PO's interpolation under a sampler-trainer mismatch correction, and Routing Replay on an
# MoE model with the routing change tracked. 7 prompts: the ranks sample 4 and 3 groups.
CASES = {
    "grpo": ("grpo", {}),
    "dapo": ("dapo", {}),
    "gspo": ("gspo", {}),
    "ppo": ("ppo", {"prompts_per_step": 15, "group_size": 1, "minibatches": 3}),  # one response per prompt
    "reinforce_pp": ("reinforce_pp", {}),
    "sppo_seq": ("sppo_seq", {"prompts_per_step": 15, "group_size": 1, "minibatches": 3}),  # a prompt critic
    "decoupled_ppo": ("decoupled_ppo", {"staleness": 1}),
    "a3po_mismatch": ("a3po", {"staleness": 2, "sampler_logit_noise": 0.5, "mismatch_correction": "token_truncate"}),
    "moe_routing_replay": ("grpo", {"model": "tiny-moe", "routing_replay": True, "track_routing": True}),
}
COMMON = dict(steps=STEPS, prompts_per_step=7, group_size=4, minibatches=2, eval_every=STEPS, eval_n=41,
              progress=False)


def case_config(case: str) -> TrainConfig:
    method, overrides = CASES[case]
    return TrainConfig.from_preset(method, **{**COMMON, **overrides})


class RecordingTrainer(Trainer):
    """Stores (rank 0) the global batch of every step; counts the prompts this rank sampled."""

    def __init__(self, config: TrainConfig, record_dir: Path):
        super().__init__(config)
        self.record_dir, self.prompts_sampled = record_dir, []
        sample = self.lagged.sample

        def counting_sample(step, prompt_ids, prompt_mask, **kwargs):
            self.prompts_sampled.append(int(prompt_ids.shape[0]))
            return sample(step, prompt_ids, prompt_mask, **kwargs)

        self.lagged.sample = counting_sample

    def collect(self, step: int, row: dict):
        rollout, rewards = super().collect(step, row)
        if self.dp.is_writer:
            torch.save({"rollout": rollout.to("cpu"), "rewards": rewards.cpu(), "row": dict(row)},
                       self.record_dir / f"batch_{step}.pt")
        return rollout, rewards


def flat_weights(trainer: Trainer) -> torch.Tensor:
    modules = [trainer.policy] + ([trainer.critic] if trainer.critic is not None else [])
    return torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()])


class Killed(Exception):
    pass


def main(out: Path) -> None:
    for case in CASES:
        record_dir = out / case
        record_dir.mkdir(parents=True, exist_ok=True)
        config = case_config(case)
        trainer = RecordingTrainer(config, record_dir)
        result = trainer.run()
        weights = flat_weights(trainer)
        ranks_weights = trainer.dp.gather_objects(weights)
        same = all(torch.equal(w, ranks_weights[0]) for w in ranks_weights)
        prompts = trainer.dp.gather_objects(trainer.prompts_sampled)
        if trainer.dp.is_writer:
            torch.save({"policy": trainer.policy.state_dict(),
                        "critic": trainer.critic.state_dict() if trainer.critic is not None else None},
                       record_dir / "weights.pt")
            result.metrics.to_csv(record_dir / "metrics.csv", index=False)
            (record_dir / "ranks.json").write_text(json.dumps({
                "world_size": trainer.dp.size, "weights_equal_across_ranks": same, "prompts_sampled": prompts,
                "summary_world_size": result.summary["world_size"]}))

    # resume: killed after step 1 (on every rank), then resumed, against an uninterrupted run
    config = TrainConfig.from_preset("grpo", **{**COMMON, "steps": 4, "eval_every": 2, "checkpoint_every": 1})
    train(config, out / "resume_full")

    def kill_after_step_1(step, row):
        if step == 1:
            raise Killed

    try:
        train(config, out / "resume_killed", callback=kill_after_step_1)
    except Killed:
        pass
    train(config, out / "resume_killed", resume=True)
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    dist.destroy_process_group()
