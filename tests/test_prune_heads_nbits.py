"""prune-heads on int4 block-quantized projections (com.microsoft MatMulNBits: onnxruntime-genai's
``-p int4`` builds, ``spattenc --weights int4``): whole blocks are sliced, never requantized.

* the block slicing itself (passes/nbits_blocks.py) on hand-quantized weights: the sliced op in
  onnxruntime equals the dequantized weight sliced as a float MatMul (bits 4 and 8; zero points none,
  packed or unpacked; flat scales; a bias);
* the builder's int4 Llama and spattenc's ``--weights int4`` Llama: a KV group sliced out at compile
  time equals the input model with that group's output-projection blocks zeroed (exact), and a group
  narrower than a block is refused in one line;
* the run-time (paper) rule gathers the same blocks: equal to the dequantized float twin pruned alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.passes import nbits_blocks as nbits
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.unfuse_ort import UnfuseOrt

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline, make_pass

K, N, BLOCK = 64, 48, 16
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[..., n] codes -> [..., ceil(n * bits / 8)] bytes, low bits first (onnxruntime's packing)."""
    per = 8 // bits
    codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], (-codes.shape[-1]) % per), codes.dtype)], -1)
    codes = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    return sum(codes[..., i] << np.uint8(i * bits) for i in range(per)).astype(np.uint8)


def _quantized(bits: int, zero_points: str, flat_scales: bool, bias: bool, rng) -> tuple[onnx.ModelProto, np.ndarray]:
    """A MatMulNBits model quantizing a random W [K, N] and the float weight it dequantizes to."""
    blocks, top = K // BLOCK, (1 << bits) - 1
    codes = rng.integers(0, top + 1, (N, blocks, BLOCK))
    scales = (rng.uniform(0.01, 0.1, (N, blocks)) / (1 << (bits - 4))).astype(np.float32)  # 8 bits: as large as 4
    zp = rng.integers(0, top + 1, (N, blocks)) if zero_points != "none" else np.full((N, blocks), 1 << (bits - 1))
    w = ((codes - zp[..., None]) * scales[..., None]).reshape(N, K).T.astype(np.float32)
    inits = [numpy_helper.from_array(_pack(codes, bits), "B"),
             numpy_helper.from_array(scales.reshape(-1) if flat_scales else scales, "scales")]
    if zero_points == "packed":
        inits.append(numpy_helper.from_array(_pack(zp, bits), "zp"))
    elif zero_points == "float":
        inits.append(numpy_helper.from_array(zp.astype(np.float32), "zp"))
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "bias"))
    names = ["A", "B", "scales", "zp" if zero_points != "none" else "", "", "bias" if bias else ""]
    while not names[-1]:
        names.pop()
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=BLOCK)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=OPSETS), w


CASES = [(4, "none", False, False), (4, "packed", False, True), (4, "float", True, False),
         (8, "packed", True, True), (8, "none", False, False)]


@pytest.mark.parametrize(("bits", "zero_points", "flat_scales", "bias"), CASES)
def test_sliced_blocks_equal_the_sliced_dequantized_weight(tmp_path, bits, zero_points, flat_scales, bias) -> None:
    rng = np.random.default_rng(bits + len(zero_points))
    proto, w = _quantized(bits, zero_points, flat_scales, bias, rng)
    b = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "bias")) if bias else 0
    a = rng.standard_normal((3, K)).astype(np.float32)
    onnx.save(proto, tmp_path / "full.onnx")
    np.testing.assert_allclose(run_ort(tmp_path / "full.onnx", {"A": a})["Y"], a @ w + b, atol=1e-5, rtol=1e-6)
    cols, rows = np.array([1, 2, 5, 17, 30, 47]), np.r_[0:16, 32:48]  # blocks 0 and 2 of 4
    model = ir.serde.deserialize_model(proto)
    node = next(iter(model.graph))
    blocks = nbits.row_blocks(nbits.layout(node), rows)
    assert blocks.tolist() == [0, 2]
    e = GraphEditor(model, "t")
    nbits.take_columns(e, node, cols)
    nbits.take_rows(e, node, blocks)
    assert (node.attributes["K"].value, node.attributes["N"].value) == (32, len(cols))
    model.graph.inputs[0].shape = ir.Shape(["M", len(rows)])
    save_model(model, tmp_path / "sliced.onnx", external_data=False)
    got = run_ort(tmp_path / "sliced.onnx", {"A": a[:, rows]})["Y"]
    want = a[:, rows] @ w[rows][:, cols] + (b[cols] if bias else 0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-6)


def test_rows_that_split_a_block_are_refused() -> None:
    proto, _ = _quantized(4, "none", False, False, np.random.default_rng(0))
    node = next(iter(ir.serde.deserialize_model(proto).graph))
    why = nbits.row_blocks(nbits.layout(node), np.r_[0:8, 16:32])
    assert isinstance(why, str) and "not whole blocks of 16" in why


# --- the pass on real int4 decoders -------------------------------------------------------------


def _zeroed(path: Path, out: Path, layer: int, rows: slice) -> None:
    """The model as prune-heads reads it, with the output projection of ``layer`` reading nothing from
    ``rows`` (those blocks' scales 0: exact for int4 blocks)."""
    from bench.coverage import _zero_rows

    model = load_model(path)
    UnfuseOrt()(model)
    Normalize()(model)
    _zero_rows(model, find_attention(model).sites[layer].out_proj, rows)
    save_model(model, out, external_data=False)


def _pruned(path: Path, out: Path, heads: tuple) -> ir.Model:
    model = load_model(path)
    Pipeline([make_pass("unfuse-ort"), make_pass("normalize"), make_pass("decompose-attention"),
              make_pass("prune-heads", rule="calibrated", heads=heads)], check=True)(model)
    save_model(model, out, external_data=False)
    return model


def _nbits_dims(model: ir.Model, name: str) -> tuple[int, int]:
    node = next(n for n in model.graph if nbits.is_nbits(n) and name in n.name)
    return node.attributes["K"].value, node.attributes["N"].value


def _assert_same(a: Path, b: Path, feeds: dict[str, np.ndarray], atol: float = 1e-5) -> None:
    want, got = run_ort(a, feeds), run_ort(b, feeds)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=atol, rtol=0, err_msg=k)


def test_builder_int4_group_sliced_exactly(tmp_path) -> None:
    """onnxruntime-genai's int4 Llama (4 heads, 2 KV groups of 2 x 16 rows, blocks of 32): group 0 of
    layer 1 sliced out; the cache keeps every KV head (packed QKV: Q's 64 columns -> 32, K/V whole)."""
    src = MODELS / "builder" / "llama_int4.onnx"
    rng = np.random.default_rng(5)
    feeds = {"input_ids": rng.integers(3, 48, (1, 4)).astype(np.int64), "attention_mask": np.ones((1, 7), np.int64),
             "position_ids": np.arange(3, 7)[None].astype(np.int64),
             **{f"past_key_values.{i}.{t}": rng.standard_normal((1, 2, 3, 16)).astype(np.float32)
                for i in range(2) for t in ("key", "value")}}
    model = _pruned(src, tmp_path / "pruned.onnx", ((), (1,)))
    assert _nbits_dims(model, "layers.1/attn/o_proj") == (32, 64)
    assert _nbits_dims(model, "layers.1/attn/qkv_proj") == (64, 96)
    assert _nbits_dims(model, "layers.0/attn/o_proj") == (64, 64)
    _zeroed(src, tmp_path / "zeroed.onnx", 1, slice(0, 32))
    _assert_same(tmp_path / "zeroed.onnx", tmp_path / "pruned.onnx", feeds)


def _dequantized(path: Path, out: Path) -> None:
    """``path`` with every MatMulNBits replaced by a float MatMul of the weight it dequantizes to."""
    proto = onnx.load(path)
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        k, n, bits, block = a["K"], a["N"], a.get("bits", 4), a["block_size"]
        assert len(node.input) == 3, "the builder writes B and scales only"
        b = numpy_helper.to_array(inits[node.input[1]])
        per = 8 // bits
        codes = ((b[..., None] >> (np.arange(per) * bits).astype(np.uint8)) & ((1 << bits) - 1)).reshape(n, -1, block)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1, 1)
        w = ((codes.astype(np.float32) - (1 << (bits - 1))) * scales).reshape(n, -1)[:, :k].T
        proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), f"{node.name}.w"))
        nodes.append(helper.make_node("MatMul", [node.input[0], f"{node.name}.w"], list(node.output), name=node.name))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.save(proto, out)


def _paper_rule_like_float_twin(src: Path, feeds: dict[str, np.ndarray], tmp_path: Path) -> None:
    """The run-time rule (``HeadSelect`` -> ``HeadSlice`` of int4 blocks) on ``src`` picks and slices as
    on its dequantized float twin (float activations: the two agree to ~1e-6 before pruning)."""
    _dequantized(src, tmp_path / "float.onnx")
    outs = {}
    for name, path in (("int4", src), ("float", tmp_path / "float.onnx")):
        model = load_model(path)
        Pipeline([make_pass("unfuse-ort"), make_pass("normalize"), make_pass("decompose-attention"),
                  make_pass("prune-heads", schedule=(1.0, 0.5))], check=True)(model)
        save_model(model, tmp_path / f"{name}.pruned.onnx", external_data=False)
        outs[name] = run_ort(tmp_path / f"{name}.pruned.onnx", feeds)
        if name == "int4":
            assert any(n.op_type == "HeadSlice" and nbits.is_nbits(n.outputs[0].uses()[0].node) for n in model.graph)
    for k, v in outs["float"].items():
        np.testing.assert_allclose(outs["int4"][k], v, atol=1e-4, rtol=0, err_msg=k)


def test_builder_int4_paper_rule_gathers_whole_blocks(tmp_path) -> None:
    """Packed QKV with a cache: Q/K/V whole (the core gathers the kept heads), the output projection's
    K blocks gathered."""
    from bench.coverage import float_activations

    rng = np.random.default_rng(6)
    feeds = {"input_ids": rng.integers(3, 48, (1, 5)).astype(np.int64), "attention_mask": np.ones((1, 8), np.int64),
             "position_ids": np.arange(3, 8)[None].astype(np.int64),
             **{f"past_key_values.{i}.{t}": rng.standard_normal((1, 2, 3, 16)).astype(np.float32)
                for i in range(2) for t in ("key", "value")}}
    _paper_rule_like_float_twin(float_activations(MODELS / "builder" / "llama_int4.onnx", tmp_path), feeds, tmp_path)


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory) -> tuple[Path, Path]:
    """Llama (4 layers, 4 heads, 2 KV groups, head dim 16) through ``spattenc --weights int4`` (blocks of
    32: a group's 32 rows are one block), and its float compile quantized with blocks of 64."""
    from spatten_compiler.passes.ort_quantize import quantize_int4

    from spatten_compiler.cli import main

    d = tmp_path_factory.mktemp("int4")
    dense = ["-q", "--no-token-pruning", "--no-kv-eviction", "--kv-bits", "none"]
    assert main([str(MODELS / "llama_torchscript.onnx"), "-o", str(d / "int4.onnx"), *dense, "--weights", "int4"]) == 0
    assert main([str(MODELS / "llama_torchscript.onnx"), "-o", str(d / "float.onnx"), *dense]) == 0
    onnx.save(quantize_int4(onnx.load(d / "float.onnx"), block_size=64), d / "int4_64.onnx")
    return d / "int4.onnx", d / "int4_64.onnx"


def test_weights_int4_output_recompiled_with_heads(tmp_path, llama_int4) -> None:
    src = llama_int4[0]
    model = _pruned(src, tmp_path / "pruned.onnx", ((), (), (0,), (1,)))
    assert _nbits_dims(model, "layers.3/self_attn/o_proj") == (32, 64)
    assert _nbits_dims(model, "layers.3/self_attn/q_proj") == (64, 32)  # KV cache: K and V stay whole
    assert _nbits_dims(model, "layers.3/self_attn/k_proj") == (64, 32)
    feeds, _ = reference_io(load_meta("llama_torchscript"))
    _zeroed(src, tmp_path / "z3.onnx", 3, slice(0, 32))
    _zeroed(tmp_path / "z3.onnx", tmp_path / "zeroed.onnx", 2, slice(32, 64))
    _assert_same(tmp_path / "zeroed.onnx", tmp_path / "pruned.onnx", feeds)


def test_group_narrower_than_a_block_refused(llama_int4) -> None:
    model = load_model(llama_int4[1])
    with pytest.raises(OptionError, match="not whole blocks of 64.*head groups of 32 rows") as e:
        Pipeline([make_pass("normalize"), make_pass("decompose-attention"),
                  make_pass("prune-heads", rule="calibrated", heads=((), (), (), (1,)))], check=True)(model)
    assert "\n" not in str(e.value)
    assert not any(n.name.startswith("spatten_heads") for n in model.graph)  # refused before any edit


def test_paper_rule_refuses_groups_narrower_than_a_block(llama_int4) -> None:
    model = load_model(llama_int4[1])
    with pytest.raises(OptionError, match="head groups of 32 rows are not whole blocks of 64.*--head-rule calibrated"):
        Pipeline([make_pass("normalize"), make_pass("decompose-attention"),
                  make_pass("prune-heads", keep=0.5)], check=True)(model)


def test_int4_projections_count_their_flops(llama_int4) -> None:
    """The compile report counts a MatMulNBits as its K x N weight: the int4 model's per-token FLOPs are
    the float model's."""
    from spatten_compiler.report import linear_flops_per_token

    def flops(path: Path) -> list[tuple[int, int]]:
        model = load_model(path)
        Normalize()(model)
        return [linear_flops_per_token(s) for s in find_attention(model).sites]

    assert flops(llama_int4[0]) == flops(llama_int4[0].parent / "float.onnx")
    assert all(pre > 0 and post > 0 for pre, post in flops(llama_int4[0]))


def test_reordered_rows_are_refused() -> None:
    proto, _ = _quantized(4, "none", False, False, np.random.default_rng(0))
    g_idx = numpy_helper.from_array((np.arange(K)[::-1] // BLOCK).astype(np.int32), "g_idx")
    proto.graph.initializer.append(g_idx)
    proto.graph.node[0].input.extend(["", "g_idx"])
    node = next(iter(ir.serde.deserialize_model(proto).graph))
    assert "reorders rows by g_idx" in nbits.row_blocks(nbits.layout(node), np.r_[0:16])


def test_weights_int4_paper_rule_gathers_whole_blocks(tmp_path, llama_int4) -> None:
    """Separate q/k/v projections with a cache: Q's columns (B, scales by output row) and the output
    projection's K blocks gathered at run time."""
    feeds, _ = reference_io(load_meta("llama_torchscript"))
    _paper_rule_like_float_twin(llama_int4[0], feeds, tmp_path)
