"""Run the reproduction notebooks with papermill and stamp each executed record.

``full`` executes a notebook in place: its outputs are the record the book shows. ``smoke`` executes a
copy in a scratch directory (CI). After a run, the notebook's metadata gets ``xxpo.code_hash``, the hash
of its code cells; a test compares it with the current cells, so a record whose code changed after it
was produced is caught as stale. It also gets ``xxpo.verdicts``: the verdicts that
:func:`xxpo.experiments.publish` emitted, moved out of the outputs (:func:`collect_verdicts`); the book's
claims ledger reads them there.

A record is accepted only if its verdicts survive other seeds. ``--check-seeds 5,6,7,8,9`` executes the
record's code once more with those reported seeds (the tuning seeds unchanged) into a scratch copy, and
stores what that re-run decided under ``xxpo.check`` in the record's metadata: the seeds, the code hash
of the copy and its verdicts (:func:`attach_check`). The ledger prints each verdict beside its re-run.
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


def attach_check(record, executed_check, seeds) -> dict:
    """Store the verdicts of ``executed_check`` (the record's notebook executed with the reported ``seeds``
    replaced) in ``record``'s metadata under ``xxpo.check``; both are ``nbformat`` notebooks, ``record``
    is modified in place. Raises if the two do not run the same code or the check has no verdicts."""
    seeds = [int(x) for x in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct ints, got {seeds!r}")
    if code_hash(executed_check) != code_hash(record):
        raise ValueError("the check was executed from other code than the record's (code hashes differ)")
    verdicts = collect_verdicts(executed_check)
    reported = record.metadata.get("xxpo", {}).get("verdicts", [])
    missing = sorted({v["claim"]["id"] for v in reported} - {v["claim"]["id"] for v in verdicts})
    if missing:
        raise ValueError(f"the check decided no verdict for {missing}")
    for v in verdicts:
        if sorted(v["seeds"]) != sorted(seeds):
            raise ValueError(f"{v['claim']['id']}: the check's verdict used seeds {v['seeds']}, not {seeds}")
    check = {"seeds": seeds, "code_hash": code_hash(executed_check), "verdicts": verdicts}
    record.metadata.setdefault("xxpo", {})["check"] = check
    return check


def check_notebook(path: Path, seeds, scratch: Path) -> dict:
    """Re-run the full record ``path`` with reported ``seeds`` (into ``scratch``) and attach the verdicts."""

    def attach(output: Path) -> None:
        record = nbformat.read(path, as_version=4)
        attach_check(record, nbformat.read(output, as_version=4), seeds)
        nbformat.write(record, path)

    return _execute(path, Path(scratch) / f"{path.stem}.check.ipynb", {"profile": "full", "seeds": list(seeds)},
                    attach, label="check")


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def run_notebook(path: Path, profile: str, output: Path, parameters: dict | None = None) -> dict:
    """Execute ``path`` into ``output`` with ``profile`` and any other notebook ``parameters`` (e.g. ``model``,
    ``task``); returns a summary dict (never raises on failure)."""

    def stamp(output: Path) -> None:
        nb = nbformat.read(output, as_version=4)
        verdicts = collect_verdicts(nb)
        nb.metadata.setdefault("xxpo", {}).update(code_hash=code_hash(nb), profile=profile, verdicts=verdicts)
        nbformat.write(nb, output)

    return _execute(path, output, {**(parameters or {}), "profile": profile}, stamp, label=profile)


def _execute(path: Path, output: Path, parameters: dict, then, label: str) -> dict:
    """papermill ``path`` into ``output`` with ``parameters``, then ``then(output)``; the summary dict of
    :func:`run_notebook` (``ok``, ``error``: the last line of the failure, ``seconds``), never raises."""
    import papermill

    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(path), str(output), parameters=parameters, kernel_name="python3",
                                   cwd=str(path.parent), progress_bar=False)
        then(output)
        ok, error = True, None
    except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
        ok, error = False, str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
    return {"notebook": path.name, "profile": label, "ok": ok, "seconds": time.perf_counter() - start,
            "output": str(output), "error": error}


def reproduce(paths=None, profile: str = "smoke", scratch=None, parameters: dict | None = None,
              check_seeds=None) -> list[dict]:
    """Run ``paths`` (default: every notebook) under ``profile``; prints progress and a summary table.

    ``parameters``: other papermill parameters for every notebook, e.g. ``{"model": "/models/Qwen2.5-0.5B-Instruct",
    "task": "jsonl:/data/gsm8k_train.jsonl,/data/gsm8k_test.jsonl"}`` for the ``gpu`` profile. The ``full``
    profile takes none: it writes the committed record, which must come from the notebook's own defaults.
    With ``check_seeds`` (``full`` only), each successful record is then re-run with those reported seeds
    and the re-run's verdicts are attached to it (:func:`check_notebook`).
    """
    if profile not in ("smoke", "full", "gpu"):
        raise ValueError(f"profile must be 'smoke', 'full' or 'gpu', got {profile!r}")
    if parameters and profile == "full":
        raise ValueError("the full profile writes the committed record and takes no parameters; use 'gpu' or 'smoke'")
    if parameters and "profile" in parameters:
        raise ValueError("set the profile with profile=..., not among the parameters")
    if check_seeds is not None:
        if profile != "full":
            raise ValueError("check_seeds re-runs a full record; use it with profile 'full'")
        if (not isinstance(check_seeds, (list, tuple)) or not check_seeds or len(set(check_seeds)) != len(check_seeds)
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in check_seeds)):
            raise ValueError(f"check_seeds must be a non-empty list of distinct non-negative ints, got {check_seeds!r}")
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
        if check_seeds is not None and result["ok"]:
            print(f"    re-running with seeds {list(check_seeds)} ...", flush=True)
            check = check_notebook(path, check_seeds, Path(tempfile.mkdtemp(prefix="xxpo-check-")))
            status = "ok" if check["ok"] else f"FAILED: {check['error']}"
            print(f"    check {status} in {check['seconds']:.0f} s", flush=True)
            results.append(check)
    print("\nsummary")
    for r in results:
        label = r["notebook"] + (" (check)" if r["profile"] == "check" else "")
        print(f"  {label:<40} {'ok' if r['ok'] else 'FAILED':<7} {r['seconds']:7.0f} s")
    return results
