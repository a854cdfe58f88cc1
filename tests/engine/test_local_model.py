"""A local Hugging Face model directory on a JSONL task: the GPU profile's path, exercised on CPU.

The directory (fixture ``local_model_dir``) and the JSONL file (``jsonl_data``) are built offline by
``tests/conftest.py``: a byte-level BPE tokenizer trained on the fly with a Qwen-style chat template,
and a randomly initialised tiny Qwen2 model saved in bfloat16 whose zero output layer makes its first
samples uniform, so about one response in ten ends with the right single-digit answer.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from xxpo.cli import main
from xxpo.models import context_length, load_model
from xxpo.tasks import encode_prompts, get_task
from xxpo.train import TrainConfig, Trainer

CONTEXT = 96  # the context of the `local_model_dir` fixture (tests/conftest.py, LOCAL_CONTEXT)


def test_the_directory_loads_in_float32_with_its_own_tokenizer_and_chat_template(local_model_dir):
    model, tokenizer = load_model(local_model_dir, device="cpu")
    assert next(model.parameters()).dtype == torch.float32  # saved in bfloat16, trained in float32 on CPU
    assert tokenizer.padding_side == "left" and tokenizer.eos_token == "<|im_end|>"
    assert context_length(model) == CONTEXT
    ids, mask = encode_prompts(tokenizer, ["How many?", "Tom has 2 apples. How many?"])
    text = tokenizer.decode(ids[0][mask[0].bool()])
    assert text == "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n"
    assert bool((mask[:, -1] == 1).all())  # left padded


def test_train_two_grpo_steps_through_the_cli(local_model_dir, jsonl_data, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="max_new_tokens lowered"):
        code = main(["train", "--model", str(local_model_dir), "--task", f"jsonl:{jsonl_data}", "--method", "grpo",
                     "--steps", "2", "--prompts-per-step", "2", "--group-size", "8", "--eval-every", "1",
                     "--eval-n", "3", "--device", "cpu", "--progress", "false", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = pd.read_csv(out / "metrics.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert list(metrics["step"]) == [0, 1]
    for column in ("loss", "reward_mean", "grad_norm", "entropy", "kl_ref", "response_length", "eval_accuracy"):
        assert metrics[column].map(math.isfinite).all(), column
    assert (metrics["frac_zero_std_groups"] < 1).any() and (metrics["grad_norm"] > 0).any()  # a real update
    assert summary["task"] == f"jsonl:{jsonl_data}" and summary["base_model"]["path"] == str(local_model_dir)
    assert summary["base_model"]["precision"] == "fp32"  # CPU; "bf16-autocast" on a CUDA GPU with bfloat16
    assert summary["task_data"]["n_train"] == 27 and summary["task_data"]["n_test"] == 3
    assert 1 <= summary["max_new_tokens"] < 512  # the task's 512 lowered to what the 96-token context leaves
    assert (metrics["response_length"] <= summary["max_new_tokens"]).all()


def test_a_budget_that_does_not_fit_and_a_missing_sft_base_are_explained(local_model_dir, jsonl_data, tmp_path):
    common = dict(task=f"jsonl:{jsonl_data}", device="cpu", progress=False, steps=1, prompts_per_step=2, group_size=2)
    with pytest.raises(ValueError, match=r"max_new_tokens=200 does not fit: the model's context is 96 tokens"):
        Trainer(TrainConfig(model=str(local_model_dir), max_new_tokens=200, **common))
    with pytest.raises(ValueError, match=r"has no SFT base model.*--model DIR"):
        Trainer(TrainConfig(model="tiny", **common))
    with pytest.raises(ValueError, match=r"there is no directory .*no-such-model"):
        Trainer(TrainConfig(model=str(tmp_path / "no-such-model"), **common))
    with pytest.raises(ValueError, match=r"prompts_per_step=64 is more than the 27 training prompts"):
        Trainer(TrainConfig(model=str(local_model_dir), max_new_tokens=8, **{**common, "prompts_per_step": 64}))


def test_the_jsonl_task_grades_what_the_tokenizer_decodes(local_model_dir, jsonl_data):
    _, tokenizer = load_model(local_model_dir, device="cpu")
    task = get_task(f"jsonl:{jsonl_data}")
    ex = task.split("test")[0]
    ids = tokenizer(task.sft_target(ex, None) + "<|im_end|>", add_special_tokens=False)["input_ids"]
    response = tokenizer.decode(ids, skip_special_tokens=True)  # what decode_responses gives the verifier
    assert task.is_correct(ex, response) and task.reward(ex, response) == 1.0


def test_the_run_cache_key_follows_the_users_files(local_model_dir, jsonl_data, tmp_path):
    from xxpo import experiments as ex

    assert not {"task_files", "model_files"} & set(ex.run_key(TrainConfig(progress=False))[1])  # built-ins: as before
    copy = tmp_path / "train.jsonl"
    copy.write_text(jsonl_data.read_text())
    config = TrainConfig(model=str(local_model_dir), task=f"jsonl:{copy}", progress=False)
    key, material = ex.run_key(config)
    assert set(material["model_files"]) >= {"config.json", "tokenizer.json", "model.safetensors"}
    assert ex.run_key(config)[0] == key
    with copy.open("a") as f:
        f.write(json.dumps({"prompt": "What is 1 plus 1?", "answer": 2}) + "\n")
    assert ex.run_key(config)[0] != key  # an edited jsonl_data file is a new run, not a cache hit


@pytest.mark.parametrize("method", ["sppo_selfplay", "dpo"])
def test_preference_methods_run_on_the_local_model_and_jsonl_task(local_model_dir, jsonl_data, tmp_path, method):
    from xxpo.train.preference import train_preference

    config = TrainConfig.from_preset(method, model=str(local_model_dir), task=f"jsonl:{jsonl_data}", device="cpu",
                                     steps=1, iterations=1, prompts_per_step=2, group_size=8, max_new_tokens=16,
                                     eval_n=3, progress=False)
    result = train_preference(config, tmp_path)
    assert result.metrics["loss"].map(math.isfinite).all()
