"""CISPO: Clipped IS-weight Policy Optimization (MiniMax 2025, MiniMax-M1, arXiv 2506.13585, Sec. 3.1).

PPO and GRPO bound an update by clipping the *surrogate*: once r_it leaves [1 - eps, 1 + eps] on the side
the advantage pushes towards, the token's gradient is zero. MiniMax-M1 observed that the tokens switched
off this way are often rare "fork" tokens (However, Wait, Recheck) whose probability a good update raises
sharply, so they stop learning after the first minibatch. CISPO keeps every token's gradient and bounds
the *weight* of that gradient instead:

    r^_it = clip(r_it, 1 - eps_low, 1 + eps_high)                                                (Eq. 5)
    J     = E[ 1/sum_i |o_i| sum_i sum_t sg(r^_it) A_it log pi_theta(o_it) ]                      (Eq. 4)

sg is the stop-gradient. The gradient is sg(r^_it) A_it grad log pi(o_it) on every valid token: where
nothing is clipped it equals the gradient of GRPO's unclipped term r_it A_it (grad r = r grad log pi), and
on-policy (r = 1) it is REINFORCE's. The paper leaves the weight unbounded below (a large eps_low) and
tunes only eps_high.

Deviations from the paper: none in the loss. Only the gradient of J means something: the *value* of
sg(r^) A log pi is not an estimate of any return (TRL and verl compute the same value). ``clip_eps_low=None``
(the default) is the paper's "no lower bound"; the weight is then clip(r, 0, 1 + eps_high). The
paper's general form with a token mask M_it (Eq. 6-7, which can re-create PPO's trust region) is not
implemented. The log-ratio is clamped to [-20, 20] before exp, as everywhere in xxpo. ``clip_eps_high``
is xxpo's eps in 1 + eps: TRL's ``epsilon_high`` for ``loss_type='cispo'`` is the cap 1 + eps itself
(its recommended 5.0 is ``clip_eps_high=4.0`` here); verl's ``clip_ratio_high`` is eps, as here.
"""

from __future__ import annotations

import torch

from xxpo.functional import aggregate, masked_mean, token_log_ratio
from xxpo.functional.checks import check_number
from xxpo.objectives.output import LossOutput, detached
from xxpo.objectives.ppo import check_policy_inputs, ratio_metrics


def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float | None = None,
    clip_eps_high: float = 4.0,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
) -> LossOutput:
    """CISPO's loss L = -J (arXiv 2506.13585 Eq. 4) for (B, T) tensors; advantages (B,) or (B, T).

    Per token ``-sg(clip(r, 1 - clip_eps_low, 1 + clip_eps_high)) * A * logp``; ``clip_eps_low=None`` puts no
    lower bound on the weight. ``token-mean`` is the paper's 1 / sum_i |o_i|.
    Metrics: clip_frac_low / clip_frac_high (fraction of valid tokens whose *weight* was clipped below /
    above, whatever the sign of A: unlike PPO, their gradient is kept), clip_frac, is_weight_mean (mean
    clipped weight), ratio_mean/min/max and approx_kl of the unclipped r.
    """
    adv, m = check_policy_inputs(logp, old_logp, advantages, mask)
    check_number("clip_eps_low", clip_eps_low, low=0, high=1, allow_none=True)
    check_number("clip_eps_high", clip_eps_high, low=0)
    log_ratio = token_log_ratio(logp, old_logp)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    low_bound = 0.0 if clip_eps_low is None else 1.0 - clip_eps_low
    weight = ratio.detach().clamp(low_bound, 1.0 + clip_eps_high)  # (B, T): sg(r^), no gradient
    loss_mat = -weight * adv * logp  # (B, T): gradient -r^ A grad log pi on every valid token
    loss = aggregate(loss_mat, m, loss_agg_mode, norm_len)
    low = ratio < low_bound
    high = ratio > 1.0 + clip_eps_high
    metrics = ratio_metrics(ratio, log_ratio, m, low, high)
    metrics.update(detached(is_weight_mean=masked_mean(weight, m)))
    return LossOutput(loss, metrics)
