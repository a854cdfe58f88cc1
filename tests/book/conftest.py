"""Fixtures for the book tests: one build of the book per session, and a headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> dict:
    """Build the book exactly as `make book` does, but into a temporary directory.

    Returns the process result and the HTML directory; tests that need the HTML fail (not skip) if
    the build failed, so a broken book cannot hide behind skipped tests.
    """
    out = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [str(jupyter_book), "build", str(REPO), "--path-output", str(out), "-W", "-n", "--keep-going"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return {"proc": proc, "html": out / "_build" / "html"}


@pytest.fixture(scope="session")
def html_dir(built_book) -> Path:
    proc = built_book["proc"]
    if proc.returncode != 0:
        pytest.fail(f"the book did not build (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return built_book["html"]


def _find_chromium() -> str | None:
    for path in CHROMIUM_CANDIDATES:
        if os.path.exists(path):
            return path
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path to Debian's chromium; installed with apt-get when missing (skips only if apt fails)."""
    path = _find_chromium()
    if path is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run(["apt-get", "update"], check=True, capture_output=True, env=env, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, capture_output=True, env=env, timeout=900)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {exc!r}")
        path = _find_chromium()
        if path is None:
            pytest.skip("apt-get installed chromium but no chromium binary was found")
    return path
