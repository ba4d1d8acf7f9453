"""bench coverage on a two-model corpus built from the committed fixtures (no export, no torch): every
check, the default-preset check, and the --format conversions (int8 per tensor and per channel, float16,
onnxruntime's saved extended-level model, onnxslim and onnxsim when installed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, load_meta, reference_io

FIXTURES = ["bert_torchscript", "llama_torchscript"]  # an encoder, a decoder with a KV cache


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    lines = []
    for name in FIXTURES:
        meta = load_meta(name)
        shutil.copy(MODELS / f"{name}.onnx", folder / f"{name}.onnx")
        feeds, _ = reference_io(meta)
        if "attention_mask" in feeds:  # the corpus's reference inputs hold no padding
            feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
        np.savez(folder / f"{name}.npz", **feeds)
        lines.append(json.dumps({
            "name": name, "family": meta["architecture"], "exporter": meta["exporter"],
            "kind": "decoder" if meta["kv_cache"] else "encoder", "kv_cache": bool(meta["kv_cache"]),
            "onnx": f"{name}.onnx", "num_layers": meta["num_layers"], "num_heads": meta["num_heads"],
            "num_kv_heads": meta["num_kv_heads"], "head_dim": meta["head_dim"], "status": "ok"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


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
