"""Models already quantized by onnxruntime's ``quantize_dynamic`` (what transformers.js and optimum ship
as ``model_quantized.onnx``): projections are ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul``.
Discovery finds the same sites as in the float model, token pruning at keep 1.0 is exact in
onnxruntime, the default preset runs, and head pruning (which slices float weights) refuses in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize

from spatten_compiler.cli import main
from spatten_compiler.decoding import DecoderSession

NAMES = ["bert_torchscript", "distilbert_torchscript", "llama_torchscript"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    out = {}
    folder = tmp_path_factory.mktemp("int8")
    for name in NAMES:
        out[name] = folder / f"{name}.int8.onnx"
        quantize_dynamic(MODELS / f"{name}.onnx", out[name], weight_type=QuantType.QInt8)
    return out


def _sites(path: Path) -> list[tuple]:
    model = ir.serde.deserialize_model(onnx.load(path))
    Normalize()(model)
    return [(s.layer, s.num_heads, s.num_kv_heads, s.head_dim, s.mask_kind, s.kv_cache, s.out_proj is not None,
             s.layer_input is not None) for s in find_attention(model).sites]


@pytest.mark.parametrize("name", NAMES)
def test_discovery_sees_through_int8_projections(name: str, quantized: dict[str, Path]) -> None:
    onnx_model = onnx.load(quantized[name])
    assert any(n.op_type == "MatMulInteger" for n in onnx_model.graph.node)
    assert _sites(quantized[name]) == _sites(MODELS / f"{name}.onnx")


@pytest.mark.parametrize("name", ["bert_torchscript", "distilbert_torchscript"])
def test_token_pruning_at_keep_one_is_exact(name: str, quantized: dict[str, Path], tmp_path: Path) -> None:
    """Every layer after the first selects all tokens (TopK, gathers and the restore run); the valid
    rows equal the int8 input model's in onnxruntime. (Padded rows may differ: per-tensor dynamic
    quantization reads them, and pruning rewrites them.)"""
    out = tmp_path / "k1.onnx"
    assert main([str(quantized[name]), "-o", str(out), "--token-keep-schedule", "1,0.999", "--kv-bits", "none"]) == 0
    feeds, _ = reference_io(load_meta(name))
    want, got = run_ort(quantized[name], feeds), run_ort(out, feeds)
    mask = next((v for k, v in feeds.items() if "mask" in k), None)
    for key, value in want.items():
        rows = mask[..., None].astype(bool) if mask is not None and value.ndim == 3 else True
        np.testing.assert_allclose(np.where(rows, got[key], 0), np.where(rows, value, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_default_preset_runs_on_int8_models(name: str, quantized: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    assert main([str(quantized[name]), "-o", str(out)]) == 0
    assert "no rewrite applied" not in capsys.readouterr().err
    if load_meta(name).get("kv_cache"):  # a decoder: generate a few steps with its pruned, split-precision cache
        session = DecoderSession(out)
        logits = session.step(np.array([[5, 9, 13, 2, 7, 11]], np.int64))
        for token in (3, 4, 5):
            logits = session.step(np.array([[token]], np.int64))
        assert logits.shape[:2] == (1, 1) and np.isfinite(logits).all()
        return
    feeds, _ = reference_io(load_meta(name))
    got = run_ort(out, feeds)
    want = run_ort(quantized[name], feeds)
    for key, value in want.items():
        assert got[key].shape == value.shape and np.isfinite(got[key]).all()


def test_head_pruning_refuses_int8_weights(quantized: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    assert main([str(quantized["bert_torchscript"]), "-o", str(out), "--head-keep", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantized weights" in err and "--weights int8" in err
    assert not out.exists()


def test_optimized_then_quantized_model_says_what_to_do(tmp_path: Path, capsys) -> None:
    """The optimizer's fused Attention quantized into QAttention: not read; the compile summary and
    inspect name the op and the remedy instead of a bare 'no attention found'."""
    from test_ort_optimized_input import ort_optimized

    src = tmp_path / "opt-int8.onnx"
    quantize_dynamic(ort_optimized("bert_torchscript", "default", tmp_path / "opt.onnx"), src,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    assert any(n.op_type == "QAttention" for n in onnx.load(src).graph.node)
    assert main([str(src), "-o", str(tmp_path / "out.onnx")]) == 0
    assert "QAttention: int8 fused attention" in capsys.readouterr().err
    assert main(["inspect", str(src)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "compile the float model, then add --optimize --weights int8" in err
