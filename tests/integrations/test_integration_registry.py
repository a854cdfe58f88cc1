"""xxpo.integrations (no peer needed): which objectives the adapters run, how each aggregates, the rescaling
to a global batch, and the generated equivalents table the book includes."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import xxpo.objectives as O
from xxpo.integrations import (
    CALLING_FORMS,
    FIXED_AGGREGATION,
    POLICY_OBJECTIVES,
    SEQUENCE_ADVANTAGES,
    TRL_EQUIVALENTS,
    TRL_REFUSED,
    VERL_EQUIVALENTS,
    aggregation,
    calling_form,
    check_objective_kwargs,
    equivalents_markdown,
    equivalents_table,
    global_scale,
    keyword_parameters,
    sequence_advantages,
)

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "book" / "_generated" / "integrations_table.md"


def test_policy_objectives_are_the_registered_losses_of_log_probs():
    assert set(POLICY_OBJECTIVES) == {"ppo", "grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "sapo",
                                      "decoupled_ppo", "a3po", "sppo_seq", "cispo", "gmpo", "rloo", "reinforce_pp"}
    assert [n for n in O.METHODS if n in POLICY_OBJECTIVES] == list(POLICY_OBJECTIVES)  # registry order
    for name in ("trpo", "dpo", "sppo_selfplay"):
        with pytest.raises(ValueError, match="not losses of per-token log-probs"):
            calling_form(name)
    for name in POLICY_OBJECTIVES:
        lead = [p for p in inspect.signature(O.get(name)).parameters][: len(CALLING_FORMS[calling_form(name)])]
        assert tuple(lead) == CALLING_FORMS[calling_form(name)]


def test_a3po_forwards_its_keyword_arguments():
    assert set(keyword_parameters("a3po")) == set(keyword_parameters("decoupled_ppo"))


def _batch(seed, rows=8, t=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 1, 4, 2, 5, 3, 6, 2])[:rows]
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    old = -0.3 - torch.rand(rows, t, generator=g, dtype=torch.float64)
    logp = (old + 0.3 * torch.randn(rows, t, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    prox = old + 0.1 * torch.randn(rows, t, generator=g, dtype=torch.float64)
    return logp, old, adv, mask, prox


def _loss(name, logp, old, adv, mask, prox, **kw):
    form = calling_form(name)
    if form == "decoupled":
        return O.get(name)(logp, old, prox, adv, mask, **kw).loss
    if form == "staleness":
        return O.get(name)(logp, old, adv, mask, 2, **kw).loss
    return O.get(name)(logp, old, adv, mask, **kw).loss


def _kwargs(name):
    return {"norm_len": 6} if aggregation(name) == "seq-mean-token-sum-norm" else {}


@pytest.mark.parametrize("name", POLICY_OBJECTIVES)
def test_aggregation_and_global_scale_split_a_batch_exactly(name):
    """The loss of a whole batch = the sum over two unequal micro-batches of loss x global_scale: this checks
    the mode ``aggregation`` reports (FIXED_AGGREGATION too) and the rescaling both adapters use."""
    logp, old, adv, mask, prox = _batch(0)
    kw = _kwargs(name)
    mode = aggregation(name, kw)
    full = _loss(name, logp, old, adv, mask, prox, **kw)
    g_full, = torch.autograd.grad(full, logp)
    parts = []
    for rows in (slice(0, 5), slice(5, 8)):  # unequal sizes and token counts
        local = _loss(name, logp[rows], old[rows], adv[rows], mask[rows], prox[rows], **kw)
        tokens, responses = float(mask.sum()), float(mask.shape[0])
        parts.append(local * global_scale(mode, mask[rows], tokens=tokens, rows=responses))
    g_split, = torch.autograd.grad(sum(parts), logp)
    assert torch.allclose(sum(parts), full, rtol=1e-12, atol=1e-14)
    assert torch.allclose(g_split, g_full, rtol=1e-10, atol=1e-14)
    if mode == "token-mean":  # the check can fail: a row normalizer is wrong for a token-mean loss
        wrong = [_loss(name, logp[r], old[r], adv[r], mask[r], prox[r], **kw) * global_scale(
            "seq-mean-token-mean", mask[r], rows=8.0) for r in (slice(0, 5), slice(5, 8))]
        assert not torch.allclose(sum(wrong), full, rtol=1e-6)


def test_fixed_aggregation_covers_exactly_the_objectives_without_the_argument():
    without = {n for n in POLICY_OBJECTIVES if "loss_agg_mode" not in keyword_parameters(n)}
    assert without == set(FIXED_AGGREGATION)


def test_global_scale_arithmetic():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert global_scale("token-mean", mask, tokens=12, dp_size=2) == pytest.approx(3 / 12 * 2)
    assert global_scale("seq-mean-token-mean", mask, rows=8) == pytest.approx(2 / 8)
    assert global_scale("seq-mean-token-sum", mask, rows=8) == pytest.approx(2 / 8)
    assert global_scale("seq-mean-token-sum-norm", mask, rows=8) == pytest.approx(3 / 8)
    assert global_scale("token-mean", mask) == 1.0
    assert global_scale("token-mean", torch.zeros(2, 3)) == 0.0


@pytest.mark.parametrize("name", POLICY_OBJECTIVES)
def test_sequence_advantages_lists_the_objectives_that_refuse_per_token_ones(name):
    logp, old, adv, mask, prox = _batch(1)
    per_token = adv[:, None] + 0.1 * torch.arange(6, dtype=adv.dtype)  # (B, T), varying along the response
    if name in SEQUENCE_ADVANTAGES:
        with pytest.raises(ValueError, match="per sequence"):
            _loss(name, logp, old, per_token, mask, prox, **_kwargs(name))
    else:
        _loss(name, logp, old, per_token, mask, prox, **_kwargs(name))


def test_sequence_advantages_reduces_or_refuses():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    seq = torch.tensor([0.5, -2.0, 7.0], dtype=torch.float64)
    per_token = seq[:, None] * mask  # zeros on padding, as verl fills it
    assert torch.equal(sequence_advantages(per_token, mask), torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64))
    assert torch.equal(sequence_advantages(seq, mask), seq)
    varying = per_token.clone()
    varying[0, 2] = 0.6
    with pytest.raises(ValueError, match="response 0"):
        sequence_advantages(varying, mask)


def test_check_objective_kwargs():
    assert check_objective_kwargs("grpo", None) == {}
    assert check_objective_kwargs("grpo", {"loss_agg_mode": "token-mean"}) == {"loss_agg_mode": "token-mean"}
    with pytest.raises(ValueError, match="takes no argument 'tau_pos'"):
        check_objective_kwargs("grpo", {"tau_pos": 1.0})
    with pytest.raises(ValueError, match="set CONFIG.eps instead"):
        check_objective_kwargs("grpo", {"clip_eps_low": 0.1}, {"clip_eps_low": "CONFIG.eps"})
    with pytest.raises(ValueError, match="tensor of the batch"):
        check_objective_kwargs("grpo", {"ref_logp": None})
    with pytest.raises(TypeError, match="dict"):
        check_objective_kwargs("grpo", [("loss_agg_mode", "token-mean")])


def test_equivalents_cover_every_method():
    assert set(TRL_EQUIVALENTS) == set(O.METHODS) == set(VERL_EQUIVALENTS)
    assert set(TRL_REFUSED) <= set(POLICY_OBJECTIVES)
    rows = equivalents_table()
    assert [r["method"] for r in rows] == list(O.METHODS)
    for row in rows:
        name = row["method"]
        policy = name in POLICY_OBJECTIVES
        assert ("verl" in row["adapters"]) == policy
        assert ("TRL" in row["adapters"]) == (policy and name not in TRL_REFUSED)
        assert row["objective"] == O.get(name).__name__
        if TRL_EQUIVALENTS[name] is None:
            assert row["TRL 1.16 built-in"] == ("none; use the adapter" if policy and name not in TRL_REFUSED
                                                else "none")
        if VERL_EQUIVALENTS[name] is None:
            assert row["verl 0.9.1 built-in"] == ("none; use the adapter" if policy else "none")


def test_book_table_is_generated_from_the_registry():
    """book/_generated/integrations_table.md is equivalents_markdown() written out; regenerate it with
    ``python -m xxpo.integrations > book/_generated/integrations_table.md`` when this fails."""
    assert TABLE.read_text() == equivalents_markdown()
