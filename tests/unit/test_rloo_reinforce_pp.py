"""leave_one_out_advantages (RLOO, arXiv 2402.14740) and reinforce_pp_advantages (REINFORCE++, arXiv 2501.03262):
hand-computed values, masking, fuzzing, clear errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xxpo.functional as F


def test_rloo_hand_computed():
    # group (1, 0, 0, 1): each baseline is the mean of the other three -> 1 - 1/3, 0 - 2/3, ...
    adv = F.leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0]), 2)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0, -2.0, 2.0]))
    adv = F.leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), 4)
    assert torch.allclose(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3], dtype=torch.float64))


def test_rloo_errors_name_the_argument():
    with pytest.raises(ValueError, match="group_size"):
        F.leave_one_out_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        F.leave_one_out_advantages(torch.ones(5), 2)
    with pytest.raises(TypeError, match="rewards"):
        F.leave_one_out_advantages(torch.ones(4, dtype=torch.long), 2)


def _whiten(values, counts, unbiased=True, eps=1e-8):
    """Plain Python: (x - mean) / sqrt(var + eps) over a multiset (value repeated count times)."""
    n = sum(counts)
    mean = sum(v * c for v, c in zip(values, counts)) / n
    var = sum(c * (v - mean) ** 2 for v, c in zip(values, counts)) / (n - 1 if unbiased else n)
    return [(v - mean) / math.sqrt(var + eps) for v in values]


def test_reinforce_pp_hand_computed_outcome_only():
    # gamma = 1, no KL: every token of a response carries its reward, whitened over the 2 + 3 + 1 valid tokens
    rewards = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    adv = F.reinforce_pp_advantages(rewards, mask)
    z = _whiten([1.0, 0.0, 0.5], [2, 3, 1])
    expected = torch.tensor([[z[0], z[0], 0], [z[1]] * 3, [z[2], 0, 0]], dtype=torch.float64)
    assert torch.allclose(adv, expected, atol=1e-12)


def test_reinforce_pp_hand_computed_discount_and_kl():
    # one response of 3 tokens plus one of 1 token; gamma = 0.5, kl_coef = 0.1, per-token KL (0.2, 0.4, 0.6) / (1.0)
    rewards = torch.tensor([1.0, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    kl = torch.tensor([[0.2, 0.4, 0.6], [1.0, 7.0, 7.0]], dtype=torch.float64)
    adv = F.reinforce_pp_advantages(rewards, mask, kl=kl, kl_coef=0.1, gamma=0.5)
    r = [-0.02, -0.04, 1.0 - 0.06]  # token rewards of response 0; response 1: 2 - 0.1
    g2 = r[2]
    g1 = r[1] + 0.5 * g2
    g0 = r[0] + 0.5 * g1
    z = _whiten([g0, g1, g2, 1.9], [1, 1, 1, 1])
    expected = torch.tensor([[z[0], z[1], z[2]], [z[3], 0, 0]], dtype=torch.float64)
    assert torch.allclose(adv, expected, atol=1e-12)


def test_reinforce_pp_baseline_subtracts_the_group_mean_first():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(4, 2, dtype=torch.float64)
    adv = F.reinforce_pp_advantages(rewards, mask, group_size=2)
    z = _whiten([0.5, -0.5, 0.0, 0.0], [2, 2, 2, 2])
    assert torch.allclose(adv[:, 0], torch.tensor(z, dtype=torch.float64), atol=1e-12)
    # an all-equal group is centred to 0 before whitening (it then takes the batch's shift, as in verl)
    assert adv[2, 0] == adv[3, 0]


def test_reinforce_pp_padding_inside_a_response_is_skipped():
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.float64)
    kl = torch.tensor([[0.0, 50.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # the hole's KL must not count
    adv = F.reinforce_pp_advantages(rewards, mask, kl=kl, kl_coef=1.0, gamma=0.9)
    assert adv[0, 1] == 0.0
    # response 0: G = 0.9^(number of valid steps to the end) x 1 -> 0.9 on token 0, 1 on token 2
    z = _whiten([0.9, 1.0, 0.0], [1, 1, 3])
    assert torch.allclose(adv[0, [0, 2]], torch.tensor(z[:2], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("kwargs, name", [
    (dict(gamma=1.5), "gamma"),
    (dict(group_size=3), "multiple of group_size"),
    (dict(kl_coef=-1.0), "kl_coef"),
    (dict(eps=-1.0), "eps"),
])
def test_reinforce_pp_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        F.reinforce_pp_advantages(torch.ones(4), torch.ones(4, 2), **kwargs)


def test_reinforce_pp_mask_shape_is_checked():
    with pytest.raises(ValueError, match="mask"):
        F.reinforce_pp_advantages(torch.ones(4), torch.ones(3, 2))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.data(),
       st.sampled_from([torch.float32, torch.float64]), st.sampled_from([0.0, 0.5, 1.0]))
def test_fuzz_reinforce_pp_and_rloo(groups, g, t, data, dtype, gamma):
    b = groups * g
    rewards = torch.tensor([data.draw(st.floats(-100, 100, allow_nan=False)) for _ in range(b)], dtype=dtype)
    mask = torch.tensor([[data.draw(st.booleans()) for _ in range(t)] for _ in range(b)])
    adv = F.reinforce_pp_advantages(rewards, mask, gamma=gamma, group_size=g if data.draw(st.booleans()) else None)
    assert adv.shape == (b, t) and torch.isfinite(adv).all() and (adv[~mask] == 0).all()
    if g >= 2:
        loo = F.leave_one_out_advantages(rewards, g)
        assert torch.isfinite(loo).all()
        assert torch.allclose(loo.reshape(groups, g).sum(-1), torch.zeros(groups, dtype=dtype),
                              atol=1e-3 * (1 + float(rewards.abs().max())))
