"""Sphinx directives that generate the book's tables and figures from the xxpo package at build time.

The book never restates what the code already says. Each directive reads the package (``xxpo.presets``,
``xxpo.train.config``, ``xxpo.objectives``, ``xxpo.functional``) while the page is built, so a table or
a figure cannot drift from the code it describes:

- ``{presets-table}``: the family table, one row per method, from ``xxpo.presets.family_table()``.
- ``{presets-changes}``: each method's parent and the one line that says what it changes.
- ``{preset-facts} NAME``: a method's quick facts (critic, reference, ratio level, clipping, ...).
- ``{preset-diff} NAME``: what NAME changes against its parent, field by field.
- ``{preset-settings} NAME``: the paper's hyper-parameters beside the suite's defaults for NAME.
- ``{xxpo-figure} KEY``: a matplotlib figure drawn now (``family-map``, ``ppo-clip``, ``kl-estimators``,
  ``ratio-spread``, ``gradient-weights``), inlined as SVG, numbered and captioned like a ``{figure}``.
- ``{api-summary} MODULE``: every public name of MODULE (its ``__all__``) with its signature and the
  first line of its docstring.
- ``{claims-ledger}``: every claim of ``xxpo.verdicts.CLAIMS`` with the verdicts that the committed
  notebooks store in their metadata (``nb.metadata["xxpo"]["verdicts"]``, written by ``xxpo reproduce``);
  a claim no notebook has tested yet is listed as "not yet tested".

Registered through ``sphinx.local_extensions`` in ``_config.yml``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import re
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective

REPO = Path(__file__).resolve().parents[2]

# Field of a MethodPreset -> label in the book. The order is the order of every generated table.
FACT_FIELDS = (
    ("critic", "critic"),
    ("reference", "reference policy"),
    ("ratio_level", "ratio level"),
    ("clipping", "clipping"),
    ("loss_agg_mode", "aggregation"),
    ("advantage", "advantage"),
    ("samples_per_prompt", "samples per prompt (paper)"),
    ("objective", "objective in xxpo.objectives"),
)

# ----------------------------------------------------------------------------------------------------
# docutils helpers
# ----------------------------------------------------------------------------------------------------


def inline_code(text: str) -> list[nodes.Node]:
    """Text where spans in double backticks become literals (docstrings use that convention)."""
    parts = str(text).split("``")
    out: list[nodes.Node] = []
    for i, part in enumerate(parts):
        if not part:
            continue
        out.append(nodes.literal(part, part) if i % 2 else nodes.Text(part))
    return out


def cell(value) -> nodes.entry:
    para = nodes.paragraph()
    para += inline_code(str(value))
    return nodes.entry("", para)


def make_table(headers, rows, classes=()) -> nodes.table:
    """A docutils table; ``rows`` are sequences of cell values (strings)."""
    table = nodes.table(classes=["xxpo-table", *classes])
    group = nodes.tgroup(cols=len(headers))
    table += group
    for _ in headers:
        group += nodes.colspec(colwidth=1)
    head = nodes.thead()
    head += nodes.row("", *(cell(h) for h in headers))
    group += head
    body = nodes.tbody()
    for row in rows:
        body += nodes.row("", *(cell(v) for v in row))
    group += body
    return table


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "None"
    return str(value)


def preset_module():
    return importlib.import_module("xxpo.presets")


class XxpoDirective(SphinxDirective):
    """Common base: records the package files a generated node depends on (incremental rebuilds)."""

    sources: tuple[str, ...] = ("xxpo/presets.py",)

    def note_sources(self, *extra: str) -> None:
        for rel in (*self.sources, *extra):
            path = REPO / rel
            if path.exists():
                self.env.note_dependency(str(path))

    def preset(self, name: str):
        presets = preset_module()
        if name not in presets.PRESETS:
            raise self.error(f"unknown method {name!r}; xxpo.presets.PRESETS has {sorted(presets.PRESETS)}")
        return presets.PRESETS[name]


# ----------------------------------------------------------------------------------------------------
# preset tables
# ----------------------------------------------------------------------------------------------------


class PresetsTable(XxpoDirective):
    """The family table: exactly ``xxpo.presets.family_table()``, one row per method, in registry order."""

    def run(self):
        self.note_sources()
        rows = preset_module().family_table()
        headers = list(rows[0])
        body = [[fmt(r[h]) for h in headers] for r in rows]
        return [make_table(headers, body, classes=["xxpo-presets-table"])]


class PresetsChanges(XxpoDirective):
    """One line per method: its parent and what it changes (``MethodPreset.changes``)."""

    def run(self):
        self.note_sources()
        presets = preset_module()
        dl = nodes.definition_list(classes=["xxpo-presets-changes"])
        for p in presets.PRESETS.values():
            item = nodes.definition_list_item()
            term = nodes.term()
            term += nodes.strong(text=p.title)
            parent = presets.PRESETS[p.parent].title if p.parent else None
            term += nodes.Text(f"  (from {parent}; {p.citation})" if parent else f"  (a root; {p.citation})")
            item += term
            definition = nodes.definition()
            para = nodes.paragraph()
            para += inline_code(p.changes[:1].upper() + p.changes[1:] + ".")
            definition += para
            item += definition
            dl += item
        return [dl]


class PresetFacts(XxpoDirective):
    """Quick facts of one method, from its preset."""

    required_arguments = 1

    def run(self):
        self.note_sources()
        p = self.preset(self.arguments[0])
        parent = self.preset(p.parent).title if p.parent else "none (a root of the family)"
        rows = [("method", p.title), ("paper", p.citation), ("parent", parent)]
        rows += [(label, fmt(getattr(p, field))) for field, label in FACT_FIELDS]
        return [make_table(["", p.title], rows, classes=["xxpo-preset-facts"])]


class PresetDiff(XxpoDirective):
    """What one method changes against its parent: every preset field and hyper-parameter, side by side."""

    required_arguments = 1

    def run(self):
        self.note_sources()
        p = self.preset(self.arguments[0])
        if p.parent is None:
            raise self.error(f"{p.name} has no parent in xxpo.presets")
        q = self.preset(p.parent)
        rows = []
        for field, label in FACT_FIELDS:
            a, b = getattr(q, field), getattr(p, field)
            rows.append((label, fmt(a), fmt(b), "changed" if a != b else ""))
        for key in sorted(set(q.hparams) | set(p.hparams)):
            a, b = q.hparams.get(key, "-"), p.hparams.get(key, "-")
            rows.append((key, fmt(a), fmt(b), "changed" if a != b else ""))
        intro = nodes.paragraph()
        intro += nodes.strong(text=f"{p.title} against {q.title}: ")
        intro += inline_code(p.changes + ".")
        table = make_table(["", q.title, p.title, ""], rows, classes=["xxpo-preset-diff"])
        return [intro, table]


class PresetSettings(XxpoDirective):
    """The paper's hyper-parameters (``xxpo.presets``) beside what ``xxpo train --method NAME`` runs."""

    required_arguments = 1
    sources = ("xxpo/presets.py", "xxpo/train/config.py")

    def run(self):
        self.note_sources()
        p = self.preset(self.arguments[0])
        try:
            config_mod = importlib.import_module("xxpo.train.config")
            cfg = config_mod.TrainConfig.from_preset(p.name)
        except Exception as exc:  # the page must not silently lose its table
            raise self.error(f"cannot build TrainConfig.from_preset({p.name!r}): {exc!r}")
        values = dataclasses.asdict(cfg)
        rows = [("samples per prompt G", fmt(p.samples_per_prompt), fmt(values["group_size"]))]
        for key, paper_value in p.hparams.items():
            if key in values:
                suite = cfg.preset_value(key) if values[key] is None else values[key]
                rows.append((key, fmt(paper_value), fmt(suite)))
            else:  # an objective argument with no config field: the loop passes the preset's value
                rows.append((key, fmt(paper_value), fmt(cfg.preset_value(key)) + " (objective argument)"))
        for key in ("model", "task", "prompts_per_step", "steps", "epochs", "minibatches", "lr", "temperature"):
            if key not in p.hparams:
                rows.append((key, "-", fmt(values[key])))
        headers = ["setting", f"paper's setting ({p.citation})", "suite default (TrainConfig.from_preset)"]
        table = make_table(headers, rows, classes=["xxpo-preset-settings"])
        return [table]


# ----------------------------------------------------------------------------------------------------
# figures drawn by code
# ----------------------------------------------------------------------------------------------------


def _year(citation: str) -> str:
    m = re.search(r"\b(19|20)\d\d\b", citation)
    return m.group(0) if m else ""


def figure_family_map(plt):
    """Descent of the family: nodes from PRESETS, arrows from family_edges(), columns = generations."""
    presets = preset_module()
    edges = presets.family_edges()
    names = list(presets.PRESETS)
    children = {n: [c for p, c in edges if p == n] for n in names}
    parents = {c: p for p, c in edges}
    roots = [n for n in names if n not in parents]

    # Tidy-tree layout: leaves take consecutive rows in depth-first order, a parent sits at the mean
    # row of its children, so no two arrows cross.
    depth, row, next_row = {}, {}, [0.0]

    def place(n, d):
        depth[n] = d
        if not children[n]:
            row[n] = next_row[0]
            next_row[0] += 1.0
        else:
            for c in children[n]:
                place(c, d + 1)
            row[n] = sum(row[c] for c in children[n]) / len(children[n])

    for r in roots:
        place(r, 0)
        next_row[0] += 0.5  # a gap between the trees

    face = {"token": "#dbe9f6", "sequence": "#fde2c4", "none": "#dcefd9"}
    edge = {"token": "#2b6cb0", "sequence": "#c05621", "none": "#2f855a"}
    label = {"token": "token-level ratio", "sequence": "sequence-level ratio", "none": "no importance ratio"}
    n_rows, n_cols = next_row[0], max(depth.values()) + 1
    dx, w, h = 2.6, 2.3, 0.74
    fig, ax = plt.subplots(figsize=(1.85 * n_cols, 0.6 * n_rows + 0.9))
    xs = {n: dx * depth[n] for n in names}
    ys = {n: -row[n] for n in names}
    for p, c in edges:
        ax.annotate("", xy=(xs[c] - w / 2, ys[c]), xytext=(xs[p] + w / 2, ys[p]),
                    arrowprops=dict(arrowstyle="-|>", color="#555555", lw=1.1, shrinkA=0, shrinkB=1))
    for n in names:
        p = presets.PRESETS[n]
        level = p.ratio_level if p.ratio_level in face else "none"
        ax.add_patch(plt.Rectangle((xs[n] - w / 2, ys[n] - h / 2), w, h, facecolor=face[level],
                                   edgecolor=edge[level], lw=1.3, zorder=2))
        main, _, sub = p.title.partition(" (")
        detail = (sub.rstrip(")") + ", " if sub else "") + _year(p.citation)
        ax.text(xs[n], ys[n] + 0.13, main, ha="center", va="center", fontsize=9.5, weight="bold", zorder=3)
        ax.text(xs[n], ys[n] - 0.19, detail, ha="center", va="center", fontsize=7, color="#333333", zorder=3)
    for level in face:
        ax.plot([], [], "s", markersize=9, markerfacecolor=face[level], markeredgecolor=edge[level], label=label[level])
    ax.legend(loc="upper center", frameon=False, fontsize=8.5, ncol=3, bbox_to_anchor=(0.5, 0.0))
    for d in range(n_cols):
        ax.text(dx * d, 0.72, f"generation {d}", ha="center", va="bottom", fontsize=8.5, color="#555555")
    ax.set_xlim(-w / 2 - 0.1, dx * (n_cols - 1) + w / 2 + 0.1)
    ax.set_ylim(-(n_rows - 0.5) - 0.1, 1.1)
    ax.axis("off")
    return fig


def figure_ppo_clip(plt):
    """PPO's per-token objective -loss of ``clipped_surrogate`` against the ratio, for A > 0 and A < 0."""
    import torch

    from xxpo.objectives.ppo import clipped_surrogate

    eps = 0.2
    r = torch.linspace(0.0, 2.0, 801, dtype=torch.float64)
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    for ax, a in zip(axes, (1.0, -1.0)):
        adv = torch.full_like(r, a)
        loss, low, high, _ = clipped_surrogate(r, adv, eps, eps)
        obj = -loss
        zero_grad = (low | high).numpy()
        ax.plot(r.numpy(), (r * a).numpy(), ls="--", color="#888888", lw=1.2, label="unclipped  $rA$")
        ax.plot(r.numpy(), obj.numpy(), color="#2b6cb0", lw=2.2, label="clipped objective")
        ys = obj.numpy()
        ax.fill_between(r.numpy(), ys.min() - 0.3, ys.max() + 0.3, where=zero_grad, color="#c05621", alpha=0.12,
                        label="gradient is zero")
        for x in (1 - eps, 1 + eps):
            ax.axvline(x, color="#555555", lw=0.8, ls=":")
        ax.axvline(1.0, color="#000000", lw=0.6)
        ax.set_title(f"A = {a:+g}", fontsize=11)
        ax.set_xlabel("ratio  $r = \\pi_\\theta / \\pi_{old}$")
        ax.set_ylabel("per-token objective")
        ax.set_xlim(0, 2)
        ax.set_ylim(ys.min() - 0.3, ys.max() + 0.3)
        ax.legend(fontsize=8, loc="upper left" if a > 0 else "lower left", frameon=False)
    fig.tight_layout()
    return fig


def figure_kl_estimators(plt):
    """k1, k2, k3 of ``xxpo.functional.kl_penalty`` as functions of log(pi_ref / pi_theta)."""
    import torch

    from xxpo.functional import kl_penalty

    log_rho = torch.linspace(-2.0, 2.0, 401, dtype=torch.float64)
    logp = torch.zeros_like(log_rho).unsqueeze(0)  # (1, N): log pi_theta
    ref = log_rho.unsqueeze(0)  # (1, N): log pi_ref
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    styles = {"k1": ("#888888", "--"), "k2": ("#2f855a", "-"), "k3": ("#2b6cb0", "-")}
    for name, (color, ls) in styles.items():
        values = kl_penalty(logp, ref, name)[0]
        ax.plot(log_rho.numpy(), values.numpy(), color=color, ls=ls, lw=2, label=name)
    ax.axhline(0, color="#000000", lw=0.6)
    ax.axvline(0, color="#000000", lw=0.6)
    ax.set_xlabel("$\\log\\rho = \\log \\pi_{ref} - \\log \\pi_\\theta$  (one sampled token)")
    ax.set_ylabel("per-token KL estimate")
    ax.set_ylim(-2.1, 4.5)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def figure_ratio_spread(plt):
    """Synthetic: spread of token ratios, GSPO's length-normalized ratio and the raw sequence ratio."""
    import numpy as np

    rng = np.random.default_rng(0)
    sigma = 0.05  # std of one token's log-ratio after an off-policy step (an illustrative value)
    lengths = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    n = 4000
    token_q, norm_q, raw_q = [], [], []
    for length in lengths:
        log_r = rng.normal(0.0, sigma, size=(n, length))
        token_q.append(np.quantile(np.abs(np.exp(log_r[:, 0]) - 1), 0.9))
        norm_q.append(np.quantile(np.abs(np.exp(log_r.mean(1)) - 1), 0.9))
        raw_q.append(np.quantile(np.abs(np.exp(log_r.sum(1)) - 1), 0.9))
    fig, ax = plt.subplots(figsize=(5.8, 3.5))
    ax.loglog(lengths, token_q, "o-", color="#888888", label="one token ratio $r_{i,t}$")
    ax.loglog(lengths, raw_q, "s-", color="#9b2c2c", label="sequence ratio (product of the $r_{i,t}$)")
    ax.loglog(lengths, norm_q, "^-", color="#c05621", label="GSPO $s_i$ (their geometric mean)")
    ax.set_xlabel("response length $|y_i|$ (tokens)")
    ax.set_ylabel("90th percentile of $|\\mathrm{ratio} - 1|$")
    ax.legend(frameon=False, fontsize=8.5)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def gradient_weights(r, advantage: float, n_tokens: int = 4) -> dict:
    """Per-token gradient coefficient c(r) of PPO/GRPO's clip, CISPO, GMPO and SAPO, by autograd.

    Each row of the batch is one response of ``n_tokens`` tokens whose first token has ratio ``r`` (old
    log-prob 0, new log-prob log r) and whose other tokens are on-policy (ratio 1). The objective J = -loss of
    each function is differentiated with respect to the first token's log-prob; the result, scaled by the
    aggregation's normalizer (B rows times ``n_tokens``) and divided by A, is c(r) in
    dJ/d log pi = c(r) A / (B n): the weight the objective puts on that token's grad log pi, 1 on-policy for
    every method. For the plain importance-sampled surrogate r A it is r.
    """
    import torch

    from xxpo.objectives import cispo_loss, gmpo_loss, grpo_loss, sapo_loss

    r = torch.as_tensor(r, dtype=torch.float64)  # (N,)
    b = r.shape[0]
    old = torch.zeros(b, n_tokens, dtype=torch.float64)  # (N, n)
    mask = torch.ones(b, n_tokens)
    adv = torch.full((b,), float(advantage), dtype=torch.float64)  # (N,): one advantage per response
    losses = {
        "PPO / GRPO clip (eps = 0.2)": lambda lp: grpo_loss(lp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2).loss,
        "CISPO (weight cap 1 + 4 = 5)": lambda lp: cispo_loss(lp, old, adv, mask, clip_eps_high=4.0).loss,
        "GMPO (log r in [-0.4, 0.4], 4 tokens)": lambda lp: gmpo_loss(lp, old, adv, mask, clip_eps_low=0.4).loss,
        "SAPO (tau+ = 1, tau- = 1.05)": lambda lp: sapo_loss(lp, old, adv, mask).loss,
    }
    out = {}
    for name, loss_fn in losses.items():
        logp = old.clone()
        logp[:, 0] = torch.log(r)
        logp.requires_grad_(True)
        (grad,) = torch.autograd.grad(-loss_fn(logp), logp)  # (N, n): dJ / d log pi
        out[name] = (grad[:, 0] * b * n_tokens / advantage).detach()  # (N,): c(r)
    return out


def figure_gradient_weights(plt):
    """The per-token gradient coefficient c(r) of ``gradient_weights`` for A > 0 and A < 0."""
    import torch

    r = torch.linspace(0.02, 6.0, 599, dtype=torch.float64)
    styles = {"PPO / GRPO clip": ("#2b6cb0", "-", 2.4), "CISPO": ("#c05621", "-", 2.0),
              "GMPO": ("#2f855a", "-", 2.0), "SAPO": ("#6b46c1", "--", 1.8)}
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), sharey=True)
    for ax, a in zip(axes, (1.0, -1.0)):
        ax.plot(r.numpy(), r.numpy(), color="#999999", ls=":", lw=1.2, label="unclipped $rA$: $c = r$")
        for name, c in gradient_weights(r, a).items():
            color, ls, lw = next(v for k, v in styles.items() if name.startswith(k))
            ax.plot(r.numpy(), c.numpy(), color=color, ls=ls, lw=lw, label=name)
        ax.axvline(1.0, color="#000000", lw=0.6)
        ax.set_title(f"A = {a:+g}", fontsize=11)
        ax.set_xlabel("ratio  $r = \\pi_\\theta / \\pi_{old}$ of one token")
        ax.set_xlim(0, 6)
        ax.set_ylim(-0.1, 6.1)
    axes[0].set_ylabel("gradient weight $c(r)$")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=8, bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


FIGURES = {
    "family-map": (figure_family_map, ("xxpo/presets.py",)),
    "ppo-clip": (figure_ppo_clip, ("xxpo/objectives/ppo.py",)),
    "kl-estimators": (figure_kl_estimators, ("xxpo/functional/kl.py",)),
    "ratio-spread": (figure_ratio_spread, ()),
    "gradient-weights": (figure_gradient_weights, ("xxpo/objectives/grpo.py", "xxpo/objectives/cispo.py",
                                                   "xxpo/objectives/gmpo.py", "xxpo/objectives/sapo.py")),
}


def render_svg(key: str) -> str:
    """Draw figure ``key`` and return an inline, responsive, deterministic SVG string."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draw, _ = FIGURES[key]
    with matplotlib.rc_context({"svg.hashsalt": f"xxpo-{key}", "svg.fonttype": "path", "font.size": 10,
                                "figure.facecolor": "white", "axes.facecolor": "white"}):
        fig = draw(plt)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and DOCTYPE: it is inlined in HTML
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)  # matplotlib's comments repeat the label text
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    # Unique ids per figure, so two inline SVGs on one page never share a clip path.
    svg = re.sub(r'id="([^"]+)"', lambda m: f'id="{key}-{m.group(1)}"', svg)
    svg = re.sub(r'url\(#([^)]+)\)', lambda m: f"url(#{key}-{m.group(1)})", svg)
    svg = re.sub(r'xlink:href="#([^"]+)"', lambda m: f'xlink:href="#{key}-{m.group(1)}"', svg)
    svg = re.sub(r'href="#([^"]+)"', lambda m: m.group(0) if m.group(1).startswith(key) else f'href="#{key}-{m.group(1)}"', svg)
    # Natural size, but never wider than the text column (the viewBox keeps the aspect ratio).
    svg = svg.replace("<svg ", '<svg style="max-width:100%;height:auto" ', 1)
    return svg


class XxpoFigure(XxpoDirective):
    """A figure drawn by matplotlib at build time and inlined as SVG; content = caption."""

    required_arguments = 1
    has_content = True
    option_spec = {"name": directives.unchanged, "alt": directives.unchanged}

    def run(self):
        key = self.arguments[0]
        if key not in FIGURES:
            raise self.error(f"unknown figure {key!r}; known: {sorted(FIGURES)}")
        _, deps = FIGURES[key]
        self.note_sources(*deps)
        svg = render_svg(key)
        alt = self.options.get("alt", "")
        html = f'<div class="xxpo-figure" role="img" aria-label="{alt}">{svg}</div>' if alt else f'<div class="xxpo-figure">{svg}</div>'
        figure = nodes.figure(classes=["xxpo-generated-figure"])
        figure += nodes.raw("", html, format="html")
        if self.content:
            holder = nodes.Element()
            self.state.nested_parse(self.content, self.content_offset, holder)
            first = holder[0]
            if isinstance(first, nodes.paragraph):
                caption = nodes.caption(first.rawsource, "", *first.children)
                caption.source, caption.line = self.get_source_info()
                figure += caption
                rest = holder.children[1:]
            else:
                rest = holder.children
            if rest:
                figure += nodes.legend("", *rest)
        self.add_name(figure)
        return [figure]


# ----------------------------------------------------------------------------------------------------
# API summary
# ----------------------------------------------------------------------------------------------------


def signature_text(name: str, obj) -> str:
    """``name(a, b, *, c=1)``: parameters and defaults, no annotations."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    parts, star_done = [], False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            parts.append("*" + p.name)
            star_done = True
            continue
        if p.kind is p.VAR_KEYWORD:
            parts.append("**" + p.name)
            continue
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"{name}({', '.join(parts)})"


def summary_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in first.splitlines())


def api_entries(module_name: str) -> list[tuple[str, str, str]]:
    """(kind, shown signature or value, summary) for each name in the module's ``__all__``."""
    module = importlib.import_module(module_name)
    entries = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            entries.append(("class", signature_text(name, obj), summary_line(obj)))
        elif callable(obj):
            entries.append(("function", signature_text(name, obj), summary_line(obj)))
        elif len(repr(obj)) > 200:  # a registry (e.g. xxpo.experiments.CLAIMS): its size, not its repr
            entries.append(("constant", f"{name}: {type(obj).__name__} of {len(obj)} entries", ""))
        else:
            entries.append(("constant", f"{name} = {obj!r}", ""))
    return entries


class ApiSummary(XxpoDirective):
    """Every name of ``MODULE.__all__`` with its signature and the first paragraph of its docstring."""

    required_arguments = 1

    def run(self):
        module_name = self.arguments[0]
        try:
            module = importlib.import_module(module_name)
            entries = api_entries(module_name)
        except Exception as exc:
            raise self.error(f"cannot import {module_name}: {exc!r}")
        path = Path(module.__file__)
        if path.name == "__init__.py":
            for sub in path.parent.glob("*.py"):
                self.env.note_dependency(str(sub))
        else:
            self.env.note_dependency(str(path))
        dl = nodes.definition_list(classes=["xxpo-api"])
        for kind, shown, summary in entries:
            item = nodes.definition_list_item()
            term = nodes.term()
            term += nodes.literal(shown, shown)
            term += nodes.Text(f"  ({kind})")
            item += term
            definition = nodes.definition()
            para = nodes.paragraph()
            para += inline_code(summary) if summary else nodes.Text("A constant of the module.")
            definition += para
            item += definition
            dl += item
        return [dl]


# ----------------------------------------------------------------------------------------------------
# the claims ledger
# ----------------------------------------------------------------------------------------------------


def notebook_records(paths) -> list[dict]:
    """What the ledger needs from each executed notebook: its docname, profile, staleness and verdicts."""
    import nbformat

    from xxpo.reproduce import code_hash

    records = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        stamp = nb.metadata.get("xxpo", {})
        check = stamp.get("check") or {}
        records.append({"docname": Path(path).resolve().relative_to(REPO).with_suffix("").as_posix(),
                        "profile": stamp.get("profile"), "stale": stamp.get("code_hash") != code_hash(nb),
                        "verdicts": list(stamp.get("verdicts", [])),
                        "check": {"seeds": check.get("seeds", []), "stale": check.get("code_hash") != code_hash(nb),
                                  "verdicts": {v["claim"]["id"]: v for v in check.get("verdicts", [])}}})
    return records


def check_text(check: dict | None, verdict: dict) -> str:
    """What the re-run with other reported seeds decided for ``verdict``'s claim, in words."""
    from xxpo.verdicts import measured_text

    if not check or not check["seeds"]:
        return "not re-run with other seeds"
    seeds = ", ".join(map(str, check["seeds"]))
    other = check["verdicts"].get(verdict["claim"]["id"])
    if other is None:
        return f"the re-run with seeds {seeds} decided nothing for this claim"
    same = "same verdict" if other["outcome"] == verdict["outcome"] else "a different verdict"
    stale = " (stale: the code changed after the re-run)" if check["stale"] else ""
    return f"re-run with seeds {seeds}: {other['outcome']}, {same}; {measured_text(other)}{stale}"


def robust_outcome(check: dict | None, verdict: dict) -> tuple[str, str]:
    """(outcome, reason) the ledger states: the record's verdict if the re-run with other seeds decided the
    same (or there is no re-run, which a test forbids for committed records); "inconclusive" if the two
    seed sets disagree, since the difference is then of the size of the seed-to-seed noise."""
    other = (check or {}).get("verdicts", {}).get(verdict["claim"]["id"])
    if other is None or other["outcome"] == verdict["outcome"]:
        return verdict["outcome"], verdict["reason"]
    seeds = ", ".join(map(str, check["seeds"]))
    return "inconclusive", (f"{verdict['outcome']} on the reported seeds but {other['outcome']} on seeds {seeds}, "
                            f"so not robust to the seeds ({verdict['reason']})")


def ledger_rows(records: list[dict], claims: dict) -> list[dict]:
    """One row per registered claim, followed by one row per verdict of it (from any notebook).

    A claim row's ``verdict`` is "not yet tested" or the count of its verdicts' outcomes, each as
    :func:`robust_outcome` states it (a verdict its re-run with other seeds contradicts counts as
    inconclusive). Raises
    ``ValueError`` for a verdict whose claim family is not registered, so the ledger cannot drift.
    """
    from xxpo.verdicts import Rules, claim_family, measured_text

    defaults = dataclasses.asdict(Rules())
    tested: dict[str, list] = {cid: [] for cid in claims}
    for record in records:
        for verdict in record["verdicts"]:
            try:
                family = claim_family(verdict["claim"]["id"])
            except ValueError as err:
                raise ValueError(f"{record['docname']}: {err}") from None
            tested[family].append((record, verdict))
    rows = []
    for cid, claim in claims.items():
        found = sorted(tested[cid], key=lambda rv: (rv[1]["claim"]["id"], rv[0]["docname"]))
        outcomes = [robust_outcome(record.get("check"), v)[0] for record, v in found]
        tally = ", ".join(f"{outcomes.count(o)} {o}" for o in ("reproduced", "not reproduced", "inconclusive")
                          if outcomes.count(o))
        rows.append({"claim": cid, "statement": claim.statement, "source": claim.source, "notebook": None,
                     "note": "", "measured": "", "verdict": tally or "not yet tested", "reason": "", "check": ""})
        for record, v in found:
            changed = ", ".join(f"{k} = {fmt(x)}" for k, x in v["rules"].items() if x != defaults.get(k))
            note = "; ".join(x for x in ("stale record: its code changed after the run" if record["stale"] else "",
                                         f"profile {record['profile']}" if record["profile"] != "full" else "",
                                         f"rules: {changed}" if changed else "") if x)
            outcome, reason = robust_outcome(record.get("check"), v)
            rows.append({"claim": v["claim"]["id"], "statement": v["claim"]["statement"],
                         "source": v["claim"]["source"], "notebook": record["docname"], "note": note,
                         "measured": measured_text(v), "verdict": outcome, "reason": reason,
                         "check": check_text(record.get("check"), v)})
    return rows


class ClaimsLedger(XxpoDirective):
    """The claims ledger: every registered claim, each notebook verdict of it, its numbers."""

    sources = ("xxpo/verdicts.py",)

    def run(self):
        from xxpo.verdicts import CLAIMS, Rules

        paths = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))  # the record of the book being built
        self.note_sources(*(p.relative_to(REPO).as_posix() for p in paths))
        try:
            rows = ledger_rows(notebook_records(paths), CLAIMS)
        except ValueError as err:
            raise self.error(str(err))
        table = nodes.table(classes=["xxpo-table", "xxpo-claims-ledger", "colwidths-given"], width="100%")
        headers = ("claim", "statement and source", "notebook", "measured", "verdict")
        group = nodes.tgroup(cols=len(headers))
        table += group
        for width in (6, 40, 14, 20, 20):  # percent of the text column
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        head += nodes.row("", *(cell(h) for h in headers))
        group += head
        body = nodes.tbody()
        family_source = None
        for row in rows:
            family = row["notebook"] is None
            statement = nodes.paragraph()
            statement += nodes.strong(text=row["statement"]) if family else nodes.Text(row["statement"])
            paragraphs = [statement]
            if family or row["source"] != family_source:  # a verdict row repeats no source
                source = nodes.paragraph()
                source += nodes.emphasis(text=row["source"])
                paragraphs.append(source)
            family_source = row["source"] if family else family_source
            notebook = nodes.paragraph()
            if row["notebook"] is not None:
                if row["notebook"] in self.env.found_docs:
                    ref = addnodes.pending_xref("", refdomain="std", reftype="doc", reftarget="/" + row["notebook"],
                                                refexplicit=True, refwarn=True, refdoc=self.env.docname)
                    ref += nodes.inline(text=Path(row["notebook"]).name)
                    notebook += ref
                else:
                    notebook += nodes.Text(Path(row["notebook"]).name)
                if row["note"]:
                    notebook += nodes.Text(f" ({row['note']})")
            verdict = nodes.paragraph()
            verdict += nodes.strong(text=row["verdict"]) if not family else nodes.Text(row["verdict"])
            if row["reason"]:
                verdict += nodes.Text(f": {row['reason']}")
            verdicts = [verdict]
            if row["check"]:
                again = nodes.paragraph()
                again += nodes.emphasis(text=row["check"][0].upper() + row["check"][1:] + ".")
                verdicts.append(again)
            claim = nodes.paragraph()
            claim += nodes.strong(text=row["claim"]) if family else nodes.Text(row["claim"])
            measured = nodes.paragraph(text=row["measured"])
            cells = [claim, paragraphs, notebook, measured, verdicts]
            body += nodes.row("", *(nodes.entry("", *(c if isinstance(c, list) else [c])) for c in cells),
                              classes=["xxpo-ledger-claim" if family else "xxpo-ledger-verdict"])
        group += body
        rules = nodes.paragraph()
        rules += nodes.Text("Default rules (")
        rules += nodes.literal(text="xxpo.experiments.Rules()")
        rules += nodes.Text("): ")
        for i, (key, value) in enumerate(dataclasses.asdict(Rules()).items()):
            rules += nodes.Text(", " if i else "")
            rules += nodes.literal(text=f"{key} = {fmt(value)}")
        rules += nodes.Text(".")
        return [table, rules]


def setup(app):
    app.add_directive("presets-table", PresetsTable)
    app.add_directive("presets-changes", PresetsChanges)
    app.add_directive("preset-facts", PresetFacts)
    app.add_directive("preset-diff", PresetDiff)
    app.add_directive("preset-settings", PresetSettings)
    app.add_directive("xxpo-figure", XxpoFigure)
    app.add_directive("api-summary", ApiSummary)
    app.add_directive("claims-ledger", ClaimsLedger)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
