"""Verdicts as code and fair hyper-parameter selection, on synthetic per-run tables (no training).

Every expected verdict below is derived by hand from the numbers the test builds: the per-seed values
are chosen so that the interval lies clearly above, below or across the threshold, and the learned /
collapsed gates are triggered by construction.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest

import xxpo.experiments as ex
from xxpo.experiments import CLAIMS, Claim, Rules, bootstrap_ci, decide, select_hparams, verdict_table
from xxpo.train import TrainConfig

SEEDS = [0, 1, 2, 3, 4]
BASE = 0.30


def runs_table(finals: dict[str, list[float]], metric: dict[str, list[float]] | None = None, best=None, seeds=SEEDS):
    """A per-run table: base 0.30 everywhere, the given final accuracies, best = max(base, final) unless given."""
    rows = []
    for arm, values in finals.items():
        for i, (seed, final) in enumerate(zip(seeds, values)):
            b = best[arm][i] if best and arm in best else max(BASE, final)
            rows.append({"arm": arm, "seed": seed, "base_eval_accuracy": BASE, "final_eval_accuracy": final,
                         "best_eval_accuracy": b, "m": (metric or finals)[arm][i]})
    return pd.DataFrame(rows)


def acc_claim(kind="superiority", margin=0.02, **kw):
    return Claim("C6b", "A vs B on accuracy", metric="final_eval_accuracy", a="A", b="B", kind=kind, margin=margin, **kw)


LEARNED_B = [0.40, 0.41, 0.39, 0.40, 0.42]  # gain ~ +0.10 on every seed


# ---------------------------------------------------------------------------------------------- gates


def test_both_arms_collapsed_is_inconclusive():
    # Both fall far below the base; A falls less, so the paired interval is clearly above the margin.
    runs = runs_table({"A": [0.20, 0.21, 0.20, 0.22, 0.21], "B": [0.05, 0.06, 0.04, 0.05, 0.06]})
    v = decide(acc_claim(), runs)
    assert v.ci[0] > 0.02  # the comparison alone would say "reproduced" ...
    assert v.outcome == "inconclusive"  # ... but a non-result never is
    assert v.arms["A"]["collapsed"] and v.arms["B"]["collapsed"]
    assert "collapsed" in v.reason


def test_neither_arm_learned_is_inconclusive():
    # Both stay at the base (+-0.01); A is a hair above B on every seed.
    runs = runs_table({"A": [0.31, 0.31, 0.30, 0.31, 0.31], "B": [0.29, 0.29, 0.29, 0.30, 0.29]})
    v = decide(acc_claim(kind="non-inferiority"), runs)
    assert v.ci[0] > -0.02
    assert v.outcome == "inconclusive"
    assert not v.arms["A"]["learned"] and not v.arms["B"]["learned"]
    assert "did not learn" in v.reason


def test_baseline_that_does_not_learn_blocks_a_win():
    runs = runs_table({"A": [0.50, 0.52, 0.49, 0.51, 0.50], "B": [0.30, 0.30, 0.31, 0.29, 0.30]})
    v = decide(acc_claim(), runs)
    assert v.arms["A"]["learned"] and not v.arms["B"]["learned"]
    assert v.outcome == "inconclusive" and "B did not learn" in v.reason


def test_gated_lets_the_failing_arm_be_the_claim():
    # C1-style: A (clipped) learns, B (unclipped) collapses; that collapse is the claim itself.
    runs = runs_table({"A": [0.45, 0.46, 0.44, 0.45, 0.47], "B": [0.10, 0.12, 0.08, 0.11, 0.09]})
    claim = Claim("C1", "clip beats no clip", metric="final_eval_accuracy", a="A", b="B", margin=0.05, gated=("A",))
    assert decide(claim, runs).outcome == "reproduced"
    assert decide(acc_claim(margin=0.05), runs).outcome == "inconclusive"  # default gates both arms


def test_collapse_by_a_drop_from_the_best_evaluation():
    # B ends above its base but 0.15 below its own best evaluation on one seed: a collapse.
    finals = {"A": [0.50, 0.52, 0.49, 0.51, 0.50], "B": LEARNED_B}
    best = {"B": [0.55, 0.41, 0.39, 0.40, 0.42]}
    v = decide(acc_claim(), runs_table(finals, best=best))
    assert v.arms["B"]["collapsed_seeds"] == [0] and v.outcome == "inconclusive"
    relaxed = decide(acc_claim(), runs_table(finals, best=best), Rules(max_collapsed_runs=1))
    assert relaxed.outcome == "reproduced"


def test_learned_needs_the_gain_interval_above_zero():
    # Mean gain +0.06 > 0.02, but two seeds lose accuracy: the interval of the mean gain reaches below 0.
    finals = [0.60, 0.58, 0.27, 0.26, 0.29]
    gains = np.array(finals) - BASE
    lo, _ = bootstrap_ci(gains)
    assert gains.mean() > 0.02 and lo < 0
    v = decide(acc_claim(), runs_table({"A": finals, "B": LEARNED_B}), Rules(collapse_drop=1.0, collapse_below_base=1.0))
    assert not v.arms["A"]["learned"] and v.outcome == "inconclusive"


def test_fewer_than_five_seeds_is_inconclusive():
    finals = {"A": [0.50, 0.52, 0.49, 0.51], "B": [0.40, 0.41, 0.39, 0.40]}
    v = decide(acc_claim(), runs_table(finals, seeds=SEEDS[:4]))
    assert v.outcome == "inconclusive" and "4 paired seeds" in v.reason
    assert v.ci[0] > 0.02  # the numbers are still recorded
    assert decide(acc_claim(), runs_table(finals, seeds=SEEDS[:4]), Rules(min_seeds=4)).outcome == "reproduced"


# ---------------------------------------------------------------------------------------------- the interval


def test_clear_win_is_reproduced():
    runs = runs_table({"A": [0.50, 0.52, 0.49, 0.51, 0.50], "B": LEARNED_B})
    v = decide(acc_claim(margin=0.05), runs)
    diffs = [a - b for a, b in zip([0.50, 0.52, 0.49, 0.51, 0.50], LEARNED_B)]
    assert v.diffs == pytest.approx(diffs)
    assert v.mean_diff == pytest.approx(sum(diffs) / 5)
    assert min(diffs) <= v.ci[0] <= v.ci[1] <= max(diffs)
    assert v.ci[0] > 0.05 and v.outcome == "reproduced"
    assert v.arms["A"]["learned"] and v.arms["B"]["learned"]


def test_clear_loss_is_not_reproduced():
    runs = runs_table({"A": [0.40, 0.41, 0.39, 0.40, 0.42], "B": [0.50, 0.52, 0.49, 0.51, 0.50]})
    v = decide(acc_claim(margin=0.0), runs)
    assert v.ci[1] < 0 and v.outcome == "not reproduced"


def test_interval_straddling_the_margin_is_inconclusive():
    # Differences 0, +0.04, 0, +0.04, +0.01: mean +0.018 and an interval that contains the margin 0.02.
    a = [0.40, 0.45, 0.40, 0.45, 0.41]
    b = [0.40, 0.41, 0.40, 0.41, 0.40]
    v = decide(acc_claim(margin=0.02), runs_table({"A": a, "B": b}))
    assert v.ci[0] < 0.02 < v.ci[1]
    assert v.outcome == "inconclusive" and "contains" in v.reason


def test_non_inferiority():
    b = LEARNED_B
    slightly_worse = [x - 0.01 for x in b]  # d = -0.01 on every seed: inside the margin 0.02
    much_worse = [x - 0.06 for x in b]  # d = -0.06: outside it
    around = [x + d for x, d in zip(b, [-0.05, 0.01, -0.04, 0.0, -0.03])]  # mean -0.022, interval across -0.02
    claim = acc_claim(kind="non-inferiority", margin=0.02)
    assert decide(claim, runs_table({"A": slightly_worse, "B": b})).outcome == "reproduced"
    assert decide(claim, runs_table({"A": much_worse, "B": b})).outcome == "not reproduced"
    v = decide(claim, runs_table({"A": around, "B": b}))
    assert v.ci[0] < -0.02 < v.ci[1] and v.outcome == "inconclusive"
    # The same "slightly worse" A is not superior.
    assert decide(acc_claim(kind="superiority", margin=0.0), runs_table({"A": slightly_worse, "B": b})).outcome == "not reproduced"


def test_direction_less():
    # Time per step: A takes 2 s, B 1 s. "A costs more" is superiority of B - A in the 'less' direction.
    runs = runs_table({"A": [0.45] * 5, "B": LEARNED_B}, metric={"A": [2.0, 2.1, 1.9, 2.0, 2.2], "B": [1.0] * 5})
    slower = Claim("C2", "B is faster than A by 0.5 s", metric="m", a="B", b="A", direction="less", margin=0.5)
    assert slower.threshold == -0.5
    assert decide(slower, runs).outcome == "reproduced"
    not_worse = Claim("C2", "A is at most 0.2 s slower", metric="m", a="A", b="B", kind="non-inferiority",
                      direction="less", margin=0.2)
    assert not_worse.threshold == 0.2
    assert decide(not_worse, runs).outcome == "not reproduced"


def test_log_ratio_claims_compare_factors():
    # A clips ~100x more than B on every seed.
    clip_a = [0.10, 0.12, 0.09, 0.11, 0.10]
    clip_b = [0.001, 0.0011, 0.0009, 0.001, 0.0012]
    runs = runs_table({"A": [0.45] * 5, "B": LEARNED_B}, metric={"A": clip_a, "B": clip_b})
    ten_x = Claim("C6a", "A clips 10x more", metric="m", a="A", b="B", margin=math.log(10), scale="log-ratio")
    thousand_x = Claim("C6a", "A clips 1000x more", metric="m", a="A", b="B", margin=math.log(1000), scale="log-ratio")
    v = decide(ten_x, runs)
    assert v.diffs == pytest.approx([math.log(x / y) for x, y in zip(clip_a, clip_b)])
    assert v.outcome == "reproduced"
    assert decide(thousand_x, runs).outcome == "not reproduced"
    assert "x (90% CI" in ex.verdict_table([v])["measured"][0]
    zero = runs_table({"A": [0.45] * 5, "B": LEARNED_B}, metric={"A": clip_a, "B": [0.0] * 5})
    z = decide(ten_x, zero)
    assert z.outcome == "inconclusive" and "undefined" in z.reason


def test_one_arm_claim_compares_with_zero():
    runs = runs_table({"A": [0.45, 0.46, 0.44, 0.45, 0.47]})
    runs["gain"] = runs["final_eval_accuracy"] - runs["base_eval_accuracy"]
    claim = Claim("C10a", "the win rate rises", metric="gain", a="A", b=None, margin=0.1)
    v = decide(claim, runs)
    assert v.b_values is None and v.mean_diff == pytest.approx(0.154)
    assert v.outcome == "reproduced"


# ---------------------------------------------------------------------------------------------- the bootstrap


def test_bootstrap_is_deterministic_and_matches_a_plain_python_oracle():
    values = [0.03, -0.01, 0.05, 0.02, 0.00]
    rules = Rules(n_boot=2000, boot_seed=7)
    assert bootstrap_ci(values, rules) == bootstrap_ci(values, rules)
    assert bootstrap_ci(values, rules) != bootstrap_ci(values, Rules(n_boot=2000, boot_seed=8))
    # Oracle: the same resampling indices, means and percentiles computed with Python lists.
    idx = np.random.default_rng(7).integers(0, 5, size=(2000, 5)).tolist()
    means = sorted(sum(values[i] for i in row) / 5 for row in idx)

    def quantile(q):  # numpy's default 'linear' method
        pos = q * (len(means) - 1)
        lo = math.floor(pos)
        return means[lo] + (means[min(lo + 1, len(means) - 1)] - means[lo]) * (pos - lo)

    assert bootstrap_ci(values, rules) == pytest.approx((quantile(0.05), quantile(0.95)), abs=1e-12)


def test_same_numbers_give_the_same_verdict_in_any_order():
    runs = runs_table({"A": [0.50, 0.52, 0.49, 0.51, 0.50], "B": LEARNED_B})
    shuffled = runs.sample(frac=1.0, random_state=3)
    assert decide(acc_claim(), runs).to_dict() == decide(acc_claim(), shuffled).to_dict()


def test_verdict_records_every_number_as_json():
    runs = runs_table({"A": [0.50, 0.52, 0.49, 0.51, 0.50], "B": LEARNED_B})
    d = decide(acc_claim(), runs).to_dict()
    json.dumps(d, allow_nan=False)
    assert d["seeds"] == SEEDS and d["a_values"] == [0.50, 0.52, 0.49, 0.51, 0.50] and d["b_values"] == LEARNED_B
    assert d["claim"]["source"] == CLAIMS["C6"].source and d["family"] == "C6"
    assert set(d["arms"]["A"]) >= {"gains", "gain_mean", "gain_ci", "learned", "collapsed_seeds", "collapsed"}
    assert d["rules"]["confidence"] == 0.90 and d["threshold"] == 0.02 and d["outcome"] == "reproduced"
    table = verdict_table([decide(acc_claim(), runs)])
    assert list(table["verdict"]) == ["reproduced"]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, match", [
    (dict(id="C99"), "not in xxpo.experiments.CLAIMS"),
    (dict(id="6a"), "claim id"),
    (dict(kind="better"), "kind"),
    (dict(direction="up"), "direction"),
    (dict(scale="log"), "scale"),
    (dict(margin=-0.1), "margin"),
    (dict(b="A"), "different arms"),
    (dict(gated=("C",)), "gated"),
])
def test_bad_claims_are_rejected(kw, match):
    args = dict(id="C6b", statement="s", metric="final_eval_accuracy", a="A", b="B")
    with pytest.raises(ValueError, match=match):
        Claim(**{**args, **kw})


def test_unpaired_seeds_and_missing_columns_are_errors():
    runs = runs_table({"A": [0.5] * 5, "B": LEARNED_B})
    with pytest.raises(ValueError, match="same seeds"):
        decide(acc_claim(), runs[~((runs.arm == "B") & (runs.seed == 4))])
    with pytest.raises(ValueError, match="columns"):
        decide(acc_claim(), runs.drop(columns="best_eval_accuracy"))
    with pytest.raises(ValueError, match="no runs of arm"):
        decide(Claim("C6b", "s", metric="m", a="A", b="Z"), runs)
    with pytest.raises(ValueError, match="confidence"):
        Rules(confidence=1.5)


# ---------------------------------------------------------------------------------------------- selection


class FakeGrid:
    """Stands in for run_grid: a final accuracy chosen per (arm, lr, seed), no training."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, arms, seeds, *, cache_dir=None, progress=True):
        self.calls.append((dict(arms), list(seeds)))
        rows = []
        for label, config in arms.items():
            arm = label.split(" [")[0]
            for seed in seeds:
                final = self.table[(arm, config.lr, seed)]
                rows.append({"arm": label, "seed": seed, "base_eval_accuracy": BASE, "final_eval_accuracy": final,
                             "best_eval_accuracy": max(BASE, final), "gain": final - BASE})
        return ex.GridResult(pd.DataFrame(), pd.DataFrame(rows))


ARMS = {"GRPO": TrainConfig(method="grpo", steps=5), "GSPO": TrainConfig(method="gspo", steps=5)}
LRS = [1e-4, 3e-4, 1e-3]


def test_selection_picks_the_best_grid_value_on_tuning_seeds_only(monkeypatch):
    # GRPO is best at 1e-4, GSPO at 1e-3 on the tuning seeds 10, 11. On the reported seeds the order
    # would be different; the selection must never see them.
    table = {}
    for seed in (10, 11):
        table.update({("GRPO", 1e-4, seed): 0.45, ("GRPO", 3e-4, seed): 0.40, ("GRPO", 1e-3, seed): 0.20,
                      ("GSPO", 1e-4, seed): 0.35, ("GSPO", 3e-4, seed): 0.40, ("GSPO", 1e-3, seed): 0.44 + 0.01 * (seed - 10)})
    fake = FakeGrid(table)
    monkeypatch.setattr(ex, "run_grid", fake)
    sel = select_hparams(ARMS, {"lr": LRS}, tuning_seeds=[10, 11], reported_seeds=SEEDS)
    assert sel.chosen == {"GRPO": {"lr": 1e-4}, "GSPO": {"lr": 1e-3}}
    assert sel.configs["GRPO"].lr == 1e-4 and sel.configs["GSPO"].lr == 1e-3
    assert sel.configs["GSPO"].method == "gspo" and sel.configs["GSPO"].steps == 5
    assert [seeds for _, seeds in fake.calls] == [[10, 11]]
    assert len(fake.calls[0][0]) == 6  # every arm at every grid value
    assert len(sel.table) == 6 and sel.table["chosen"].sum() == 2
    row = sel.table[(sel.table.arm == "GSPO") & (sel.table.lr == 1e-3)].iloc[0]
    assert row["score"] == pytest.approx(0.445) and row["seed 10"] == 0.44 and bool(row["chosen"])


def test_selection_breaks_ties_by_grid_order(monkeypatch):
    table = {(arm, lr, s): 0.40 for arm in ARMS for lr in LRS for s in (10, 11)}
    monkeypatch.setattr(ex, "run_grid", FakeGrid(table))
    sel = select_hparams(ARMS, {"lr": LRS}, tuning_seeds=[10, 11], reported_seeds=SEEDS)
    assert sel.chosen == {"GRPO": {"lr": 1e-4}, "GSPO": {"lr": 1e-4}}
    sel = select_hparams(ARMS, {"lr": LRS[::-1]}, tuning_seeds=[10, 11], reported_seeds=SEEDS)
    assert sel.chosen == {"GRPO": {"lr": 1e-3}, "GSPO": {"lr": 1e-3}}


def test_selection_with_a_custom_rule(monkeypatch):
    # A rule that prefers the worst seed (robustness): GRPO 3e-4 has the best minimum.
    rng = random.Random(0)
    table = {(arm, lr, s): rng.uniform(0.3, 0.5) for arm in ARMS for lr in LRS for s in (10, 11, 12)}
    monkeypatch.setattr(ex, "run_grid", FakeGrid(table))

    def worst_seed(rows):
        return rows["final_eval_accuracy"].min()

    sel = select_hparams(ARMS, {"lr": LRS}, tuning_seeds=[10, 11, 12], reported_seeds=SEEDS, score=worst_seed)
    for arm in ARMS:
        expected = max(LRS, key=lambda lr: min(table[(arm, lr, s)] for s in (10, 11, 12)))
        assert sel.chosen[arm] == {"lr": expected}
    assert "worst_seed" in sel.rule


def test_tuning_seeds_overlapping_reported_seeds_is_an_error(monkeypatch):
    monkeypatch.setattr(ex, "run_grid", FakeGrid({}))
    with pytest.raises(ValueError, match=r"disjoint.*\[3\]"):
        select_hparams(ARMS, {"lr": LRS}, tuning_seeds=[3, 10], reported_seeds=SEEDS)


@pytest.mark.parametrize("grid, match", [({}, "non-empty"), ({"lrr": [1e-4]}, "not a TrainConfig field"),
                                         ({"lr": []}, "non-empty list"), ({"seed": [1]}, "not a TrainConfig field")])
def test_bad_grids_are_rejected(grid, match):
    with pytest.raises(ValueError, match=match):
        select_hparams(ARMS, grid, tuning_seeds=[10], reported_seeds=SEEDS)


def test_the_module_docstring_example_runs(monkeypatch, capsys):
    """The notebook in xxpo.experiments' docstring, with run_grid replaced by synthetic runs."""
    import re
    import textwrap

    def fake_run_grid(arms, seeds, *, cache_dir=None, progress=True):
        steps, runs = [], []
        for label, config in arms.items():
            gspo = config.method == "gspo"
            for seed in seeds:
                final = 0.45 + 0.01 * seed + (0.02 if gspo else 0.0) - 100 * abs(config.lr - 3e-4)
                for step in range(3):
                    steps.append({"arm": label, "seed": seed, "step": step, "clip_frac": (0.2 if gspo else 0.002) * (1 + 0.1 * step)})
                runs.append({"arm": label, "seed": seed, "base_eval_accuracy": BASE, "final_eval_accuracy": final,
                             "best_eval_accuracy": max(BASE, final), "gain": final - BASE})
        return ex.GridResult(pd.DataFrame(steps), pd.DataFrame(runs))

    monkeypatch.setattr(ex, "run_grid", fake_run_grid)
    example = textwrap.dedent(re.search(r"top to bottom::\n\n(.*?)\n\n\*\*The cache", ex.__doc__, re.S).group(1))
    scope = {"display": lambda obj: None}
    exec(compile(example, "xxpo.experiments docstring", "exec"), scope)
    assert scope["tuned"].chosen == {"GRPO": {"lr": 3e-4}, "GSPO": {"lr": 3e-4}}
    printed = capsys.readouterr().out
    assert "C6a" in printed and "C6b" in printed and "reproduced" in printed


def test_profile_overrides_merge_checked_values_and_name_bad_keys():
    from xxpo.experiments import profile_with_overrides

    profile = {"seeds": [0, 1], "prompts": 16, "lrs": [1e-4, 3e-4], "steps": {"a": 2, "b": 3}, "etas": [0, 2], "task": "add2"}
    merged = profile_with_overrides(profile, {"prompts": 4, "lrs": [1e-3], "steps": {"a": 1, "b": 1}, "etas": [0]},
                                    name="gpu", own=("seeds",))
    assert merged == {**profile, "prompts": 4, "lrs": [1e-3], "steps": {"a": 1, "b": 1}, "etas": [0]}
    assert profile["prompts"] == 16  # the profile itself is not changed
    assert profile_with_overrides(profile, None, name="gpu") == profile
    for overrides, match in [({"seeds": [3]}, r"profile_overrides\['seeds'\]: set seeds with its own"),
                             ({"prompt": 4}, r"unknown key 'prompt'.*'prompts'"),
                             ({"prompts": 0}, r"profile_overrides\['prompts'\] must have the form"),
                             ({"prompts": True}, r"profile_overrides\['prompts'\]"),
                             ({"lrs": []}, r"profile_overrides\['lrs'\]"),
                             ({"lrs": [-1e-3]}, r"profile_overrides\['lrs'\]"),
                             ({"steps": {"a": 1}}, r"profile_overrides\['steps'\]"),
                             ({"task": ""}, r"profile_overrides\['task'\]")]:
        with pytest.raises(ValueError, match=match):
            profile_with_overrides(profile, overrides, name="gpu", own=("seeds",))
    with pytest.raises(ValueError, match="profile_overrides must be a dict"):
        profile_with_overrides(profile, [("prompts", 4)], name="gpu")


def test_a_jsonl_task_needs_a_model_directory_and_files_that_parse(tmp_path):
    from xxpo.experiments import check_jsonl_task

    check_jsonl_task("add2", "tiny")  # a built-in task passes with a preset
    good = tmp_path / "good.jsonl"
    good.write_text("".join(f'{{"prompt": "What is {i} plus 1?", "answer": {i + 1}}}\n' for i in range(20)))
    with pytest.raises(ValueError, match=r"^tasks='jsonl:.*' is a JSONL task, which has no SFT base model: model must"):
        check_jsonl_task(f"jsonl:{good}", "tiny", "tasks")
    check_jsonl_task(f"jsonl:{good}", str(tmp_path))  # a directory: passes
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1 plus 1?"}\n')
    with pytest.raises(ValueError, match=r"^task='jsonl:.*bad.jsonl': .*line 1.*answer"):
        check_jsonl_task(f"jsonl:{bad}", str(tmp_path))
