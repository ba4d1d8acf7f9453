"""Models already quantized by onnxruntime: ``quantize_dynamic`` (int8; what transformers.js and optimum
ship as ``model_quantized.onnx``: projections are ``DynamicQuantizeLinear -> MatMulInteger -> Cast ->
Mul``) and the int4 quantizer in QDQ format (``DequantizeLinear`` of int4 blocks -> ``MatMul``).
The optimizer's model quantized (``QAttention``) is decomposed into that form. Discovery finds the same sites as in the float model, token pruning at keep 1.0 is exact in
onnxruntime, the default preset runs; head pruning slices int8 weights (per tensor, and per channel
with their scales and zero points) and refuses QDQ blocks in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize

from spatten_compiler import inspect
from spatten_compiler.cli import main
from spatten_compiler.decoding import DecoderSession

NAMES = ["bert_torchscript", "distilbert_torchscript", "llama_torchscript"]


QDQ4 = ["bert_torchscript", "distilbert_torchscript"]  # the int4 quantizer leaves Llama's ReduceMean invalid
PER_CHANNEL = ["bert_torchscript", "llama_torchscript"]  # quantize_dynamic(per_channel=True): transformers.js'


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = {}
    folder = tmp_path_factory.mktemp("int8")
    src = {}  # copies: quantize_dynamic writes <model>-inferred.onnx beside its input (test workers race in models/)
    for name in NAMES:
        src[name] = folder / f"{name}.onnx"
        shutil.copy(MODELS / f"{name}.onnx", src[name])
        out[name] = folder / f"{name}.int8.onnx"
        quantize_dynamic(src[name], out[name], weight_type=QuantType.QInt8)
    for name in PER_CHANNEL:
        out[f"{name}.pc8"] = folder / f"{name}.pc8.onnx"
        quantize_dynamic(src[name], out[f"{name}.pc8"], weight_type=QuantType.QInt8, per_channel=True)
    for name in QDQ4:
        q = MatMulNBitsQuantizer(onnx.load(MODELS / f"{name}.onnx"), bits=4, block_size=32, is_symmetric=True,
                                 quant_format=QuantFormat.QDQ)
        q.process()
        out[f"{name}.qdq4"] = folder / f"{name}.qdq4.onnx"
        onnx.save(q.model.model, out[f"{name}.qdq4"])
    return out


ALL = [*NAMES, *(f"{n}.qdq4" for n in QDQ4)]
QUANTIZED_OP = {"int8": "MatMulInteger", "qdq4": "DequantizeLinear"}


def _name(key: str) -> str:
    return key.split(".")[0]


def _sites(path: Path) -> list[tuple]:
    model = ir.serde.deserialize_model(onnx.load(path))
    Normalize()(model)
    return [(s.layer, s.num_heads, s.num_kv_heads, s.head_dim, s.mask_kind, s.kv_cache, s.out_proj is not None,
             s.layer_input is not None) for s in find_attention(model).sites]


@pytest.mark.parametrize("key", ALL)
def test_discovery_sees_through_quantized_projections(key: str, quantized: dict[str, Path]) -> None:
    op = QUANTIZED_OP["qdq4" if key.endswith("qdq4") else "int8"]
    assert any(n.op_type == op for n in onnx.load(quantized[key]).graph.node)
    assert _sites(quantized[key]) == _sites(MODELS / f"{_name(key)}.onnx")


@pytest.mark.parametrize("key", ["bert_torchscript", "distilbert_torchscript", "bert_torchscript.qdq4",
                                 "distilbert_torchscript.qdq4"])
def test_token_pruning_at_keep_one_is_exact(key: str, quantized: dict[str, Path], tmp_path: Path) -> None:
    """Every layer after the first selects all tokens (TopK, gathers and the restore run); the valid
    rows equal the int8 input model's in onnxruntime. (Padded rows may differ: per-tensor dynamic
    quantization reads them, and pruning rewrites them.)"""
    out = tmp_path / "k1.onnx"
    assert main([str(quantized[key]), "-o", str(out), "--token-keep-schedule", "1,0.999", "--kv-bits", "none"]) == 0
    feeds, _ = reference_io(load_meta(_name(key)))
    want, got = run_ort(quantized[key], feeds), run_ort(out, feeds)
    mask = next((v for k, v in feeds.items() if "mask" in k), None)
    for key, value in want.items():
        rows = mask[..., None].astype(bool) if mask is not None and value.ndim == 3 else True
        np.testing.assert_allclose(np.where(rows, got[key], 0), np.where(rows, value, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ALL)
def test_default_preset_runs_on_quantized_models(key: str, quantized: dict[str, Path], tmp_path: Path, capsys) -> None:
    name = _name(key)
    out = tmp_path / "out.onnx"
    assert main([str(quantized[key]), "-o", str(out)]) == 0
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
    want = run_ort(quantized[key], feeds)
    for k, value in want.items():
        assert got[k].shape == value.shape and np.isfinite(got[k]).all()


@pytest.mark.parametrize("key", ["bert_torchscript", "llama_torchscript", *(f"{n}.pc8" for n in PER_CHANNEL)])
def test_head_pruning_slices_int8_weights(key: str, quantized: dict[str, Path], tmp_path: Path) -> None:
    """One scale and zero point per tensor (quantize_dynamic's default) or per output column
    (``.pc8``: sliced with the columns): the int8 columns / rows of the kept heads are sliced like
    float ones. Keep 1.0 is exact; at 0.5 the written model runs."""
    feeds, _ = reference_io(load_meta(_name(key)))
    want = run_ort(quantized[key], feeds)
    for keep in ("1.0", "0.5"):
        out = tmp_path / f"h{keep}.onnx"
        assert main([str(quantized[key]), "-o", str(out), "--head-keep", keep, "--no-token-pruning",
                     "--kv-bits", "none"]) == 0
        got = run_ort(out, feeds)
        for output, value in want.items():
            if keep == "1.0":
                np.testing.assert_array_equal(got[output], value)
            elif not output.startswith("present"):
                assert got[output].shape == value.shape and np.isfinite(got[output]).all()


def test_head_pruning_refuses_weights_it_cannot_slice(quantized: dict[str, Path], tmp_path: Path, capsys) -> None:
    """Dequantized QDQ blocks: refused in one line."""
    src = quantized["bert_torchscript.qdq4"]
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "--head-keep", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantized weights" in err and "--weights int8" in err
    assert not out.exists()


def test_optimized_then_quantized_model_is_read(tmp_path: Path, capsys) -> None:
    """The optimizer's model quantized (QAttention, QEmbedLayerNormalization): decomposed exactly into
    the int8 projection form discovery reads; token pruning at keep 1.0 equals the input on the valid
    rows, head pruning at 1.0 too and runs at 0.5, and the default preset runs."""
    from test_ort_optimized_input import ort_optimized

    src = tmp_path / "opt-int8.onnx"
    quantize_dynamic(ort_optimized("bert_torchscript", "default", tmp_path / "opt.onnx"), src,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    ops = {n.op_type for n in onnx.load(src).graph.node}
    assert {"QAttention", "QEmbedLayerNormalization"} <= ops
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    want = run_ort(src, feeds)["last_hidden_state"]
    rows = feeds["attention_mask"][..., None].astype(bool)
    runs = {"decomposed": ["--pipeline", "unfuse-ort,normalize,decompose-attention"],
            "tokens 1.0": ["--token-keep-schedule", "1,0.999", "--kv-bits", "none"],
            "heads 1.0": ["--head-keep", "1.0", "--no-token-pruning", "--kv-bits", "none"],
            "heads 0.5": ["--head-keep", "0.5", "--no-token-pruning", "--kv-bits", "none"], "preset": []}
    for label, flags in runs.items():
        out = tmp_path / f"{label.replace(' ', '-')}.onnx"
        assert main([str(src), "-o", str(out), "-q", *flags]) == 0, label
        got = run_ort(out, feeds)["last_hidden_state"]
        assert got.shape == want.shape and np.isfinite(got).all(), label
        if label in ("decomposed", "tokens 1.0", "heads 1.0"):
            np.testing.assert_allclose(np.where(rows, got, 0), np.where(rows, want, 0), atol=1e-5, err_msg=label)
    assert len(inspect(str(src))) == 4


@pytest.mark.parametrize("kw", [dict(qk="norm"), dict(qk="partial_rope"), dict(qk="interleaved_rope"),
                                dict(bias="buckets"), dict(bias="alibi")], ids=str)
def test_int8_projection_behind_a_per_head_transform_or_beside_a_position_table(kw: dict, tmp_path: Path) -> None:
    """The structural paths see int8 projections too: a per-head transform (q/k norm, rotary: GPT-J,
    NeoX) reaches quantize_dynamic's scale Mul, and a position-bias table it quantized (MPNet's
    Gather -> DequantizeLinear) stays a bias, not a second mask."""
    import structural_graphs

    src = tmp_path / "float.onnx"
    onnx.save(structural_graphs.build(**kw), src)
    quantize_dynamic(src, tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(tmp_path / "int8.onnx").graph.node)
    assert _sites(tmp_path / "int8.onnx") == _sites(src)


def test_int8_projection_reading_the_quantized_embedding(tmp_path: Path) -> None:
    """A layer that reads the embeddings directly (OLMo 2's layer 0): quantize_dynamic feeds its
    MatMulInteger the int8 Gather of the quantized table, with no DynamicQuantizeLinear; the float
    input is that Gather's DequantizeLinear."""
    import attention_graphs
    import onnx.compose
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, attention_graphs.D))
                                    .astype(np.float32), "table")
    embed = helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["x"])], "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", attention_graphs.D])], [table]),
        opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "float.onnx"
    merged = onnx.compose.merge_models(embed, attention_graphs.build(), io_map=[("x", "x")])
    del merged.opset_import[:]
    merged.opset_import.append(helper.make_opsetid("", 17))
    merged.ir_version = 8
    onnx.save(merged, src)
    quantize_dynamic(src, tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    nodes = onnx.load(tmp_path / "int8.onnx").graph.node
    producers = {o: n.op_type for n in nodes for o in n.output}
    assert any(n.op_type == "MatMulInteger" and producers.get(n.input[0]) == "Gather" for n in nodes)
    assert _sites(tmp_path / "int8.onnx") == _sites(src)


def test_int8_rotary_tables_gathered_by_position(tmp_path: Path) -> None:
    """RoFormer gathers its sinusoidal table by position; quantize_dynamic quantizes that Gather, so the
    interleaved rotary's cos/sin come through a DequantizeLinear, which the per-head transform walk
    passes."""
    import structural_graphs

    src = tmp_path / "float.onnx"
    onnx.save(structural_graphs.build(qk="interleaved_rope", rope_table=True), src)
    quantize_dynamic(src, tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(tmp_path / "int8.onnx").graph.node)
    assert _sites(tmp_path / "int8.onnx") == _sites(src)
