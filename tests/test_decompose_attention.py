"""decompose-attention: the fused ONNX Attention op becomes MatMul/Softmax/MatMul with equal outputs,
token pruning then works on it, and variants that cannot be expressed exactly are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, fixture_names, load_meta, reference_io, run_ort
from onnx import TensorProto, helper
from spatten_compiler.passes.decompose_attention import DecomposeAttention
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.runtime.reference import ReferenceRuntime

from spatten_compiler.errors import OptionError

FUSED = [n for n in fixture_names() if load_meta(n).get("fused_attention") == "Attention"]


def test_fused_fixtures_exist() -> None:
    assert {"bert_attention_op23", "llama_attention_op23"} <= set(FUSED)


@pytest.mark.parametrize("name", FUSED)
def test_decomposed_equals_fused(name: str, tmp_path: Path) -> None:
    model = ir.load(MODELS / f"{name}.onnx")
    Normalize()(model)
    assert DecomposeAttention()(model).modified
    assert not [n for n in model.graph if n.op_type == "Attention"]
    report = find_attention(model)
    meta = load_meta(name)
    assert len(report.sites) == meta["num_layers"] and all(s.fused is None for s in report.sites)
    ir.save(model, tmp_path / "d.onnx")
    feeds, _ = reference_io(meta)
    got, want = run_ort(tmp_path / "d.onnx", feeds), run_ort(MODELS / f"{name}.onnx", feeds)
    real = feeds["attention_mask"].astype(bool)
    for key in want:
        a, b = got[key], want[key]
        if a.ndim >= 2 and a.shape[:2] == real.shape:
            a, b = a[real], b[real]
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=key)


def test_token_pruning_on_fused_encoder(tmp_path: Path) -> None:
    from spatten_compiler.cli import main

    out = tmp_path / "p.onnx"
    assert main([str(MODELS / "bert_attention_op23.onnx"), "-o", str(out), "--token-keep", "0.5", "--emit-kept",
                 "--token-min-keep", "1", "-q"]) == 0
    feeds, _ = reference_io(load_meta("bert_attention_op23"))
    got = run_ort(out, feeds)
    assert got["spatten_kept_positions.0"].shape[1] < feeds["input_ids"].shape[1]
    report = ReferenceRuntime(out).run(feeds)
    for key, value in got.items():
        np.testing.assert_allclose(report.outputs[key], value, atol=1e-4, rtol=0, err_msg=key)


def _fused(**attrs: object) -> onnx.ModelProto:
    x = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 2, "S", 4]) for n in ("q", "k", "v")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2, "S", 4])
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], **attrs)
    return helper.make_model(helper.make_graph([node], "g", x, [y]), opset_imports=[helper.make_opsetid("", 23)])


def test_causal_without_mask(tmp_path: Path) -> None:
    proto = _fused(is_causal=1)
    onnx.save(proto, tmp_path / "f.onnx")
    model = ir.serde.deserialize_model(proto)
    DecomposeAttention()(model)
    ir.save(model, tmp_path / "d.onnx")
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 2, 5, 4)).astype(np.float32) for n in ("q", "k", "v")}
    np.testing.assert_allclose(run_ort(tmp_path / "d.onnx", feeds)["y"], run_ort(tmp_path / "f.onnx", feeds)["y"],
                               atol=1e-5)


def test_softcap_is_refused_with_reason() -> None:
    model = ir.serde.deserialize_model(_fused(softcap=30.0))
    with pytest.raises(OptionError, match="softcap"):
        DecomposeAttention()(model)


def _fused_stack(layers: int, attention, name: str, seed: int = 0) -> onnx.ModelProto:
    """x [B,S,8] -> per layer: ``attention(i, x, const)`` nodes producing ``a{i}`` -> output projection
    -> residual. Inputs x and mask [B,S] int32; com.microsoft opset imported."""
    rng = np.random.default_rng(seed)
    d, nodes, inits = 8, [], []

    def const(cname: str, array: np.ndarray) -> str:
        inits.append(onnx.numpy_helper.from_array(array.astype(np.float32), cname))
        return cname

    x = "x"
    for i in range(layers):
        nodes.extend(attention(i, x, const, rng))
        nodes.append(helper.make_node("MatMul", [f"a{i}", const(f"wo{i}", rng.standard_normal((d, d)) * 0.5)],
                                      [f"o{i}"]))
        nodes.append(helper.make_node("Add", [x, f"o{i}"], [f"h{i}"]))
        x = f"h{i}"
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d]),
         helper.make_tensor_value_info("mask", TensorProto.INT32, ["B", "S"])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", "S", d])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _mha_stack(layers: int = 1, bias: bool = True, causal: int = 0) -> onnx.ModelProto:
    """Separate projections -> com.microsoft.MultiHeadAttention (2 heads, key padding mask): the fused
    form onnxruntime's transformer optimizer writes."""

    def attention(i, x, const, rng):
        nodes = [helper.make_node("MatMul", [x, const(f"w{t}{i}", rng.standard_normal((8, 8)) * 0.5)], [f"{t}{i}"])
                 for t in "qkv"]
        ins = [f"q{i}", f"k{i}", f"v{i}", const(f"b{i}", rng.standard_normal(24) * 0.1) if bias else "", "mask"]
        return [*nodes, helper.make_node("MultiHeadAttention", ins, [f"a{i}"], domain="com.microsoft",
                                         num_heads=2, unidirectional=causal)]

    return _fused_stack(layers, attention, "mha")


def _mha_feeds(seq: int = 9) -> dict:
    mask = np.ones((2, seq), np.int32)
    mask[1, seq - 3:] = 0
    return {"x": np.random.default_rng(1).standard_normal((2, seq, 8)).astype(np.float32), "mask": mask}


@pytest.mark.parametrize("bias, causal", [(True, 0), (False, 0), (True, 1)])
def test_microsoft_mha_decomposed_equals_fused(bias: bool, causal: int, tmp_path: Path) -> None:
    proto = _mha_stack(bias=bias, causal=causal)
    onnx.save(proto, tmp_path / "f.onnx")
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    DecomposeAttention()(model)
    (site,) = find_attention(model).sites
    assert (site.num_heads, site.head_dim, site.fused) == (2, 4, None)
    assert site.mask_source == "mask" and site.mask_kind.endswith("padding")
    ir.save(model, tmp_path / "d.onnx")
    feeds = _mha_feeds()
    out = next(o.name for o in proto.graph.output)
    real = feeds["mask"].astype(bool)
    np.testing.assert_allclose(run_ort(tmp_path / "d.onnx", feeds)[out][real],
                               run_ort(tmp_path / "f.onnx", feeds)[out][real], atol=1e-5)


def test_token_pruning_on_microsoft_mha(tmp_path: Path) -> None:
    from spatten_compiler.cli import main

    src, out = tmp_path / "f.onnx", tmp_path / "p.onnx"
    onnx.save(_mha_stack(layers=3), src)
    assert main([str(src), "-o", str(out), "--token-keep", "0.5", "--token-min-keep", "1", "--emit-kept", "-q"]) == 0
    feeds = _mha_feeds()
    got = run_ort(out, feeds)
    assert got["spatten_kept_mask"].sum(1).tolist() == [5, 3]  # ceil(len * 0.5) of each sample's real tokens
    report = ReferenceRuntime(out).run(feeds)
    for key, value in got.items():
        np.testing.assert_allclose(report.outputs[key], value, atol=1e-4, rtol=0, err_msg=key)


def _packed_stack(layers: int = 1) -> onnx.ModelProto:
    """com.microsoft.Attention with packed [8, 24] weights, bias and a 0/1 mask per layer."""

    def attention(i, x, const, rng):
        ins = [x, const(f"w{i}", rng.standard_normal((8, 24)) * 0.5), const(f"b{i}", rng.standard_normal(24) * 0.1),
               "mask"]
        return [helper.make_node("Attention", ins, [f"a{i}"], domain="com.microsoft", num_heads=2)]

    return _fused_stack(layers, attention, "packed")


def test_microsoft_packed_attention_decomposed_and_pruned(tmp_path: Path) -> None:
    from spatten_compiler.cli import main

    proto = _packed_stack()
    onnx.save(proto, tmp_path / "f.onnx")
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    DecomposeAttention()(model)
    (site,) = find_attention(model).sites
    assert (site.num_heads, site.head_dim, site.q.packed) == (2, 4, 0)
    ir.save(model, tmp_path / "d.onnx")
    feeds = _mha_feeds()
    real = feeds["mask"].astype(bool)
    np.testing.assert_allclose(run_ort(tmp_path / "d.onnx", feeds)["h0"][real],
                               run_ort(tmp_path / "f.onnx", feeds)["h0"][real], atol=1e-5)
    onnx.save(_packed_stack(layers=3), tmp_path / "f3.onnx")
    out = tmp_path / "p.onnx"
    assert main([str(tmp_path / "f3.onnx"), "-o", str(out), "--token-keep", "0.5", "--token-min-keep", "1",
                 "--emit-kept", "-q"]) == 0
    got = run_ort(out, feeds)
    assert got["spatten_kept_mask"].sum(1).tolist() == [5, 3]
    report = ReferenceRuntime(out).run(feeds)
    np.testing.assert_allclose(report.outputs["h2"], got["h2"], atol=1e-4, rtol=0)
