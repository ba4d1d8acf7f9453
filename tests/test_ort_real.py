"""--weights int4 on the real SmolLM2 export (models/cache/smollm2; skipped when absent).

One compile, `--kv-bits 8 --weights int4`: every projection (and the LM head) becomes onnxruntime's
MatMulNBits while the KV cache stays spattenc's 8-bit planes; a prefill and a decode step on real text
run, and the logits stay within the tolerance measured against the fp32 export (docs/optimize.md,
"int4 on SmolLM2"). Int4 round-to-nearest on a 135M model is lossy: the bounds below are the
measured values with a margin, not a quality claim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, run_ort

from spatten_compiler.cli import main as spattenc

SMOLLM2 = MODELS / "cache" / "smollm2" / "model.onnx"
TEXT = "The quick brown fox jumps over the lazy dog because it wanted to see what was on the other side"
DECODE = 4  # the last tokens run as a decode step over the cache the prefill wrote
# Measured on this text (20 tokens): --kv-bits 8 --weights int4 vs fp32 relative L2 0.560, top-1 0.45;
# onnxruntime's int4 alone (spattenc --weights int4, no K/V planes) 0.563 / 0.45: the loss is int4's.
# The two int4 models differ by 0.019 relative L2 (top-1 0.95): what the 8-bit K/V planes add.
REL_L2_MAX, TOP1_MIN = 0.65, 0.35


def _step(path: Path, names: list[str], ids: np.ndarray, past_len: int,
          past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, past_len + ids.shape[1]), np.int64),
             "position_ids": np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None]}
    model = onnx.load(path, load_external_data=False)
    for value in model.graph.input:
        if value.name.startswith("past_key_values"):
            uint8 = value.type.tensor_type.elem_type == onnx.TensorProto.UINT8
            empty = np.zeros((1, 3, 0, 1 if value.name.endswith(".scale") else 64), np.uint8 if uint8 else np.float32)
            feeds[value.name] = past[value.name] if past else empty
    out = run_ort(path, feeds)
    return out["logits"][0], {k.replace("present", "past_key_values"): v for k, v in out.items()
                              if k.startswith("present")}


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    names = [o.name for o in onnx.load(path, load_external_data=False).graph.output]
    first, past = _step(path, names, ids[:, :-DECODE], 0, None)
    second, _ = _step(path, names, ids[:, -DECODE:], ids.shape[1] - DECODE, past)
    return np.concatenate([first, second])


@pytest.mark.real
def test_smollm2_int4_weights_with_spatten_kv_planes(tmp_path: Path) -> None:
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} not exported (python models/export.py --real smollm2)")
    from tokenizers import Tokenizer

    out = tmp_path / "int4.onnx"
    assert spattenc([str(SMOLLM2), "-o", str(out), "-q", "--kv-bits", "8", "--weights", "int4"]) == 0
    model = onnx.load(out, load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    source = onnx.load(SMOLLM2, load_external_data=False)
    weights = {t.name for t in source.graph.initializer}
    projections = sum(n.op_type == "MatMul" and n.input[1] in weights for n in source.graph.node)
    assert ops.count("MatMulNBits") == projections > 0
    assert "MatMul" not in ops or all(n.input[1] not in weights for n in model.graph.node if n.op_type == "MatMul")
    cache = [v for v in model.graph.input if v.name.startswith("past_key_values")]
    assert cache and {v.name.rsplit(".", 1)[1] for v in cache} == {"msb", "scale"}
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.UINT8 for v in cache if v.name.endswith(".msb"))
    assert any(n.domain == "spatten" for n in model.graph.node)

    tok = Tokenizer.from_file(str(SMOLLM2.parent / "tokenizer.json"))
    ids = np.array([tok.encode(TEXT).ids], np.int64)
    ref, got = _logits(SMOLLM2, ids), _logits(out, ids)
    assert np.isfinite(got).all()
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"SmolLM2 --kv-bits 8 --weights int4 vs fp32: relative L2 {rel:.3f}, top-1 agreement {top1:.2f}")
    assert rel <= REL_L2_MAX and top1 >= TOP1_MIN
