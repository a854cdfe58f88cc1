"""Each method described once, as data. Paper names live here; the engine only reads these descriptions.

A ``MethodPreset`` says everything a method changes, with the value its paper uses (every value cites
the paper and section, or says where it comes from when the paper is silent): its objective, its
advantage estimator, its critic, how the reference policy enters, its proximal policy, how the
parameters are updated, and which config fields become the objective's keyword arguments. The RL loop
(``xxpo.train.loop``), the preference trainer, ``TrainConfig``, the CLI's method list, the book's
tables and the learning check all read ``PRESETS``; none of them compares a method's name.

Adding a method is one objective function plus one description, from outside the package too::

    from xxpo.presets import MethodPreset, register

    def my_loss(logp, old_logp, advantages, mask, *, clip_eps_low=0.2, clip_eps_high=None): ...

    register(MethodPreset("my_method", "My method", "me 2026", "grpo", "what it changes", my_loss,
                          "token", "clip r", "token-mean", "group", "none", "none", dict(clip_eps_low=0.1),
                          objective_args=("clip_eps_low", "clip_eps_high")))
    train(TrainConfig.from_preset("my_method"))          # or: xxpo train --import my_module.py --method my_method
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

ADVANTAGES = ("gae", "group", "seq_value", "leave_one_out", "reinforce_pp", "none")
CRITICS = ("none", "token", "prompt")
REFERENCES = ("none", "KL in loss", "KL in reward", "implicit", "previous iterate")
PROXIMALS = ("none", "recompute", "loglinear")
UPDATES = ("gradient", "trpo", "offline_pairs", "self_play")
TENSOR_INPUTS = ("logp", "old_logp", "prox_logp", "advantages", "mask")
PG_INPUTS = ("logp", "old_logp", "advantages", "mask")


@dataclass(frozen=True)
class MethodPreset:
    name: str
    """Registry name of the method (``TrainConfig(method=...)``, ``xxpo train --method``)."""
    title: str
    """Human name of the method."""
    citation: str
    """Short citation: authors, year, arXiv id."""
    parent: str | None
    """The method it modifies (None for a root of the family tree)."""
    changes: str
    """One line: what it changes relative to ``parent``."""
    objective: str | Callable
    """The loss: a function name in ``xxpo.objectives``, or the function itself (methods defined outside xxpo)."""
    ratio_level: str
    """'token', 'sequence', or 'none' (no importance ratio)."""
    clipping: str
    """How the update is bounded: a clip range, a gate, a KL constraint, or nothing."""
    loss_agg_mode: str
    """Aggregation mode of ``xxpo.functional.aggregate`` ('-' for sequence-level losses)."""
    advantage: str
    """Advantage estimator, one of ``ADVANTAGES``: 'gae' (token critic), 'group' (group-relative, scaled by
    the ``adv_norm`` hyper-parameter), 'seq_value' (R - V(x), prompt critic), 'leave_one_out' (RLOO: R_i minus
    the mean of the other rewards of its group), 'reinforce_pp' (REINFORCE++: token returns whitened over the
    batch), 'none' (preference methods). With reference 'KL in reward', 'gae' and 'reinforce_pp' subtract
    ``kl_coef`` times a per-token k1 estimate from the token rewards, 'leave_one_out' its sum from R_i."""
    critic: str
    """One of ``CRITICS``: 'none', 'token' (per-token value, GAE) or 'prompt' (prompt-only value)."""
    reference: str
    """How a reference policy enters in the paper's setting, one of ``REFERENCES``. The engine computes the
    frozen base model's log-probs whenever ``kl_coef > 0``; the KL goes into the loss when the objective takes
    ``kl_coef``, into the reward when this is 'KL in reward'."""
    hparams: dict
    """The paper's hyper-parameters under xxpo's names (config fields or objective keywords)."""
    samples_per_prompt: int = 1
    """G, the group size, in the paper's setting."""
    update: str = "gradient"
    """One of ``UPDATES``: 'gradient' (AdamW on minibatches), 'trpo' (natural-gradient step with a line
    search), 'offline_pairs' (DPO-style pairs mined once), 'self_play' (SPPO iterations)."""
    proximal: str = "none"
    """Decoupled PPO's proximal policy, one of ``PROXIMALS``: 'recompute' (one extra forward pass) or
    'loglinear' (A-3PO's interpolation, ``xxpo.objectives.a3po_prox_logp``); ``TrainConfig.prox`` overrides."""
    inputs: tuple[str, ...] = PG_INPUTS
    """The objective's positional tensors, from ``TENSOR_INPUTS`` (preference objectives: see their trainer)."""
    objective_args: tuple[str, ...] = ()
    """Keyword arguments of the objective, each read from the config (``TrainConfig.preset_value``); the loop
    also provides ``ref_logp`` (when computed) and ``norm_len`` (the generation budget). A value that
    resolves to None is not passed, so the objective's default applies."""

    def __post_init__(self):
        for field, allowed in (("advantage", ADVANTAGES), ("critic", CRITICS), ("reference", REFERENCES),
                               ("proximal", PROXIMALS), ("update", UPDATES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r} (method {self.name!r})")
        if not (isinstance(self.objective, str) or callable(self.objective)):
            raise TypeError(f"objective must be a function name in xxpo.objectives or a callable, got {self.objective!r}")
        bad = [i for i in self.inputs if i not in TENSOR_INPUTS]
        if bad:
            raise ValueError(f"inputs must be drawn from {TENSOR_INPUTS}, got {bad} (method {self.name!r})")
        if (self.proximal != "none") != ("prox_logp" in self.inputs):
            raise ValueError(f"method {self.name!r}: a proximal policy and a 'prox_logp' input go together")
        if self.critic == "token" and self.advantage != "gae" or self.critic == "prompt" and self.advantage != "seq_value":
            raise ValueError(f"method {self.name!r}: critic {self.critic!r} does not go with advantage {self.advantage!r}")

    @property
    def is_preference(self) -> bool:
        """Trained by ``xxpo.train.preference.train_preference`` rather than the RL loop."""
        return self.update in ("offline_pairs", "self_play")

    @property
    def objective_fn(self) -> Callable:
        """The objective function itself."""
        if callable(self.objective):
            return self.objective
        from xxpo import objectives  # presets sit beside objectives; the import is deferred to keep it light

        return getattr(objectives, self.objective)

    @property
    def objective_name(self) -> str:
        return self.objective if isinstance(self.objective, str) else getattr(self.objective, "__name__", repr(self.objective))


_PG = ("clip_eps_low", "clip_eps_high")  # every clipped objective's keywords
_AGG = ("loss_agg_mode", "norm_len")
_KL = ("ref_logp", "kl_coef", "kl_estimator", "kl_is_correction")

PRESETS: dict[str, MethodPreset] = {
    "trpo": MethodPreset(
        "trpo", "TRPO", "Schulman et al. 2015, arXiv 1502.05477", None,
        "maximize the importance-sampled surrogate under a hard KL trust region",
        "trpo_step", "token", "KL(old||new) <= 0.01", "token-mean", "gae", "token", "none",
        # Spinning Up defaults (the paper's delta is 0.01, Sec. 8); CG and line search per Appendix C.
        dict(max_kl=0.01, cg_iters=10, damping=0.1, backtrack_iters=10, backtrack_coeff=0.8),
        update="trpo", objective_args=("max_kl", "cg_iters", "damping", "backtrack_iters", "backtrack_coeff"),
    ),
    "ppo": MethodPreset(
        "ppo", "PPO", "Schulman et al. 2017, arXiv 1707.06347", "trpo",
        "replace the KL constraint by a clipped ratio; add a learned critic with GAE",
        "ppo_loss", "token", "clip r to [0.8, 1.2]", "token-mean", "gae", "token", "KL in reward",
        # eps = 0.2 (Sec. 6.1, Table 3); lam = 0.95 (Table 3); gamma = 1 for LLM outcome rewards
        # (TRL/verl RLHF defaults); kl_coef = 0.05 in the reward (TRL PPO default, Ziegler et al. 2019).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, gamma=1.0, lam=0.95, kl_coef=0.05, kl_estimator="k1"),
        objective_args=_PG + ("dual_clip_c",) + _AGG,
    ),
    "grpo": MethodPreset(
        "grpo", "GRPO", "Shao et al. 2024, arXiv 2402.03300", "ppo",
        "drop the critic: group z-score advantages over G samples; KL to the reference in the loss",
        "grpo_loss", "token", "clip r to [0.8, 1.2]", "seq-mean-token-mean", "group", "none", "KL in loss",
        # eps = 0.2, beta = 0.04 and G = 64 (DeepSeekMath Sec. 4.2); k3 estimator (Eq. 4).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.04, kl_estimator="k3", adv_norm="group"),
        samples_per_prompt=64, objective_args=_PG + _KL + ("dual_clip_c",) + _AGG,
    ),
    "dr_grpo": MethodPreset(
        "dr_grpo", "Dr. GRPO", "Liu et al. 2025, arXiv 2503.20783", "grpo",
        "remove 1/|o_i| (divide by a constant) and the std normalization of advantages",
        "dr_grpo_loss", "token", "clip r to [0.8, 1.2]", "seq-mean-token-sum-norm", "group", "none", "none",
        # beta = 0, G = 8 (README example command); normalizer = generate_max_length (code, "Modification 1");
        # adv_norm "none": the group mean is subtracted, the std is not divided (Sec. 3.2).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, adv_norm="none"),
        samples_per_prompt=8, objective_args=_PG + _KL + ("dual_clip_c", "norm_len"),
    ),
    "dapo": MethodPreset(
        "dapo", "DAPO", "Yu et al. 2025, arXiv 2503.14476", "grpo",
        "clip-higher, token-level loss, dynamic sampling, overlong reward shaping, no KL",
        "dapo_loss", "token", "clip r to [0.8, 1.28]", "token-mean", "group", "none", "none",
        # eps_low = 0.2, eps_high = 0.28, G = 16, no KL (Sec. 4.1); dynamic sampling: over-sample until the batch
        # holds only groups with unequal rewards (Sec. 3.2; verl's recipe caps it at max_num_gen_batches = 10);
        # soft overlong punishment over the last L_cache = 4096 of L_max = 20480 tokens, a fraction 0.2 (Sec. 3.4).
        dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0, adv_norm="group", dynamic_sampling=True,
             max_sampling_rounds=10, overlong_buffer=0.2),
        samples_per_prompt=16, objective_args=_PG + _KL + ("dual_clip_c",) + _AGG,
    ),
    "gspo": MethodPreset(
        "gspo", "GSPO", "Zheng et al. 2025, arXiv 2507.18071", "grpo",
        "one length-normalized sequence ratio per response, clipped at sequence level",
        "gspo_loss", "sequence", "clip s to [1 - 3e-4, 1 + 4e-4]", "-", "group", "none", "none",
        # eps = 3e-4 / 4e-4 (Sec. 5.1); 4 minibatches per rollout; no KL (TRL paper index).
        dict(clip_eps_low=3e-4, clip_eps_high=4e-4, kl_coef=0.0, adv_norm="group", minibatches=4),
        samples_per_prompt=8,  # G is not stated in the fact sheet's sources; 8 is the suite's default
        objective_args=_PG,
    ),
    "gspo_token": MethodPreset(
        "gspo_token", "GSPO-token", "Zheng et al. 2025, arXiv 2507.18071 (Sec. 4.3)", "gspo",
        "sequence ratio value with per-token gradients, so per-token advantages are allowed",
        "gspo_token_loss", "sequence", "clip s to [1 - 3e-4, 1 + 4e-4]", "seq-mean-token-mean", "group", "none", "none",
        # same setting as GSPO (Sec. 4.3 defines it as a drop-in).
        dict(clip_eps_low=3e-4, clip_eps_high=4e-4, kl_coef=0.0, adv_norm="group", minibatches=4),
        samples_per_prompt=8,  # G is not stated in the fact sheet's sources; 8 is the suite's default
        objective_args=_PG,
    ),
    "sapo": MethodPreset(
        "sapo", "SAPO", "Gao et al. 2025, arXiv 2511.20347", "gspo",
        "replace the hard clip by a smooth sigmoid gate (narrower for negative advantages), back at token level",
        "sapo_loss", "token", "soft gate, tau+ = 1.0, tau- = 1.05", "seq-mean-token-mean", "group", "none", "none",
        # tau_pos = 1.0, tau_neg = 1.05, 4 minibatches, other settings as GSPO (Sec. 5.1).
        dict(tau_pos=1.0, tau_neg=1.05, kl_coef=0.0, adv_norm="group", minibatches=4),
        samples_per_prompt=8,  # G is not stated in the fact sheet's sources; 8 is the suite's default
        objective_args=("tau_pos", "tau_neg") + _AGG,
    ),
    "cispo": MethodPreset(
        "cispo", "CISPO", "MiniMax 2025 (MiniMax-M1), arXiv 2506.13585", "dapo",
        "clip the importance weight, stop its gradient, and keep every token's gradient through log pi",
        "cispo_loss", "token", "clip the weight sg(r) to at most 1 + 4, no lower bound", "token-mean", "group", "none",
        "none",
        # Token-level normalization 1/sum|o_i| and group advantages (Sec. 3.1, Eq. 4); no lower bound on the weight
        # (the paper sets eps_low large and tunes only eps_high). The tuned eps_high is not in the fact sheet's
        # sources: 4.0 is TRL's recommended epsilon_high = 5.0 (the cap 1 + eps, from ScaleRL, arXiv 2510.13786).
        dict(clip_eps_high=4.0, kl_coef=0.0, adv_norm="group"),
        samples_per_prompt=8,  # G is not stated in the fact sheet's sources; 8 is the suite's default
        objective_args=_PG + _AGG,
    ),
    "gmpo": MethodPreset(
        "gmpo", "GMPO", "Zhao et al. 2025, arXiv 2507.20673", "grpo",
        "geometric instead of arithmetic mean of the token terms: one sequence ratio of per-token clipped ratios",
        "gmpo_loss", "sequence", "clip log r per token to [-0.4, 0.4]", "-", "group", "none", "none",
        # clip range (e^-0.4, e^0.4) (Sec. 4; TRL's GMPOConfig epsilon = 0.4); no KL (TRL's GMPO beta = 0).
        dict(clip_eps_low=0.4, clip_eps_high=0.4, kl_coef=0.0, adv_norm="group"),
        samples_per_prompt=8,  # G is not stated in the fact sheet's sources; 8 is the suite's default
        objective_args=_PG,
    ),
    "rloo": MethodPreset(
        "rloo", "RLOO", "Ahmadian et al. 2024, arXiv 2402.14740", "ppo",
        "no critic: REINFORCE over k samples per prompt, each baselined by the mean reward of the other k - 1",
        "ppo_loss", "token", "clip r to [0.8, 1.2] (r = 1 on-policy)", "seq-mean-token-sum", "leave_one_out", "none",
        "KL in reward",
        # The paper's estimator is REINFORCE on whole responses (sum of token log-probs, mean over samples) with the
        # leave-one-out baseline, k = 2 and KL in the reward with beta = 0.03 (TRL paper index for 2402.14740).
        # eps = 0.2 only matters off-policy (TRL RLOOConfig epsilon default).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.03),
        samples_per_prompt=2, objective_args=_PG + _AGG,
    ),
    "reinforce_pp": MethodPreset(
        "reinforce_pp", "REINFORCE++", "Hu 2025, arXiv 2501.03262", "ppo",
        "no critic: token returns (outcome reward minus a token-level KL) whitened over the whole batch",
        "ppo_loss", "token", "clip r to [0.8, 1.2]", "token-mean", "reinforce_pp", "none", "KL in reward",
        # PPO's clipped loss with eps = 0.2, gamma = 1, token-level KL in the reward, global-batch normalization
        # (fact sheet 14.3, verl reinforce_plus_plus). The fact sheet gives no beta: 0.01 is the suite's choice.
        dict(clip_eps_low=0.2, clip_eps_high=0.2, gamma=1.0, kl_coef=0.01),
        samples_per_prompt=1, objective_args=_PG + _AGG,
    ),
    "decoupled_ppo": MethodPreset(
        "decoupled_ppo", "Decoupled PPO", "Hilton et al. 2021, arXiv 2110.00641; Fu et al. 2025 (AReaL), arXiv 2505.24298",
        "ppo", "clip around a recent proximal policy; correct for the stale behaviour policy with pi_prox/pi_behav",
        "decoupled_ppo_loss", "token", "clip u to [0.8, 1.2]", "token-mean", "group", "none", "none",
        # AReaL App. B Table 3: eps = 0.2, global advantage normalization ("batch": batch mean and std, no group
        # mean = AReaL adv_norm mean_level = std_level = batch, token-weighted there), 4 minibatches,
        # 16 answers per prompt; staleness eta = 8 for math (Sec. 4.1).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, adv_norm="batch", minibatches=4, staleness=8),
        samples_per_prompt=16, proximal="recompute", inputs=("logp", "old_logp", "prox_logp", "advantages", "mask"),
        objective_args=_PG + ("behav_weight_cap", "dual_clip_c") + _AGG,
    ),
    "a3po": MethodPreset(
        "a3po", "A-3PO", "Li, Wu, Shen 2025, arXiv 2512.06547", "decoupled_ppo",
        "interpolate log pi_prox between behaviour and current policy (alpha = 1/staleness): no extra forward pass",
        "decoupled_ppo_loss", "token", "clip u to [0.8, 1.2]", "token-mean", "group", "none", "none",
        # Used with AReaL's decoupled loss and its defaults; staleness 8 in the AReaL docs' GSM8K run; adv_norm "batch"
        # (batch mean and std) as in AReaL's A-3PO example config (examples/experimental/prox_approx).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, adv_norm="batch", minibatches=4, staleness=8),
        samples_per_prompt=16, proximal="loglinear", inputs=("logp", "old_logp", "prox_logp", "advantages", "mask"),
        objective_args=_PG + ("behav_weight_cap", "dual_clip_c") + _AGG,
    ),
    "sppo_seq": MethodPreset(
        "sppo_seq", "SPPO (sequence-level PPO)", "Wang et al. 2026, arXiv 2604.08865", "ppo",
        "a bandit view: prompt-only critic V(x) trained with BCE, A = R - V(x), one sample per prompt",
        "sppo_seq_loss", "token", "clip r to [0.8, 1.2]", "token-mean", "seq_value", "prompt", "none",
        # eps = 0.2, token-mean, no KL, N = 1 (authors' run scripts and actor.yaml).
        dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0),
        samples_per_prompt=1, objective_args=_PG + ("dual_clip_c",) + _AGG,
    ),
    "dpo": MethodPreset(
        "dpo", "DPO", "Rafailov et al. 2023, arXiv 2305.18290", None,
        "no reward model and no sampling: a logistic loss on preference pairs with an implicit reward",
        "dpo_loss", "none", "none (beta = 0.1 sets the implicit KL strength)", "-", "none", "none", "implicit",
        # beta = 0.1 (Sec. 6 / App. B).
        dict(dpo_beta=0.1, variant="sigmoid"),
        update="offline_pairs", inputs=(), objective_args=("dpo_beta", "variant", "label_smoothing"),
    ),
    "ipo": MethodPreset(
        "ipo", "IPO", "Azar et al. 2023, arXiv 2310.12036", "dpo",
        "regress the log-ratio margin onto 1/(2 beta) with a squared loss instead of DPO's logistic loss",
        "dpo_loss", "none", "none (the squared loss keeps the margin finite)", "-", "none", "none", "implicit",
        # tau (xxpo's dpo_beta) = 0.1, as TRL's default beta; the paper sweeps tau (Sec. 5).
        dict(dpo_beta=0.1, variant="ipo"),
        update="offline_pairs", inputs=(), objective_args=("dpo_beta", "variant", "label_smoothing"),
    ),
    "sppo_selfplay": MethodPreset(
        "sppo_selfplay", "SPPO (self-play)", "Wu et al. 2024, arXiv 2405.00675", "dpo",
        "regress log(pi/pi_t) onto eta (win rate - 1/2) against the previous iterate, iterated",
        "sppo_selfplay_loss", "none", "none", "-", "none", "none", "previous iterate",
        # eta = 1/beta = 1000, K = 5 samples, 3 iterations (authors' scripts/pipeline.sh).
        dict(eta=1000.0, iterations=3),
        samples_per_prompt=5, update="self_play", inputs=(), objective_args=("eta",),
    ),
}


def register(preset: MethodPreset, *, replace: bool = False) -> MethodPreset:
    """Add a method description to ``PRESETS`` (e.g. a method defined outside xxpo); returns it."""
    if not isinstance(preset, MethodPreset):
        raise TypeError(f"preset must be a MethodPreset, got {type(preset).__name__}")
    if preset.name in PRESETS and not replace:
        raise ValueError(f"method {preset.name!r} is already registered (pass replace=True to redefine it)")
    if preset.parent is not None and preset.parent not in PRESETS:
        raise ValueError(f"parent must be a registered method or None, got {preset.parent!r}")
    PRESETS[preset.name] = preset
    return preset


def policy_methods() -> tuple[str, ...]:
    """Methods trained by the RL loop (``xxpo.train.train``)."""
    return tuple(n for n, p in PRESETS.items() if not p.is_preference)


def preference_methods() -> tuple[str, ...]:
    """Methods trained from preference pairs or self-play (``xxpo.train.preference.train_preference``)."""
    return tuple(n for n, p in PRESETS.items() if p.is_preference)


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
                "advantage": p.advantage + (f" ({p.hparams['adv_norm']})" if "adv_norm" in p.hparams else ""),
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
    """A method's description as plain data (the objective by name)."""
    p = get_preset(name)
    return {**{f.name: getattr(p, f.name) for f in fields(p)}, "objective": p.objective_name}
