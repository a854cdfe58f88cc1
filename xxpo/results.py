"""Run records: a metrics DataFrame, a summary, a snapshot of the environment, written atomically.

A run directory holds ``metrics.csv`` (one row per step) and ``summary.json``. Files are written to a
temporary name in the same directory and renamed, so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The current git commit of ``cwd`` (default: this package's checkout), or 'unknown'."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_snapshot() -> dict:
    """Hardware and package versions, for the provenance of every result."""
    import transformers

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pandas": pd.__version__,
        "git_commit": git_commit(),
    }


def write_run(out_dir: str | os.PathLike, metrics: pd.DataFrame, summary: dict) -> None:
    """Write ``metrics.csv`` and ``summary.json`` into ``out_dir`` atomically."""
    out = Path(out_dir)
    atomic_write_bytes(out / "metrics.csv", metrics.to_csv(index=False).encode())
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2, default=str).encode())


def read_run(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    out = Path(out_dir)
    return pd.read_csv(out / "metrics.csv"), json.loads((out / "summary.json").read_text())
