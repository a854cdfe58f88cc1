"""Every notebook runs end to end under the smoke profile, and every committed record is current."""

from __future__ import annotations

import copy
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_record_was_re_run_with_other_seeds(path):
    """The protocol: a record's verdicts are re-decided on reported seeds it did not use, by the same code."""
    nb = nbformat.read(path, as_version=4)
    stamp = nb.metadata.get("xxpo", {})
    if not stamp.get("verdicts"):
        pytest.skip(f"{path.name} decides no claim")
    check = stamp.get("check")
    assert check, f"{path.name}: no re-run with other seeds; run `xxpo reproduce --profile full --check-seeds 5,6,7,8,9 {path}`"
    assert check["code_hash"] == code_hash(nb), f"{path.name}: the re-run is stale (the code changed after it)"
    reported = {s for v in stamp["verdicts"] for s in v["seeds"]}
    assert not reported & set(check["seeds"]), f"{path.name}: the re-run reused reported seeds"
    assert {v["claim"]["id"] for v in stamp["verdicts"]} <= {v["claim"]["id"] for v in check["verdicts"]}


def test_attach_check_stores_the_re_run_and_refuses_other_code():
    from xxpo.reproduce import attach_check
    from xxpo.verdicts import VERDICT_MIME

    def notebook(source, verdict_seeds):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        verdict = {"claim": {"id": "C6b"}, "outcome": "reproduced", "seeds": verdict_seeds}
        nb.cells[0].outputs = [nbformat.v4.new_output("display_data", data={VERDICT_MIME: {"verdicts": [verdict]}})]
        return nb

    record = notebook("x = 1", [0, 1])
    record.metadata["xxpo"] = {"verdicts": [{"claim": {"id": "C6b"}, "outcome": "reproduced", "seeds": [0, 1]}]}
    check = attach_check(record, notebook("x = 1", [5, 6]), [5, 6])
    assert record.metadata["xxpo"]["check"] == check and check["seeds"] == [5, 6]
    assert check["code_hash"] == code_hash(record) and check["verdicts"][0]["seeds"] == [5, 6]
    with pytest.raises(ValueError, match="other code"):
        attach_check(record, notebook("x = 2", [5, 6]), [5, 6])
    with pytest.raises(ValueError, match="seeds"):
        attach_check(record, notebook("x = 1", [5, 7]), [5, 6])
    empty = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    with pytest.raises(ValueError, match="no verdict for"):
        attach_check(record, empty, [5, 6])


def test_check_seeds_need_the_full_profile():
    with pytest.raises(ValueError, match="full"):
        reproduce(NOTEBOOKS[:1], profile="smoke", check_seeds=[5, 6])
    with pytest.raises(ValueError, match="check_seeds"):
        reproduce(NOTEBOOKS[:1], profile="full", check_seeds=[5, 5])


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


# ---------------------------------------------------------------------------------------------------
# verdicts: published by xxpo.experiments.publish, moved into the metadata by xxpo reproduce
# ---------------------------------------------------------------------------------------------------

VERDICT_CELL = '''
import pandas as pd
from xxpo.experiments import Claim, decide, publish

rows = []
for seed in range(5):
    rows.append(dict(arm="GSPO", seed=seed, base_eval_accuracy=0.3, final_eval_accuracy=0.45 + 0.01 * seed,
                     best_eval_accuracy=0.46 + 0.01 * seed))
    rows.append(dict(arm="GRPO", seed=seed, base_eval_accuracy=0.3, final_eval_accuracy=0.40,
                     best_eval_accuracy=0.41))
runs = pd.DataFrame(rows)
claims = [
    Claim("C6b", "GSPO's accuracy is at least GRPO's - 0.02", metric="final_eval_accuracy", a="GSPO", b="GRPO",
          kind="non-inferiority", margin=0.02),
    Claim("C6c", "GRPO beats GSPO", metric="final_eval_accuracy", a="GRPO", b="GSPO"),
]
publish([decide(c, runs) for c in claims])
'''


def test_reproduce_moves_published_verdicts_into_the_metadata(tmp_path):
    from xxpo.reproduce import run_notebook
    from xxpo.verdicts import VERDICT_MIME

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('profile = "full"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(VERDICT_CELL)]
    source = tmp_path / "99_synthetic.ipynb"
    nbformat.write(nb, source)
    result = run_notebook(source, "smoke", tmp_path / "out.ipynb")
    assert result["ok"], result["error"]
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    stamp = executed.metadata["xxpo"]
    assert stamp["code_hash"] == code_hash(executed) and stamp["profile"] == "smoke"
    verdicts = {v["claim"]["id"]: v for v in stamp["verdicts"]}
    assert set(verdicts) == {"C6b", "C6c"}
    assert verdicts["C6b"]["outcome"] == "reproduced" and verdicts["C6c"]["outcome"] == "not reproduced"
    assert verdicts["C6b"]["a_values"] == pytest.approx([0.45, 0.46, 0.47, 0.48, 0.49])
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(VERDICT_MIME in o.get("data", {}) for o in outputs)  # moved, not copied: the book can render
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(html) == 1 and "C6b" in html[0] and "not reproduced" in html[0]


def test_collect_verdicts_rejects_a_claim_published_twice():
    from xxpo.reproduce import collect_verdicts
    from xxpo.verdicts import VERDICT_MIME

    verdict = {"claim": {"id": "C6b"}, "outcome": "inconclusive"}
    output = nbformat.v4.new_output("display_data", data={VERDICT_MIME: {"verdicts": [verdict]}, "text/plain": "t"})
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[output]), nbformat.v4.new_code_cell("y", outputs=[copy.deepcopy(output)])]
    with pytest.raises(ValueError, match="C6b"):
        collect_verdicts(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_records_keep_verdicts_in_metadata_not_outputs(path):
    from xxpo.verdicts import VERDICT_MIME

    nb = nbformat.read(path, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(VERDICT_MIME in o.get("data", {}) for o in outputs), (
        f"{path.name}: a verdict output was not moved into the metadata; run it with `xxpo reproduce`")
