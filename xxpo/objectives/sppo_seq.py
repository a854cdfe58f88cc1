"""SPPO (sequence-level PPO): Sequence-Level PPO for Long-Horizon Reasoning (Wang et al. 2026, arXiv 2604.08865).

Not to be confused with self-play preference optimization (``sppo_selfplay.py``).

Reasoning with a verifiable reward is treated as a *contextual bandit*: the context is the prompt, the
action is the whole response, the reward R in {0, 1} arrives once. So the critic need not value every
token: a prompt-only value V(x) = sigmoid(f_phi(x)) estimates how solvable the prompt is, trained with
binary cross-entropy against R, and every token of the response gets the same advantage A = R - V(x)
(``xxpo.functional.sequence_value_advantages``). One sample per prompt suffices: the critic, not a group
of G samples, provides the baseline. The policy update is PPO's clipped surrogate with token ratios,
eps = 0.2, token-mean, no KL, as in the authors' code.

Deviations: none from the authors' code; whether the paper's equations use a sequence-level ratio is
unverified (the fact sheet, sec. 13.2), so we follow the code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xxpo.functional.checks import check_same_shape, check_tensor
from xxpo.objectives.output import LossOutput, detached
from xxpo.objectives.ppo import ppo_loss


def sequence_value_loss(value_logits: torch.Tensor, rewards: torch.Tensor) -> LossOutput:
    """BCE of sigmoid(value_logits) against rewards in [0, 1]; both (B,).

    Metrics: value_mean (mean V(x)), calibration_error (|mean V(x) - mean R|).
    """
    check_tensor("value_logits", value_logits, ndim=1)
    check_tensor("rewards", rewards, ndim=1)
    check_same_shape("value_logits", value_logits, rewards=rewards)
    if bool(((rewards < 0) | (rewards > 1)).any()):
        raise ValueError("rewards must lie in [0, 1] for the BCE critic; rescale them first")
    loss = F.binary_cross_entropy_with_logits(value_logits, rewards.detach().to(value_logits.dtype))
    v = torch.sigmoid(value_logits)
    return LossOutput(loss, detached(value_mean=v.mean(), calibration_error=(v.mean() - rewards.mean()).abs()))


def sppo_seq_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
) -> LossOutput:
    """Sequence-level PPO's policy loss: PPO's clipped surrogate with A = R - V(x) (B,) on every token.

    ``dual_clip_c``: the optional third clip of dual-clip PPO, as in ``ppo_loss`` (off by default)."""
    return ppo_loss(logp, old_logp, advantages, mask, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                    dual_clip_c=dual_clip_c, loss_agg_mode=loss_agg_mode, norm_len=norm_len)
