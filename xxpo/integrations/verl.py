"""Every xxpo policy objective as a verl policy loss, ``xxpo_<name>`` (verl 0.9.1).

Importing this module registers them with ``verl.trainer.ppo.core_algos.register_policy_loss``. To have
verl's workers import it, name it in ``VERL_USE_EXTERNAL_MODULES`` and pick a loss in the config::

    VERL_USE_EXTERNAL_MODULES=xxpo.integrations.verl python -m verl.trainer.main_ppo \\
        actor_rollout_ref.actor.policy_loss.loss_mode=xxpo_gspo \\
        actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean \\
        actor_rollout_ref.actor.clip_ratio_low=3e-4 actor_rollout_ref.actor.clip_ratio_high=4e-4 ...

verl calls a policy loss as ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights)``: (bs, resp_len) tensors, per-token advantages, a bool mask, the actor's config.
(verl's type alias calls the last argument ``rollout_log_probs``; the keyword verl passes is
``rollout_is_weights``, and it is what these functions take.) Each ``xxpo_<name>``:

- reads the objective's hyper-parameters from the actor config where verl has a field for them:
  ``clip_ratio_low``/``clip_ratio_high`` (falling back to ``clip_ratio``) -> ``clip_eps_low``/``clip_eps_high``,
  ``clip_ratio_c`` -> ``dual_clip_c`` (verl's vanilla loss always dual-clips, so these do too),
  ``tau_pos``/``tau_neg``, ``loss_agg_mode``, ``loss_scale_factor`` -> ``norm_len``; other arguments are
  given once, under xxpo's names, to ``register({name: kwargs})``;
- honours ``loss_agg_mode`` where the objective has the argument; an objective that fixes its
  aggregation (GSPO, GSPO-token, Dr. GRPO) refuses any other mode instead of ignoring it, and
  ``seq-mean-token-sum-norm`` needs ``loss_scale_factor`` (verl's default, the padded width of each
  micro-batch, is the data-dependent normalizer Dr. GRPO removes);
- reduces per-token advantages to one per response for GSPO, and refuses responses whose tokens carry
  different advantages (use ``xxpo_gspo_token``);
- normalizes like verl's ``agg_loss``: the micro-batch loss is scaled to verl's global batch
  (``config.global_batch_info``: ``dp_size``, ``batch_num_tokens``, ``global_batch_size``;
  ``xxpo.integrations.global_scale``), and ``seq-mean-token-sum-norm`` counts the non-empty responses
  as verl does (``xxpo.objectives`` counts all rows: the two differ only when a response is empty);
- refuses ``rollout_is_weights`` unless the objective is Decoupled PPO: only it takes a behaviour weight.

Decoupled PPO reads verl's decoupled mode of rollout correction: ``old_log_prob`` is recomputed by the
actor (pi_prox) and ``rollout_is_weights`` is pi_prox / pi_rollout (truncated), so pi_behav =
old_log_prob - log(rollout_is_weights). A-3PO reads verl's bypass mode (``old_log_prob`` is the rollout's,
pi_behav) and needs a ``staleness`` from ``register({"a3po": {"staleness": d}})``: verl passes none.
KL to a reference stays verl's (``actor.use_kl_loss``): its policy losses receive no reference log-probs.
"""

from __future__ import annotations

import math

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from xxpo.functional import LOSS_AGG_MODES
from xxpo.integrations import (
    FIXED_AGGREGATION,
    POLICY_OBJECTIVES,
    SEQUENCE_ADVANTAGES,
    aggregation,
    calling_form,
    check_objective_kwargs,
    global_scale,
    keyword_parameters,
    sequence_advantages,
)
from xxpo.objectives import get

PREFIX = "xxpo_"

CONFIG_ARGUMENTS = {
    "clip_eps_low": "actor.clip_ratio_low",
    "clip_eps_high": "actor.clip_ratio_high",
    "dual_clip_c": "actor.clip_ratio_c",
    "tau_pos": "actor.tau_pos",
    "tau_neg": "actor.tau_neg",
    "loss_agg_mode": "actor.loss_agg_mode",
    "norm_len": "actor.loss_scale_factor",
    "kl_coef": "actor.use_kl_loss / actor.kl_loss_coef",
}
"""Objective arguments that verl's actor config sets, and the field that sets each."""


def _field(config, key, default=None):
    """A field of an ActorConfig dataclass or of a DictConfig."""
    if hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def config_arguments(name: str, config, loss_agg_mode: str) -> dict:
    """The objective's keyword arguments that come from verl's actor ``config`` (see the module docstring)."""
    accepted = keyword_parameters(name)
    clip = _field(config, "clip_ratio", 0.2)
    kw = {}
    if "clip_eps_low" in accepted:
        kw["clip_eps_low"] = float(_field(config, "clip_ratio_low", clip))
    if "clip_eps_high" in accepted:
        kw["clip_eps_high"] = float(_field(config, "clip_ratio_high", clip))
    if "dual_clip_c" in accepted:
        kw["dual_clip_c"] = float(_field(config, "clip_ratio_c", 3.0))
    if "tau_pos" in accepted:
        kw["tau_pos"] = float(_field(config, "tau_pos", 1.0))
        kw["tau_neg"] = float(_field(config, "tau_neg", 1.05))
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"{PREFIX}{name}: loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if "loss_agg_mode" in accepted:
        kw["loss_agg_mode"] = loss_agg_mode
    elif loss_agg_mode != FIXED_AGGREGATION[name]:
        raise ValueError(f"{PREFIX}{name} aggregates as {FIXED_AGGREGATION[name]!r}; set actor.loss_agg_mode to it "
                         f"(got {loss_agg_mode!r})")
    if loss_agg_mode == "seq-mean-token-sum-norm":
        factor = _field(config, "loss_scale_factor", None)
        if factor is None:
            raise ValueError(f"{PREFIX}{name} with seq-mean-token-sum-norm needs actor.loss_scale_factor (the "
                             "generation budget); verl's default, each micro-batch's padded width, varies with the data")
        kw["norm_len"] = factor
    return kw


def make_policy_loss(name: str, **objective_kwargs):
    """A function with verl's policy-loss signature that computes xxpo objective ``name``."""
    form = calling_form(name)
    fn = get(name)
    objective_kwargs = dict(objective_kwargs)
    staleness = objective_kwargs.pop("staleness", None) if form == "staleness" else None
    extra = check_objective_kwargs(name, objective_kwargs, CONFIG_ARGUMENTS)

    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                    rollout_is_weights=None):
        if config is None:
            raise ValueError(f"{PREFIX}{name}: config (verl's actor config) is required; it holds the clip ranges")
        kw = config_arguments(name, config, loss_agg_mode)
        kw.update(extra)
        mask = response_mask
        adv = sequence_advantages(advantages, mask) if name in SEQUENCE_ADVANTAGES else advantages
        if rollout_is_weights is not None and form != "decoupled":
            raise ValueError(f"{PREFIX}{name} takes no rollout_is_weights: only xxpo_decoupled_ppo weights by "
                             "pi_prox/pi_behav; turn rollout correction's IS weights off or use it")
        if form == "standard":
            out = fn(log_prob, old_log_prob, adv, mask, **kw)
        elif form == "decoupled":
            if rollout_is_weights is None:
                raise ValueError(f"{PREFIX}{name} needs verl's decoupled rollout correction "
                                 "(algorithm.rollout_correction.rollout_is=token, bypass_mode=false): old_log_prob is "
                                 "then pi_prox and rollout_is_weights pi_prox/pi_behav")
            w = rollout_is_weights.to(log_prob.dtype)
            valid = mask.bool()
            if bool((valid & ~(torch.isfinite(w) & (w > 0))).any()):
                raise ValueError(f"{PREFIX}{name}: rollout_is_weights must be finite and > 0 on response tokens")
            behav = old_log_prob - torch.where(valid, w, torch.ones_like(w)).log()  # (B, T): log pi_behav
            out = fn(log_prob, behav, old_log_prob, adv, mask, **kw)
        else:  # staleness (A-3PO): old_log_prob is the behaviour policy's, verl's bypass mode
            if staleness is None:
                raise ValueError(f"{PREFIX}{name} needs the staleness of the data, which verl does not pass to policy "
                                 f"losses: register({{'{name}': {{'staleness': d}}}})")
            out = fn(log_prob, old_log_prob, adv, mask, staleness, **kw)
        info = _field(config, "global_batch_info", {}) or {}
        mode = aggregation(name, kw)
        rows = _number(info.get("global_batch_size"))
        if rows is None and mode == "seq-mean-token-sum-norm":  # agg_loss counts non-empty responses, xxpo all rows
            rows = float(mask.bool().any(-1).sum())
        scale = global_scale(mode, mask, tokens=_number(info.get("batch_num_tokens")), rows=rows,
                             dp_size=int(info.get("dp_size", 1) or 1))
        metrics = {f"actor/xxpo/{k}": float(v) for k, v in out.metrics.items()}
        return out.loss * scale, metrics

    policy_loss.__name__ = f"{PREFIX}{name}"
    policy_loss.__doc__ = f"verl policy loss computing xxpo.objectives.{fn.__name__} (see xxpo.integrations.verl)."
    return policy_loss


def _number(value):
    if value is None:
        return None
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not math.isfinite(value):
        raise ValueError(f"global_batch_info holds a non-finite count {value}")
    return value


def register(overrides: dict[str, dict] | None = None) -> tuple[str, ...]:
    """Register every policy objective with verl as ``xxpo_<name>``; returns the names registered.

    ``overrides[name]`` holds extra keyword arguments of objective ``name`` under xxpo's names (e.g.
    ``{"a3po": {"staleness": 1}, "decoupled_ppo": {"behav_weight_cap": 2.0}}``); arguments that verl's
    config sets are refused there. Called once with no overrides when this module is imported.
    """
    overrides = overrides or {}
    unknown = set(overrides) - set(POLICY_OBJECTIVES)
    if unknown:
        raise ValueError(f"overrides: {sorted(unknown)} are not policy objectives {POLICY_OBJECTIVES}")
    names = []
    for name in POLICY_OBJECTIVES:
        register_policy_loss(f"{PREFIX}{name}")(make_policy_loss(name, **overrides.get(name, {})))
        names.append(f"{PREFIX}{name}")
    return tuple(names)


REGISTERED = register()

__all__ = ["CONFIG_ARGUMENTS", "PREFIX", "REGISTERED", "config_arguments", "make_policy_loss", "register"]
