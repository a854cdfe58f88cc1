"""GMPO: Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv 2507.20673).

GRPO's per-response objective is the *arithmetic* mean over tokens of r_it A_i, so one token with an
extreme ratio can dominate the update. GMPO takes the *geometric* mean of the (clipped) token terms
instead, which an outlier moves far less, and writes it for A_i of either sign as

    J = E[ 1/G sum_i ( prod_t |min(r_it A_i, clip(r_it, e^-eps_low, e^eps_high) A_i)| )^(1/|o_i|) sgn(A_i) ]

Because A_i is one number per response, the product factors into A_i times a sequence ratio:

    J = E[ 1/G sum_i A_i exp( 1/|o_i| sum_t c_it ) ]
    c_it = min(log r_it, clip(log r_it, -eps_low, eps_high))   if A_i > 0
           max(log r_it, clip(log r_it, -eps_low, eps_high))   if A_i < 0

so each token is clipped on its own, in log space, on the side its advantage pushes towards (PPO's
pessimistic bound), and only then are the tokens averaged. Unclipped, exp(mean_t log r_it) is exactly
GSPO's sequence ratio s_i (arXiv 2507.18071 Eq. 7); the two differ in *where* they clip: GSPO clips s_i
and drops the whole response, GMPO clips tokens and drops only those. The gradient is
A_i s~_i 1/|o_i| sum_{t unclipped} grad log pi(o_it), with s~_i the clipped geometric mean: every kept
token of a response gets the same weight, as in GSPO. The paper's clip range is (e^-0.4, e^0.4), far wider
than GRPO's, which the outlier-robust mean tolerates.

Deviations from the paper: none in the loss. Responses with no valid token are left out of the mean over
responses (TRL's ``GMPOTrainer`` counts them, with value -A_i and no gradient). There is no KL term (the
paper trains without one; TRL's optional beta adds a per-response mean k3). The mean log-ratio is clamped
to [-20, 20] before exp, as everywhere in xxpo; verl's ``geo_mean`` does not clamp.
"""

from __future__ import annotations

import torch

from xxpo.functional import masked_mean
from xxpo.functional.checks import check_number
from xxpo.functional.ratios import LOG_RATIO_CLAMP
from xxpo.objectives.output import LossOutput, detached
from xxpo.objectives.ppo import check_policy_inputs, ratio_metrics


def gmpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.4,
    clip_eps_high: float | None = None,
) -> LossOutput:
    """GMPO's loss L = -J with per-token clipping in log space; advantages must be (B,).

    ``clip_eps_low`` / ``clip_eps_high`` bound log r (so r to (e^-clip_eps_low, e^clip_eps_high)); high
    defaults to low. Averaged over the responses that have at least one valid token (the paper's 1/G).
    Metrics: clip_frac_low / clip_frac_high / clip_frac (fraction of valid tokens whose gradient the clip
    removes: log r < -eps_low with A < 0, log r > eps_high with A > 0), ratio_mean/min/max and approx_kl of
    the token ratios r, and seq_ratio_mean (mean clipped geometric-mean ratio over responses).
    """
    adv, m = check_policy_inputs(logp, old_logp, advantages, mask, per_sequence_only=True)
    check_number("clip_eps_low", clip_eps_low, low=0)
    check_number("clip_eps_high", clip_eps_high, low=0, allow_none=True)
    eps_low = clip_eps_low
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    log_ratio = logp - old_logp.detach()  # (B, T), raw
    bounded = log_ratio.clamp(-eps_low, eps_high)  # (B, T)
    pessimistic = torch.where(adv > 0, torch.minimum(log_ratio, bounded), torch.maximum(log_ratio, bounded))  # (B, T)
    log_s = masked_mean(pessimistic, m, dim=-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B,)
    s = torch.exp(log_s)  # (B,): clipped geometric mean of the token ratios
    seq_adv = adv[:, 0]  # (B,)
    nonempty = m.sum(-1) > 0  # (B,)
    loss = masked_mean(-s * seq_adv, nonempty)
    token_log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # for the logged token statistics
    low = (log_ratio < -eps_low) & (adv < 0)
    high = (log_ratio > eps_high) & (adv > 0)
    metrics = ratio_metrics(torch.exp(token_log_ratio), token_log_ratio, m, low, high)
    metrics.update(detached(seq_ratio_mean=masked_mean(s, nonempty)))
    return LossOutput(loss, metrics)
