"""The spattenc command line: help, the identity pipeline, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, fixture_names, load_meta, reference_io, run_ort, tiny_model

from spatten_compiler.cli import main


def spattenc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spatten_compiler", *args], capture_output=True, text=True, timeout=300
    )


def test_help_shows_examples_and_commands() -> None:
    r = spattenc("--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and "compile" in r.stdout and "inspect" in r.stdout


def test_compile_help() -> None:
    r = spattenc("compile", "--help")
    assert r.returncode == 0 and "--output" in r.stdout and "--in-place" in r.stdout


def test_default_verb_is_compile(tiny_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert main([str(tiny_path), "-o", str(out), "-q"]) == 0
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert np.array_equal(run_ort(out, {"x": x})["y"], run_ort(tiny_path, {"x": x})["y"])


IDENTITY = {"pipeline": ["--pipeline", "normalize"],
            "all-off": ["--no-token-pruning", "--kv-bits", "none", "--no-kv-eviction"]}


@pytest.mark.parametrize("how", list(IDENTITY))
@pytest.mark.parametrize("name", fixture_names())
def test_identity_pipeline_on_fixture(name: str, how: str, tmp_path: Path) -> None:
    """Every preset part switched off writes the input model (bit-identical outputs); ``--pipeline
    normalize`` computes the same up to float rounding (its constant folding changes the op order
    onnxruntime sees: < 1e-5 here). A compile with no options applies the default preset
    (tests/test_presets.py)."""
    out = tmp_path / f"{name}.onnx"
    assert main([str(MODELS / f"{name}.onnx"), "-o", str(out), "-q", *IDENTITY[how]]) == 0
    feeds, _ = reference_io(load_meta(name))
    before, after = run_ort(MODELS / f"{name}.onnx", feeds), run_ort(out, feeds)
    assert before.keys() == after.keys()
    for k in before:
        if how == "all-off":
            np.testing.assert_array_equal(after[k], before[k])
        else:
            np.testing.assert_allclose(after[k], before[k], atol=1e-5, rtol=0)


def _bad_inputs(tmp: Path, tiny: Path) -> dict[str, tuple[list[str], str]]:
    text = tmp / "notes.onnx"
    text.write_text("this is not a model\n")
    trunc = tmp / "trunc.onnx"
    trunc.write_bytes(tiny.read_bytes()[:40])
    empty = tmp / "empty.onnx"
    empty.write_bytes(b"")
    invalid = tiny_model()
    invalid.graph.node[0].input[1] = "no_such_tensor"
    invalid_path = tmp / "invalid.onnx"
    onnx.save(invalid, invalid_path)
    ext = tmp / "ext.onnx"
    onnx.save(tiny_model(), ext, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp / "ext.onnx.data").unlink()
    short = tmp / "short.onnx"
    onnx.save(tiny_model(), short, save_as_external_data=True, location="short.onnx.data", size_threshold=0)
    (tmp / "short.onnx.data").write_bytes(b"\0" * 8)
    (tmp / "typed.json").write_text('{"token_keep": "0.5"}')
    (tmp / "schedule.json").write_text('{"token_keep_schedule": [0.5, null]}')
    return {
        "missing": ([str(tmp / "nope.onnx")], "no such file"),
        "directory": ([str(tmp)], "not a file"),
        "text": ([str(text)], "not an ONNX model"),
        "truncated": ([str(trunc)], "not an ONNX model"),
        "empty": ([str(empty)], "not an ONNX model"),
        "invalid graph": ([str(invalid_path)], "invalid ONNX graph"),
        "missing external data": ([str(ext)], "missing or unreadable"),
        "short external data": ([str(short)], "has only 8 bytes"),
        "output is input": ([str(tiny), "--in-place-not-given"], "is the input model"),
        "unknown pass": ([str(tiny), "--pipeline", "no-such-pass"], "unknown pass"),
        "missing output folder": ([str(tiny), "-o", str(tmp / "no" / "dir.onnx")], "does not exist"),
        "output is a folder": ([str(tiny), "-o", str(tmp)], "is a folder"),
        "missing report folder": ([str(tiny), "--report", str(tmp / "no" / "r.json")], "does not exist"),
        "binary config": ([str(tiny), "--config", str(tiny)], "not a JSON text file"),
        "config value of a wrong type": ([str(tiny), "--config", str(tmp / "typed.json")],
                                         "token_keep must be a number or null, got '0.5'"),
        "config list with a null": ([str(tiny), "--config", str(tmp / "schedule.json")],
                                    "token_keep_schedule must be a list of numbers"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing", "directory", "text", "truncated", "empty", "invalid graph", "missing external data",
        "short external data", "output is input", "unknown pass", "missing output folder", "output is a folder",
        "missing report folder", "binary config", "config value of a wrong type", "config list with a null",
    ],
)
def test_bad_input_one_line_exit_2_no_output(case: str, tiny_path: Path, tmp_path: Path) -> None:
    args, expected = _bad_inputs(tmp_path, tiny_path)[case]
    out = tmp_path / "out.onnx"
    if case == "output is input":
        args = [args[0], "-o", args[0]]
    elif "-o" not in args:
        args = [*args, "-o", str(out)]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    r = spattenc(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spattenc"), r.stderr
    assert expected in lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "bad input must not create or modify files"


def test_in_place_overwrites_only_when_asked(tiny_path: Path) -> None:
    assert main([str(tiny_path), "-o", str(tiny_path), "--in-place", "-q"]) == 0
    onnx.checker.check_model(str(tiny_path))


def test_debug_shows_traceback(tmp_path: Path) -> None:
    r = spattenc(str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx"), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_usage_error_is_one_line() -> None:
    r = spattenc("model.onnx")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "-o/--output" in r.stderr


def test_compile_says_what_each_pass_did(tmp_path: Path) -> None:
    """Default output: one plain line per rewriting pass (schedule chosen), then the compile summary
    (what was applied, ideal ratios, how to change it), then the "wrote" line; -q: nothing."""
    model = str(MODELS / "bert_torchscript.onnx")
    r = spattenc(model, "-o", str(tmp_path / "a.onnx"), "--token-keep", "0.5")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("prune-tokens: ") and "keep 1.00 " in lines[0], lines
    assert lines[1].startswith("spattenc: your options only"), lines
    assert any(line.startswith("  tokens kept per layer") and "1.00, 0.50 x3" in line for line in lines), lines
    assert lines[-1].startswith("wrote ") and sum(line.startswith("wrote ") for line in lines) == 1, lines
    q = spattenc(model, "-o", str(tmp_path / "b.onnx"), "--token-keep", "0.5", "-q")
    assert q.returncode == 0 and q.stderr == ""


def test_compiling_a_compiled_model_says_so(tmp_path: Path, capsys) -> None:
    """A model spattenc wrote holds spatten ops that hide the attention it rewrote: a second rewrite
    says so (exit 2, one line) instead of a bare 'no attention found'."""
    from spatten_compiler.cli import main as cli_main

    first, second = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    assert cli_main([str(MODELS / "bert_torchscript.onnx"), "-o", str(first)]) == 0  # the default preset
    capsys.readouterr()
    assert cli_main([str(first), "-o", str(second), "--head-keep", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was written by spattenc already" in err and not second.exists()
