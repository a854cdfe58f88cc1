"""The sampler-trainer mismatch in the loop: ``sampler_logit_noise`` makes it, ``mismatch_correction`` corrects it."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
import torch

from xxpo import objectives
from xxpo.rollout import response_logprobs, sample
from xxpo.tasks.tokenizer import encode_prompts
from xxpo.train import TrainConfig, train
from xxpo.train import loop as loop_module
from xxpo.train.config import MISMATCH_CORRECTIONS
from xxpo.train.run import load_start
from xxpo.train.sft import base_model

SMALL = dict(steps=1, eval_every=1, eval_n=20, progress=False, prompts_per_step=4, group_size=4, minibatches=1)


@pytest.fixture(scope="module")
def base():
    return base_model(TrainConfig().task, "tiny", seed=0)


_CACHE = {}


def _model_and_tok():
    """The default run's starting policy (the cached SFT base model) and its tokenizer."""
    if "m" not in _CACHE:
        policy, _, tok, _ = load_start(TrainConfig(), torch.device("cpu"))
        _CACHE["m"] = (policy, tok)
    return _CACHE["m"]


def _rollout(noise: float, seed: int = 0):
    model, tok = _model_and_tok()
    ids, mask = encode_prompts(tok, ["12+34=", "5+6="])
    return model, sample(model, ids, mask, num_samples=4, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed), logit_noise=noise)


def test_noise_is_off_by_default():
    config = TrainConfig()
    assert config.sampler_logit_noise == 0.0 and config.mismatch_correction == "none"
    assert MISMATCH_CORRECTIONS[0] == "none"


def test_without_noise_the_sampler_agrees_with_the_trainer(base):
    model, r = _rollout(0.0)
    with torch.no_grad():
        recomputed = response_logprobs(model, r, 1.0)
    assert torch.allclose(recomputed * r.response_mask, r.behav_logp, atol=1e-5)


def test_noise_is_deterministic_per_seed_and_makes_a_mismatch(base):
    model, a = _rollout(1.0, seed=3)
    _, b = _rollout(1.0, seed=3)
    _, c = _rollout(1.0, seed=4)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.behav_logp, b.behav_logp)
    assert not torch.equal(a.behav_logp, c.behav_logp)
    with torch.no_grad():
        recomputed = response_logprobs(model, a, 1.0) * a.response_mask  # (B, T) the trainer's
    gap = ((recomputed - a.behav_logp).abs() * a.response_mask).sum() / a.response_mask.sum()
    assert float(gap) > 0.05


def test_noisy_runs_are_repeatable_and_log_the_mismatch(base):
    config = TrainConfig.from_preset("grpo", sampler_logit_noise=1.0, **SMALL)
    a, b = train(config), train(config)
    cols = [c for c in a.metrics.columns if not c.startswith("time") and c != "tokens_per_second"]
    pd.testing.assert_frame_equal(a.metrics[cols], b.metrics[cols])
    row = a.metrics.iloc[0]
    assert row["mismatch_abs_logp"] > 0.05 and row["mismatch_kl"] > 0
    # uncorrected: old_logp is the sampler's, so the first (only) minibatch's ratio is not 1
    assert abs(row["ratio_mean"] - 1.0) > 1e-3
    clean = train(TrainConfig.from_preset("grpo", **SMALL)).metrics
    assert "mismatch_abs_logp" not in clean.columns  # nothing is measured by default


def test_corrected_run_without_noise_is_on_policy(base):
    row = train(TrainConfig.from_preset("grpo", mismatch_correction="token_truncate", **SMALL)).metrics.iloc[0]
    assert row["mismatch_abs_logp"] < 1e-4
    assert row["is_weight_mean"] == pytest.approx(1.0, abs=1e-4) and row["is_bound_frac"] == 0.0
    assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("correction", ["none", "sequence_mask"])
def test_the_objective_gets_the_right_old_logp(base, monkeypatch, correction):
    seen = {}
    original = loop_module.Trainer.objective

    def spy(self, mb, logp, adv, extra, step):
        seen.update(behav=mb.behav_logp, old=extra.get("trainer_old_logp"), logp=logp.detach(), adv=adv)
        return original(self, mb, logp, adv, extra, step)

    monkeypatch.setattr(loop_module.Trainer, "objective", spy)
    train(TrainConfig.from_preset("grpo", sampler_logit_noise=1.0, mismatch_correction=correction, **SMALL))
    if correction == "none":
        assert seen["old"] is None and seen["adv"].dim() == 1  # the sampler's log-probs, the advantages untouched
    else:  # the trainer's recompute before the update = the first minibatch's forward (one minibatch)
        m = seen["behav"].ne(0) | seen["old"].ne(0)
        assert torch.allclose(seen["old"], seen["logp"], atol=1e-5)
        assert not torch.allclose(seen["old"], seen["behav"], atol=1e-3)
        assert seen["adv"].dim() == 2 and m.any()


def test_correction_applies_mismatch_weights_on_a_hand_case(base, monkeypatch):
    """IcePop bounds [0.5, 5]: token ratios 0.3, 1.5, 6 give weights 0, 1.5, 0 times the advantage."""
    config = TrainConfig.from_preset("grpo", mismatch_correction="token_mask", mismatch_low=0.5, mismatch_high=5.0,
                                     **SMALL)
    trainer = loop_module.Trainer(config)
    _, rollout, _, _ = trainer.sample_round(0)
    m = rollout.response_mask  # (B, T)
    rho = torch.tensor([0.3, 1.5, 6.0]).repeat(m.shape[1] // 3 + 1)[: m.shape[1]].expand_as(m)  # (B, T)
    hand_old = (rollout.behav_logp + rho.log()) * m  # (B, T): the "trainer's" log-probs
    monkeypatch.setattr(loop_module, "response_logprobs", lambda *a, **k: hand_old)
    adv = torch.linspace(-1, 1, len(rollout))  # (B,)
    extra, row = {}, {}
    out = trainer.mismatch(rollout, adv, extra, None, row)
    expected_w = torch.where((rho >= 0.5) & (rho <= 5), rho, torch.zeros_like(rho)) * m  # by hand
    assert torch.allclose(out, adv[:, None] * expected_w, atol=1e-6)
    assert torch.equal(extra["trainer_old_logp"], hand_old)
    ref = objectives.mismatch_weights(hand_old, rollout.behav_logp, m, level="token", mode="mask", low=0.5, high=5.0)
    assert torch.allclose(out, adv[:, None] * ref.weights)
    assert row["is_bound_frac"] == pytest.approx(float(((rho != 1.5).float() * m).sum() / m.sum()), abs=1e-6)
    assert row["mismatch_abs_logp"] == pytest.approx(float((rho.log().abs() * m).sum() / m.sum()), rel=1e-5)


@pytest.mark.parametrize("overrides, field", [
    (dict(sampler_logit_noise=-0.1), "sampler_logit_noise"),
    (dict(sampler_logit_noise=math.inf), "sampler_logit_noise"),
    (dict(mismatch_correction="tis"), "mismatch_correction"),
    (dict(mismatch_low=-1.0), "mismatch_low"),
    (dict(mismatch_high=0.0), "mismatch_high"),
    (dict(mismatch_low=3.0, mismatch_high=2.0), "mismatch_low"),
])
def test_bad_mismatch_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**overrides)


def test_sample_rejects_negative_noise():
    model, tok = _model_and_tok()
    ids, mask = encode_prompts(tok, ["1+1="])
    with pytest.raises(ValueError, match="logit_noise"):
        sample(model, ids, mask, num_samples=2, max_new_tokens=3, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, logit_noise=-1.0)
