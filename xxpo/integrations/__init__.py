"""Run xxpo's objectives inside other trainers: TRL (``xxpo.integrations.trl``) and verl (``xxpo.integrations.verl``).

This module imports neither peer; it reads only the objectives' registry (``xxpo.objectives``). It says

- which registered objectives are policy-gradient losses that a trainer can call on a batch of log-probs
  (``POLICY_OBJECTIVES``, found from each function's signature), and in which of three calling forms;
- how each one aggregates its per-token terms (``aggregation``), which is what an adapter needs to turn
  a micro-batch loss into its share of a global-batch loss (``global_scale``);
- which built-in setting of each peer computes the same loss (``TRL_EQUIVALENTS``, ``VERL_EQUIVALENTS``).
  The adapters' tests run the peer's own loss with exactly these settings and compare, so every row of
  the book's table (``equivalents_table``) is a checked statement.

Peers named here: TRL 1.16 (``GRPOTrainer``, ``DPOTrainer``) and verl 0.9.1 (``core_algos``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from xxpo.functional import LOSS_AGG_MODES
from xxpo.functional.checks import check_mask, check_tensor
from xxpo.objectives import METHODS, get

# The three ways a policy-gradient objective is called: the leading positional parameters of its function.
CALLING_FORMS = {
    "standard": ("logp", "old_logp", "advantages", "mask"),  # PPO, GRPO, ..., GSPO, SAPO
    "decoupled": ("logp", "behav_logp", "prox_logp", "advantages", "mask"),  # Decoupled PPO
    "staleness": ("logp", "behav_logp", "advantages", "mask", "staleness"),  # A-3PO
}

FORWARDS_KWARGS_TO = {"a3po": "decoupled_ppo"}
"""Objectives whose ``**kwargs`` are passed on to another objective (A-3PO's docstring says so)."""

FIXED_AGGREGATION = {
    "gspo": "seq-mean-token-mean",  # a mean over responses of s_i A_i: the row normalizer of seq-mean-token-mean
    "gspo_token": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "gmpo": "seq-mean-token-mean",  # a mean over responses of s_i A_i, like GSPO
}
"""Objectives without a ``loss_agg_mode`` argument, and the aggregation they apply (the tests check each)."""

SEQUENCE_ADVANTAGES = ("gspo", "gmpo")
"""Objectives that need one advantage per response, shape (B,), and refuse per-token ones."""

KERNEL_ARGUMENTS = ("ref_logp", "staleness")
"""Keyword arguments that are tensors of the batch, supplied by an adapter, never by a user's kwargs."""


def _forms() -> dict[str, str]:
    out = {}
    for name in METHODS:
        params = [p.name for p in inspect.signature(get(name)).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for form, lead in CALLING_FORMS.items():
            if tuple(params[: len(lead)]) == lead:
                out[name] = form
                break
    return out


_FORMS = _forms()
POLICY_OBJECTIVES = tuple(_FORMS)
"""Registered objectives that are policy-gradient losses of per-token log-probs, in registry order."""


def calling_form(name: str) -> str:
    """'standard', 'decoupled' or 'staleness' (see ``CALLING_FORMS``) for a policy objective ``name``."""
    if name not in _FORMS:
        others = tuple(m for m in METHODS if m not in _FORMS)
        raise ValueError(f"objective must be one of the policy objectives {POLICY_OBJECTIVES}, got {name!r} "
                         f"({others} are not losses of per-token log-probs)")
    return _FORMS[name]


def keyword_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments objective ``name`` accepts (following ``FORWARDS_KWARGS_TO``), by name."""
    params = {}
    lead = CALLING_FORMS[calling_form(name)]
    for fn_name in (name, FORWARDS_KWARGS_TO.get(name)):
        if fn_name is None:
            continue
        skip = CALLING_FORMS[calling_form(fn_name)]
        for p in inspect.signature(get(fn_name)).parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in skip or p.name in lead:
                continue
            params.setdefault(p.name, p)
    return params


def check_objective_kwargs(name: str, kwargs, reserved: dict[str, str] | None = None) -> dict:
    """Validate a user's keyword arguments for objective ``name``; returns a copy.

    ``reserved`` maps argument names that the hosting trainer sets from its own config to the config field
    to set instead; naming one of them, an unknown argument or a tensor argument raises ``ValueError``.
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"objective_kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
    accepted = keyword_parameters(name)
    for key in kwargs:
        if key not in accepted:
            raise ValueError(f"objective_kwargs: {name} takes no argument {key!r}; it takes {sorted(accepted)}")
        if key in KERNEL_ARGUMENTS:
            raise ValueError(f"objective_kwargs: {key!r} is a tensor of the batch; the adapter supplies it")
        if reserved and key in reserved:
            raise ValueError(f"objective_kwargs: {key!r} comes from the trainer's config; set {reserved[key]} instead")
    return dict(kwargs)


def aggregation(name: str, kwargs: dict | None = None) -> str:
    """The loss-aggregation mode objective ``name`` applies with keyword arguments ``kwargs``."""
    kwargs = kwargs or {}
    accepted = keyword_parameters(name)
    if "loss_agg_mode" in accepted:
        mode = kwargs.get("loss_agg_mode", accepted["loss_agg_mode"].default)
    else:
        mode = FIXED_AGGREGATION[name]
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")
    return mode


def sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token advantages -> (B,), when each response carries one value on its valid tokens.

    That is how GRPO-style estimators fill the tensor (verl broadcasts the sequence score over the
    response). A response whose valid tokens carry different values (GAE, per-token rewards) raises
    ``ValueError``: a sequence-level objective has no advantage to give it. Empty rows get 0. (B,) passes.
    """
    check_tensor("advantages", advantages, ndim=(1, 2))
    if advantages.dim() == 1:
        return advantages
    check_mask("mask", mask, advantages.shape)
    valid = mask.bool()
    high = torch.where(valid, advantages, torch.full_like(advantages, -torch.inf)).amax(-1)  # (B,)
    low = torch.where(valid, advantages, torch.full_like(advantages, torch.inf)).amin(-1)  # (B,)
    nonempty = valid.any(-1)  # (B,)
    spread = torch.where(nonempty, high - low, torch.zeros_like(high))  # (B,)
    scale = torch.where(nonempty, high.abs(), torch.zeros_like(high))
    if bool((spread > 1e-6 * (1.0 + scale)).any()):
        row = int((spread > 1e-6 * (1.0 + scale)).nonzero()[0])
        raise ValueError(f"advantages differ across the tokens of response {row} (spread {float(spread[row]):.3g}); "
                         "this objective needs one advantage per response (use gspo_token for per-token ones)")
    return torch.where(nonempty, high, torch.zeros_like(high))  # (B,)


def global_scale(mode: str, mask: torch.Tensor, *, tokens=None, rows=None, dp_size: int = 1) -> float:
    """Factor that turns an xxpo loss computed on one micro-batch into its share of a global-batch loss.

    Every aggregation mode is a weighted sum of per-token losses whose normalizer counts the micro-batch:
    its valid tokens (``token-mean``), its responses with at least one valid token (the two ``seq-mean``
    modes), or all its rows (``seq-mean-token-sum-norm``). Multiplying by ``local count / global count``
    (``tokens`` or ``rows``; None keeps the local count) and by ``dp_size`` (data-parallel ranks, whose
    gradients are averaged) makes the micro-batch losses of all ranks and accumulation steps add up to the
    loss of the whole batch.
    """
    m = mask.bool()
    if mode == "token-mean":
        local, total = float(m.sum()), tokens
    elif mode == "seq-mean-token-sum-norm":
        local, total = float(m.shape[0]), rows
    else:
        local, total = float(m.any(-1).sum()), rows
    total = local if total is None else float(total)
    if total <= 0:
        return 0.0
    return local / total * dp_size


# ----------------------------------------------------------------------------------------------------
# What each peer calls the same loss
# ----------------------------------------------------------------------------------------------------


GENERATION_BUDGET = "${data.max_response_length}"
"""A setting whose value is the run's generation budget, written as verl's config interpolation (the tests
substitute a number)."""


@dataclass(frozen=True)
class Equivalent:
    """A peer's built-in setting that computes the same loss as an xxpo objective with its defaults."""

    settings: dict
    """The peer's config: TRL ``GRPOConfig``/``DPOConfig`` fields, or verl dotted config keys."""
    note: str = ""
    """The known difference, if any (the numerical ones are asserted by the adapters' tests)."""
    trainer: str = "GRPOTrainer"
    """The peer's trainer or loss that the settings belong to."""
    extra: dict = field(default_factory=dict)
    """Keyword arguments of the xxpo objective that make it compute the peer's loss (e.g. TRL's weight cap)."""


TRL_EQUIVALENTS: dict[str, Equivalent | None] = {
    "ppo": Equivalent({"loss_type": "dapo"}, "the clipped loss only: TRL 1.16 has no critic, hence no GAE advantages; "
                      "loss_type='dapo' names TRL's token-mean normalization, the clip stays symmetric"),
    "trpo": None,
    "grpo": Equivalent({"loss_type": "grpo"}, "TRL counts a response with no valid token in its mean over "
                       "responses; xxpo averages over the non-empty ones"),
    "dr_grpo": Equivalent({"loss_type": "dr_grpo"}, "norm_len is TRL's max_completion_length"),
    "dapo": Equivalent({"loss_type": "dapo", "epsilon_high": 0.28}),
    "gspo": Equivalent({"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4,
                        "epsilon_high": 4e-4}, "as for grpo, empty responses count in TRL's mean"),
    "gspo_token": None,
    "sapo": Equivalent({"loss_type": "sapo"}, "as for grpo, empty responses count in TRL's mean"),
    "decoupled_ppo": Equivalent({"loss_type": "dapo", "use_vllm": True, "vllm_importance_sampling_correction": True,
                                 "vllm_importance_sampling_mode": "token_truncate"},
                                "behaviour policy = vLLM's sampler, proximal = TRL's recomputed old log-probs; "
                                "TRL's truncation cap is behav_weight_cap", extra={"behav_weight_cap": 3.0}),
    "a3po": None,
    "dpo": Equivalent({"loss_type": "sigmoid"}, trainer="DPOTrainer"),
    "sppo_selfplay": Equivalent({"loss_type": "sppo_hard"}, "TRL's hard version: win probability 1 for the chosen "
                                "response and 0 for the rejected one, eta = 1/beta; TRL sums the pair's two terms "
                                "where xxpo averages them (a factor 2)", trainer="DPOTrainer"),
    "sppo_seq": Equivalent({"loss_type": "dapo"}, "the clipped loss only: TRL has no prompt-value critic"),
    "cispo": Equivalent({"loss_type": "cispo", "epsilon_high": 5.0},
                        "TRL's epsilon_high is the weight cap 1 + clip_eps_high and TRL sets no lower bound, so the "
                        "adapter (which reads epsilon_high as clip_eps_high) does not reproduce it from the same "
                        "config; the loss itself is checked in tests/equivalence/test_trl.py",
                        trainer="GRPOTrainer, loss only"),
    "gmpo": Equivalent({"epsilon": 0.4}, "TRL counts a response with no valid token in its mean over responses; "
                       "checked in tests/equivalence/test_trl.py", trainer="trl.experimental.gmpo.GMPOTrainer"),
    "rloo": Equivalent({"beta": 0.03}, "the advantages (leave-one-out baseline, KL summed into the reward) are "
                       "TRL's; TRL clips one product ratio per response, so the losses agree on-policy only",
                       trainer="RLOOTrainer"),
    "reinforce_pp": None,
}
"""xxpo method -> the TRL 1.16 setting with the same loss (None: TRL has none). Entries whose ``trainer`` is
not ``GRPOTrainer`` or ``DPOTrainer`` are checked by ``tests/equivalence`` rather than through the adapter."""

VERL_EQUIVALENTS: dict[str, Equivalent | None] = {
    "ppo": Equivalent({"actor.policy_loss.loss_mode": "vanilla", "actor.loss_agg_mode": "token-mean"},
                      "vanilla always applies dual-clip (clip_ratio_c, default 3); xxpo_ppo reads clip_ratio_c "
                      "as dual_clip_c", trainer="core_algos"),
    "trpo": None,
    "grpo": Equivalent({"actor.policy_loss.loss_mode": "vanilla", "actor.loss_agg_mode": "seq-mean-token-mean"},
                       "the KL term is verl's actor.use_kl_loss, outside the policy loss (kl_loss_type=low_var_kl is "
                       "k3, its value clamped at 10)",
                       trainer="core_algos"),
    "dr_grpo": Equivalent({"actor.policy_loss.loss_mode": "vanilla", "actor.loss_agg_mode": "seq-mean-token-sum-norm",
                           "actor.loss_scale_factor": GENERATION_BUDGET},
                          "verl divides by its non-empty responses, xxpo by all rows; vanilla's dual-clip is read "
                          "as dual_clip_c",
                          trainer="core_algos"),
    "dapo": Equivalent({"actor.policy_loss.loss_mode": "vanilla", "actor.loss_agg_mode": "token-mean",
                        "actor.clip_ratio_high": 0.28}, trainer="core_algos"),
    "gspo": Equivalent({"actor.policy_loss.loss_mode": "gspo", "actor.loss_agg_mode": "seq-mean-token-mean",
                        "actor.clip_ratio_low": 3e-4, "actor.clip_ratio_high": 4e-4},
                       "verl's gspo is the GSPO-token form: equal for one advantage per response",
                       trainer="core_algos"),
    "gspo_token": Equivalent({"actor.policy_loss.loss_mode": "gspo", "actor.loss_agg_mode": "seq-mean-token-mean",
                              "actor.clip_ratio_low": 3e-4, "actor.clip_ratio_high": 4e-4}, trainer="core_algos"),
    "sapo": Equivalent({"actor.policy_loss.loss_mode": "sapo", "actor.loss_agg_mode": "seq-mean-token-mean"},
                       "verl's sapo uses seq-mean-token-mean whatever loss_agg_mode says", trainer="core_algos"),
    "decoupled_ppo": Equivalent({"actor.policy_loss.loss_mode": "vanilla", "actor.loss_agg_mode": "token-mean",
                                 "algorithm.rollout_correction.rollout_is": "token"},
                                "proximal = verl's recomputed old_log_prob, behaviour weight = rollout_is_weights; "
                                "vanilla's dual-clip is read as dual_clip_c", trainer="core_algos"),
    "a3po": None,
    "dpo": None,
    "sppo_selfplay": None,
    "sppo_seq": Equivalent({"actor.policy_loss.loss_mode": "vanilla", "actor.loss_agg_mode": "token-mean"},
                           "the policy loss only (the prompt-value critic is in the authors' verl fork); "
                           "vanilla's dual-clip is read as dual_clip_c", trainer="core_algos"),
    "cispo": Equivalent({"actor.policy_loss.loss_mode": "cispo", "actor.loss_agg_mode": "token-mean"},
                        "verl's default clip_ratio_low = 0.2 bounds the weight below by 0.8 (passed on as clip_eps_low); "
                        "clip_ratio_low=1.0 gives the paper's unbounded weight", trainer="core_algos"),
    "gmpo": Equivalent({"actor.policy_loss.loss_mode": "geo_mean", "actor.clip_ratio_low": 0.4,
                        "actor.clip_ratio_high": 0.4},
                       "equal to ~1e-9 (verl adds 1e-8 to its length denominators), checked in "
                       "tests/equivalence/test_verl_family.py; verl averages over all responses, empty ones too",
                       trainer="core_algos, to 1e-8"),
    "rloo": Equivalent({"algorithm.adv_estimator": "rloo", "actor.policy_loss.loss_mode": "vanilla",
                        "actor.loss_agg_mode": "seq-mean-token-sum"},
                       "the advantages are verl's rloo estimator (checked in tests/equivalence/test_verl_family.py); "
                       "vanilla's dual-clip is read as dual_clip_c", trainer="core_algos"),
    "reinforce_pp": Equivalent({"algorithm.adv_estimator": "reinforce_plus_plus", "actor.policy_loss.loss_mode":
                                "vanilla", "actor.loss_agg_mode": "token-mean"},
                               "the advantages are verl's reinforce_plus_plus estimator (checked in "
                               "tests/equivalence/test_verl_family.py); vanilla's dual-clip is read as dual_clip_c",
                               trainer="core_algos"),
}
"""xxpo method -> the verl 0.9.1 setting with the same policy loss (None: verl has none)."""

TRL_REFUSED = {
    "a3po": "TRL's GRPOTrainer is synchronous: every sample comes from the policy at the start of its update "
            "(staleness 0), where A-3PO is PPO; use decoupled_ppo, whose proximal log-probs TRL recomputes",
}
"""Policy objectives the TRL adapter refuses, with the reason it gives."""


def _settings_text(eq: Equivalent, short: bool = False) -> str:
    def key(k: str) -> str:
        return k.rsplit(".", 1)[-1] if short else k

    return ", ".join(f"{key(k)}={v}" if v == GENERATION_BUDGET else f"{key(k)}={v!r}" for k, v in eq.settings.items())


def equivalents_table() -> list[dict[str, str]]:
    """One row per registered method: its objective, TRL's and verl's built-in equivalent, the adapters that run
    it, and the known differences.

    Generated from ``xxpo.objectives.METHODS`` and the dictionaries above, which the tests check against
    the peers' own losses; the book's integration page shows these rows. verl keys are shortened to their
    last component (``loss_mode`` for ``actor.policy_loss.loss_mode``).
    """
    rows = []
    for name in METHODS:
        policy = name in _FORMS
        trl_eq, verl_eq = TRL_EQUIVALENTS.get(name), VERL_EQUIVALENTS.get(name)
        if trl_eq is not None:
            trl_text = _settings_text(trl_eq) + ("" if trl_eq.trainer == "GRPOTrainer" else f" ({trl_eq.trainer})")
        else:
            trl_text = "none; use the adapter" if policy and name not in TRL_REFUSED else "none"
        verl_text = _settings_text(verl_eq, short=True) if verl_eq is not None else (
            "none; use the adapter" if policy else "none")
        if not policy:
            adapters = "-"
        elif name in TRL_REFUSED:
            adapters = "verl only"  # xxpo_<name>; the TRL adapter refuses it (see the notes)
        else:
            adapters = "TRL, verl"  # XxpoGRPOTrainer(objective=<name>), loss_mode=xxpo_<name>
        notes = [f"{peer}: {eq.note}" for peer, eq in (("TRL", trl_eq), ("verl", verl_eq)) if eq is not None and eq.note]
        if name in TRL_REFUSED:
            notes.append(f"TRL adapter: refused, because {TRL_REFUSED[name]}")
        rows.append({
            "method": name,
            "objective": get(name).__name__,
            "TRL 1.16 built-in": trl_text,
            "verl 0.9.1 built-in": verl_text,
            "adapters": adapters,
            "known differences": "; ".join(notes) or "-",
        })
    return rows


def equivalents_markdown() -> str:
    """``equivalents_table()`` as Markdown: the table, then the known differences as a list.

    ``book/_generated/integrations_table.md`` is this text (``python -m xxpo.integrations`` prints it; a
    test fails when the file and the registry disagree).
    """
    rows = equivalents_table()
    headers = ["method", "TRL 1.16 built-in", "verl 0.9.1 built-in", "adapters"]

    def cell(header: str, row: dict) -> str:
        text = str(row[header]).replace("|", "\\|").replace("$", "\\$")
        if header == "method":
            return f"{text} (`{row['objective']}`)"
        return text

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(cell(h, row) for h in headers) + " |")
    lines += ["", "Known differences (the numerical ones are asserted by tests in `tests/integrations/`):", ""]
    for row in rows:
        if row["known differences"] != "-":
            lines.append(f"- **{row['method']}**. {row['known differences']}.")
    return "\n".join(lines) + "\n"


__all__ = [
    "CALLING_FORMS",
    "Equivalent",
    "GENERATION_BUDGET",
    "FIXED_AGGREGATION",
    "POLICY_OBJECTIVES",
    "SEQUENCE_ADVANTAGES",
    "TRL_EQUIVALENTS",
    "TRL_REFUSED",
    "VERL_EQUIVALENTS",
    "aggregation",
    "calling_form",
    "check_objective_kwargs",
    "equivalents_markdown",
    "equivalents_table",
    "global_scale",
    "keyword_parameters",
    "sequence_advantages",
]
