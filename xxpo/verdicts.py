"""Verdicts as code: the family's claims (:data:`CLAIMS`), claims as a notebook declares them
(:class:`Claim`), the rules (:class:`Rules`), :func:`decide`, and :func:`publish` for the claims ledger.

Import these from :mod:`xxpo.experiments`, which re-exports them and documents the whole protocol with an
example. This module needs no torch: ``xxpo reproduce`` and the book's claims ledger read it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["CLAIMS", "VERDICT_MIME", "Claim", "PaperClaim", "Rules", "Verdict", "bootstrap_ci", "claim_family",
           "decide", "measured_text", "publish", "verdict_table"]

VERDICT_MIME = "application/vnd.xxpo.verdicts+json"
"""MIME type of the output :func:`publish` emits; ``xxpo reproduce`` moves it into the notebook metadata."""


# --------------------------------------------------------------------------------------------------
# The family's claims, registered once (the book's claims ledger lists every one)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperClaim:
    """A claim of the source material, as the papers state it; notebooks test it through ``Claim`` objects."""

    id: str
    """``C<n>``; a notebook's claims are ``C<n>`` or ``C<n><letter>`` (``C6a``, ``C6b``, ...)."""
    source: str
    """The paper(s) it comes from."""
    statement: str
    """The claim in one sentence."""


CLAIMS: dict[str, PaperClaim] = {c.id: c for c in (
    PaperClaim("C1", "Schulman et al. 2017 (PPO), arXiv 1707.06347",
               "PPO's clip keeps multi-epoch updates stable where the unclipped ratio objective does not."),
    PaperClaim("C2", "Schulman et al. 2017 (PPO), arXiv 1707.06347; the XXPO family blog post (2025)",
               "TRPO's constrained step costs more time than PPO's for similar reward."),
    PaperClaim("C3", "Shao et al. 2024 (GRPO), arXiv 2402.03300",
               "GRPO matches PPO's reward without a critic, at lower memory and time."),
    PaperClaim("C4", "the XXPO family blog post (2025); Rafailov et al. 2023 (DPO), arXiv 2305.18290",
               "DPO is faster but falls behind online RL on a harder task."),
    PaperClaim("C5", "Liu et al. 2025 (Dr. GRPO), arXiv 2503.20783",
               "GRPO lengthens incorrect answers; Dr. GRPO does not."),
    PaperClaim("C6", "Zheng et al. 2025 (GSPO), arXiv 2507.18071",
               "GSPO clips far more tokens, yet learns at least as well and more stably than GRPO; on MoE models "
               "GRPO needs Routing Replay and GSPO does not."),
    PaperClaim("C7", "Hilton et al. 2021, arXiv 2110.00641; Fu et al. 2025 (AReaL), arXiv 2505.24298",
               "Stale data hurts coupled PPO; decoupled PPO recovers."),
    PaperClaim("C8", "Li et al. 2025 (A-3PO), arXiv 2512.06547",
               "A-3PO matches decoupled PPO without the extra forward pass."),
    PaperClaim("C9", "Gao et al. 2025 (SAPO), arXiv 2511.20347",
               "SAPO's soft gate is more stable than hard clipping off-policy."),
    PaperClaim("C10", "Wu et al. 2024 (self-play SPPO), arXiv 2405.00675; Wang et al. 2026 (sequence-level PPO), "
               "arXiv 2604.08865",
               "SPPO. Self-play: the win rate rises over iterations. Sequence-level PPO: N = 1 matches GRPO at "
               "lower cost."),
    PaperClaim("C11", "Yu et al. 2025 (DAPO), arXiv 2503.14476",
               "DAPO's clip-higher (eps_high > eps_low) slows the collapse of policy entropy, and its token-level "
               "loss keeps response length from running away."),
    PaperClaim("C12", "Yao et al. 2025 (truncated IS, blog post fengyao.notion.site/off-policy-rl); Liu et al. 2025 "
               "(masked IS, \"When Speed Kills Stability\", richardli.xyz/rl-collapse); Ling Team 2025 (IcePop, "
               "Ring-1T), arXiv 2510.18855",
               "A mismatch between the sampler's and the trainer's probabilities degrades RL training; importance "
               "weights pi_trainer / pi_sampler, truncated per token (TIS), masked per sequence (MIS) or masked per "
               "token (IcePop), recover it."),
)}
"""Every claim of the family, by id. Add a claim here (never in a notebook) to give it an id."""

_CLAIM_ID = re.compile(r"^(C\d+)([a-z]?)$")


def claim_family(claim_id: str) -> str:
    """``"C6b"`` -> ``"C6"``; raises for an id that is not ``C<n>[letter]`` or not in :data:`CLAIMS`."""
    m = _CLAIM_ID.match(claim_id) if isinstance(claim_id, str) else None
    if m is None:
        raise ValueError(f"claim id must look like 'C6' or 'C6b', got {claim_id!r}")
    if m.group(1) not in CLAIMS:
        raise ValueError(f"claim id {claim_id!r}: {m.group(1)} is not in xxpo.experiments.CLAIMS ({', '.join(CLAIMS)})")
    return m.group(1)


# --------------------------------------------------------------------------------------------------
# Claims as a notebook declares them, and the rules that decide them
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One testable claim, declared before the runs: ``A <kind> B`` on ``metric``, paired by seed.

    The per-seed quantity is ``d = A - B`` (``scale="difference"``) or ``d = ln(A / B)``
    (``scale="log-ratio"``, for "clips 10x more": ``margin=math.log(10)``). With ``b=None`` it is A's
    value itself (``d = A``; e.g. ``metric="gain"``). See :func:`decide` for the rules.
    """

    id: str
    """``C<n>`` or ``C<n><letter>``; ``C<n>`` must be in :data:`CLAIMS`."""
    statement: str
    """What is tested, in one sentence, with its numbers (e.g. "GSPO's accuracy >= GRPO's - 0.02")."""
    metric: str
    """A column of the per-run table (``GridResult.runs`` or ``GridResult.per_run()`` of :mod:`xxpo.experiments`)."""
    a: str
    """The arm the claim is about."""
    b: str | None
    """The arm it is compared with (None: compare A with 0)."""
    kind: str = "superiority"
    """``"superiority"`` (A beats B by more than ``margin``) or ``"non-inferiority"`` (A is not worse than
    B by more than ``margin``)."""
    margin: float = 0.0
    """>= 0, in the units of ``d`` (accuracy points, or a log factor for ``scale="log-ratio"``)."""
    direction: str = "greater"
    """``"greater"``: higher ``metric`` is better for the claim; ``"less"``: lower is (time, length)."""
    scale: str = "difference"
    """``"difference"`` (A - B) or ``"log-ratio"`` (ln(A / B); both values must be > 0)."""
    source: str | None = None
    """Citation; None takes the registered claim's source."""
    gated: tuple[str, ...] | None = None
    """Arms that must have learned and not collapsed for any verdict but "inconclusive" (None: A and B).
    List fewer only when an arm's failure is the claim itself (C1: the unclipped arm collapses)."""

    def __post_init__(self):
        family = claim_family(self.id)
        if not isinstance(self.statement, str) or not self.statement.strip():
            raise ValueError("statement must be a non-empty string")
        if self.kind not in ("superiority", "non-inferiority"):
            raise ValueError(f"kind must be 'superiority' or 'non-inferiority', got {self.kind!r}")
        if self.direction not in ("greater", "less"):
            raise ValueError(f"direction must be 'greater' or 'less', got {self.direction!r}")
        if self.scale not in ("difference", "log-ratio"):
            raise ValueError(f"scale must be 'difference' or 'log-ratio', got {self.scale!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not (
                math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {self.margin!r}")
        if self.a == self.b:
            raise ValueError(f"a and b must be different arms, got {self.a!r} twice")
        arms = (self.a,) if self.b is None else (self.a, self.b)
        gated = arms if self.gated is None else tuple(self.gated)
        if not set(gated) <= set(arms):
            raise ValueError(f"gated must be a subset of the compared arms {arms}, got {gated}")
        object.__setattr__(self, "gated", gated)
        object.__setattr__(self, "margin", float(self.margin))
        if self.source is None:
            object.__setattr__(self, "source", CLAIMS[family].source)

    @property
    def threshold(self) -> float:
        """The boundary the interval of ``d`` is compared with: +-margin (see :func:`decide`)."""
        sign = 1.0 if self.direction == "greater" else -1.0
        return sign * (self.margin if self.kind == "superiority" else -self.margin)

    def rule(self) -> str:
        """The decision rule in words, e.g. "reproduced if the CI of A - B lies above -0.02"."""
        above = self.direction == "greater"
        bound = f"{self.threshold:+.4g}" + (f" (a factor {math.exp(self.threshold):.3g})" if self.scale == "log-ratio" else "")
        return (f"reproduced if the CI of {self.quantity()} lies {'above' if above else 'below'} {bound}, "
                f"not reproduced if it lies {'below' if above else 'above'}")

    def quantity(self) -> str:
        if self.b is None:
            return f"{self.a}" if self.scale == "difference" else f"ln {self.a}"
        return f"{self.a} - {self.b}" if self.scale == "difference" else f"ln({self.a} / {self.b})"


@dataclass(frozen=True)
class Rules:
    """How every verdict of a notebook is decided; declare it before the runs (defaults are the suite's)."""

    min_seeds: int = 5
    """Fewer paired reported seeds than this: inconclusive."""
    confidence: float = 0.90
    """Two-sided level of the percentile bootstrap interval of the mean. 0.90 makes each bound a one-sided
    95% bound, the usual level of a non-inferiority test."""
    n_boot: int = 10_000
    """Bootstrap resamples (of the seeds, with replacement)."""
    boot_seed: int = 0
    """Seed of the bootstrap: the same numbers always give the same interval."""
    min_gain: float = 0.02
    """An arm *learned* when its mean held-out accuracy gain over the base (final - base) exceeds this AND
    the interval of that mean lies above 0. 0.02 is four examples of a 200-example evaluation set."""
    collapse_below_base: float = 0.05
    """A run *collapsed* when its final held-out accuracy is below its base's by more than this, ..."""
    collapse_drop: float = 0.10
    """... or below its own best evaluation (the base included) by more than this."""
    max_collapsed_runs: int = 0
    """An arm counts as collapsed when more of its reported runs than this collapsed."""

    def __post_init__(self):
        for name in ("min_seeds", "n_boot", "boot_seed", "max_collapsed_runs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name in ("min_seeds", "n_boot") else 0):
                raise ValueError(f"{name} must be an int >= {1 if name in ('min_seeds', 'n_boot') else 0}, got {value!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")
        for name in ("min_gain", "collapse_below_base", "collapse_drop"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")


def bootstrap_ci(values: Sequence[float], rules: Rules | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement), seeded.

    With 5 values the percentile interval is somewhat narrower than a t interval; the margins and the
    learned / collapse gates of :func:`decide` are there so that a narrow interval alone never decides.
    """
    rules = Rules() if rules is None else rules
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0 or not np.isfinite(x).all():
        raise ValueError(f"values must be a non-empty list of finite numbers, got {values!r}")
    idx = np.random.default_rng(rules.boot_seed).integers(0, len(x), size=(rules.n_boot, len(x)))
    means = x[idx].mean(axis=1)
    alpha = (1 - rules.confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


@dataclass(frozen=True)
class Verdict:
    """The outcome of one claim and every number it was decided from (``to_dict()`` is what is stored)."""

    claim: Claim
    outcome: str
    """``"reproduced"``, ``"not reproduced"`` or ``"inconclusive"``."""
    reason: str
    seeds: tuple[int, ...]
    a_values: tuple[float, ...]
    b_values: tuple[float, ...] | None
    diffs: tuple[float, ...]
    """Per seed: A - B, ln(A / B), A or ln A (see :class:`Claim`); empty when undefined."""
    mean_diff: float
    ci: tuple[float, float]
    arms: dict
    """Per compared arm: ``gains`` (final - base per seed), ``gain_mean``, ``gain_ci``, ``learned``,
    ``collapsed_seeds``, ``collapsed``."""
    rules: Rules

    def to_dict(self) -> dict:
        return _plain({"claim": dataclasses.asdict(self.claim), "family": claim_family(self.claim.id),
                       "outcome": self.outcome, "reason": self.reason, "rule": self.claim.rule(),
                       "threshold": self.claim.threshold, "seeds": self.seeds, "a_values": self.a_values,
                       "b_values": self.b_values, "diffs": self.diffs, "mean_diff": self.mean_diff,
                       "ci": self.ci, "arms": self.arms, "rules": dataclasses.asdict(self.rules)})


def _plain(x):
    """JSON-safe copy: tuples -> lists, numpy scalars -> Python, non-finite floats -> None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


RUN_COLUMNS = ("base_eval_accuracy", "final_eval_accuracy", "best_eval_accuracy")


def decide(claim: Claim, runs, rules: Rules | None = None) -> Verdict:
    """Decide ``claim`` from the per-run table ``runs`` (a DataFrame, or a ``GridResult`` of ``xxpo.experiments``).

    ``runs`` needs columns ``arm``, ``seed``, ``claim.metric`` and ``base_eval_accuracy``,
    ``final_eval_accuracy``, ``best_eval_accuracy``. The seeds of A and B must be the same (pairing).
    ``rules`` defaults to ``Rules()``.
    With ``d`` per seed as in :class:`Claim`, ``[lo, hi]`` its mean's bootstrap interval and
    ``m = claim.margin``, the checks are made in this order; the first that applies decides:

    ========================================================  =================================
    condition                                                  verdict
    ========================================================  =================================
    fewer than ``rules.min_seeds`` paired seeds                inconclusive
    a gated arm did not learn (``Rules.min_gain``)             inconclusive
    a gated arm collapsed (``Rules.collapse_*``)               inconclusive
    ``d`` undefined (missing value, ln of a value <= 0)        inconclusive
    superiority, greater:      claim ``d > m``                 reproduced if lo > m; not if hi < m
    superiority, less:         claim ``d < -m``                reproduced if hi < -m; not if lo > -m
    non-inferiority, greater:  claim ``d >= -m``               reproduced if lo > -m; not if hi < -m
    non-inferiority, less:     claim ``d <= m``                reproduced if hi < m; not if lo > m
    otherwise (the interval contains the threshold)            inconclusive
    ========================================================  =================================

    An arm *learned* when the mean over seeds of its gain (final - base held-out accuracy) exceeds
    ``rules.min_gain`` and the bootstrap interval of that mean lies above 0. A run *collapsed* when its
    final accuracy is below base - ``collapse_below_base`` or below its best evaluation - ``collapse_drop``;
    an arm collapsed when more than ``max_collapsed_runs`` of its runs did. The gated arms are
    ``claim.gated`` (default: both). So a non-result (both arms collapsed, neither learned, too few seeds)
    is never "reproduced". Every number used is kept in the :class:`Verdict`.
    """
    if not isinstance(claim, Claim):
        raise TypeError(f"claim must be a Claim, got {type(claim).__name__}")
    rules = Rules() if rules is None else rules
    if not isinstance(rules, Rules):
        raise TypeError(f"rules must be a Rules, got {type(rules).__name__}")
    runs = getattr(runs, "runs", runs)  # a GridResult or its runs table
    missing = [c for c in ("arm", "seed", claim.metric, *RUN_COLUMNS) if c not in runs.columns]
    if missing:
        raise ValueError(f"runs lacks the columns {missing} (claim {claim.id}); it has {list(runs.columns)}")
    arms = (claim.a,) if claim.b is None else (claim.a, claim.b)
    by_arm = {}
    for arm in arms:
        rows = runs[runs["arm"] == arm]
        if rows.empty:
            raise ValueError(f"claim {claim.id}: no runs of arm {arm!r}; arms present: {sorted(runs['arm'].unique())}")
        if rows["seed"].duplicated().any():
            raise ValueError(f"claim {claim.id}: arm {arm!r} has several runs of one seed")
        by_arm[arm] = rows.set_index("seed").sort_index()
    seeds = tuple(int(s) for s in by_arm[claim.a].index)
    if claim.b is not None and set(by_arm[claim.b].index) != set(seeds):
        raise ValueError(f"claim {claim.id}: arms {claim.a!r} and {claim.b!r} must have the same seeds (pairing), got "
                         f"{list(seeds)} and {sorted(int(s) for s in by_arm[claim.b].index)}")

    arm_info, gate_reasons = {}, []
    for arm, rows in by_arm.items():
        base, final, best = (rows[c].to_numpy(float) for c in RUN_COLUMNS)
        gains = final - base
        ok = np.isfinite(gains).all()
        gain_ci = bootstrap_ci(gains, rules) if ok else (math.nan, math.nan)
        learned = bool(ok and gains.mean() > rules.min_gain and gain_ci[0] > 0)
        fell = (final < base - rules.collapse_below_base) | (final < best - rules.collapse_drop) | ~np.isfinite(final)
        collapsed_seeds = [int(s) for s, f in zip(rows.index, fell) if f]
        collapsed = len(collapsed_seeds) > rules.max_collapsed_runs
        arm_info[arm] = {"gains": gains.tolist(), "gain_mean": float(gains.mean()), "gain_ci": gain_ci,
                         "learned": learned, "collapsed_seeds": collapsed_seeds, "collapsed": collapsed}
        if arm in claim.gated and not learned:
            gate_reasons.append(f"{arm} did not learn (mean gain {gains.mean():+.3f}, CI {_ci(gain_ci)}; needs "
                                f"> {rules.min_gain:g} with a CI above 0)")
        if arm in claim.gated and collapsed:
            gate_reasons.append(f"{arm} collapsed on seeds {collapsed_seeds}")

    a_values = by_arm[claim.a][claim.metric].to_numpy(float)
    b_values = by_arm[claim.b][claim.metric].loc[list(seeds)].to_numpy(float) if claim.b is not None else None
    undefined = None
    values = a_values if b_values is None else np.concatenate([a_values, b_values])
    if not np.isfinite(values).all():
        undefined = f"{claim.metric} is missing on some run"
    elif claim.scale == "log-ratio" and (values <= 0).any():
        undefined = f"ln of {claim.metric} is undefined: a value is <= 0"
    diffs, mean_diff, ci = (), math.nan, (math.nan, math.nan)
    if undefined is None:
        if claim.scale == "log-ratio":
            d = np.log(a_values) - (np.log(b_values) if b_values is not None else 0.0)
        else:
            d = a_values - (b_values if b_values is not None else 0.0)
        diffs, mean_diff, ci = tuple(d.tolist()), float(d.mean()), bootstrap_ci(d, rules)

    t, lo, hi = claim.threshold, ci[0], ci[1]
    if len(seeds) < rules.min_seeds:
        outcome, reason = "inconclusive", f"only {len(seeds)} paired seeds (the rules need {rules.min_seeds})"
    elif gate_reasons:
        outcome, reason = "inconclusive", "; ".join(gate_reasons)
    elif undefined is not None:
        outcome, reason = "inconclusive", undefined
    else:
        above, below = lo > t, hi < t
        if claim.direction == "less":
            above, below = below, above
        outcome = "reproduced" if above else ("not reproduced" if below else "inconclusive")
        where = ("contains" if outcome == "inconclusive" else
                 "lies above" if (outcome == "reproduced") == (claim.direction == "greater") else "lies below")
        reason = f"the {rules.confidence:.0%} CI {_ci(ci)} of {claim.quantity()} {where} the threshold {t:+.4g}"
    return Verdict(claim, outcome, reason, seeds, tuple(a_values.tolist()),
                   None if b_values is None else tuple(b_values.tolist()), diffs, mean_diff, ci, arm_info, rules)


def _ci(ci) -> str:
    return f"[{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci[0] is not None and math.isfinite(ci[0]) else "[undefined]"


def measured_text(verdict: dict) -> str:
    """The measured effect in words, from ``Verdict.to_dict()`` (the book's ledger uses it too)."""
    claim, rules = verdict["claim"], verdict["rules"]
    n, mean, ci = len(verdict["seeds"]), verdict["mean_diff"], verdict["ci"]
    if mean is None:
        return f"undefined ({n} seeds)"
    level = f"{rules['confidence']:.0%} CI"
    name = claim["a"] if claim["b"] is None else f"{claim['a']} / {claim['b']}"
    if claim["scale"] == "log-ratio":
        return f"{name} = {math.exp(mean):.3g}x ({level} {math.exp(ci[0]):.3g}x to {math.exp(ci[1]):.3g}x; {n} seeds)"
    name = claim["a"] if claim["b"] is None else f"{claim['a']} - {claim['b']}"
    return f"{name} = {mean:+.3f} ({level} {ci[0]:+.3f} to {ci[1]:+.3f}; {n} seeds)"


def verdict_table(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """One row per verdict: claim, statement, metric, measured effect, rule, verdict, reason."""
    rows = []
    for v in verdicts:
        d = v.to_dict()
        rows.append({"claim": v.claim.id, "statement": v.claim.statement, "metric": v.claim.metric,
                     "measured": measured_text(d), "rule": d["rule"], "verdict": v.outcome, "reason": v.reason})
    return pd.DataFrame(rows, columns=["claim", "statement", "metric", "measured", "rule", "verdict", "reason"])


def publish(verdicts: Sequence[Verdict]) -> None:
    """Show the verdict table, and emit the verdicts as a ``VERDICT_MIME`` output.

    ``xxpo reproduce`` moves that output into ``nb.metadata["xxpo"]["verdicts"]``, where the book's
    claims ledger reads it. Claim ids must be unique within a notebook.
    """
    from IPython.display import display

    verdicts = list(verdicts)
    if not verdicts or not all(isinstance(v, Verdict) for v in verdicts):
        raise ValueError("publish needs a non-empty list of Verdicts (from decide)")
    ids = [v.claim.id for v in verdicts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"claim ids must be unique, got {ids}")
    table = verdict_table(verdicts)
    display({VERDICT_MIME: {"verdicts": [v.to_dict() for v in verdicts]},
             "text/html": table.to_html(index=False, escape=True, classes="xxpo-verdicts"),
             "text/plain": table.to_string(index=False)}, raw=True)


