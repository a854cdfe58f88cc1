"""Training configuration: one dataclass, every field documented once (its ``help``) and validated.

``TrainConfig.from_preset("gspo", steps=40)`` starts from the paper's setting in ``xxpo.presets`` and
overrides what the caller names; the command line (``xxpo train``) is generated from these fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

from xxpo.functional import ADV_NORMS, KL_ESTIMATORS, LOSS_AGG_MODES
from xxpo.presets import PRESETS, PROXIMALS, get_preset, policy_methods, preference_methods
from xxpo.tasks import DEFAULT_TASK

MISMATCH_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""``TrainConfig.mismatch_correction``: 'none' or LEVEL_MODE of ``xxpo.objectives.mismatch_weights``."""
POLICY_METHODS = policy_methods()
"""The built-in methods trained by the RL loop (a snapshot; methods registered later are in PRESETS)."""
PREFERENCE_METHODS = preference_methods()
"""The built-in preference methods (a snapshot, as ``POLICY_METHODS``)."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    method: str = _f("grpo", "Method name, a key of xxpo.presets.PRESETS: " + ", ".join(PRESETS))
    task: str = _f(DEFAULT_TASK, "Task: a name in xxpo.tasks.TASKS, or jsonl:TRAIN[,TEST] for prompts and numeric answers "
                   "from local JSONL files (format, split and verifier: xxpo.tasks.jsonl)")
    model: str = _f("tiny", "Model preset (xxpo.models.MODEL_PRESETS) or a local Hugging Face model directory")
    seed: int = _f(0, "Seed for model init, sampling and minibatch order; same config + seed = same metrics")
    device: str = _f("auto", "'auto' (CUDA when present), 'cpu' or 'cuda[:i]'")
    # the base model
    sft_steps: int | None = _f(None, "SFT steps for the cached base model (None: the task's default)")
    base_seed: int = _f(0, "Seed of the SFT base model (kept apart from `seed` so all RL seeds share one base)")
    # the loop
    steps: int = _f(30, "RL steps (one rollout batch each)")
    prompts_per_step: int = _f(16, "Prompts sampled per step (from_preset: x group_size for one-sample methods)")
    group_size: int = _f(8, "G, responses sampled per prompt")
    max_new_tokens: int | None = _f(None, "Generation budget (None: the task's); also Dr. GRPO's norm_len")
    temperature: float = _f(1.0, "Sampling temperature (log-probs are those of softmax(logits / temperature))")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0 = off)")
    epochs: int = _f(1, "mu: passes over each rollout batch")
    minibatches: int = _f(1, "Optimizer steps per epoch; > 1 makes later minibatches off-policy")
    lr: float = _f(3e-4, "AdamW learning rate of the policy")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float | None = _f(1.0, "Max global grad norm (None = no clipping)")
    # the objective
    clip_eps_low: float | None = _f(None, "Lower clip range (None: the preset's)")
    clip_eps_high: float | None = _f(None, "Upper clip range (None: the preset's)")
    dual_clip_c: float | None = _f(None, "Dual-clip constant c > 1 (None = off)")
    loss_agg_mode: str | None = _f(None, "Aggregation: " + ", ".join(LOSS_AGG_MODES) + " (None: the preset's)")
    adv_norm: str | None = _f(None, "Advantage scale (xxpo.functional.group_advantages): " + ", ".join(ADV_NORMS)
                              + " (None: the preset's)")
    adv_eps: float = _f(1e-6, "Epsilon added to the std in advantage normalization")
    kl_coef: float | None = _f(None, "Coefficient of the KL to the reference (None: the preset's)")
    kl_estimator: str = _f("k3", "KL estimator for the loss (k1, k2, k3)")
    kl_is_correction: bool = _f(False, "Weight the KL term by pi_theta / pi_old, unbiased on off-policy minibatches "
                                "(DeepSeek-V3.2; TRL use_bias_correction_kl); False as in GRPO's paper")
    tau_pos: float = _f(1.0, "SAPO gate temperature for positive advantages")
    tau_neg: float = _f(1.05, "SAPO gate temperature for negative advantages")
    dynamic_sampling: bool | None = _f(None, "DAPO dynamic sampling: keep only groups whose rewards differ, sampling more "
                                       "prompts until prompts_per_step such groups exist (None: the preset's)")
    max_sampling_rounds: int | None = _f(None, "Dynamic sampling: at most this many rollouts per step; after the last one "
                                          "the step trains on the informative groups it has (None: the preset's, else 10)")
    overlong_buffer: float | None = _f(None, "DAPO soft overlong punishment: the last fraction of max_new_tokens over which "
                                       "the reward falls linearly to -1 (0 = off; None: the preset's, else off)")
    # critics
    gamma: float = _f(1.0, "GAE discount")
    lam: float = _f(0.95, "GAE lambda")
    critic_lr: float = _f(1e-3, "Adam learning rate of the critic (PPO, TRPO, sequence-level PPO)")
    value_clip_eps: float | None = _f(0.2, "Clip range of the clipped value loss (None = unclipped)")
    # TRPO
    max_kl: float = _f(0.01, "TRPO trust-region size delta")
    # asynchrony
    staleness: int = _f(0, "eta: rollouts may come from policies up to this many versions old (0 = synchronous)")
    staleness_mode: str = _f("max", "'max': always eta versions old; 'uniform': a random lag in [0, eta] per step")
    prox: str | None = _f(None, "Proximal policy of decoupled methods: 'recompute' (extra forward) or 'loglinear' "
                          "(A-3PO's interpolation) (None: the method's)")
    prox_error: bool = _f(False, "Log prox_abs_err, mean |log pi_prox(loglinear) - log pi_prox(recompute)| per token "
                          "(costs the recompute forward)")
    behav_weight_cap: float | None = _f(None, "Cap on pi_prox / pi_behav (None = no cap)")
    # sampler-trainer mismatch
    sampler_logit_noise: float = _f(0.0, "Std of Gaussian noise added to the sampler's tempered logits at each decoding "
                                    "step (from the sampling generator): the recorded behaviour log-probs are the noisy "
                                    "sampler's, a controlled sampler-trainer mismatch (0 = off)")
    mismatch_correction: str = _f("none", "Correction of the sampler-trainer mismatch: 'none' (old_logp = the sampler's "
                                  "log-probs), or LEVEL_MODE in token_truncate (TIS), token_mask (IcePop), "
                                  "sequence_truncate, sequence_mask (MIS): recompute the trainer's old_logp before the "
                                  "update and multiply the advantages by xxpo.objectives.mismatch_weights")
    mismatch_low: float | None = _f(None, "Lower bound of the mismatch weight pi_old / mu (None = open)")
    mismatch_high: float | None = _f(2.0, "Upper bound of the mismatch weight pi_old / mu (None = open)")
    # preference methods
    dpo_beta: float = _f(0.1, "DPO temperature beta (not GRPO's kl_coef)")
    label_smoothing: float = _f(0.0, "cDPO label smoothing in [0, 0.5)")
    eta: float = _f(1000.0, "SPPO self-play eta (= 1 / beta)")
    iterations: int = _f(3, "SPPO self-play iterations (the reference is refreshed each)")
    # bookkeeping
    eval_every: int = _f(10, "Held-out evaluation every k steps (and at the start and the end)")
    eval_n: int = _f(200, "Held-out examples per evaluation (a fixed subset)")
    track_routing: bool = _f(False, "MoE only: fraction of routing decisions that change per update")
    routing_replay: bool = _f(False, "MoE only: Routing Replay, the training forwards reuse the experts the behaviour "
                              "policy chose for each token (GSPO, arXiv 2507.18071)")
    logprob_chunk_rows: int | None = _f(None, "Log-probs of the training, reference and proximal forwards: None = automatic "
                                        "(from the hidden states in chunks when B*T*V > 2^26 logits, else full logits), "
                                        "0 = always full (B, T, V) logits, n > 0 = always chunked, n rows per chunk "
                                        "(xxpo.rollout.token_logprobs)")
    checkpoint_every: int = _f(0, "Save a resumable checkpoint every k steps into out_dir (0 = never)")
    progress: bool = _f(True, "Show a tqdm progress bar")

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_preset(cls, method: str, **overrides) -> "TrainConfig":
        """The paper's setting for ``method`` (from xxpo.presets) under the suite's defaults, then ``overrides``.

        Every policy-gradient preset samples the same number of completions per step: methods that draw
        one response per prompt (PPO, TRPO, sequence-level PPO) get ``group_size`` times more prompts
        (16 x 8 = 128), so that comparisons across methods are at equal sample budget.
        """
        preset = get_preset(method)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in preset.hparams.items() if k in known}
        if preset.samples_per_prompt == 1 and not preset.is_preference:
            values["group_size"] = 1
            values["prompts_per_step"] = cls.prompts_per_step * cls.group_size
        values.update(overrides)
        return cls(method=method, **values)

    def validate(self) -> None:
        if self.method not in PRESETS:
            raise ValueError(f"method must be one of {tuple(PRESETS)} (or registered with xxpo.presets.register), "
                             f"got {self.method!r}")
        preset = PRESETS[self.method]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value}")
        positive_ints = ("steps", "prompts_per_step", "group_size", "epochs", "minibatches", "eval_every", "eval_n", "iterations")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.logprob_chunk_rows is not None and (isinstance(self.logprob_chunk_rows, bool)
                                                    or not isinstance(self.logprob_chunk_rows, int) or self.logprob_chunk_rows < 0):
            raise ValueError(f"logprob_chunk_rows must be None, 0 or a positive integer, got {self.logprob_chunk_rows!r}")
        for name in ("staleness", "checkpoint_every", "seed", "base_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "critic_lr", "temperature", "max_kl", "tau_pos", "tau_neg", "dpo_beta", "eta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.weight_decay < 0 or self.adv_eps < 0:
            raise ValueError("weight_decay and adv_eps must be >= 0")
        if self.loss_agg_mode is not None and self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.adv_norm is not None and self.adv_norm not in ADV_NORMS:
            raise ValueError(f"adv_norm must be one of {ADV_NORMS}, got {self.adv_norm!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.staleness_mode not in ("max", "uniform"):
            raise ValueError(f"staleness_mode must be 'max' or 'uniform', got {self.staleness_mode!r}")
        if self.prox is not None:
            if self.prox not in PROXIMALS[1:]:
                raise ValueError(f"prox must be one of {PROXIMALS[1:]} or None, got {self.prox!r}")
            if preset.proximal == "none":
                raise ValueError(f"prox applies to methods with a proximal policy; {self.method} has none")
        if self.prox_error and self.preset_value("prox") != "loglinear":
            raise ValueError("prox_error measures the loglinear approximation: it needs a method with prox='loglinear'")
        if self.max_sampling_rounds is not None and (isinstance(self.max_sampling_rounds, bool)
                                                     or not isinstance(self.max_sampling_rounds, int) or self.max_sampling_rounds < 1):
            raise ValueError(f"max_sampling_rounds must be a positive integer or None, got {self.max_sampling_rounds!r}")
        if self.overlong_buffer is not None and not 0 <= self.overlong_buffer <= 1:
            raise ValueError(f"overlong_buffer must be a fraction in [0, 1] (0 = off) or None, got {self.overlong_buffer}")
        if self.preset_value("dynamic_sampling", False) and self.group_size < 2:
            raise ValueError("dynamic_sampling needs group_size >= 2 (it keeps groups whose rewards differ)")
        kl_coef = self.preset_value("kl_coef", 0.0)
        if kl_coef and "kl_coef" not in preset.objective_args and preset.reference != "KL in reward":
            raise ValueError(f"kl_coef must be 0 for {self.method}: its objective has no KL term and its reward none")
        for name in ("clip_eps_low", "clip_eps_high", "kl_coef", "grad_clip", "value_clip_eps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.clip_eps_low is not None and self.clip_eps_low >= 1:
            raise ValueError(f"clip_eps_low must be < 1, got {self.clip_eps_low}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.sampler_logit_noise < 0:
            raise ValueError(f"sampler_logit_noise must be >= 0, got {self.sampler_logit_noise}")
        if self.mismatch_correction not in MISMATCH_CORRECTIONS:
            raise ValueError(f"mismatch_correction must be one of {MISMATCH_CORRECTIONS}, got {self.mismatch_correction!r}")
        if self.mismatch_low is not None and self.mismatch_low < 0:
            raise ValueError(f"mismatch_low must be >= 0 or None, got {self.mismatch_low}")
        if self.mismatch_high is not None and self.mismatch_high <= 0:
            raise ValueError(f"mismatch_high must be > 0 or None, got {self.mismatch_high}")
        if self.mismatch_low is not None and self.mismatch_high is not None and self.mismatch_low > self.mismatch_high:
            raise ValueError(f"mismatch_low must be <= mismatch_high, got {self.mismatch_low} > {self.mismatch_high}")
        if self.behav_weight_cap is not None and self.behav_weight_cap < 1:
            raise ValueError(f"behav_weight_cap must be >= 1, got {self.behav_weight_cap}")
        if preset.advantage in ("group", "leave_one_out") and self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for {self.method} (group-relative advantages)")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError("minibatches must divide prompts_per_step * group_size")

    def preset_value(self, name: str, default=None):
        """The config field if set, else the method's preset (its hyper-parameters, then its description's
        field of that name, e.g. ``loss_agg_mode`` or ``prox``), else ``default``."""
        value = getattr(self, name, None)
        if value is not None:
            return value
        preset = PRESETS[self.method]
        if name in preset.hparams:
            return preset.hparams[name]
        attr = {"prox": "proximal"}.get(name, name)
        value = getattr(preset, attr, None) if attr in {f.name for f in fields(preset)} else None
        return default if value in (None, "-", "none") else value

    def objective_kwargs(self, provided: dict | None = None) -> dict:
        """Keyword arguments of the method's objective: each name in its description's ``objective_args``,
        taken from ``provided`` (what the trainer computes, e.g. ``ref_logp``, ``norm_len``) or else from
        :meth:`preset_value`. Names that resolve to None are left out, so the objective's default applies."""
        provided = provided or {}
        kwargs = {}
        for name in PRESETS[self.method].objective_args:
            value = provided[name] if name in provided else self.preset_value(name)
            if value is not None:
                kwargs[name] = value
        return kwargs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields():
    """(name, type string, default, help) for every field: the CLI and the docs are generated from this."""
    return [(f.name, str(f.type), f.default, f.metadata["help"]) for f in fields(TrainConfig)]


# --------------------------------------------------------------------------------------------------
# The CPU learning check
# --------------------------------------------------------------------------------------------------

LEARNING_CHECK_SEEDS = (0, 1, 2)
LEARNING_CHECK_BUDGET = dict(steps=40, eval_every=40, eval_n=500, progress=False)
LEARNING_CHECK = {
    # method -> overrides of its preset, the same for every seed. Read with the reasons below.
    "ppo": {}, "trpo": {}, "grpo": {}, "dr_grpo": {}, "dapo": {}, "sppo_seq": {},
    "gspo": dict(lr=1e-4), "gspo_token": dict(lr=1e-4), "sapo": dict(lr=1e-4),
    "decoupled_ppo": dict(lr=1e-4, staleness=2), "a3po": dict(lr=1e-4, staleness=2),
    "cispo": {}, "gmpo": {}, "rloo": {}, "reinforce_pp": {},
    "dpo": dict(dpo_beta=1.0, lr=1e-4, prompts_per_step=64, epochs=3, steps=30, eval_every=30),
    "ipo": dict(dpo_beta=0.5, lr=3e-4, prompts_per_step=64, epochs=3, steps=30, eval_every=30),
    "sppo_selfplay": dict(eta=2.0, lr=3e-4, steps=30, iterations=3, eval_every=30),
}
"""The setting under which each method must raise held-out accuracy over the base model on 2 CPU cores.

:func:`learning_check_config` builds it for each seed in ``LEARNING_CHECK_SEEDS``: the tests run it and
``benchmarks/methods.py`` prints the table. Why the
overrides (measured on add2, tiny model, 3 seeds, 40 steps; see benchmarks/README.md):

- The presets that split each rollout into 4 minibatches (GSPO, SAPO, Decoupled PPO, A-3PO) run at
  lr 1e-4 instead of the suite's 3e-4: four AdamW steps per rollout at 3e-4 move this 125k-parameter
  model so far that token ratios reach ~2 within one rollout; SAPO (no hard clip) then ended below the
  base on 2 of 3 seeds and Decoupled PPO / A-3PO with eta = 2 on 1-2 of 3 seeds.
- Decoupled PPO and A-3PO run with staleness eta = 2 (their regime) instead of AReaL's 8.
- CISPO, GMPO, RLOO and REINFORCE++ run on their presets (one minibatch per rollout, so on-policy: CISPO is then
  REINFORCE and GMPO is GRPO's gradient; the check only says the estimator and the loop learn).
- DPO / IPO / SPPO use beta = 1 / 0.5 and eta = 2 instead of the papers' 0.1 and 1000, which suit
  responses of hundreds of tokens (see "Scale" in :mod:`xxpo.train.preference`).
"""


def learning_check_config(method: str, seed: int) -> TrainConfig:
    """The learning check's config of ``method`` for one seed: its preset, the budget, its overrides."""
    return TrainConfig.from_preset(method, **{**LEARNING_CHECK_BUDGET, **LEARNING_CHECK[method], "seed": seed})
