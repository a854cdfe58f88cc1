"""Run the reproduction notebooks with papermill and stamp each executed record.

``full`` executes a notebook in place: its outputs are the record the book shows. ``smoke`` executes a
copy in a scratch directory (CI). After a run, the notebook's metadata gets ``xxpo.code_hash``, the hash
of its code cells; a test compares it with the current cells, so a record whose code changed after it
was produced is caught as stale. It also gets ``xxpo.verdicts``: the verdicts that
:func:`xxpo.experiments.publish` emitted, moved out of the outputs (:func:`collect_verdicts`); the book's
claims ledger reads them there.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"


def code_hash(nb) -> str:
    """sha256 over the source of every code cell except papermill's injected parameters."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code" and "injected-parameters" not in cell.get("metadata", {}).get("tags", []):
            h.update(cell.source.strip().encode() + b"\0")
    return h.hexdigest()


def collect_verdicts(nb) -> list[dict]:
    """Take every :data:`~xxpo.verdicts.VERDICT_MIME` output out of ``nb`` (in cell order) and return the
    verdicts it held. The other representations of the output (the HTML table) stay; the JSON leaves the
    outputs because the book cannot render an unknown MIME type. Raises if a claim id appears twice."""
    from xxpo.verdicts import VERDICT_MIME

    verdicts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = output.get("data", {})
            if VERDICT_MIME in data:
                verdicts.extend(data.pop(VERDICT_MIME)["verdicts"])
    ids = [v["claim"]["id"] for v in verdicts]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"claim ids published more than once: {duplicates}")
    return verdicts


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def run_notebook(path: Path, profile: str, output: Path, parameters: dict | None = None) -> dict:
    """Execute ``path`` into ``output`` with ``profile`` and any other notebook ``parameters`` (e.g. ``model``,
    ``task``); returns a summary dict (never raises on failure)."""
    import papermill

    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(path), str(output), parameters={**(parameters or {}), "profile": profile},
                                   kernel_name="python3",
                                   cwd=str(path.parent), progress_bar=False)
        nb = nbformat.read(output, as_version=4)
        verdicts = collect_verdicts(nb)
        nb.metadata.setdefault("xxpo", {}).update(code_hash=code_hash(nb), profile=profile, verdicts=verdicts)
        nbformat.write(nb, output)
        ok, error = True, None
    except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
        ok, error = False, str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
    return {"notebook": path.name, "profile": profile, "ok": ok, "seconds": time.perf_counter() - start,
            "output": str(output), "error": error}


def reproduce(paths=None, profile: str = "smoke", scratch=None, parameters: dict | None = None) -> list[dict]:
    """Run ``paths`` (default: every notebook) under ``profile``; prints progress and a summary table.

    ``parameters``: other papermill parameters for every notebook, e.g. ``{"model": "/models/Qwen2.5-0.5B-Instruct",
    "task": "jsonl:/data/gsm8k_train.jsonl,/data/gsm8k_test.jsonl"}`` for the ``gpu`` profile. The ``full``
    profile takes none: it writes the committed record, which must come from the notebook's own defaults.
    """
    if profile not in ("smoke", "full", "gpu"):
        raise ValueError(f"profile must be 'smoke', 'full' or 'gpu', got {profile!r}")
    if parameters and profile == "full":
        raise ValueError("the full profile writes the committed record and takes no parameters; use 'gpu' or 'smoke'")
    if parameters and "profile" in parameters:
        raise ValueError("set the profile with profile=..., not among the parameters")
    paths = [Path(p).resolve() for p in paths] if paths else notebooks()
    for p in paths:
        if not p.is_file():
            raise ValueError(f"notebook {p} does not exist")
    out_dir = Path(scratch or tempfile.mkdtemp(prefix="xxpo-smoke-")) if profile != "full" else None
    results = []
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} (profile={profile}) ...", flush=True)
        output = path if profile == "full" else out_dir / path.name
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        result = run_notebook(path, profile, output, parameters)
        status = "ok" if result["ok"] else f"FAILED: {result['error']}"
        print(f"    {status} in {result['seconds']:.0f} s -> {result['output']}", flush=True)
        results.append(result)
    print("\nsummary")
    for r in results:
        print(f"  {r['notebook']:<40} {'ok' if r['ok'] else 'FAILED':<7} {r['seconds']:7.0f} s")
    return results
