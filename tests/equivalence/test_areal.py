"""xxpo's advantage normalizations against AReaL's (inclusionAI/AReaL@4aef98d8, algorithms.md section 15.3).

AReaL is not installed here, so its ``Normalization`` (``areal/utils/data.py``) is re-stated below from its
code: it works on PER-TOKEN advantages with the loss mask, a mean level and a std level each in
{batch, group, None}; the std is taken about whichever mean was subtracted (the group means when
``mean_level=group``), Bessel-corrected by default (``std_unbiased=True``), and ``eps=1e-5`` is added to it.
Its actor builds the per-token advantages with GAE on the outcome reward placed at the last response
token; with gamma = lambda = 1, no critic and ``kl_ctl = 0`` (its GRPO-family examples) every response
token carries the response's reward, which is what ``_per_token_advantages`` builds.

AReaL's levels map to xxpo's ``adv_norm`` as: batch/batch -> "batch" (AReaL's default, used for decoupled
PPO and A-3PO), group/batch -> "group_mean_residual_std" (its LitePPO row), group/group -> "group",
group/None -> "none". ``mask`` makes xxpo count tokens as AReaL does.
"""

import pytest
import torch

import xxpo.functional as F

AREAL_EPS = 1e-5
LEVELS = [(("batch", "batch"), "batch"), (("group", "batch"), "group_mean_residual_std"),
          (("group", "group"), "group"), (("group", None), "none")]


def _per_token_advantages(rewards, mask):
    """GAE with gamma = lambda = 1 and V = 0 on a reward at the last valid token: a reverse cumulative sum."""
    last = mask.cumsum(-1) == mask.sum(-1, keepdim=True)  # (B, T) at and after the last valid token
    first_last = last & mask.bool()
    token_rewards = torch.where(first_last, rewards[:, None], torch.zeros_like(mask))  # (B, T)
    return token_rewards.flip(-1).cumsum(-1).flip(-1) * mask  # (B, T)


def _areal_normalize(x, mask, mean_level, std_level, group_size, eps=AREAL_EPS, unbiased=True):
    """Re-statement of AReaL's Normalization.__call__ on (B, T) advantages and a 0/1 loss mask."""
    x, mask = x.double(), mask.double()

    def mean_of(xs, ms):
        n = ms.sum()
        return (xs * ms).sum() / n if n > 0 else torch.zeros((), dtype=xs.dtype)

    def std_of(xs, ms, centre):
        n = ms.sum()
        sq = ((xs * ms - centre * ms) ** 2).sum()
        if unbiased:
            return torch.ones((), dtype=xs.dtype) if n <= 1 else (sq / (n - 1)).sqrt()
        return torch.ones((), dtype=xs.dtype) if n == 0 else (sq / n).sqrt()

    groups = [slice(k, k + group_size) for k in range(0, x.shape[0], group_size)]
    if mean_level == "batch":
        mean = mean_of(x, mask).expand_as(x)
    elif mean_level == "group":
        mean = torch.zeros_like(x)
        for s in groups:
            mean[s] = mean_of(x[s], mask[s])
    else:
        mean = torch.zeros_like(x)
    centred = (x - mean) * mask
    if std_level == "batch":
        std = std_of(x, mask, mean).expand_as(x)
    elif std_level == "group":
        std = torch.zeros_like(x)
        for s in groups:
            std[s] = std_of(x[s], mask[s], mean[s])
    else:
        std, eps = torch.ones_like(x), 0.0
    return centred / (std + eps)


def _batch(seed, n_groups=4, g=4, t=6):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.rand(n_groups * g, generator=gen, dtype=torch.float64).round()  # binary
    rewards[:g] = 1.0  # a group that is all correct
    rewards[g:2 * g] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n_groups * g,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).double()  # (B, T) ragged
    return rewards, mask, g


@pytest.mark.parametrize("levels,adv_norm", LEVELS, ids=[a for _, a in LEVELS])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adv_norm_matches_areal_token_level(levels, adv_norm, unbiased, seed):
    rewards, mask, g = _batch(seed)
    theirs = _areal_normalize(_per_token_advantages(rewards, mask), mask, *levels, g, unbiased=unbiased)  # (B, T)
    ours = F.group_advantages(rewards, g, adv_norm=adv_norm, eps=AREAL_EPS, unbiased=unbiased, mask=mask)  # (B,)
    assert torch.allclose(ours[:, None] * mask, theirs, atol=1e-12, rtol=1e-9)


def test_per_token_advantages_carry_the_reward():
    rewards, mask, _ = _batch(3)
    assert torch.equal(_per_token_advantages(rewards, mask), rewards[:, None] * mask)


@pytest.mark.parametrize("levels,adv_norm", LEVELS, ids=[a for _, a in LEVELS])
def test_token_weighting_is_what_makes_it_exact(levels, adv_norm):
    """Without the mask each response counts once; with ragged lengths that is not AReaL's number."""
    rewards, mask, g = _batch(0)
    theirs = _areal_normalize(_per_token_advantages(rewards, mask), mask, *levels, g)
    per_response = F.group_advantages(rewards, g, adv_norm=adv_norm, eps=AREAL_EPS)
    assert not torch.allclose(per_response[:, None] * mask, theirs, atol=1e-6)
