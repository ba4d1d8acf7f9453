"""``python -m bench``: every benchmark module is found without a central list and runs through it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import MODELS, ROOT

from bench.__main__ import discover, main


def test_every_module_with_main_is_a_benchmark() -> None:
    expected = {p.stem for p in (ROOT / "bench").glob("*.py")
                if not p.stem.startswith("_") and "\ndef main(" in p.read_text()}
    found = discover()
    assert set(found) == expected and "latency" in found and "common" not in found
    assert all(b.summary for b in found.values())


def test_a_new_module_appears_without_registration(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text('"""My benchmark. More text."""\n\ndef main(argv=None):\n    return 0\n')
    (tmp_path / "helper.py").write_text('"""Helpers, no main."""\n')
    assert {n: b.summary for n, b in discover(tmp_path).items()} == {"mine": "My benchmark"}


def test_list_and_unknown_name() -> None:
    r = subprocess.run([sys.executable, "-m", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "embed_eval" in r.stdout and "docs/benchmarks.md" in r.stdout
    r = subprocess.run([sys.executable, "-m", "bench", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no benchmark 'nope'" in r.stderr


def test_dispatch_runs_a_benchmark(tmp_path: Path) -> None:
    listing = tmp_path / "c.txt"
    listing.write_text("# name\toptions\nt5\t--token-keep 0.5\n")
    out = tmp_path / "out"
    assert main(["compile_candidates", str(listing), str(MODELS / "bert_torchscript.onnx"), str(out)]) == 0
    assert json.loads((out / "t5.spatten.json").read_text())["token_schedule"] == [1.0, 0.5, 0.5, 0.5]
    assert (out / "t5.onnx").stat().st_size > 0


def test_every_benchmark_runs_as_a_file_from_anywhere(tmp_path: Path) -> None:
    """``python bench/x.py`` (the form the recorded commands use) works outside the repo root too."""
    for name in discover():
        r = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--help"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        # bench's own imports resolve (optional packages such as scikit-learn may be absent) and the
        # file does something (a missing main guard prints nothing)
        assert "No module named 'bench" not in r.stderr and (r.stdout or r.stderr), (name, r.stderr[-300:])
