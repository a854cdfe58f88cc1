"""The benchmark scripts still run and print what their READMEs promise (they assert nothing on time)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_rl_step_quick_prints_the_ratio_line():
    out = run_script("benchmarks/rl_step.py", "--quick")
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"xxpo/trl completions-per-second ratio: \d+\.\d\d", last), last
    assert float(last.rsplit(" ", 1)[1]) > 0


def test_methods_table_has_a_row_per_method():
    out = run_script("benchmarks/methods.py", "--methods", "grpo", "dpo", "--seeds", "0")
    rows = [line for line in out.splitlines() if line.startswith("| grpo ") or line.startswith("| dpo ")]
    assert len(rows) == 2, out
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[0] == "grpo" and 0 <= float(cells[4]) <= 1 and 0 <= float(cells[5]) <= 1  # base, trained accuracy
    assert re.search(r"\d+/2 methods raised mean held-out accuracy", out.strip().splitlines()[-1])


@pytest.mark.slow
def test_logprob_memory_small_prints_the_ratio_line():
    out = run_script("benchmarks/logprob_memory.py", "--vocab", "5000", "--rows", "64", "--reps", "1", "--no-model")
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"chunked/naive extra-memory ratio: \d+\.\d\d\d", last), last
    assert "| xxpo-chunked |" in out and "| trl-chunked |" in out


@pytest.mark.slow
def test_data_parallel_prints_the_ratio_line():
    out = run_script("benchmarks/data_parallel.py", "--model", "tiny", "--steps", "3", "--warmup", "1", "--repeats", "1",
                     "--prompts", "4", "--group-size", "2")
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"1-process/2-process seconds-per-step ratio: \d+\.\d\d", last), last
    assert "time_update" in out
