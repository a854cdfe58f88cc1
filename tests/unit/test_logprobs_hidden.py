"""xxpo.functional.logprobs_from_hidden: log-probs and entropy from hidden states, one chunk of rows at a time."""

from __future__ import annotations

import pytest
import torch

from xxpo.functional import logprobs_from_hidden


def naive(hidden, weight, targets, bias=None, temperature=1.0, mask=None):
    """The full-logits computation: (..., V) logits in float32, log-softmax, gather, entropy; 0 where mask is 0."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logp_all = (logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if mask is not None:
        logp, entropy = logp * mask, entropy * mask
    return logp, entropy


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64_logprobs_and_entropy_with_temperature_and_mask(with_bias):
    g = torch.Generator().manual_seed(0)
    b, t, h, v = 2, 5, 4, 7
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    inputs = (hidden, weight) + ((bias,) if with_bias else ())

    def both(hidden, weight, bias=None):
        return logprobs_from_hidden(hidden, weight, targets, bias=bias, temperature=0.7, mask=mask,
                                    with_entropy=True, chunk_rows=3, vocab_block=2)

    def logp_only(hidden, weight, bias=None):
        return logprobs_from_hidden(hidden, weight, targets, bias=bias, temperature=0.7, mask=mask, chunk_rows=2, vocab_block=3)

    def entropy_only(hidden, weight, bias=None):  # the log-prob output gets no gradient
        return both(hidden, weight, bias)[1]

    for fn in (both, logp_only, entropy_only):
        assert torch.autograd.gradcheck(fn, inputs)
    logp, entropy = both(*inputs)
    ref_logp, ref_entropy = naive(hidden, weight, targets, bias, 0.7, mask.double())
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-12)
    assert (logp[mask == 0] == 0).all() and (entropy[mask == 0] == 0).all()


def test_large_vocabulary_values_and_gradients_equal_the_naive_computation():
    """V = 50,000, small H: chunked forward + backward against full logits, within float32 tolerance."""
    g = torch.Generator().manual_seed(1)
    b, t, h, v = 3, 20, 16, 50_000
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.2).float()
    w_logp, w_ent = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)  # arbitrary upstream gradients
    results = []
    for fn in ("chunked", "naive"):
        hid, wei = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fn == "chunked":
            logp, ent = logprobs_from_hidden(hid, wei, targets, temperature=0.8, mask=mask, with_entropy=True, chunk_rows=7,
                                            vocab_block=4096)
        else:
            logp, ent = naive(hid, wei, targets, temperature=0.8, mask=mask)
        ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
        results.append((logp.detach(), ent.detach(), hid.grad, wei.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert results[0][3].abs().sum() > 0


def test_bfloat16_hidden_states_give_float32_outputs_close_to_float32():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 8, generator=g)
    weight = torch.randn(300, 8, generator=g)
    targets = torch.randint(0, 300, (2, 6), generator=g)
    h16, w16 = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    logp, ent = logprobs_from_hidden(h16, w16, targets, temperature=1.3, with_entropy=True, chunk_rows=5)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    # the float32 log-softmax of the bf16 logits, as the full-logits path computes it
    ref_logp, ref_ent = naive(h16.detach(), w16.detach(), targets, temperature=1.3)
    torch.testing.assert_close(logp.detach(), ref_logp, rtol=0, atol=2e-2)
    torch.testing.assert_close(ent.detach(), ref_ent, rtol=0, atol=2e-2)


def test_autocast_runs_the_head_in_the_autocast_dtype_and_the_softmax_in_float32():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(10, 8, generator=g), torch.randn(50, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = logprobs_from_hidden(hidden, weight, targets, chunk_rows=3)
        ref = torch.nn.functional.linear(hidden, weight).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-6)  # the same bf16 logits, then float32
    logp.sum().backward()
    assert weight.grad.dtype == torch.float32


def test_no_full_vocabulary_tensor_is_saved_for_backward():
    """What autograd keeps between forward and backward is O(N + V*H), never O(N * V)."""
    n, h, v = 64, 4, 1000
    hidden, weight = torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        logp, ent = logprobs_from_hidden(hidden, weight, torch.randint(0, v, (n,)), with_entropy=True, chunk_rows=8)
    assert max(saved) <= v * h and sum(saved) <= n * h + v * h + 4 * n


def test_all_rows_masked_gives_zeros_and_zero_gradients():
    hidden, weight = torch.randn(2, 3, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    logp, ent = logprobs_from_hidden(hidden, weight, torch.zeros(2, 3, dtype=torch.long), mask=torch.zeros(2, 3),
                                     with_entropy=True)
    assert (logp == 0).all() and (ent == 0).all()
    logp.sum().backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_bad_arguments_raise_naming_them():
    h, w, t = torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="weight"):
        logprobs_from_hidden(h, torch.randn(5, 3), t)
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_hidden(h, w, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="targets"):
        logprobs_from_hidden(h, w, t.float())
    with pytest.raises(ValueError, match="chunk_rows"):
        logprobs_from_hidden(h, w, t, chunk_rows=0)
    with pytest.raises(ValueError, match="vocab_block"):
        logprobs_from_hidden(h, w, t, vocab_block=0)
    with pytest.raises(ValueError, match="mask"):
        logprobs_from_hidden(h, w, t, mask=torch.ones(3, 2))
