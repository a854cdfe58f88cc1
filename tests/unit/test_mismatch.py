"""mismatch_weights: TIS, sequence TIS, MIS and IcePop weights for the sampler-trainer mismatch, and their use
with any objective through the advantages."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xxpo.objectives as O
from xxpo.objectives import mismatch_weights

MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float64)


def _logps(log_rho):
    old = torch.full((3, 3), -1.0, dtype=torch.float64)
    return old, old - torch.tensor(log_rho, dtype=torch.float64)  # sampler = old - log rho


LOG_RHO = [[math.log(3.0), math.log(0.4), 0.0], [math.log(1.5), math.log(6.0), 9.0], [5.0, 5.0, 5.0]]


def test_token_truncate_is_tis():
    old, sampler = _logps(LOG_RHO)
    out = mismatch_weights(old, sampler, MASK, level="token", mode="truncate", high=2.0)
    assert torch.allclose(out.weights, torch.tensor([[2.0, 0.4, 1.0], [1.5, 2.0, 0.0], [0, 0, 0]],
                                                    dtype=torch.float64))
    assert out.seq_weights is None
    assert abs(out.metrics["is_bound_frac"].item() - 2 / 5) < 1e-6
    assert abs(out.metrics["is_seq_bound_frac"].item() - 1.0) < 1e-6
    assert abs(out.metrics["is_weight_max"].item() - 2.0) < 1e-6


def test_token_mask_is_icepop():
    old, sampler = _logps(LOG_RHO)
    out = mismatch_weights(old, sampler, MASK, level="token", mode="mask", low=0.5, high=5.0)
    assert torch.allclose(out.weights, torch.tensor([[3.0, 0.0, 1.0], [1.5, 0.0, 0.0], [0, 0, 0]],
                                                    dtype=torch.float64))


def test_sequence_levels_use_the_product():
    old, sampler = _logps(LOG_RHO)
    prod0, prod1 = 3.0 * 0.4 * 1.0, 1.5 * 6.0  # 1.2 and 9 (the padding's log rho = 9 must not count)
    trunc = mismatch_weights(old, sampler, MASK, level="sequence", mode="truncate", high=2.0)
    assert torch.allclose(trunc.seq_weights, torch.tensor([prod0, 2.0, 0.0], dtype=torch.float64))
    assert torch.allclose(trunc.weights, torch.tensor([[prod0] * 3, [2.0, 2.0, 0.0], [0, 0, 0]], dtype=torch.float64))
    mis = mismatch_weights(old, sampler, MASK, level="sequence", mode="mask", high=2.0)
    assert torch.allclose(mis.seq_weights, torch.tensor([prod0, 0.0, 0.0], dtype=torch.float64))
    assert abs(mis.metrics["is_seq_bound_frac"].item() - 0.5) < 1e-6


def test_no_mismatch_gives_weight_one_and_zero_kl():
    old = torch.randn(4, 5, dtype=torch.float64) - 2
    mask = torch.ones(4, 5)
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            out = mismatch_weights(old, old.clone(), mask, level=level, mode=mode, low=0.5, high=2.0)
            assert torch.equal(out.weights, torch.ones_like(old))
            assert out.metrics["mismatch_kl"].item() == 0.0 and out.metrics["is_bound_frac"].item() == 0.0


def test_weights_carry_no_gradient():
    old = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    sampler = (old.detach() - 0.3).requires_grad_()
    out = mismatch_weights(old, sampler, torch.ones(2, 3))
    assert not out.weights.requires_grad


def test_kl_metric_is_k3_of_sampler_against_trainer():
    old, sampler = _logps([[0.2, -0.1, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = mismatch_weights(old, sampler, MASK)
    k3 = [math.exp(x) - 1 - x for x in (0.2, -0.1, 0.0, 0.3, 0.0)]
    assert abs(out.metrics["mismatch_kl"].item() - sum(k3) / 5) < 1e-6


@pytest.mark.parametrize("name", ["grpo_loss", "dapo_loss", "cispo_loss", "sapo_loss", "ppo_loss", "gspo_token_loss"])
def test_weights_through_the_advantages_multiply_each_token_loss(policy_batch, name):
    """objective(adv * w) == the objective's aggregation of w x its per-token loss, for objectives homogeneous in A:
    checked against a per-token weighted loss built by differentiating with respect to the advantages."""
    logp, old, adv, mask = policy_batch(81, per_token_adv=True, spread=1.0)
    g = torch.Generator().manual_seed(3)
    w = 3 * torch.rand(adv.shape, generator=g, dtype=torch.float64)
    w[0, 1] = 0.0  # a masked token
    fn = getattr(O, name)
    # each per-token loss is linear in its own A on each side of 0, so l(w A) = w l(A) term by term:
    # compare with a direct weighting: loss(A * w) at w = 1 on one token and 0 elsewhere, summed up
    full = fn(logp, old, adv * w, mask).loss
    pieces = 0.0
    for i in range(adv.shape[0]):
        for j in range(adv.shape[1]):
            one = torch.zeros_like(adv)
            one[i, j] = 1.0
            pieces = pieces + w[i, j] * fn(logp, old, adv * one, mask).loss
    assert torch.allclose(full, pieces, atol=1e-12)


@pytest.mark.parametrize("kwargs, name", [
    (dict(level="tok"), "level"),
    (dict(mode="clip"), "mode"),
    (dict(high=0.0), "high"),
    (dict(low=-1.0), "low"),
    (dict(low=3.0, high=2.0), "low must be <= high"),
])
def test_bad_arguments_are_named(kwargs, name):
    old = torch.zeros(2, 3)
    with pytest.raises((ValueError, TypeError), match=name):
        mismatch_weights(old, old, torch.ones(2, 3), **kwargs)


def test_bad_tensors_are_named():
    old = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sampler_logp"):
        mismatch_weights(old, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        mismatch_weights(old, old, torch.ones(2, 4))
    with pytest.raises(ValueError, match="old_logp"):
        mismatch_weights(torch.full((2, 3), float("nan")), old, torch.ones(2, 3))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.sampled_from(["token", "sequence"]), st.sampled_from(["truncate", "mask"]),
       st.sampled_from([None, 0.5]), st.sampled_from([None, 2.0, 5.0]), st.data(),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_fuzz_weights_are_finite_bounded_and_zero_on_padding(b, t, level, mode, low, high, data, dtype):
    lr = torch.tensor([[data.draw(st.floats(-60, 60, allow_nan=False)) for _ in range(t)] for _ in range(b)])
    mask = torch.tensor([[data.draw(st.booleans()) for _ in range(t)] for _ in range(b)])
    old = torch.full((b, t), -1.0).to(dtype)
    out = mismatch_weights(old, (old.float() - lr).to(dtype), mask, level=level, mode=mode, low=low, high=high)
    w = out.weights
    assert w.shape == (b, t) and torch.isfinite(w).all() and (w >= 0).all()
    assert (w[~mask] == 0).all()
    if high is not None:
        assert (w <= high * (1 + 1e-2)).all()
    for value in out.metrics.values():
        assert value.dim() == 0 and torch.isfinite(value)
    if level == "sequence":
        assert out.seq_weights.shape == (b,)
