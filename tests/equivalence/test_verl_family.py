"""xxpo's CISPO, GMPO, RLOO, REINFORCE++ and mismatch weights against verl 0.9.1's own functions, called directly
(``core_algos`` losses and advantage estimators, ``rollout_corr_helper``).

Known differences, asserted below: verl's ``geo_mean`` adds 1e-8 to its length denominators (equal to ~1e-9
relative) and averages over every row; verl's CISPO applies its default lower bound 1 - clip_ratio_low (the
paper, TRL and xxpo's default have none); REINFORCE++-baseline in verl tiles the *summed* token rewards over the
response, so it equals xxpo's only without a KL term in the reward.
"""

import types

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights  # noqa: E402
from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402

import xxpo.functional as F  # noqa: E402
import xxpo.objectives as O  # noqa: E402
from value_grad import value_and_grad  # noqa: E402

B, T = 8, 6


def _actor(loss_mode, **fields):
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode), **fields)


def _batch(seed, spread=0.35):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T) bool, every row non-empty
    old = -0.2 - 2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    logp = (old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    seq_adv = torch.randn(B, generator=g, dtype=torch.float64)
    seq_adv[0], seq_adv[3] = abs(seq_adv[0]) + 0.2, -abs(seq_adv[3]) - 0.2
    return logp, old, seq_adv[:, None] * mask, mask, seq_adv



@pytest.mark.parametrize("low, high", [(1.0, 4.0), (0.2, 0.2), (0.5, 0.1)])
def test_cispo_equals_verl(low, high):
    logp, old, adv, mask, _ = _batch(1, spread=0.8)
    cfg = _actor("cispo", clip_ratio_low=low, clip_ratio_high=high)
    fn = core_algos.get_policy_loss_fn("cispo")
    verl_v, verl_g = value_and_grad(logp, lambda: fn(old, logp, adv, mask, "token-mean", cfg))
    ours_v, ours_g = value_and_grad(logp, lambda: O.cispo_loss(logp, old, adv, mask, clip_eps_low=low, clip_eps_high=high))
    assert torch.allclose(ours_v, verl_v, rtol=1e-10, atol=1e-13) and torch.allclose(ours_g, verl_g, rtol=1e-10, atol=1e-13)
    _, metrics = fn(old, logp, adv, mask, "token-mean", cfg)
    assert 0 < metrics["actor/pg_clipfrac"] < 1  # the bounds bite


@pytest.mark.parametrize("eps", [0.4, 0.1])
def test_gmpo_equals_verl_geo_mean(eps):
    logp, old, adv, mask, seq_adv = _batch(2)
    cfg = _actor("geo_mean", clip_ratio_low=eps, clip_ratio_high=eps)
    fn = core_algos.get_policy_loss_fn("geo_mean")
    verl_v, verl_g = value_and_grad(logp, lambda: fn(old, logp, adv, mask, "token-mean", cfg))
    ours_v, ours_g = value_and_grad(logp, lambda: O.gmpo_loss(logp, old, seq_adv, mask, clip_eps_low=eps))
    assert torch.allclose(ours_v, verl_v, rtol=1e-7, atol=1e-12) and torch.allclose(ours_g, verl_g, rtol=1e-7, atol=1e-12)
    _, metrics = fn(old, logp, adv, mask, "token-mean", cfg)
    assert metrics["actor/pg_clipfrac"] + metrics["actor/pg_clipfrac_lower"] > 0


def test_rloo_equals_verl():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    mask = torch.ones(12, 4, dtype=torch.float64)
    mask[1, 2:] = 0
    token_rewards = F.token_rewards_from_outcome(rewards, mask)
    index = np.repeat(np.arange(3), 4)
    adv, _ = core_algos.compute_rloo_outcome_advantage(token_rewards, mask, index)
    assert torch.allclose(adv, F.leave_one_out_advantages(rewards, 4)[:, None] * mask, atol=1e-12)


@pytest.mark.parametrize("gamma, kl_coef", [(1.0, 0.0), (0.9, 0.0), (1.0, 0.1), (0.7, 0.05)])
def test_reinforce_pp_equals_verl(gamma, kl_coef):
    g = torch.Generator().manual_seed(4)
    rewards = torch.rand(10, generator=g, dtype=torch.float64).round()
    mask = torch.ones(10, 5, dtype=torch.float64)
    mask[2, 3:] = 0
    mask[4, 1] = 0  # a hole inside a response
    kl = 0.3 * torch.randn(10, 5, generator=g, dtype=torch.float64)
    token_rewards = F.token_rewards_from_outcome(rewards, mask, kl, kl_coef)  # verl's token_level_rewards
    verl_adv, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(
        token_rewards, mask, config=types.SimpleNamespace(gamma=gamma))
    ours = F.reinforce_pp_advantages(rewards, mask, kl=kl, kl_coef=kl_coef, gamma=gamma)
    assert torch.allclose(ours, verl_adv, atol=1e-12)


def test_reinforce_pp_baseline_equals_verl_without_kl():
    g = torch.Generator().manual_seed(5)
    rewards = torch.rand(12, generator=g, dtype=torch.float64).round()
    mask = torch.ones(12, 4, dtype=torch.float64)
    mask[3, 1:] = 0
    index = np.repeat(np.arange(3), 4)
    verl_adv, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        F.token_rewards_from_outcome(rewards, mask), mask, index)
    assert torch.allclose(F.reinforce_pp_advantages(rewards, mask, group_size=4), verl_adv, atol=1e-12)


@pytest.mark.parametrize("level, threshold, kwargs", [
    ("token", 2.0, dict(mode="truncate", high=2.0)),
    ("sequence", 2.0, dict(mode="truncate", high=2.0)),
    ("token", "0.5_5.0", dict(mode="mask", low=0.5, high=5.0)),  # IcePop
])
def test_mismatch_weights_equal_verl_rollout_correction(level, threshold, kwargs):
    g = torch.Generator().manual_seed(6)
    _, old, _, mask, _ = _batch(7)
    sampler = old + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    verl_w, _ = compute_rollout_correction_weights(old - sampler, mask.double(), rollout_is=level,
                                                   rollout_is_threshold=threshold)
    ours = O.mismatch_weights(old, sampler, mask, level=level, **kwargs)
    assert torch.allclose(ours.weights, verl_w, atol=1e-12)
    assert 0 < ours.metrics["is_bound_frac"].item() < 1
