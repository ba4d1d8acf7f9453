"""The README and docs stay true: the quick start prints what the page says, the layout names real
paths, links resolve, and every cited benchmark result is in bench/results/."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest
import quickstart
from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Docs other branches write; the README links them before they are merged. Remove once they exist.
PENDING: set[str] = set()  # docs a README link may name before they exist (none now)


def test_quickstart_prints_what_the_readme_says() -> None:
    text = (ROOT / "README.md").read_text()
    assert {"commands", "output", "file compare.py"} <= set(quickstart.blocks(text))
    expected = quickstart.masked(quickstart.blocks(text)["output"])
    actual = quickstart.masked(quickstart.run(text))
    assert actual == expected, "README quick start drifted; re-paste with: python tests/quickstart.py --update"


def _layout() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- layout -->\n```\w*\n(.*?)^```", text, re.S | re.M)
    assert block, "README has no <!-- layout --> block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip() and not line[0].isspace()]


def test_layout_paths_exist() -> None:
    missing = [p for p in _layout() if not (ROOT / p).exists()]
    assert not missing, f"README layout names paths that do not exist: {missing}"


def test_layout_lists_every_top_level_folder() -> None:
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout:
        pytest.skip("not a git checkout")
    tops = {f.split("/")[0] for f in r.stdout.splitlines() if "/" in f and not f.startswith(".")}
    listed = {p.rstrip("/").split("/")[0] for p in _layout()}
    assert not tops - listed, f"top-level folders missing from the README layout: {sorted(tops - listed)}"


def _links(path: Path) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", path.read_text()) if "://" not in m]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc: Path) -> None:
    broken = []
    for link in _links(doc):
        target = (doc.parent / link).resolve()
        if not target.exists() and str(target.relative_to(ROOT)) not in PENDING:
            broken.append(link)
    assert not broken, f"{doc.name}: broken links {broken}"


def _expand(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",") for x in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


def cited_results(text: str) -> set[str]:
    """File-name patterns of bench/results/ entries a text cites (``bench/results/X``, ``results/X``
    or a bare timestamped name such as ``20261129-033158-inspect-bench.*``)."""
    found = set()
    for token in re.findall(r"(?:bench/)?results/[\w*?.{},-]+|\b\d{8}-\d{4,6}[\w*?.{},-]*", text):
        name = re.sub(r"[A-Z]{2,}", "*", token.rstrip(".,;:)").split("/")[-1])  # NAME placeholders
        if name and not re.search(r"\.\w+\}?$|\*$", name):
            name += "*"  # a prefix such as --out bench/results/<ts>-name
        if name:
            found.update(_expand(name))
    return found


def result_files() -> list[str]:
    return sorted(p.name for p in (ROOT / "bench" / "results").iterdir())


def test_every_cited_result_exists() -> None:
    files = result_files()
    missing = sorted({f"{doc.name}: {pat}" for doc in DOCS for pat in cited_results(doc.read_text())
                      if not fnmatch.filter(files, pat)})
    assert not missing, f"cited results missing from bench/results/ (restore them from git history): {missing}"
