"""The gpu profile of notebooks 05 to 11 on a local model directory and JSONL tasks, end to end on CPU.

Each notebook runs with ``profile="gpu"``, ``model=<the tiny saved Qwen2 directory>`` (fixture
``local_model_dir`` of ``tests/conftest.py``) and ``jsonl:`` tasks of single-digit arithmetic, shrunk
through its parameters (one reported seed, one tuning seed, one learning rate, 1-2 steps) and
``profile_overrides`` (a few prompts, a small group, 3 held-out prompts). The run cache is a temporary
directory, so every run trains. One seed makes every verdict "inconclusive"; what is checked is that the
gpu path runs through every cell on a user's model and data and stores its verdicts in the metadata.
"""

from __future__ import annotations

import json

import nbformat
import papermill
import pytest

from xxpo.reproduce import NOTEBOOK_DIR, run_notebook

ONE = dict(seeds=[0], tuning_seeds=[100])
SMALL = dict(lrs=[1e-3], eval_n=3)  # 27 training and 3 held-out prompts in the JSONL file


def parameters(name: str, train: str, test: str, minus: str) -> dict:
    """The notebook parameters of the tiny gpu run of notebook ``name``; ``train``, ``test``, ``minus``: JSONL paths."""
    task = f"jsonl:{train}"
    return {
        "05_length_bias": dict(ONE, task=task, steps=2, max_new_tokens=16, profile_overrides=dict(
            SMALL, prompts=2, G=8, eval_every=1, difficulty_prompts=3)),
        "06_dapo": dict(ONE, task=task, steps=2, profile_overrides=dict(SMALL, prompts=2, G=8, overlong_budget=16)),
        "07_staleness": dict(ONE, task=f"jsonl:{train},{test}", steps=1, profile_overrides=dict(
            SMALL, prompts=2, G=8, minibatches=2, etas=[0, 1], a3po_etas=[1], eval_every=1)),
        "08_sapo": dict(ONE, task=task, steps=1, profile_overrides=dict(SMALL, prompts=2, G=8, minibatches=2,
                                                                         eval_every=1)),
        "09_dpo_vs_online": dict(ONE, tasks=[task, f"jsonl:{minus}"], profile_overrides=dict(
            lrs=[1e-3], prompts=2, G=8, pairs=2, epochs=1, steps=[1, 1], eval_every=[1, 1], eval_n=[3, 3])),
        "10_sppo": dict(ONE, task=task, profile_overrides=dict(
            SMALL, sp_steps=1, iterations=1, sp_prompts=2, K=8, dpo_pairs=2, dpo_epochs=1, rl_steps=1,
            rl_eval_every=1, grpo_prompts=2, G=8, seq_prompts=16)),
        "11_mismatch": dict(ONE, task=task, steps=1, profile_overrides=dict(
            SMALL, prompts=2, G=8, minibatches=2, probe_prompts=4, eval_every=1)),
    }[name]


GPU_NOTEBOOKS = [p for p in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")) if "05" <= p.name[:2] <= "11"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def jsonl_files(tmp_path_factory, jsonl_data):
    """The 30 sums of ``jsonl_data``, a separate TEST file of other sums, and a second task (differences)."""
    root = tmp_path_factory.mktemp("gpu-data")
    test = write_jsonl(root / "test.jsonl", [{"prompt": f"What is {a} plus {b}?", "answer": a + b}
                                             for a, b in [(0, 9), (1, 8), (2, 7), (3, 6)]])
    minus = write_jsonl(root / "minus.jsonl", [{"prompt": f"What is {a} minus {b}?", "answer": f"#### {a - b}"}
                                               for a in range(10) for b in range(a + 1)][:30])
    return str(jsonl_data), str(test), str(minus)


def test_the_notebooks_05_to_11_are_covered():
    assert [p.name[:2] for p in GPU_NOTEBOOKS] == ["05", "06", "07", "08", "09", "10", "11"]


@pytest.mark.slow
@pytest.mark.parametrize("path", GPU_NOTEBOOKS, ids=lambda p: p.name)
def test_gpu_profile_runs_on_a_local_model_and_jsonl_tasks(path, local_model_dir, jsonl_files, tmp_path, monkeypatch):
    monkeypatch.setenv("XXPO_CACHE", str(tmp_path / "cache"))  # the kernel inherits it: fresh runs, no shared cache
    params = dict(parameters(path.stem, *jsonl_files), model=str(local_model_dir))
    result = run_notebook(path, "gpu", tmp_path / path.name, params)
    assert result["ok"], result["error"]
    executed = nbformat.read(tmp_path / path.name, as_version=4)
    stamp = executed.metadata["xxpo"]
    assert stamp["profile"] == "gpu"
    verdicts = stamp["verdicts"]
    record_ids = {v["claim"]["id"] for v in nbformat.read(path, as_version=4).metadata["xxpo"]["verdicts"]}
    assert verdicts and {v["claim"]["id"] for v in verdicts} <= record_ids
    assert all(v["outcome"] == "inconclusive" for v in verdicts)  # one seed never decides a claim
    assert all(v["seeds"] == [0] for v in verdicts)
    text = "\n".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "profile=gpu" in text and jsonl_files[0] in text  # the setup cell printed the profile and the task


@pytest.mark.parametrize("name, params, match", [
    ("07_staleness", dict(profile="smoke", profile_overrides={"prompt": 8}), r"unknown key 'prompt'.*'prompts'"),
    ("05_length_bias", dict(profile="smoke", task="jsonl:/no/such.jsonl"),
     r"task='jsonl:/no/such.jsonl' is a JSONL task, which has no SFT base model: model must be a local"),
])
def test_a_bad_gpu_parameter_stops_the_setup_cell_naming_it(name, params, match, tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match=match):
        papermill.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(tmp_path / "bad.ipynb"), parameters=params,
                                   kernel_name="python3", cwd=str(NOTEBOOK_DIR), progress_bar=False)
