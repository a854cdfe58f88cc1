"""`xxpo train` and `xxpo reproduce` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xxpo.cli import build_parser, main
from xxpo.train.config import config_fields


def run(*args):
    return subprocess.run([sys.executable, "-m", "xxpo.cli", *args], capture_output=True, text=True, timeout=600)


def test_train_help_lists_every_config_field():
    out = run("train", "--help")
    assert out.returncode == 0
    for name, _, _, help_text in config_fields():
        assert f"--{name.replace('_', '-')}" in out.stdout, name


def test_reproduce_help():
    out = run("reproduce", "--help")
    assert out.returncode == 0 and "--profile" in out.stdout


def test_train_writes_metrics_and_summary(tmp_path):
    out = run("train", "--method", "grpo", "--steps", "2", "--seed", "3", "--eval-every", "1", "--eval-n", "20",
              "--progress", "false", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 3  # header + one row per step
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["config"]["steps"] == 2
    assert {"base_eval_accuracy", "final_eval_accuracy", "seconds_per_step"} <= set(summary)


def test_bad_option_values_are_reported_not_raised(tmp_path, capsys):
    assert main(["train", "--method", "grpo", "--lr", "-1", "--out", str(tmp_path)]) == 2
    assert "lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", str(tmp_path), "--steps", "many"])


def test_reproduce_passes_notebook_parameters_to_papermill(monkeypatch, tmp_path):
    import xxpo.reproduce as rp

    calls = []

    def fake_run(path, profile, output, parameters=None):
        calls.append((path.name, profile, parameters))
        return {"notebook": path.name, "profile": profile, "ok": True, "seconds": 0.0, "output": str(output), "error": None}

    monkeypatch.setattr(rp, "run_notebook", fake_run)
    nb = sorted(rp.notebooks())[-1]
    assert main(["reproduce", "--profile", "gpu", "--scratch", str(tmp_path), "-p", "model", "/models/qwen",
                 "-p", "task", "jsonl:/d/train.jsonl,/d/test.jsonl", "-p", "seeds", "[0, 1]", "-p", "steps", "5",
                 str(nb)]) == 0
    assert calls == [(nb.name, "gpu", {"model": "/models/qwen", "task": "jsonl:/d/train.jsonl,/d/test.jsonl",
                                        "seeds": [0, 1], "steps": 5})]
    assert main(["reproduce", "--profile", "full", "-p", "steps", "5", str(nb)]) == 2  # the record takes no parameters
    assert main(["reproduce", "--profile", "gpu", "-p", "not-a-name", "1", str(nb)]) == 2
