"""Each paper's setting as data. Paper names live here; the code only knows names that describe the math.

A ``MethodPreset`` says what a method changes, with the value its paper uses (every value cites the
paper and section, or says where it comes from when the paper is silent). The training loop turns a
preset into a config; the book's family map and "what changes" tables are generated from ``PRESETS``,
so they cannot drift from the code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MethodPreset:
    name: str
    """Registry name of the method (``xxpo.objectives.get``)."""
    title: str
    """Human name of the method."""
    citation: str
    """Short citation: authors, year, arXiv id."""
    parent: str | None
    """The method it modifies (None for a root of the family tree)."""
    changes: str
    """One line: what it changes relative to ``parent``."""
    objective: str
    """Objective function name in ``xxpo.objectives``."""
    ratio_level: str
    """'token', 'sequence', or 'none' (no importance ratio)."""
    clipping: str
    """How the update is bounded: a clip range, a gate, a KL constraint, or nothing."""
    loss_agg_mode: str
    """Aggregation mode of ``xxpo.functional.aggregate`` ('-' for sequence-level losses)."""
    advantage: str
    """Advantage estimator: 'gae', 'group', 'group_mean', 'batch', 'rloo', 'seq_value', or 'none'."""
    critic: str
    """'none', 'token' (per-token value, GAE) or 'prompt' (prompt-only value)."""
    reference: str
    """How a reference policy enters: 'none', 'KL in loss', 'KL in reward', 'implicit', 'previous iterate'."""
    hparams: dict
    """The paper's hyper-parameters under xxpo's names."""
    samples_per_prompt: int = 1
    """G, the group size, in the paper's setting."""


PRESETS: dict[str, MethodPreset] = {
    "trpo": MethodPreset(
        "trpo", "TRPO", "Schulman et al. 2015, arXiv 1502.05477", None,
        "maximize the importance-sampled surrogate under a hard KL trust region",
        "trpo_step", "token", "KL(old||new) <= 0.01", "token-mean", "gae", "token", "none",
        # Spinning Up defaults (the paper's delta is 0.01, Sec. 8); CG and line search per Appendix C.
        dict(max_kl=0.01, cg_iters=10, damping=0.1, backtrack_iters=10, backtrack_coeff=0.8),
    ),
    "ppo": MethodPreset(
        "ppo", "PPO", "Schulman et al. 2017, arXiv 1707.06347", "trpo",
        "replace the KL constraint by a clipped ratio; add a learned critic with GAE",
        "ppo_loss", "token", "clip r to [0.8, 1.2]", "token-mean", "gae", "token", "KL in reward",
        # eps = 0.2 (Sec. 6.1, Table 3); lam = 0.95 (Table 3); gamma = 1 for LLM outcome rewards
        # (TRL/verl RLHF defaults); kl_coef = 0.05 in the reward (TRL PPO default, Ziegler et al. 2019).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, gamma=1.0, lam=0.95, kl_coef=0.05, kl_estimator="k1"),
    ),
    "grpo": MethodPreset(
        "grpo", "GRPO", "Shao et al. 2024, arXiv 2402.03300", "ppo",
        "drop the critic: group z-score advantages over G samples; KL to the reference in the loss",
        "grpo_loss", "token", "clip r to [0.8, 1.2]", "seq-mean-token-mean", "group", "none", "KL in loss",
        # eps = 0.2, beta = 0.04 and G = 64 (DeepSeekMath Sec. 4.2); k3 estimator (Eq. 4).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.04, kl_estimator="k3", adv_norm="group"),
        samples_per_prompt=64,
    ),
    "dr_grpo": MethodPreset(
        "dr_grpo", "Dr. GRPO", "Liu et al. 2025, arXiv 2503.20783", "grpo",
        "remove 1/|o_i| (divide by a constant) and the std normalization of advantages",
        "dr_grpo_loss", "token", "clip r to [0.8, 1.2]", "seq-mean-token-sum-norm", "group_mean", "none", "none",
        # beta = 0, G = 8 (README example command); normalizer = generate_max_length (code, "Modification 1").
        dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, adv_norm="none"),
        samples_per_prompt=8,
    ),
    "dapo": MethodPreset(
        "dapo", "DAPO", "Yu et al. 2025, arXiv 2503.14476", "grpo",
        "clip-higher, token-level loss, dynamic sampling, overlong reward shaping, no KL",
        "dapo_loss", "token", "clip r to [0.8, 1.28]", "token-mean", "group", "none", "none",
        # eps_low = 0.2, eps_high = 0.28, G = 16, no KL (Sec. 4.1); dynamic sampling (Sec. 3.2).
        dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0, adv_norm="group", filter_zero_std_groups=True),
        samples_per_prompt=16,
    ),
    "gspo": MethodPreset(
        "gspo", "GSPO", "Zheng et al. 2025, arXiv 2507.18071", "grpo",
        "one length-normalized sequence ratio per response, clipped at sequence level",
        "gspo_loss", "sequence", "clip s to [1 - 3e-4, 1 + 4e-4]", "-", "group", "none", "none",
        # eps = 3e-4 / 4e-4 (Sec. 5.1); 4 minibatches per rollout; no KL (TRL paper index).
        dict(clip_eps_low=3e-4, clip_eps_high=4e-4, kl_coef=0.0, adv_norm="group", minibatches=4),
        samples_per_prompt=8,  # G is not stated in the fact sheet's sources; 8 is the suite's default
    ),
    "gspo_token": MethodPreset(
        "gspo_token", "GSPO-token", "Zheng et al. 2025, arXiv 2507.18071 (Sec. 4.3)", "gspo",
        "sequence ratio value with per-token gradients, so per-token advantages are allowed",
        "gspo_token_loss", "sequence", "clip s to [1 - 3e-4, 1 + 4e-4]", "seq-mean-token-mean", "group", "none", "none",
        # same setting as GSPO (Sec. 4.3 defines it as a drop-in).
        dict(clip_eps_low=3e-4, clip_eps_high=4e-4, kl_coef=0.0, adv_norm="group", minibatches=4),
        samples_per_prompt=8,  # G is not stated in the fact sheet's sources; 8 is the suite's default
    ),
    "sapo": MethodPreset(
        "sapo", "SAPO", "Gao et al. 2025, arXiv 2511.20347", "gspo",
        "replace the hard clip by a smooth sigmoid gate (narrower for negative advantages), back at token level",
        "sapo_loss", "token", "soft gate, tau+ = 1.0, tau- = 1.05", "seq-mean-token-mean", "group", "none", "none",
        # tau_pos = 1.0, tau_neg = 1.05, 4 minibatches, other settings as GSPO (Sec. 5.1).
        dict(tau_pos=1.0, tau_neg=1.05, kl_coef=0.0, adv_norm="group", minibatches=4),
        samples_per_prompt=8,  # G is not stated in the fact sheet's sources; 8 is the suite's default
    ),
    "decoupled_ppo": MethodPreset(
        "decoupled_ppo", "Decoupled PPO", "Hilton et al. 2021, arXiv 2110.00641; Fu et al. 2025 (AReaL), arXiv 2505.24298",
        "ppo", "clip around a recent proximal policy; correct for the stale behaviour policy with pi_prox/pi_behav",
        "decoupled_ppo_loss", "token", "clip u to [0.8, 1.2]", "token-mean", "batch", "none", "none",
        # AReaL App. B Table 3: eps = 0.2, global (batch) advantage normalization, 4 minibatches,
        # 16 answers per prompt; staleness eta = 8 for math (Sec. 4.1).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, adv_norm="batch", minibatches=4, staleness=8, prox="recompute"),
        samples_per_prompt=16,
    ),
    "a3po": MethodPreset(
        "a3po", "A-3PO", "Li, Wu, Shen 2025, arXiv 2512.06547", "decoupled_ppo",
        "interpolate log pi_prox between behaviour and current policy (alpha = 1/staleness): no extra forward pass",
        "a3po_loss", "token", "clip u to [0.8, 1.2]", "token-mean", "batch", "none", "none",
        # Used with AReaL's decoupled loss and its defaults; staleness 8 in the AReaL docs' GSM8K run.
        dict(clip_eps_low=0.2, clip_eps_high=0.2, adv_norm="batch", minibatches=4, staleness=8, prox="loglinear"),
        samples_per_prompt=16,
    ),
    "sppo_seq": MethodPreset(
        "sppo_seq", "SPPO (sequence-level PPO)", "Wang et al. 2026, arXiv 2604.08865", "ppo",
        "a bandit view: prompt-only critic V(x) trained with BCE, A = R - V(x), one sample per prompt",
        "sppo_seq_loss", "token", "clip r to [0.8, 1.2]", "token-mean", "seq_value", "prompt", "none",
        # eps = 0.2, token-mean, no KL, N = 1 (authors' run scripts and actor.yaml).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0),
        samples_per_prompt=1,
    ),
    "dpo": MethodPreset(
        "dpo", "DPO", "Rafailov et al. 2023, arXiv 2305.18290", None,
        "no reward model and no sampling: a logistic loss on preference pairs with an implicit reward",
        "dpo_loss", "none", "none (beta = 0.1 sets the implicit KL strength)", "-", "none", "none", "implicit",
        # beta = 0.1 (Sec. 6 / App. B).
        dict(dpo_beta=0.1, variant="sigmoid"),
    ),
    "sppo_selfplay": MethodPreset(
        "sppo_selfplay", "SPPO (self-play)", "Wu et al. 2024, arXiv 2405.00675", "dpo",
        "regress log(pi/pi_t) onto eta (win rate - 1/2) against the previous iterate, iterated",
        "sppo_selfplay_loss", "none", "none", "-", "none", "none", "previous iterate",
        # eta = 1/beta = 1000, K = 5 samples, 3 iterations (authors' scripts/pipeline.sh).
        dict(eta=1000.0, iterations=3),
        samples_per_prompt=5,
    ),
}


def family_edges() -> list[tuple[str, str]]:
    """(parent, child) pairs of the family tree."""
    return [(p.parent, p.name) for p in PRESETS.values() if p.parent is not None]


def family_table() -> list[dict]:
    """One row per method with what it changes, for the book's family map."""
    rows = []
    for p in PRESETS.values():
        rows.append(
            {
                "method": p.title,
                "parent": PRESETS[p.parent].title if p.parent else "-",
                "ratio level": p.ratio_level,
                "clipping": p.clipping,
                "aggregation": p.loss_agg_mode,
                "advantage": p.advantage,
                "critic": p.critic,
                "reference": p.reference,
            }
        )
    return rows


def get_preset(name: str) -> MethodPreset:
    if name not in PRESETS:
        raise ValueError(f"method must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]


def as_dict(name: str) -> dict:
    return asdict(get_preset(name))
