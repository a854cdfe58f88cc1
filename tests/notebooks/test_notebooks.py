"""Every notebook runs end to end under the smoke profile, and every committed record is current."""

from __future__ import annotations

import os

import nbformat
import pytest

from xxpo.reproduce import code_hash, notebooks, reproduce

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NOTEBOOKS = notebooks()


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_record_is_a_full_run_of_the_current_code(path):
    nb = nbformat.read(path, as_version=4)
    stamp = nb.metadata.get("xxpo", {})
    assert stamp.get("profile") == "full", f"{path.name}: the committed record must come from `xxpo reproduce --profile full`"
    assert stamp.get("code_hash") == code_hash(nb), (
        f"{path.name}: code cells changed after the record was produced; re-run `xxpo reproduce --profile full {path}`"
    )
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells), f"{path.name}: a code cell was not executed"
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: the record contains errors: {[e.get('evalue') for e in errors]}"


def test_code_hash_sees_code_changes_but_not_outputs(tmp_path):
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    before = code_hash(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    assert code_hash(nb) == before
    next(c for c in nb.cells if c.cell_type == "code").source += "\n# edited"
    assert code_hash(nb) != before


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_under_the_smoke_profile(path, tmp_path):
    [result] = reproduce([path], profile="smoke", scratch=tmp_path)
    assert result["ok"], result["error"]
    executed = nbformat.read(tmp_path / path.name, as_version=4)
    assert executed.metadata["xxpo"]["profile"] == "smoke"
    text = "\n".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "profile=smoke" in text


def test_bad_profile_is_rejected():
    with pytest.raises(ValueError, match="profile"):
        reproduce(NOTEBOOKS[:1], profile="huge")


def test_a_bad_parameter_fails_the_notebook_with_a_clear_error(tmp_path):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="seeds"):
        papermill.execute_notebook(str(NOTEBOOKS[0]), str(tmp_path / "bad.ipynb"), parameters={"profile": "smoke", "seeds": [-1]},
                                   kernel_name="python3", progress_bar=False)
