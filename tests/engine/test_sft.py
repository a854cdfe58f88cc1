"""Tests of xxpo.train.sft (training, the on-disk base-model cache) and xxpo.train.evaluate."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import xxpo.train.sft as sft
from xxpo.models import MODEL_PRESETS, build_model
from xxpo.tasks import get_task
from xxpo.train.evaluate import evaluate
from xxpo.train.sft import base_model, sft_batch, sft_loss, sft_train


@pytest.fixture(scope="module")
def task():
    return get_task("add2_scratch")


def fresh(tok, seed: int = 0):
    return build_model(MODEL_PRESETS["tiny"], tok, seed=seed)


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ------------------------------------------------------------------------------------------ SFT


def test_sft_batch_is_left_padded_prompt_and_right_padded_target_plus_eos(tok, task):
    examples = task.split("train")[:6]
    rng = random.Random(7)
    targets = [task.sft_target(ex, rng) for ex in examples]  # the draws sft_batch makes from the same seed
    prompt_ids, prompt_mask, response_ids, response_mask = sft_batch(tok, task, examples, random.Random(7))
    for i, (ex, target) in enumerate(zip(examples, targets)):
        prompt = prompt_ids[i][prompt_mask[i].bool()].tolist()
        assert prompt == [tok.bos_token_id] + tok.convert_tokens_to_ids(list(ex.prompt))
        assert (prompt_mask[i].diff() >= 0).all()  # zeros then ones: left padded
        n = int(response_mask[i].sum())
        assert response_ids[i, :n].tolist() == tok.convert_tokens_to_ids(list(target)) + [tok.eos_token_id]
        assert response_mask[i].tolist() == [1] * n + [0] * (response_ids.shape[1] - n)
        assert (response_ids[i, n:] == tok.pad_token_id).all()


def test_sft_loss_is_the_nll_of_response_tokens_only(tok, task):
    model = fresh(tok)
    batch = sft_batch(tok, task, task.split("train")[:5], random.Random(0))
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    total, count = 0.0, 0
    for i in range(len(prompt_ids)):  # one unpadded row at a time, positions 0..S-1
        prompt = prompt_ids[i][prompt_mask[i].bool()]
        response = response_ids[i][response_mask[i].bool()]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0].double()  # (S, V)
        logp = logits[len(prompt) - 1 : -1].log_softmax(-1).gather(-1, response[:, None])  # (n, 1)
        total, count = total - logp.sum().item(), count + len(response)
    assert sft_loss(model, *batch).item() == pytest.approx(total / count, abs=1e-5)


def test_sft_is_deterministic_given_the_seed(tok, task):
    runs = []
    for seed in (3, 3, 4):
        model = fresh(tok)
        log = sft_train(model, tok, task, steps=4, batch_size=16, seed=seed)
        runs.append((model, log.losses))
    assert same_weights(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1] and len(runs[0][1]) == 4
    assert not same_weights(runs[0][0], runs[2][0])  # another seed draws other batches
    assert not same_weights(runs[0][0], fresh(tok))  # and training changed the weights


def test_sft_lowers_the_loss(tok, task):
    model = fresh(tok)
    batch = sft_batch(tok, task, task.split("train")[:64], random.Random(0))
    before = sft_loss(model, *batch).item()
    sft_train(model, tok, task, steps=15, batch_size=16, seed=0, warmup_steps=3)
    assert sft_loss(model, *batch).item() < before - 0.5


def test_sft_stops_at_the_target_accuracy_on_held_out_train_examples(tok, monkeypatch):
    """Stub the validation score: it must see only the last val_n train examples and stop the run."""
    task = get_task("add2")
    seen, scores = [], iter([0.1, 0.2, 0.5, 0.9])

    def fake_score(model, tokenizer, task_, examples, **kwargs):
        seen.append(list(examples))
        return {"accuracy": next(scores)}

    monkeypatch.setattr(sft, "score_examples", fake_score)
    log = sft_train(fresh(tok), tok, task, steps=100, batch_size=8, seed=0, target_accuracy=0.5, eval_every=2, val_n=10)
    assert len(log.losses) == 6 and log.val_accuracy == [(2, 0.1), (4, 0.2), (6, 0.5)]
    assert all(examples == task.split("train")[-10:] for examples in seen)
    # without a target nothing is held out and every step runs
    assert len(sft_train(fresh(tok), tok, task, steps=3, batch_size=8, seed=0).losses) == 3


def test_sft_rejects_bad_arguments(tok, task):
    with pytest.raises(ValueError, match="steps"):
        sft_train(fresh(tok), tok, task, steps=0)
    with pytest.raises(ValueError, match="lr"):
        sft_train(fresh(tok), tok, task, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        sft_train(fresh(tok), tok, task, steps=1, batch_size=10**9)
    with pytest.raises(ValueError, match="target_accuracy"):
        sft_train(fresh(tok), tok, task, steps=1, target_accuracy=1.5)


# ------------------------------------------------------------------------------------- evaluate


def test_evaluate_matches_an_independent_greedy_decode(tok):
    """Untrained model: score it with transformers' own greedy ``generate``, one prompt at a time."""
    task = get_task("add2")
    model = fresh(tok, seed=2).eval()
    scores = evaluate(model, tok, task, n=20, batch_size=8)
    keep = sorted(random.Random(0).sample(range(len(task.split("test"))), 20))
    examples = [task.split("test")[i] for i in keep]
    lengths, correct = [], []
    for ex in examples:
        ids = torch.tensor([[tok.bos_token_id] + tok.convert_tokens_to_ids(list(ex.prompt))])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=task.max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1] :].tolist()
        n = out.index(tok.eos_token_id) + 1 if tok.eos_token_id in out else len(out)
        lengths.append(n)
        correct.append(task.is_correct(ex, tok.decode(out[:n], skip_special_tokens=True)))
    assert scores["n"] == 20
    assert scores["accuracy"] == pytest.approx(sum(correct) / 20)
    assert scores["mean_length"] == pytest.approx(sum(lengths) / 20)
    wrong = [n for n, c in zip(lengths, correct) if not c]
    assert scores["mean_length_incorrect"] == pytest.approx(sum(wrong) / len(wrong))
    if not any(correct):
        assert math.isnan(scores["mean_length_correct"])
    assert evaluate(model, tok, task, n=20, batch_size=256) == scores  # same subset, any batch size


def test_a_little_training_beats_no_training(tok):
    task = get_task("mul1")
    untrained = fresh(tok)
    trained = fresh(tok)
    sft_train(trained, tok, task, steps=100, warmup_steps=20, seed=0)
    before = evaluate(untrained, tok, task, n=200)
    after = evaluate(trained, tok, task, n=200)
    assert after["accuracy"] > before["accuracy"] + 0.03
    assert not math.isnan(after["mean_length_correct"])


# ------------------------------------------------------------------------------------ base_model


def test_base_model_trains_once_then_loads_from_cache(tmp_path, monkeypatch, tok):
    calls = []
    real_train = sft.sft_train

    def counting_train(*args, **kwargs):
        calls.append(kwargs["steps"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(sft, "sft_train", counting_train)
    first = base_model("add2", "tiny", seed=1, cache_dir=tmp_path, device="cpu", sft_steps=3, eval_n=16)
    assert calls == [3] and first.info["from_cache"] is False
    path = tmp_path / first.info["config_hash"]
    assert first.info["path"] == str(path) and (path / "config.json").is_file()
    stored = json.loads((path / "info.json").read_text())
    assert stored["eval_accuracy"] == first.info["eval_accuracy"] and 0.0 <= stored["eval_accuracy"] <= 1.0
    assert stored["sft"]["steps"] == 3 and stored["sft_steps_taken"] == 3 and stored["seed"] == 1
    assert stored["sft_seconds"] > 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left behind

    second = base_model("add2", "tiny", seed=1, cache_dir=tmp_path, device="cpu", sft_steps=3, eval_n=16)
    assert calls == [3]  # loaded, not retrained
    assert second.info["from_cache"] is True
    assert {**second.info, "from_cache": False} == first.info  # the same record, read back from disk
    assert same_weights(first.model, second.model)
    assert second.tokenizer.get_vocab() == tok.get_vocab() and second.tokenizer.padding_side == "left"

    third = base_model("add2", "tiny", seed=2, cache_dir=tmp_path, device="cpu", sft_steps=3, eval_n=16)
    assert calls == [3, 3] and third.info["config_hash"] != first.info["config_hash"]


def test_base_model_hash_covers_the_settings():
    key = dict(task="add2", model_config=MODEL_PRESETS["tiny"].to_dict(), sft={"steps": 3}, seed=0)
    digest = sft.config_hash(key)
    assert sft.config_hash(dict(reversed(list(key.items())))) == digest  # order does not matter
    for change in (dict(task="add3"), dict(seed=1), dict(sft={"steps": 4}),
                   dict(model_config=MODEL_PRESETS["tiny-moe"].to_dict())):
        assert sft.config_hash({**key, **change}) != digest


def test_base_model_default_cache_dir_follows_xxpo_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XXPO_CACHE", str(tmp_path / "c"))
    assert sft.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("XXPO_CACHE")
    assert sft.default_cache_dir() == Path.home() / ".cache" / "xxpo"


def test_base_model_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="model"):
        base_model("add2", "huge", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="task"):
        base_model("division", cache_dir=tmp_path)
