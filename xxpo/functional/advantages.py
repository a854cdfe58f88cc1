"""Advantage estimators: how a scalar reward becomes a learning signal.

Rewards are ``(B,)`` with ``B = prompts x G`` laid out group by group (the G samples of prompt 0
first, then prompt 1, ...). Sequence advantages are ``(B,)``; GAE returns ``(B, T)``.
"""

from __future__ import annotations

import torch

from xxpo.functional.aggregation import masked_mean, masked_sum
from xxpo.functional.checks import check_choice, check_mask, check_number, check_same_shape, check_tensor

ADV_NORMS = ("group", "group_mean_batch_std", "group_mean_residual_std", "batch", "none")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    check_tensor("rewards", rewards, ndim=1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards length {rewards.shape[0]} is not a multiple of group_size {group_size}")
    return rewards.reshape(-1, group_size)  # (n_prompts, G)


def _weighted_mean(x: torch.Tensor, w: torch.Tensor, dim=None) -> torch.Tensor:
    """sum w x / sum w (0 where sum w = 0); over all entries, or over ``dim`` keeping it."""
    if dim is None:
        total = w.sum()
        return (w * x).sum() / total if bool(total > 0) else x.new_zeros(())
    total = w.sum(dim, keepdim=True)
    return torch.where(total > 0, (w * x).sum(dim, keepdim=True) / total.clamp(min=1e-30), torch.zeros_like(total))


def _weighted_std(dev: torch.Tensor, w: torch.Tensor, unbiased: bool, dim=None) -> torch.Tensor:
    """sqrt(sum w dev^2 / (sum w - 1)) (Bessel) or / sum w, for deviations ``dev`` from a centre; 1 where that
    count is <= 1 (unbiased) or 0 (biased), as AReaL's ``Normalization`` does."""
    kw = {} if dim is None else {"dim": dim, "keepdim": True}
    total = w.sum(**kw)
    denom = total - 1 if unbiased else total
    sq = (w * dev * dev).sum(**kw)
    return torch.where(denom > 0, (sq / denom.clamp(min=1e-30)).sqrt(), torch.ones_like(sq))


def _divide(dev: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dev / scale, with a zero scale (eps = 0 and all deviations 0) giving 0 rather than NaN."""
    return dev / torch.where(scale > 0, scale, torch.ones_like(scale))


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    adv_norm: str = "group",
    eps: float = 1e-6,
    unbiased: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages from outcome rewards (B,) laid out group by group; ``adv_norm`` picks the centre and scale.

    With m_g the mean of the prompt's G rewards, m and s the mean and std of all B rewards, s_g the std
    of the prompt's rewards, and r the std of the residuals R - m_g over the batch:

    - ``"group"``:                   (R - m_g) / (s_g + eps). GRPO (arXiv 2402.03300 Sec. 4.1.2); TRL
      ``scale_rewards="group"``; AReaL ``mean_level=group, std_level=group``.
    - ``"group_mean_batch_std"``:    (R - m_g) / (s + eps), s of the RAW rewards. TRL ``scale_rewards="batch"``.
    - ``"group_mean_residual_std"``: (R - m_g) / (r + eps), r = sqrt(sum (R - m_g)^2 / (N - 1)), N = B. AReaL
      ``mean_level=group, std_level=batch`` (its LitePPO configuration, arXiv 2508.08221): AReaL takes
      the batch std about the group means it subtracted.
    - ``"batch"``:                   (R - m) / (s + eps), no group mean. AReaL ``mean_level=batch,
      std_level=batch`` (its ``NormConfig`` default, set in its GRPO and A-3PO example configs).
    - ``"none"``:                    R - m_g. Dr. GRPO (arXiv 2503.20783 Sec. 3.2).

    ``mask`` (B, T), optional: count each response once per valid token in every mean and std, as AReaL
    does (it normalizes per-token advantages, which equal R on every response token when gamma = lambda
    = 1, there is no critic and no KL reward); N is then the number of valid tokens and a response with
    no valid token gets 0. Without it every response counts once, as in TRL and verl.

    ``eps=1e-6`` and the unbiased (Bessel) std follow verl; TRL uses 1e-4, AReaL 1e-5, the Dr. GRPO repo
    1e-8. Where the centre is a group mean, a group whose rewards are all equal gets advantages of
    exactly 0 (its float-error deviation would otherwise be divided by a tiny std); with ``"batch"``
    only a batch whose rewards are all equal does. Returns ``(B,)``.
    """
    check_choice("adv_norm", adv_norm, ADV_NORMS)
    check_number("eps", eps, low=0)
    grouped = _groups(rewards, group_size)  # (n, G)
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if mask is None:
        w = torch.ones_like(grouped)  # (n, G): one count per response
    else:
        check_tensor("mask", mask, ndim=2, floating=False)
        w = check_mask("mask", mask, (rewards.shape[0], mask.shape[-1])).to(rewards.dtype).sum(-1)  # (B,)
        w = w.reshape(grouped.shape)  # (n, G): valid tokens per response
    if adv_norm == "batch":
        centre = _weighted_mean(grouped, w)  # ()
        flat = grouped.amax() == grouped.amin()
        dev = torch.zeros_like(grouped) if bool(flat) else grouped - centre  # (n, G)
        out = _divide(dev, _weighted_std(dev, w, unbiased) + eps)
    else:
        centre = _weighted_mean(grouped, w, dim=-1)  # (n, 1)
        flat_group = grouped.amax(-1, keepdim=True) == grouped.amin(-1, keepdim=True)  # (n, 1)
        dev = torch.where(flat_group, torch.zeros_like(grouped), grouped - centre)  # (n, G)
        if adv_norm == "group":
            scale = _weighted_std(dev, w, unbiased, dim=-1) + eps  # (n, 1)
        elif adv_norm == "group_mean_batch_std":
            scale = _weighted_std(grouped - _weighted_mean(grouped, w), w, unbiased) + eps  # ()
        elif adv_norm == "group_mean_residual_std":
            scale = _weighted_std(dev, w, unbiased) + eps  # ()
        else:  # "none"
            scale = dev.new_tensor(1.0)
        out = _divide(dev, scale)
    if mask is not None:
        out = torch.where(w > 0, out, torch.zeros_like(out))
    return out.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): A_i = R_i - mean_{j != i} R_j within each group; ``(B,)``.

    The baseline of sample i is the mean of the other G - 1 rewards of its prompt, so it does not depend
    on R_i and the estimate stays unbiased. Equivalently A_i = G / (G - 1) (R_i - mean_j R_j): the group-mean
    advantage (``group_advantages(..., adv_norm="none")``) scaled by G / (G - 1), which is how verl computes it.
    """
    grouped = _groups(rewards, group_size)
    if group_size < 2:
        raise ValueError("group_size must be >= 2 for leave-one-out advantages")
    others_mean = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)  # (n, G)
    return (grouped - others_mean).reshape(-1)


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_size: int | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    eps: float = 1e-8,
    unbiased: bool = True,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262): discounted token returns, whitened over the whole batch; ``(B, T)``.

    Token rewards are the outcome reward on each response's last valid token minus ``kl_coef * kl`` on every
    token (the KL-in-reward of ``token_rewards_from_outcome``); the return G_t = sum_{s >= t} gamma^(s-t) r_s
    is then normalized by the mean and std over all valid tokens of the batch (``batch_whiten``): no critic
    and no per-prompt std. With ``group_size`` the mean reward of each prompt's group is subtracted from its
    outcome rewards first: REINFORCE++-baseline (verl ``reinforce_plus_plus_baseline``), which the paper
    recommends with several samples per prompt. Padding gets 0; a masked position passes no return on.
    With gamma = 1 and no KL every token of a response carries the same value, so the result is a
    token-weighted batch z-score of the (centred) outcome rewards. ``eps`` and the unbiased variance over
    the valid tokens follow verl's ``masked_whiten``.
    """
    check_tensor("rewards", rewards, ndim=1)
    m = check_mask("mask", mask, (rewards.shape[0], mask.shape[-1])).to(rewards.dtype)
    check_number("gamma", gamma, low=0, high=1)
    check_number("eps", eps, low=0)
    if group_size is not None:
        grouped = _groups(rewards, group_size)  # (n, G)
        rewards = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)  # (B,)
    token_rewards = token_rewards_from_outcome(rewards, m, kl, kl_coef)  # (B, T)
    returns, _ = gae(token_rewards, torch.zeros_like(token_rewards), m, gamma=gamma, lam=1.0)  # V = 0: G_t
    return batch_whiten(returns, m, eps=eps, unbiased=unbiased)


def batch_whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8, unbiased: bool = False) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid entries of the batch (PPO's advantage whitening).

    ``unbiased=True`` divides the variance by N - 1 (N valid entries; N when N <= 1), as verl's ``masked_whiten``.
    """
    check_tensor("x", x, ndim=(1, 2))
    mask = torch.ones_like(x) if mask is None else check_mask("mask", mask, x.shape).to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1) if bool(n > 1) else var
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (arXiv 1506.02438 Eq. 16) over masked token rewards.

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, run backwards.
    Masked positions are skipped: they neither receive nor pass on value or advantage, so
    padding inside or after a response cannot leak into the recursion. Returns
    ``(advantages, returns)`` both ``(B, T)``, zero where ``mask`` is 0; returns = A + V.
    """
    check_tensor("token_rewards", token_rewards, ndim=2)
    check_tensor("values", values, ndim=2)
    check_same_shape("token_rewards", token_rewards, values=values)
    m = check_mask("mask", mask, token_rewards.shape).to(values.dtype)
    check_number("gamma", gamma, low=0, high=1)
    check_number("lam", lam, low=0, high=1)
    values = values.detach()
    next_value = values.new_zeros(values.shape[0])  # (B,)
    last_adv = values.new_zeros(values.shape[0])  # (B,)
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * last_adv
        next_value = torch.where(m[:, t].bool(), values[:, t], next_value)
        last_adv = torch.where(m[:, t].bool(), adv_t, last_adv)
        advantages[:, t] = adv_t * m[:, t]
    return advantages, (advantages + values) * m


def sequence_value_advantages(rewards: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sequence-level PPO (arXiv 2604.08865): A = R - V(x) with V(x) in (0, 1) from a prompt-only critic.

    One scalar per response, broadcast to all its tokens by the objective; not normalized, as in
    the authors' code. ``values`` is detached. Shapes ``(B,)``.
    """
    check_tensor("rewards", rewards, ndim=1)
    check_tensor("values", values, ndim=1)
    check_same_shape("rewards", rewards, values=values)
    return rewards - values.detach()


def token_rewards_from_outcome(
    rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """Per-token rewards for PPO: the outcome reward on each response's last valid token, minus
    ``kl_coef * kl`` on every token (the KL-in-reward form of Ziegler et al., arXiv 1909.08593). ``(B, T)``."""
    check_tensor("rewards", rewards, ndim=1)
    m = check_mask("mask", mask, (rewards.shape[0], mask.shape[-1])).to(rewards.dtype)
    check_number("kl_coef", kl_coef, low=0)
    lengths = m.sum(-1).long()  # (B,)
    out = torch.zeros_like(m)
    rows = torch.arange(m.shape[0], device=m.device)
    has = lengths > 0
    last = (m * torch.arange(m.shape[1], device=m.device)).argmax(-1)  # index of the last valid token
    out[rows[has], last[has]] = rewards[has]
    if kl is not None and kl_coef > 0:
        out = out - kl_coef * kl.detach() * m
    return out

