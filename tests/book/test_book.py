"""The book: it builds with warnings as errors, quotes code that exists, reaches every page, renders
its math offline, and its generated tables say what the package says.

Fast tests read the markdown sources; tests marked ``slow`` share one build of the book (about a
minute on two cores); the ``browser`` test drives a headless Chromium over the built pages.
"""

from __future__ import annotations

import ast
import html
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

# One xdist worker runs every book test, so the session's book build happens once.
pytestmark = pytest.mark.xdist_group("book")

REPO = Path(__file__).resolve().parents[2]
BOOK = REPO / "book"
PAGES = sorted(BOOK.glob("*.md"))
FENCE = re.compile(r"^(`{3,}|:{3,})\{(?P<name>[\w-]+)\}\s*(?P<arg>[^\n]*)\n(?P<body>.*?)^\1\s*$", re.M | re.S)


def directives(text: str, name: str) -> list[tuple[str, dict]]:
    """(argument, options) of every ```{name} block of a MyST page."""
    out = []
    for m in FENCE.finditer(text):
        if m.group("name") != name:
            continue
        options = dict(re.findall(r"^:([\w-]+):\s*(.*)$", m.group("body"), re.M))
        out.append((m.group("arg").strip(), options))
    return out


def section(text: str, heading: str) -> str:
    """The text under a markdown heading (any level) up to the next heading of the same or higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.M)
    assert m, f"no heading {heading!r}"
    level = len(m.group(1))
    rest = text[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def toc_files() -> list[str]:
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc.get("parts", []))
    walk(toc.get("chapters", []))
    return files


# ----------------------------------------------------------------------------------------------------
# fast: the sources
# ----------------------------------------------------------------------------------------------------


def find_pyobject(tree: ast.Module, dotted: str) -> bool:
    scope = tree.body
    for part in dotted.split("."):
        match = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part]
        if not match:
            return False
        scope = match[0].body
    return True


def test_every_literalinclude_target_exists():
    seen = 0
    for page in PAGES:
        for arg, options in directives(page.read_text(), "literalinclude"):
            target = (page.parent / arg).resolve()
            assert target.is_file(), f"{page.name}: literalinclude of missing file {arg}"
            assert REPO in target.parents, f"{page.name}: {arg} points outside the repository"
            if "pyobject" in options:
                tree = ast.parse(target.read_text())
                assert find_pyobject(tree, options["pyobject"]), f"{page.name}: {arg} has no {options['pyobject']}"
            seen += 1
    assert seen >= 10  # the chapters quote the package; an empty result means the parser broke


def test_toc_lists_existing_pages_and_reaches_every_page():
    listed = toc_files()
    for entry in listed:
        candidates = [REPO / entry, REPO / f"{entry}.md", REPO / f"{entry}.ipynb"]
        assert any(p.is_file() for p in candidates), f"_toc.yml lists {entry!r}, which does not exist"
    stems = {str(Path(e).with_suffix("")) for e in listed}
    for page in PAGES:
        rel = str(page.relative_to(REPO).with_suffix(""))
        assert rel in stems, f"{rel}.md is not reachable from _toc.yml"
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        executed = any(c.get("outputs") for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "code")
        rel = str(nb.relative_to(REPO).with_suffix(""))
        # An executed notebook is part of the record and must be in the book; one without outputs
        # is not rendered until `xxpo reproduce` has produced them.
        assert not executed or rel in stems, f"executed notebook {rel}.ipynb is not reachable from _toc.yml"


def test_pages_have_no_placeholders():
    pattern = re.compile(r"\bTODO\b|\bTBD\b|\bFIXME\b|coming soon|lorem ipsum|placeholder", re.I)
    for page in PAGES:
        hits = pattern.findall(page.read_text())
        assert not hits, f"{page.name} contains {hits}"


def test_python_snippets_run():
    ran = 0
    for page in PAGES:
        for m in re.finditer(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S):
            exec(compile(m.group(1), f"{page.name}:snippet", "exec"), {"__name__": "__book__"})
            ran += 1
    assert ran >= 1


def test_intro_example_prints_what_it_says(capsys):
    code = re.search(r"^```python\n(.*?)^```", (BOOK / "intro.md").read_text(), re.M | re.S).group(1)
    exec(compile(code, "intro.md:snippet", "exec"), {"__name__": "__book__"})
    printed = capsys.readouterr().out.splitlines()
    claimed = [line.split("# ", 1)[1].strip() for line in code.splitlines() if line.startswith("print(")]
    assert printed == claimed


def test_referenced_tests_exist():
    """Chapters cite tests by node id (tests/...py::test_name); each must exist."""
    refs = set()
    for page in PAGES:
        refs |= set(re.findall(r"(tests/[\w/]+\.py)::(test_\w+)", page.read_text()))
    assert refs
    for path, name in sorted(refs):
        source = (REPO / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} is cited by the book but does not exist"


def _objective_metric_names() -> set[str]:
    from xxpo import objectives as O

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 3, generator=g, dtype=torch.float64)
    old = logp - 0.1 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    adv, mask = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64), torch.ones(4, 3)
    names = set()
    names |= set(O.ppo_loss(logp, old, adv, mask).metrics)
    names |= set(O.grpo_loss(logp, old, adv, mask, ref_logp=old, kl_coef=0.1).metrics)
    names |= set(O.gspo_loss(logp, old, adv, mask).metrics)
    names |= set(O.gspo_token_loss(logp, old, adv, mask).metrics)
    names |= set(O.value_loss(logp, old, old, mask).metrics)
    names |= set(O.dapo_loss(logp, old, adv, mask).metrics) | set(O.dr_grpo_loss(logp, old, adv, mask, norm_len=3).metrics)
    names |= set(O.sapo_loss(logp, old, adv, mask).metrics)
    names |= set(O.decoupled_ppo_loss(logp, old, old, adv, mask).metrics)
    names |= set(O.a3po_loss(logp, old, adv, mask, staleness=2).metrics)
    names |= set(O.sppo_seq_loss(logp, old, adv, mask).metrics)
    names |= set(O.cispo_loss(logp, old, adv, mask).metrics) | set(O.gmpo_loss(logp, old, adv, mask).metrics)
    names |= set(O.mismatch_weights(old, logp.detach(), mask).metrics)
    names |= set(O.sequence_value_loss(torch.randn(4, generator=g), torch.rand(4, generator=g)).metrics)
    seq = torch.randn(4, generator=g, dtype=torch.float64)
    names |= set(O.dpo_loss(seq, seq - 1, seq * 0, seq * 0).metrics) | set(O.dpo_loss(seq, seq - 1, seq * 0, seq * 0, variant="ipo").metrics)
    names |= set(O.sppo_selfplay_loss(seq, seq * 0, torch.rand(4, generator=g, dtype=torch.float64)).metrics)
    # TRPO on a two-action softmax policy: logits = x @ W.
    W = torch.zeros(3, 2, requires_grad=True)
    x, actions = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
    advantages = torch.randn(8, generator=g)
    old_all = torch.log_softmax(x @ W.detach(), -1)  # (8, 2)
    rows = torch.arange(8)

    def surrogate():
        new = torch.log_softmax(x @ W, -1)[rows, actions]
        return (torch.exp(new - old_all[rows, actions]) * advantages).mean()

    def kl():
        return (old_all.exp() * (old_all - torch.log_softmax(x @ W, -1))).sum(-1).mean()

    names |= set(O.trpo_step([W], surrogate, kl).metrics)
    return names


# Every algorithm chapter follows DESIGN.md's skeleton: these sections, in this order (a heading may go on,
# e.g. "What changes against GRPO" or "Experiment: GSPO against GRPO").
ALGORITHM_CHAPTERS = ("trpo", "ppo", "grpo", "dr_grpo", "dapo", "gspo", "sapo", "decoupled_ppo", "a3po", "dpo",
                      "sppo_selfplay", "sppo_seq")
SKELETON = ("Quick facts", "Motivation", "Derivation", "What changes against", "Pseudocode", "Implementation",
            "Deviations from the paper", "The paper's setting and the suite's", "Logged metrics", "Experiment",
            "Pitfalls", "Exercises", "References and other implementations")


@pytest.mark.parametrize("page", ALGORITHM_CHAPTERS)
def test_every_algorithm_chapter_follows_the_skeleton(page):
    text = (BOOK / f"{page}.md").read_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    positions = []
    for part in SKELETON:
        found = [i for i, h in enumerate(headings) if h.startswith(part)]
        assert found, f"{page}.md has no section '{part}'"
        positions.append(found[0])
    assert positions == sorted(positions), f"{page}.md: skeleton sections out of order: {headings}"
    assert "**Previously:**" in text and "{preset-facts}" in text and "{preset-settings}" in text
    assert re.search(r"literalinclude.*\n:pyobject:", text) or ":pyobject:" in text, f"{page}.md quotes no code"
    assert "Key equations" in text, f"{page}.md has no key equations"


# The chapter on the family since 2025 has one section per method, each following the skeleton one heading
# level lower (no experiment or references per method: those are shared at the end of the page).
FAMILY_SINCE = "family_since"
FAMILY_SINCE_SECTIONS = {"CISPO": "cispo", "GMPO": "gmpo", "Sampler-trainer mismatch": None, "RLOO": "rloo",
                         "REINFORCE++": "reinforce_pp"}
METHOD_SKELETON = ("Motivation", "Derivation", "Key equations", "What changes against", "Pseudocode", "Implementation",
                   "Deviations from the paper", "The paper", "Logged metrics", "Pitfalls", "Exercises")


def method_sections(text: str) -> dict[str, str]:
    """The text of every ``## `` section of a page, keyed by its heading."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("heading, method", list(FAMILY_SINCE_SECTIONS.items()))
def test_family_since_sections_follow_the_skeleton(heading, method):
    text = (BOOK / f"{FAMILY_SINCE}.md").read_text()
    sections = method_sections(text)
    (body,) = [b for h, b in sections.items() if h.startswith(heading)]
    headings = re.findall(r"^### (.+)$", body, re.M)
    positions = []
    for part in METHOD_SKELETON:
        found = [i for i, h in enumerate(headings) if h.startswith(part)]
        assert found, f"{FAMILY_SINCE}.md, section {heading!r}: no subsection {part!r}"
        positions.append(found[0])
    assert positions == sorted(positions), f"{FAMILY_SINCE}.md, section {heading!r}: out of order: {headings}"
    assert ":pyobject:" in body and re.search(r"^\$\$ \(eq-", body, re.M), heading
    if method is not None:
        for directive in ("preset-facts", "preset-diff", "preset-settings"):
            assert directives(body, directive) == [(method, {})], (heading, directive)
    assert "**Previously:**" in text
    for shared in ("Experiment", "References and other implementations"):
        assert any(h.startswith(shared) for h in sections), shared


def test_family_since_metrics_exist():
    """Every metric named in the chapter's 'Logged metrics' subsections is returned by an objective."""
    names = _objective_metric_names()
    text = (BOOK / f"{FAMILY_SINCE}.md").read_text()
    blocks = re.findall(r"^### Logged metrics\n(.*?)(?=^#{2,3} )", text, re.M | re.S)
    assert len(blocks) == len(FAMILY_SINCE_SECTIONS)
    checked = 0
    for block in blocks:
        for metric in re.findall(r"(?<!})`(\w+)`", block):  # not the target of a role such as {ref}`ppo`
            if metric == "ppo_loss":
                continue
            assert metric in names, f"{FAMILY_SINCE}.md: {metric!r} is not a metric of any objective"
            checked += 1
    assert checked >= 20


def test_gradient_weight_figure_is_the_objectives_gradient():
    """The figure's curves, computed by autograd from the objectives, are the closed forms of the chapter."""
    ext = book_extension()
    r = torch.tensor([0.3, 0.7, 0.9, 1.0, 1.1, 1.3, 1.45, 1.6, 2.0, 4.0, 5.5], dtype=torch.float64)
    for a in (1.0, -1.0):
        c = {name.split(" (")[0]: v for name, v in ext.gradient_weights(r, a).items()}
        kept = (r <= 1.2) if a > 0 else (r >= 0.8)
        assert torch.allclose(c["PPO / GRPO clip"], torch.where(kept, r, torch.zeros_like(r)), atol=1e-12)
        assert torch.allclose(c["CISPO"], r.clamp(max=5.0), atol=1e-12)
        log_r = r.log()
        kept_g = (log_r <= 0.4) if a > 0 else (log_r >= -0.4)
        assert torch.allclose(c["GMPO"], torch.where(kept_g, r ** 0.25, torch.zeros_like(r)), atol=1e-12)
        tau = 1.0 if a > 0 else 1.05
        assert torch.allclose(c["SAPO"], r / torch.cosh(tau * (r - 1) / 2) ** 2, atol=1e-12)
    assert "gradient-weights" in ext.FIGURES
    assert directives((BOOK / f"{FAMILY_SINCE}.md").read_text(), "xxpo-figure")[0][0] == "gradient-weights"


def test_documented_metrics_exist():
    """Every metric in a 'Logged metrics' table is returned by an objective; every metric the text
    says the training loop adds is recorded by the loop."""
    objective_names = _objective_metric_names()
    loop_source = (REPO / "xxpo" / "train" / "loop.py").read_text()
    checked = 0
    for name in (f"{page}.md" for page in ALGORITHM_CHAPTERS):
        text = section((BOOK / name).read_text(), "Logged metrics")
        for row in re.findall(r"^\| (.+?) \|", text, re.M):
            for metric in re.findall(r"`(\w+)`", row):
                assert metric in objective_names, f"{name}: {metric!r} is not a metric of any quoted objective"
                checked += 1
        for sentence in re.findall(r"[^.\n]*training loop adds[^.\n]*\.", text):
            for metric in re.findall(r"`(\w+)`", sentence):
                assert re.search(rf"\b{metric}\b", loop_source), f"{name}: the loop records no {metric!r}"
                checked += 1
    assert checked >= 20


def test_make_book_command_is_the_one_the_book_states():
    makefile = (REPO / "Makefile").read_text()
    assert "jupyter-book build . -W -n --keep-going" in makefile
    assert "jupyter-book build . -W -n --keep-going" in (BOOK / "intro.md").read_text()


def test_config_is_offline_and_strict():
    config = yaml.safe_load((REPO / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"  # a string: YAML would read a bare off as False
    assert "sphinx-mathjax-offline" in config["sphinx"]["extra_extensions"]
    assert config["html"]["use_repository_button"] is False
    assert config["only_build_toc_files"] is True
    assert config["sphinx"]["config"]["bibtex_reference_style"] == "author_year"
    for ext in ("amsmath", "dollarmath", "colon_fence", "deflist"):
        assert ext in config["parse"]["myst_enable_extensions"]


# ----------------------------------------------------------------------------------------------------
# slow: the built book
# ----------------------------------------------------------------------------------------------------


class Tables(HTMLParser):
    """Collects <table> elements as (classes, rows of cell texts)."""

    def __init__(self):
        super().__init__()
        self.tables, self._stack, self._row, self._cell = [], [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._stack.append((attrs.get("class", "").split(), []))
        elif tag == "tr" and self._stack:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._stack[-1][1].append(self._row)
            self._row = None
        elif tag == "table" and self._stack:
            self.tables.append(self._stack.pop())

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(page: Path, cls: str) -> list[list[list[str]]]:
    parser = Tables()
    parser.feed(page.read_text())
    return [rows for classes, rows in parser.tables if cls in classes]


@pytest.mark.slow
def test_book_builds_with_warnings_as_errors(built_book):
    proc = built_book["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "build succeeded" in proc.stdout
    assert re.search(r"\bWARNING\b", proc.stdout + proc.stderr) is None
    for page in PAGES:
        assert (built_book["html"] / "book" / f"{page.stem}.html").is_file()


@pytest.mark.slow
def test_mathjax_is_served_locally(html_dir):
    script = html_dir / "_static" / "mathjax" / "tex-chtml.js"
    assert script.is_file() and script.stat().st_size > 100_000
    for page in html_dir.glob("book/*.html"):
        text = page.read_text()
        srcs = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', text, re.I)
        if "math notranslate" in text:
            assert srcs == ["../_static/mathjax/tex-chtml.js"], f"{page.name}: MathJax from {srcs}"
        assert not re.search(r"(cdn\.jsdelivr|cdnjs|unpkg)[^\"']*mathjax", text, re.I), page.name


@pytest.mark.slow
def test_presets_table_is_family_table(html_dir):
    from xxpo.presets import family_table

    found = tables(html_dir / "book" / "family.html", "xxpo-presets-table")
    assert len(found) == 1
    header, *rows = found[0]
    expected = family_table()
    assert header == list(expected[0])
    assert rows == [[str(r[h]) for h in header] for r in expected]


@pytest.mark.slow
def test_preset_diff_marks_exactly_the_changed_fields(html_dir):
    from xxpo.presets import PRESETS

    child, parent = PRESETS["ppo"], PRESETS["trpo"]
    (rows,) = tables(html_dir / "book" / "ppo.html", "xxpo-preset-diff")
    header, *body = rows
    assert header[1:3] == [parent.title, child.title]
    by_label = {r[0]: r for r in body}
    for key in set(parent.hparams) | set(child.hparams):
        changed = parent.hparams.get(key) != child.hparams.get(key)
        assert (by_label[key][3] == "changed") == changed, key
    assert by_label["ratio level"][3] == ("changed" if parent.ratio_level != child.ratio_level else "")
    assert by_label["clipping"][1:3] == [parent.clipping, child.clipping]


@pytest.mark.slow
@pytest.mark.parametrize("page, method", [(page, page) for page in ALGORITHM_CHAPTERS]
                         + [(FAMILY_SINCE, m) for m in FAMILY_SINCE_SECTIONS.values() if m is not None])
def test_preset_settings_show_preset_and_trainconfig(html_dir, page, method):
    from xxpo.presets import PRESETS
    from xxpo.train.config import TrainConfig

    preset, config = PRESETS[method], TrainConfig.from_preset(method)
    found = [rows for rows in tables(html_dir / "book" / f"{page}.html", "xxpo-preset-settings")
             if preset.citation in rows[0][1]]  # a page may show a variant's settings too (DPO and IPO)
    assert len(found) == 1, f"{page}: expected one settings table citing {preset.citation!r}"
    header, *body = found[0]
    by_key = {r[0]: r for r in body}
    assert len(by_key) == len(body), "a setting is listed twice"

    def same(cell, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return cell == str(value)
        return float(cell) == pytest.approx(float(value))

    for key, value in preset.hparams.items():
        assert same(by_key[key][1], value), (key, by_key[key])
        if hasattr(config, key):
            assert same(by_key[key][2], config.preset_value(key)), (key, by_key[key])
        else:  # an objective argument that is not a config field (e.g. TRPO's cg_iters): the preset's value
            cell = by_key[key][2]
            assert cell.endswith(" (objective argument)") and same(cell.removesuffix(" (objective argument)"),
                                                                    config.preset_value(key)), (key, by_key[key])
    assert same(by_key["samples per prompt G"][2], config.group_size)
    assert by_key["model"][2] == config.model and by_key["task"][2] == config.task


@pytest.mark.slow
def test_api_page_lists_every_public_name(html_dir):
    import xxpo.functional
    import xxpo.objectives

    text = html.unescape(re.sub(r"<[^>]+>", "", (html_dir / "book" / "api.html").read_text()))
    for module in (xxpo.objectives, xxpo.functional):
        for name in module.__all__:
            assert re.search(rf"\b{name}\b", text), f"{module.__name__}.{name} missing from the API page"


@pytest.mark.slow
def test_generated_figures_are_inline_svg_with_unique_ids(html_dir):
    total = 0
    for page in PAGES:
        n = len(directives(page.read_text(), "xxpo-figure"))
        out = (html_dir / "book" / f"{page.stem}.html").read_text()
        figures = re.findall(r'<figure class="[^"]*xxpo-generated-figure[^"]*".*?</figure>', out, re.S)
        assert len(figures) == n, page.name
        for fig in figures:
            assert "<svg" in fig and "<figcaption" in fig
        ids = re.findall(r'<svg[^>]*>.*?</svg>', out, re.S)
        svg_ids = [i for svg in ids for i in re.findall(r'\sid="([^"]+)"', svg)]
        assert len(svg_ids) == len(set(svg_ids)), f"{page.name}: duplicate ids inside inline SVGs"
        total += n
    assert total >= 4


# ----------------------------------------------------------------------------------------------------
# browser: MathJax really renders
# ----------------------------------------------------------------------------------------------------


class VisibleText(HTMLParser):
    """Text of <main>, without scripts, styles, code blocks and MathJax's own assistive markup."""

    SKIP = {"script", "style", "pre", "code", "mjx-assistive-mml", "svg", "math", "textarea"}

    def __init__(self):
        super().__init__()
        self.depth_skip, self.in_main, self.parts = 0, 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.in_main += 1
        if tag in self.SKIP:
            self.depth_skip += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth_skip:
            self.depth_skip -= 1
        if tag == "main" and self.in_main:
            self.in_main -= 1

    def handle_data(self, data):
        if self.in_main and not self.depth_skip:
            self.parts.append(data)


def chromium_args(chromium: str, user_data_dir: Path) -> list[str]:
    """The headless, offline-safe flags every browser test uses."""
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={user_data_dir}",
        "--virtual-time-budget=10000",
    ]


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("page", ["foundations", "notation", *ALGORITHM_CHAPTERS, FAMILY_SINCE])
def test_mathjax_renders_in_chromium(html_dir, chromium, tmp_path, page):
    url = (html_dir / "book" / f"{page}.html").as_uri()
    proc = subprocess.run(
        chromium_args(chromium, tmp_path / "profile") + ["--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )
    dom = proc.stdout
    assert proc.returncode == 0 and "<html" in dom, proc.stderr[-2000:]
    n_math = len(re.findall(r"<mjx-container", dom))
    n_source = len(re.findall(r'class="math notranslate nohighlight"', (html_dir / "book" / f"{page}.html").read_text()))
    assert n_source > 0
    assert n_math >= n_source, f"{page}: {n_math} rendered formulas for {n_source} in the source"
    assert "<mjx-merror" not in dom, f"{page}: MathJax reported a TeX error"
    parser = VisibleText()
    parser.feed(dom)
    text = "".join(parser.parts)
    for raw in ("$$", "\\[", "\\(", "\\begin{"):
        assert raw not in text, f"{page}: unrendered TeX {raw!r} in the page text"


@pytest.mark.slow
@pytest.mark.browser
def test_screenshot_of_a_chapter_is_not_blank(html_dir, chromium, tmp_path):
    from PIL import Image

    shot = tmp_path / "foundations.png"
    proc = subprocess.run(
        chromium_args(chromium, tmp_path / "profile")
        + ["--window-size=1280,2400", f"--screenshot={shot}", (html_dir / "book" / "foundations.html").as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2400)
    lo, hi = image.getextrema()
    assert hi - lo > 100  # text on a background, not a blank page
    dark = sum(image.histogram()[:128])
    assert dark > 0.005 * image.size[0] * image.size[1]  # enough dark pixels to be text


WIDTH_PROBE = """<script>
window.addEventListener('load', function () {
  var ready = (typeof MathJax === 'undefined') ? Promise.resolve() : MathJax.startup.promise;
  ready.then(function () {
    var wide = [];
    document.querySelectorAll('div.math mjx-container').forEach(function (c) {
      if (c.scrollWidth > c.clientWidth + 2) wide.push((c.closest('div.math').id || '?') + ' +' + (c.scrollWidth - c.clientWidth) + 'px');
    });
    document.querySelectorAll('main table').forEach(function (t, i) {
      var box = t.parentElement;
      if (box.scrollWidth > box.clientWidth + 2) wide.push('table ' + (t.id || i) + ' +' + (box.scrollWidth - box.clientWidth) + 'px');
    });
    document.body.setAttribute('data-wide', JSON.stringify(wide));
  });
});
</script>"""


# Every chapter of the book, and the frame pages with equations or tables.
COLUMN_FIT_PAGES = ("foundations", "notation", "family", *ALGORITHM_CHAPTERS, "family_since")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("page", COLUMN_FIT_PAGES)
def test_math_and_tables_fit_the_text_column(html_dir, chromium, tmp_path, page):
    """At a 1280-pixel-wide window no displayed equation and no table needs a horizontal scroll bar."""
    source = html_dir / "book" / f"{page}.html"
    probe = source.with_name(f"{page}.width-probe.html")  # beside the page, so relative paths resolve
    probe.write_text(source.read_text().replace("</body>", WIDTH_PROBE + "</body>"))
    try:
        proc = subprocess.run(
            chromium_args(chromium, tmp_path / "profile") + ["--window-size=1280,1000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=180,
        )
    finally:
        probe.unlink()
    m = re.search(r'data-wide="([^"]*)"', proc.stdout)
    assert m, f"{page}: the width probe did not run\n{proc.stderr[-2000:]}"
    assert html.unescape(m.group(1)) == "[]", f"{page}: wider than the text column: {html.unescape(m.group(1))}"


# ----------------------------------------------------------------------------------------------------
# the claims ledger
# ----------------------------------------------------------------------------------------------------


def book_extension():
    import importlib.util

    spec = importlib.util.spec_from_file_location("xxpo_book_under_test", BOOK / "_ext" / "xxpo_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_verdict(claim_id="C6b"):
    import pandas as pd

    from xxpo.experiments import Claim, decide

    rows = [dict(arm=arm, seed=s, base_eval_accuracy=0.3, final_eval_accuracy=final + 0.01 * s,
                 best_eval_accuracy=final + 0.01 * s) for s in range(5) for arm, final in (("GSPO", 0.45), ("GRPO", 0.40))]
    claim = Claim(claim_id, "GSPO's accuracy is at least GRPO's - 0.02", metric="final_eval_accuracy", a="GSPO",
                  b="GRPO", kind="non-inferiority", margin=0.02)
    return decide(claim, pd.DataFrame(rows)).to_dict()


def test_ledger_rows_list_every_claim_and_each_notebook_verdict():
    from xxpo.verdicts import CLAIMS, measured_text

    ext = book_extension()
    verdict = synthetic_verdict()
    records = [{"docname": "notebooks/01_x", "profile": "full", "stale": False, "verdicts": [verdict]},
               {"docname": "notebooks/02_y", "profile": "full", "stale": True, "verdicts": []}]
    rows = ext.ledger_rows(records, CLAIMS)
    family_rows = [r for r in rows if r["notebook"] is None]
    assert [r["claim"] for r in family_rows] == list(CLAIMS)
    by_id = {r["claim"]: r for r in family_rows}
    assert by_id["C6"]["verdict"] == "1 reproduced" and by_id["C6"]["check"] == ""
    assert all(by_id[c]["verdict"] == "not yet tested" for c in CLAIMS if c != "C6")
    (row,) = [r for r in rows if r["notebook"] is not None]
    assert rows.index(row) == rows.index(by_id["C6"]) + 1  # under its family claim
    assert row["claim"] == "C6b" and row["verdict"] == "reproduced" and row["note"] == ""
    assert row["measured"] == measured_text(verdict) and "GSPO - GRPO = +0.050" in row["measured"]

    stale = ext.ledger_rows([{**records[0], "stale": True, "profile": "smoke"}], CLAIMS)
    assert "stale record" in stale[rows.index(row)]["note"] and "profile smoke" in stale[rows.index(row)]["note"]
    verdict["claim"]["id"] = "C99a"
    with pytest.raises(ValueError, match="notebooks/01_x.*C99"):
        ext.ledger_rows([{**records[0], "verdicts": [verdict]}], CLAIMS)


def test_ledger_rows_show_each_verdict_beside_its_re_run_with_other_seeds():
    from xxpo.verdicts import CLAIMS

    ext = book_extension()
    verdict = synthetic_verdict()
    other = {**synthetic_verdict(), "outcome": "inconclusive"}
    base = {"docname": "notebooks/01_x", "profile": "full", "stale": False, "verdicts": [verdict]}

    def row_of(check):
        rows = ext.ledger_rows([{**base, "check": check}], CLAIMS)
        return next(r for r in rows if r["notebook"] is not None)

    same = row_of({"seeds": [5, 6], "stale": False, "verdicts": {"C6b": verdict}})
    assert same["check"].startswith("re-run with seeds 5, 6: reproduced, same verdict; GSPO - GRPO = +0.050")
    assert same["verdict"] == "reproduced" and same["reason"] == verdict["reason"]
    differs = row_of({"seeds": [5, 6], "stale": True, "verdicts": {"C6b": other}})
    assert "inconclusive, a different verdict" in differs["check"] and "stale" in differs["check"]
    # two seed sets that disagree make the stated verdict inconclusive, in the claim's row and in the tally
    assert differs["verdict"] == "inconclusive" and "not robust to the seeds" in differs["reason"]
    rows = ext.ledger_rows([{**base, "check": {"seeds": [5, 6], "stale": False, "verdicts": {"C6b": other}}}], CLAIMS)
    assert next(r for r in rows if r["claim"] == "C6")["verdict"] == "1 inconclusive"
    assert "decided nothing" in row_of({"seeds": [5, 6], "stale": False, "verdicts": {}})["check"]
    assert row_of({"seeds": [], "stale": True, "verdicts": {}})["check"] == "not re-run with other seeds"
    assert row_of(None)["check"] == "not re-run with other seeds"


def test_ledger_page_follows_the_claims_marker_in_the_toc():
    lines = (REPO / "_toc.yml").read_text().splitlines()
    marker = next(i for i, line in enumerate(lines) if "# toc:claims" in line)
    assert lines[marker + 1].strip() == "- file: book/claims"
    assert directives((BOOK / "claims.md").read_text(), "claims-ledger") == [("", {})]


@pytest.mark.slow
def test_ledger_page_lists_every_claim_and_the_committed_verdicts(html_dir):
    from xxpo.experiments import CLAIMS, Rules
    from xxpo.reproduce import notebooks

    (rows,) = tables(html_dir / "book" / "claims.html", "xxpo-claims-ledger")
    header, *body = rows
    assert header == ["claim", "statement and source", "notebook", "measured", "verdict"]
    smart = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
    shown = {r[0]: [c.translate(smart) for c in r] for r in body}  # Sphinx's smart quotes
    for cid, claim in CLAIMS.items():
        assert cid in shown, f"{cid} missing from the ledger"
        assert claim.statement in shown[cid][1] and claim.source in shown[cid][1]
    ext = book_extension()
    committed = []
    for record in ext.notebook_records(notebooks()):
        for v in record["verdicts"]:
            committed.append(v)
            assert v["claim"]["id"] in shown
            assert shown[v["claim"]["id"]][4].startswith(ext.robust_outcome(record["check"], v)[0])
    untested = {cid for cid in CLAIMS} - {v["claim"]["id"].rstrip("abcdefghijklmnopqrstuvwxyz") for v in committed}
    assert all(shown[cid][4] == "not yet tested" for cid in untested)
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", (html_dir / "book" / "claims.html").read_text())).split())
    assert f"min_seeds = {Rules().min_seeds}" in text


@pytest.mark.slow
def test_api_page_lists_the_experiment_layer(html_dir):
    import xxpo.experiments

    text = html.unescape(re.sub(r"<[^>]+>", "", (html_dir / "book" / "api.html").read_text()))
    for name in xxpo.experiments.__all__:
        assert re.search(rf"\b{name}\b", text), f"xxpo.experiments.{name} missing from the API page"


@pytest.mark.slow
@pytest.mark.browser
def test_claims_ledger_fits_the_text_column(html_dir, chromium, tmp_path):
    test_math_and_tables_fit_the_text_column(html_dir, chromium, tmp_path, "claims")
