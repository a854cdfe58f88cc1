"""Corrections for the mismatch between the sampler's log-probs and the trainer's (TIS, MIS, IcePop).

An inference engine (vLLM, SGLang, a bfloat16 sampler) and the trainer compute slightly different
probabilities for the same weights, so the tokens a policy-gradient loss treats as samples of pi_old were
really drawn from a sampler distribution mu. Importance sampling fixes the measure with, per token,

    rho_t = pi_old(y_t) / mu(y_t)            (trainer's log-prob of the behaviour policy minus the sampler's)

and per response rho = prod_t rho_t (a *product*: a sequence-level correction needs the whole likelihood
ratio, not GSPO's geometric mean). Raw ratios have unbounded variance; the peers bound them in two ways,
at two levels:

=============== ============================================================ =================================
level / mode    weight w                                                     known as
=============== ============================================================ =================================
token truncate  clip(rho_t, low, high)                                       TIS (truncated IS; verl
                                                                             ``rollout_is='token'``)
token mask      rho_t if low <= rho_t <= high else 0                         IcePop (Ling team, Ring-1T,
                                                                             arXiv 2510.18855; verl's
                                                                             bounds 0.5 and 5)
sequence trunc. clip(rho, low, high) on every token of the response          sequence TIS
sequence mask   rho if low <= rho <= high else 0, on every token             MIS (masked IS; the "When Speed
                                                                             Kills Stability" note that verl's
                                                                             rollout correction cites)
=============== ============================================================ =================================

TRL calls these ``vllm_importance_sampling_mode`` = ``token_truncate``, ``token_mask``,
``sequence_truncate``, ``sequence_mask`` (its default, with ``_clip_max`` 3 and no ``_clip_min``); verl's
``compute_rollout_correction_weights`` computes token/sequence truncation from a single threshold and IcePop
from a ``"low_high"`` string. The weights are constants (no gradient): they change the measure, not the
objective.

How to use them with any objective of ``xxpo.objectives``: the weight multiplies each token's policy loss
(not a KL term), which is what TRL and verl do. For every objective whose per-token loss is positively
homogeneous in the advantage (PPO, GRPO, Dr. GRPO, DAPO, CISPO, SAPO, Decoupled PPO, sequence-level PPO,
GSPO-token: l(w A) = w l(A) for w >= 0) that is exactly ``objective(logp, old_logp, advantages * w, mask)``
with (B, T) advantages; for the sequence-level objectives (GSPO, GMPO) use ``level="sequence"`` and
``advantages * seq_weights`` (B,). Here ``old_logp`` is the trainer's log-prob of the behaviour policy (the
ratio r = pi_theta / pi_old stays the trainer's), as in verl's "decoupled" mode and TRL.

Deviations: the log-ratio (token, or summed over a response) is clamped to [-20, 20] before exp, as verl
does (TRL does not clamp). Weights are 0 on padding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from xxpo.functional import masked_mean, masked_sum
from xxpo.functional.checks import check_choice, check_mask, check_number, check_same_shape, check_tensor
from xxpo.functional.ratios import LOG_RATIO_CLAMP
from xxpo.objectives.output import detached

MISMATCH_LEVELS = ("token", "sequence")
MISMATCH_MODES = ("truncate", "mask")


class MismatchWeights(NamedTuple):
    """``weights`` (B, T): detached, >= 0, 0 on padding. ``seq_weights`` (B,): one weight per response
    (``level="sequence"`` only, else None). ``metrics``: detached scalars (see ``mismatch_weights``)."""

    weights: torch.Tensor
    seq_weights: torch.Tensor | None
    metrics: dict[str, torch.Tensor]


def mismatch_weights(
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    low: float | None = None,
    high: float | None = 2.0,
) -> MismatchWeights:
    """Importance weights pi_old / mu for tokens sampled by ``sampler_logp`` but scored by the trainer's ``old_logp``.

    ``level``: 'token' (rho_t) or 'sequence' (rho = prod_t rho_t, the same weight on every token of a
    response). ``mode``: 'truncate' clamps the weight to [low, high]; 'mask' sets it to 0 outside [low, high]
    and leaves it unchanged inside. ``None`` leaves that side open (``low=None, high=None`` gives raw IS).
    TIS: ``level='token', mode='truncate', high=2`` (verl's default threshold; TRL's cap is 3). MIS:
    ``level='sequence', mode='mask'``. IcePop: ``level='token', mode='mask', low=0.5, high=5``.

    Metrics: is_weight_mean / is_weight_max (over valid tokens, after the bound), is_bound_frac (fraction of
    valid tokens whose weight was truncated or masked), is_seq_bound_frac (fraction of non-empty responses
    with at least one such token) and mismatch_kl (mean k3 estimate of KL(mu || pi_old) per token).
    """
    check_tensor("old_logp", old_logp, ndim=2)
    check_tensor("sampler_logp", sampler_logp, ndim=2)
    check_same_shape("old_logp", old_logp, sampler_logp=sampler_logp)
    m = check_mask("mask", mask, old_logp.shape).to(old_logp.dtype)
    check_choice("level", level, MISMATCH_LEVELS)
    check_choice("mode", mode, MISMATCH_MODES)
    check_number("low", low, low=0, allow_none=True)
    check_number("high", high, low=0, low_inclusive=False, allow_none=True)
    if low is not None and high is not None and low > high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")
    log_rho = (old_logp - sampler_logp).detach()  # (B, T)
    log_rho = torch.where(m.bool(), log_rho, torch.zeros_like(log_rho))  # padding never leaks in
    if level == "sequence":
        seq_log_rho = masked_sum(log_rho, m, dim=-1)  # (B,): log of the product over the response
        raw = torch.exp(seq_log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).unsqueeze(-1).expand_as(m)  # (B, T)
    else:
        raw = torch.exp(log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (B, T): rho_t
    lo = -torch.inf if low is None else low
    hi = torch.inf if high is None else high
    outside = (raw < lo) | (raw > hi)  # (B, T)
    if mode == "truncate":
        w = raw if low is None and high is None else raw.clamp(min=low, max=high)
    else:
        w = torch.where(outside, torch.zeros_like(raw), raw)
    w = w * m  # (B, T), 0 on padding
    bound = outside & m.bool()
    valid = m.bool()
    nonempty = valid.any(-1)  # (B,)
    token_log_rho = log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    k3 = torch.expm1(token_log_rho) - token_log_rho  # (B, T), samples from mu: estimates KL(mu || pi_old)
    metrics = detached(
        is_weight_mean=masked_mean(w, m),
        is_weight_max=w[valid].max() if bool(valid.any()) else w.new_zeros(()),
        is_bound_frac=masked_mean(bound.to(m.dtype), m),
        is_seq_bound_frac=masked_mean(bound.any(-1).to(m.dtype), nonempty),
        mismatch_kl=masked_mean(k3, m),
    )
    seq_weights = masked_mean(w, m, dim=-1) if level == "sequence" else None  # (B,): the response's one weight
    return MismatchWeights(w, seq_weights, metrics)
