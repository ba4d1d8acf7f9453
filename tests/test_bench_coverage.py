"""bench coverage on a two-model corpus built from the committed fixtures (no export, no torch): every
check, the default-preset check, and the --format conversions (int8 per tensor and per channel, float16,
onnxruntime's saved extended-level model, onnxslim and onnxsim when installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_corpus

FIXTURES = ["bert_torchscript", "llama_torchscript"]  # an encoder, a decoder with a KV cache


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), FIXTURES)


def test_fixed_shapes_format(corpus: Path, tmp_path: Path) -> None:
    """``--format fixed``: onnx-simplifier at the reference inputs' shapes; KV-cache models left out (a
    fixed cache length cannot grow), every check passes on the encoder."""
    pytest.importorskip("onnxsim")
    from bench.coverage import CHECKS, main

    assert main(["--corpus", str(corpus), "--format", "fixed", "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("*-coverage.json")).read_text())
    assert [r["name"] for r in result["rows"]] == ["bert_torchscript"]
    assert all(result["rows"][0][check]["ok"] for check in CHECKS), result["rows"][0]


@pytest.mark.parametrize("fmt", ["float", "int8", "int8pc", "fp16", "ortext", "slim", "onnxsim"])
def test_every_check_and_format(fmt: str, corpus: Path, tmp_path: Path) -> None:
    from bench.coverage import CHECKS, main

    if fmt in ("slim", "onnxsim"):  # the post-processing tools are not dependencies
        pytest.importorskip("onnxslim" if fmt == "slim" else "onnxsim")

    assert main(["--corpus", str(corpus), "--format", fmt, "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("*-coverage.json")).read_text())
    assert [r["name"] for r in result["rows"]] == FIXTURES and not result["export_failures"]
    for row in result["rows"]:
        for check in CHECKS:
            refused_heads = fmt.startswith("int8") and check.startswith("heads")  # prune-heads slices float weights
            assert row[check]["ok"] or (refused_heads and row[check].get("refused")), (row["name"], check, row[check])
    assert ("converted to " + fmt in next(tmp_path.glob("*-coverage.md")).read_text()) == (fmt != "float")
