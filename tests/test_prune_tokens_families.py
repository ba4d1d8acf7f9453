"""prune-tokens beyond plain encoders (issue #16): position terms on the scores, RoPE, decoder prompts
(causal mask, last token kept), a layer scale and a parallel residual, attention sinks (GPT-OSS),
on two-layer hand-built graphs and on the corpus (``corpus`` marker). Checks: all tokens selected ==
the input model; keep < 1: onnxruntime == reference runtime and the kept set == a NumPy computation of
the rule."""

from __future__ import annotations

import math

import attention_graphs
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import packed_graphs
import pytest
import structural_graphs
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.prune_tokens import PruneTokens
from spatten_compiler.runtime.reference import ReferenceRuntime
from test_prune_tokens import _rule_in_numpy
from test_structural_discovery import CORPUS, _corpus

from spatten_compiler.errors import OptionError


def _layer_scale(proto: onnx.ModelProto) -> onnx.ModelProto:
    """DINOv2/BEiT: the output projection is scaled per channel before the residual Add."""
    g = proto.graph
    add = next(n for n in g.node if n.output[0] == "y")
    gamma = numpy_helper.from_array(np.linspace(0.5, 1.5, structural_graphs.D).astype(np.float32), "gamma")
    g.initializer.append(gamma)
    g.node.insert(list(g.node).index(add), helper.make_node("Mul", [add.input[1], "gamma"], ["scaled"], name="ls"))
    add.input[1] = "scaled"
    return proto


def _post_norm(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Gemma 2 / OLMo 2: a norm of the attention branch before the residual Add (RMSNorm, decomposed)."""
    g = proto.graph
    add = next(n for n in g.node if n.output[0] == "y")
    g.initializer.extend([numpy_helper.from_array(np.float32(2), "pn_two"),
                          numpy_helper.from_array(np.array([-1]), "pn_ax"),
                          numpy_helper.from_array(np.float32(1e-6), "pn_eps")])
    at = list(g.node).index(add)
    for i, node in enumerate([helper.make_node("Pow", [add.input[1], "pn_two"], ["pn_sq"], name="pn_sq"),
                              helper.make_node("ReduceMean", ["pn_sq", "pn_ax"], ["pn_ms"], name="pn_ms", keepdims=1),
                              helper.make_node("Add", ["pn_ms", "pn_eps"], ["pn_mse"], name="pn_mse"),
                              helper.make_node("Sqrt", ["pn_mse"], ["pn_rms"], name="pn_rms"),
                              helper.make_node("Div", [add.input[1], "pn_rms"], ["pn_out"], name="pn_out")]):
        g.node.insert(at + i, node)
    add.input[1] = "pn_out"
    return proto


def _sub_norm(proto: onnx.ModelProto, op: str = "rms") -> onnx.ModelProto:
    """BitNet's attn_sub_norm / Sub-LN: a norm over all heads between the head merge and the output
    projection (RMS decomposed as transformers writes it, or one LayerNormalization)."""
    g = proto.graph
    o = next(n for n in g.node if n.op_type == "MatMul" and n.input[1] == "w_o")
    width = structural_graphs.H * structural_graphs.DH
    g.initializer.extend([numpy_helper.from_array(np.float32(2), "sn_two"),
                          numpy_helper.from_array(np.array([-1]), "sn_ax"),
                          numpy_helper.from_array(np.float32(1e-6), "sn_eps"),
                          numpy_helper.from_array(np.linspace(0.5, 1.5, width).astype(np.float32), "sn_gamma"),
                          numpy_helper.from_array(np.full(width, 0.1, np.float32), "sn_beta")])
    if op == "rms":
        nodes = [helper.make_node("Pow", [o.input[0], "sn_two"], ["sn_sq"]),
                 helper.make_node("ReduceMean", ["sn_sq", "sn_ax"], ["sn_ms"], keepdims=1),
                 helper.make_node("Add", ["sn_ms", "sn_eps"], ["sn_mse"]),
                 helper.make_node("Sqrt", ["sn_mse"], ["sn_rms"]),
                 helper.make_node("Reciprocal", ["sn_rms"], ["sn_inv"]),
                 helper.make_node("Mul", [o.input[0], "sn_inv"], ["sn_normed"]),
                 helper.make_node("Mul", ["sn_gamma", "sn_normed"], ["sn_out"])]
    else:
        nodes = [helper.make_node("LayerNormalization", [o.input[0], "sn_gamma", "sn_beta"], ["sn_out"], axis=-1)]
    at = list(g.node).index(o)
    for i, node in enumerate(nodes):
        node.name = node.output[0]
        g.node.insert(at + i, node)
    o.input[0] = "sn_out"
    return proto


def _parallel(proto: onnx.ModelProto) -> onnx.ModelProto:
    """GPT-J/NeoX: y = (attn + mlp(x)) + x."""
    g = proto.graph
    add = next(n for n in g.node if n.output[0] == "y")
    w = numpy_helper.from_array(np.random.default_rng(3).standard_normal((structural_graphs.D,) * 2)
                                .astype(np.float32) * 0.3, "w_mlp")
    g.initializer.append(w)
    g.node.extend([helper.make_node("MatMul", ["x", "w_mlp"], ["mlp"], name="mlp"),
                   helper.make_node("Add", [add.input[1], "mlp"], ["attn_mlp"], name="par")])
    g.node.remove(add)
    g.node.append(helper.make_node("Add", ["attn_mlp", "x"], ["y"], name="res"))
    return proto


def _parallel_after_residual(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Cohere: y = (x + attn) + mlp(x) - the MLP branch joins after the residual Add."""
    g = proto.graph
    res = next(n for n in g.node if n.output[0] == "y")
    res.output[0] = "x_attn"
    w = numpy_helper.from_array(np.random.default_rng(4).standard_normal((structural_graphs.D,) * 2)
                                .astype(np.float32) * 0.3, "w_mlp")
    g.initializer.append(w)
    g.node.extend([helper.make_node("MatMul", ["x", "w_mlp"], ["mlp"], name="mlp"),
                   helper.make_node("Add", ["x_attn", "mlp"], ["y"], name="par_after")])
    return proto


def _mask_multiplied(proto: onnx.ModelProto) -> onnx.ModelProto:
    """XLM: every layer's output times the padding mask, y = layer(x) * mask[:, :, None]."""
    g = proto.graph
    last = next(n for n in g.node if n.output[0] == "y")
    last.output[0] = "y_unmasked"
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "mm_axis"))
    g.node.extend([helper.make_node("Cast", ["mask"], ["mm_f"], to=TensorProto.FLOAT, name="mm_cast"),
                   helper.make_node("Unsqueeze", ["mm_f", "mm_axis"], ["mm_col"], name="mm_col"),
                   helper.make_node("Mul", ["y_unmasked", "mm_col"], ["y"], name="mm_mul")])
    return proto


def _square_mask(proto: onnx.ModelProto) -> onnx.ModelProto:
    """SDPA / opset-23 Attention exports: the padding mask expanded to [B, 1, S, S] (query rows too)."""
    g = proto.graph
    add = next(n for n in g.node if n.output[0] == "masked")
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "sq_one"))
    at = list(g.node).index(add)
    for i, node in enumerate([helper.make_node("Shape", ["x"], ["sq_b"], start=0, end=1, name="sq_b"),
                              helper.make_node("Shape", ["x"], ["sq_s"], start=1, end=2, name="sq_s"),
                              helper.make_node("Concat", ["sq_b", "sq_one", "sq_s", "sq_s"], ["sq_shape"], axis=0,
                                               name="sq_shape"),
                              helper.make_node("Expand", ["add4d", "sq_shape"], ["sq_mask"], name="sq_mask")]):
        g.node.insert(at + i, node)
    add.input[1] = "sq_mask"
    return proto


def _llama(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Llama/SmolLM2 (TorchScript): q/k/v read an RMSNorm-like ``xn = x * g`` and the head merge is
    ``reshape(*xn.shape[:-1], -1)``: its target reads the *normed* input's length, not the layer input's."""
    g = proto.graph
    N = helper.make_node
    g.initializer.extend([numpy_helper.from_array(np.linspace(0.5, 1.5, structural_graphs.D).astype(np.float32), "g_norm"),
                          numpy_helper.from_array(np.array(0, np.int64), "i0"),
                          numpy_helper.from_array(np.array(1, np.int64), "i1"),
                          numpy_helper.from_array(np.array([0], np.int64), "ax0"),
                          numpy_helper.from_array(np.array([-1], np.int64), "minus1")])
    for n in g.node:
        if n.op_type == "MatMul" and n.input[0] == "x":
            n.input[0] = "xn"
        if n.op_type == "Reshape" and n.input[1] == "merge":
            n.input[1] = "merge_shape"
    merge = [N("Shape", ["xn"], ["xn_shape"]), N("Gather", ["xn_shape", "i0"], ["xn_b"], axis=0),
             N("Gather", ["xn_shape", "i1"], ["xn_s"], axis=0), N("Unsqueeze", ["xn_b", "ax0"], ["xn_b1"]),
             N("Unsqueeze", ["xn_s", "ax0"], ["xn_s1"]),
             N("Concat", ["xn_b1", "xn_s1", "minus1"], ["merge_shape"], axis=0)]
    for i, node in enumerate([N("Mul", ["x", "g_norm"], ["xn"]), *merge]):
        g.node.insert(i, node)
    return proto


def _unsqueezed_views(proto: onnx.ModelProto) -> onnx.ModelProto:
    """GPT-BigCode (dynamo): the projection is unsqueezed to ``[B, 1, S, H*Dh]`` before the head split,
    whose target reads the graph input's length - the token axis of the reshaped data is 2, not 1."""
    g = proto.graph
    N = helper.make_node
    H, DH = structural_graphs.H, structural_graphs.DH
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "uq_ax1"),
                          numpy_helper.from_array(np.array([H, DH], np.int64), "uq_hd")])
    at = 0
    for node in list(g.node):
        if node.op_type == "Reshape" and node.input[1].startswith("shape_"):
            t = node.input[1][len("shape_"):]
            new = [N("Unsqueeze", [node.input[0], "uq_ax1"], [f"uq_{t}"]),
                   N("Shape", ["x"], [f"uq_b_{t}"], start=0, end=1), N("Shape", ["x"], [f"uq_s_{t}"], start=1, end=2),
                   N("Concat", [f"uq_b_{t}", f"uq_s_{t}", "uq_hd"], [f"uq_shape_{t}"], axis=0)]
            at = list(g.node).index(node)
            for i, n in enumerate(new):
                g.node.insert(at + i, n)
            node.input[:] = [f"uq_{t}", f"uq_shape_{t}"]
    return proto


def _static_views(proto: onnx.ModelProto) -> onnx.ModelProto:
    """DINOv2 / BEiT (dynamo): the input length is fixed by the export (patches + CLS), and the head
    split's target holds it as a constant piece, ``[B, 6, -1, Dh]``; pruning must rebind that piece."""
    g = proto.graph
    N = helper.make_node
    g.input[0].type.tensor_type.shape.dim[1].dim_value = 6
    g.initializer.extend([numpy_helper.from_array(np.array([6], np.int64), "st_len"),
                          numpy_helper.from_array(np.array([-1, structural_graphs.DH], np.int64), "st_hd")])
    for node in list(g.node):
        if node.op_type == "Reshape" and node.input[1].startswith("shape_"):
            t = node.input[1][len("shape_"):]
            at = list(g.node).index(node)
            for i, n in enumerate([N("Shape", ["x"], [f"st_b_{t}"], start=0, end=1),
                                   N("Concat", [f"st_b_{t}", "st_len", "st_hd"], [f"st_shape_{t}"], axis=0)]):
                g.node.insert(at + i, n)
            node.input[1] = f"st_shape_{t}"
    return proto


def _folded(alibi: bool = False) -> onnx.ModelProto:
    """XGLM/BLOOM/DeBERTa-v2: heads folded into the batch ``[B*H, S, Dh]`` (packed_graphs' folded
    layout) and a padding mask added in a ``[B, H, S, S]`` view of the 3-D scores, both views' targets
    from the graph input's shape (dynamo), the views' symbolic shapes recorded as the exporters do.
    ``alibi``: BLOOM's ``[B*H, 1, S]`` term ``slope_h * ((CumSum(mask) - 1) * mask)`` on the 3-D scores."""
    proto = packed_graphs.build("folded")
    g = proto.graph
    N = helper.make_node
    H = packed_graphs.H
    g.input.append(helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"]))
    g.initializer.extend([numpy_helper.from_array(np.array([H], np.int64), "fd_h"),
                          numpy_helper.from_array(np.array([1, 2], np.int64), "fd_ax12"),
                          numpy_helper.from_array(np.float32(1), "fd_one"),
                          numpy_helper.from_array(np.float32(-1e9), "fd_big")])
    soft = next(n for n in g.node if n.op_type == "Softmax")
    at = list(g.node).index(soft)
    new = [N("Shape", ["x"], ["fd_b"], start=0, end=1), N("Shape", ["x"], ["fd_s"], start=1, end=2),
           N("Concat", ["fd_b", "fd_h", "fd_s", "fd_s"], ["fd_unfold"], axis=0),
           N("Reshape", [soft.input[0], "fd_unfold"], ["fd_s4"]),
           N("Cast", ["mask"], ["fd_mf"], to=TensorProto.FLOAT), N("Sub", ["fd_one", "fd_mf"], ["fd_inv"]),
           N("Mul", ["fd_inv", "fd_big"], ["fd_bias"]), N("Unsqueeze", ["fd_bias", "fd_ax12"], ["add4d"]),
           N("Add", ["fd_s4", "add4d"], ["masked"]),
           N("Mul", ["fd_b", "fd_h"], ["fd_bh"]), N("Concat", ["fd_bh", "fd_s", "fd_s"], ["fd_fold"], axis=0),
           N("Reshape", ["masked", "fd_fold"], ["fd_s3"])]
    if alibi:
        g.initializer.extend([numpy_helper.from_array(np.array([0.5, 0.25, 0.125, 0.0625], np.float32)[:H]
                                                      .reshape(1, H, 1), "fd_slopes"),
                              numpy_helper.from_array(np.int64(1), "fd_i1"),
                              numpy_helper.from_array(np.array([1], np.int64), "fd_ax1"),
                              numpy_helper.from_array(np.array([-1, 1], np.int64), "fd_m1_1")])
        new = [N("CumSum", ["mask", "fd_i1"], ["fd_cs"]), N("Sub", ["fd_cs", "fd_i1"], ["fd_p"]),
               N("Mul", ["fd_p", "mask"], ["fd_pm"]), N("Cast", ["fd_pm"], ["fd_pf"], to=TensorProto.FLOAT),
               N("Unsqueeze", ["fd_pf", "fd_ax1"], ["fd_p3"]), N("Mul", ["fd_slopes", "fd_p3"], ["fd_al"]),
               N("Shape", ["mask"], ["fd_ms"], start=1, end=2),
               N("Concat", ["fd_m1_1", "fd_ms"], ["fd_al_shape"], axis=0),
               N("Reshape", ["fd_al", "fd_al_shape"], ["fd_alibi"]),
               N("Add", [soft.input[0], "fd_alibi"], ["fd_biased"])] + new
        new[new.index(next(n for n in new if n.output[0] == "fd_s4"))].input[0] = "fd_biased"
        g.value_info.append(helper.make_tensor_value_info("fd_alibi", TensorProto.FLOAT, [None, 1, "S"]))
    for i, n in enumerate(new):
        g.node.insert(at + i, n)
    soft.input[0] = "fd_s3"
    g.value_info.extend([helper.make_tensor_value_info("fd_s4", TensorProto.FLOAT, ["B", H, "S", "S"]),
                         helper.make_tensor_value_info("masked", TensorProto.FLOAT, ["B", H, "S", "S"])])
    return proto


def stack(proto: onnx.ModelProto, shared_positions: bool = True, layers: int = 2) -> onnx.ModelProto:
    """``layers`` copies of a one-layer graph (x, mask -> y) in sequence. Positions and shapes in all
    read the graph input ``x`` (as exporters compute them once from input_ids; unless not
    ``shared_positions``: a layer measures its own input), the data path the previous layer's output."""
    nodes, inits = [], []
    for layer in range(layers):
        rename = lambda n, layer=layer: n if n in ("mask", "") else (  # noqa: E731
            "x" if n == "x" and layer == 0 else f"l{layer}_{n}")
        for init in proto.graph.initializer:
            t = onnx.TensorProto()
            t.CopyFrom(init)
            t.name = rename(init.name)
            inits.append(t)
        for node in proto.graph.node:
            n = onnx.NodeProto()
            n.CopyFrom(node)
            n.name = f"l{layer}_{node.name or node.output[0]}"
            for i, name in enumerate(node.input):
                n.input[i] = "x" if name == "x" and (layer == 0 or node.op_type == "Shape" and shared_positions) else (
                    f"l{layer - 1}_y" if name == "x" else rename(name))
            for i, name in enumerate(node.output):
                n.output[i] = rename(name)
            nodes.append(n)
    x, mask = proto.graph.input[0], proto.graph.input[1]
    out = helper.make_tensor_value_info(f"l{layers - 1}_y", TensorProto.FLOAT, ["B", "S", structural_graphs.D])
    model = helper.make_model(helper.make_graph(nodes, "two", [x, mask], [out], inits),
                              opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    onnx.checker.check_model(model)
    return model


CASES = {
    "t5_buckets": lambda: structural_graphs.build(bias="buckets"),
    "alibi": lambda: structural_graphs.build(bias="alibi"),
    # MPT: an [H, 1, S] term, the last S columns of a fixed table (the length read from the layer's K: TorchScript;
    # from the graph input: dynamo)
    "mpt_alibi": lambda: structural_graphs.build(bias="mpt"),
    "mpt_alibi_input": lambda: structural_graphs.build(bias="mpt_input"),
    "partial_rope": lambda: structural_graphs.build(qk="partial_rope"),
    "interleaved_rope": lambda: structural_graphs.build(qk="interleaved_rope"),
    "rope_table": lambda: attention_graphs.build(rope=True),
    "layer_scale": lambda: _layer_scale(structural_graphs.build()),
    "post_norm": lambda: _post_norm(structural_graphs.build()),
    "sub_norm": lambda: _sub_norm(structural_graphs.build()),
    "sub_layer_norm": lambda: _sub_norm(structural_graphs.build(), op="layer"),
    "parallel_residual": lambda: _parallel(structural_graphs.build()),
    "parallel_after_residual": lambda: _parallel_after_residual(structural_graphs.build()),
    "mask_multiplied": lambda: _mask_multiplied(structural_graphs.build()),
    "decoder": lambda: attention_graphs.build(mask="causal+additive"),
    "square_mask": lambda: _square_mask(structural_graphs.build()),
    "decoder_rope": lambda: attention_graphs.build(mask="causal+additive", rope=True),
    "llama": lambda: _llama(attention_graphs.build(mask="causal+additive", rope=True, kv_heads=1)),
    "unsqueezed_views": lambda: _unsqueezed_views(structural_graphs.build()),
    "static_views": lambda: _static_views(structural_graphs.build()),
    "folded": _folded,
    "folded_alibi": lambda: _folded(alibi=True),
    # GPT-OSS: a learned sink column concatenated to the scores, sliced off P; its broadcast shape reads
    # the graph input's length (re-broadcast to the kept tokens)
    "sinks": lambda: structural_graphs.build(sink="after"),
    "sinks_before": lambda: structural_graphs.build(sink="before"),
    "llama_sinks": lambda: structural_graphs.with_sink(
        _llama(attention_graphs.build(mask="causal+additive", rope=True, kv_heads=1))),
}
DECODER = {"decoder", "decoder_rope", "llama", "llama_sinks"}


def _compile(proto: onnx.ModelProto, tmp_path, name: str = "o", **opts) -> str:
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    PruneTokens(emit_kept=True, min_keep=1, **opts)(model)
    path = str(tmp_path / f"{name}.onnx")
    ir.save(model, path)
    return path


def _run(path_or_proto, feeds: dict) -> dict:
    src = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _feeds(seq: int = 6, pad: bool = True) -> dict:
    x = np.random.default_rng(5).standard_normal((2, seq, structural_graphs.D)).astype(np.float32)
    mask = np.ones((2, seq), np.int64)
    if pad:
        mask[1, -2:] = 0
    return {"x": x, "mask": mask}


@pytest.mark.parametrize("case", sorted(CASES))
def test_discovered_with_layer_io(case: str) -> None:
    model = ir.serde.deserialize_model(stack(CASES[case]()))
    Normalize()(model)
    sites = find_attention(model).sites
    assert len(sites) == 2 and all(s.layer_input is not None and s.layer_output is not None for s in sites)
    assert sites[1].layer_input.name == "l0_y" and (case not in DECODER or sites[1].mask_kind.startswith("causal"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_all_tokens_selected_equals_input(case: str, tmp_path) -> None:
    """Layer 1 selects all S tokens (0.999): token, mask, position-term and RoPE gathers run, exactly."""
    proto = stack(CASES[case]())
    feeds = _feeds(pad=False)
    got = _run(_compile(proto, tmp_path, schedule=(1.0, 0.999)), feeds)
    assert got["spatten_kept_positions.0"].shape == (2, 6)
    np.testing.assert_allclose(got["l1_y"], _run(proto, feeds)["l1_y"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_after_attention_all_tokens_equals_input(case: str, tmp_path) -> None:
    """Pruning right after layer 0's softmax, through a per-token norm on the branch (a post-norm,
    Sub-LN); a parallel block (MLP of the full input added to the attention output) is refused in one
    line."""
    proto = stack(CASES[case]())
    if case == "parallel_residual":  # the branch joins another before the residual
        with pytest.raises(OptionError, match="before the residual"):
            _compile(proto, tmp_path, schedule=(1.0, 0.999), prune_point="after-attention")
        return
    if case == "parallel_after_residual":  # Cohere: the MLP of the full input joins after it
        with pytest.raises(OptionError, match="a branch computed beside the attention"):
            _compile(proto, tmp_path, schedule=(1.0, 0.999), prune_point="after-attention")
        return
    if case.startswith("folded"):  # the in-layer row gather is per sample, folded probabilities per (sample, head)
        with pytest.raises(OptionError, match="folded into the batch"):
            _compile(proto, tmp_path, schedule=(1.0, 0.999), prune_point="after-attention")
        return
    feeds = _feeds(pad=False)
    got = _run(_compile(proto, tmp_path, schedule=(1.0, 0.999), prune_point="after-attention"), feeds)
    np.testing.assert_allclose(got["l1_y"], _run(proto, feeds)["l1_y"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(set(CASES) - {"parallel_residual", "parallel_after_residual",
                                                      "folded", "folded_alibi"}))
def test_after_attention_pruned_ort_equals_reference(case: str, tmp_path) -> None:
    """keep 0.5 right after layer 0's softmax (the decoder presets' prune point): the post-attention
    part runs on 3 of 6 tokens - reshape targets read the kept count, including Llama's head merge
    built from the normed input's shape (SmolLM2 no-cache failed at o_proj before) - and onnxruntime
    equals the reference runtime; a decoder's last real token is among the kept."""
    proto = stack(CASES[case]())
    feeds = _feeds()
    path = _compile(proto, tmp_path, schedule=(1.0, 0.5), prune_point="after-attention")
    got = _run(path, feeds)
    reference = ReferenceRuntime(path).run(feeds).outputs
    for k, v in got.items():
        np.testing.assert_allclose(reference[k], v, atol=1e-4, rtol=0, err_msg=k)
    assert got["spatten_kept_positions.0"].shape == (2, 3)
    if case in DECODER:
        assert all(int(feeds["mask"][b].sum()) - 1 in got["spatten_kept_positions.0"][b] for b in range(2))


@pytest.mark.parametrize("case", sorted(CASES))
def test_pruned_ort_equals_reference_and_numpy_rule(case: str, tmp_path) -> None:
    proto = stack(CASES[case]())
    feeds = _feeds()
    path = _compile(proto, tmp_path, schedule=(1.0, 0.5))
    got = _run(path, feeds)
    reference = ReferenceRuntime(path).run(feeds).outputs
    for k, v in got.items():
        np.testing.assert_allclose(reference[k], v, atol=1e-4, rtol=0, err_msg=k)
    # the kept set: SpAtten's rule on layer 0's probabilities (the input model's own Softmax)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(helper.make_empty_tensor_value_info("l0_probs"))
    probs = _run(probe, feeds)["l0_probs"]
    protect = "first+last" if case in DECODER else "first"
    expected = _rule_in_numpy([probs], feeds["mask"], [1.0, 0.5], protect=protect)
    kept = got["spatten_kept_positions.0"]
    assert kept.shape[1] == math.ceil(6 * 0.5)
    for b in range(2):
        np.testing.assert_array_equal(np.flatnonzero(got["spatten_kept_mask"][b]), expected[b][0])
        if case in DECODER:  # the last real token is computed, not restored
            assert int(feeds["mask"][b].sum()) - 1 in kept[b]


def test_decoder_last_row_is_computed_at_any_keep(tmp_path) -> None:
    """At keep 0.2 (2 of 6 tokens) a decoder keeps only its protected tokens: the first and the last;
    the last row of the output is the layer's real computation on them (the rest restored)."""
    proto = stack(CASES["decoder"]())
    feeds = _feeds(pad=False)
    got = _run(_compile(proto, tmp_path, schedule=(1.0, 0.2)), feeds)
    np.testing.assert_array_equal(got["spatten_kept_positions.0"], [[0, 5], [0, 5]])
    # layer 1 of the input model run on layer 0's outputs at tokens {0, 5} alone
    x1 = _run(_probe(proto, "l0_y"), feeds)["l0_y"][:, [0, 5]]
    layer1 = _single_layer(proto)
    want = _run(layer1, {"x": x1, "mask": np.ones((2, 2), np.int64)})["y"]
    np.testing.assert_allclose(got["l1_y"][:, 5], want[:, 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["decoder", "llama"])
def test_decoder_recent_window_is_kept(case: str, tmp_path) -> None:
    """``recent=0.5``: each sample keeps its last ``floor(0.5 * kper)`` real tokens (8 tokens, keep 0.75:
    k = 6, the full sample keeps 5..7; the one with 6 real tokens has kper 5, keeps 4..5), plus the
    first; onnxruntime == reference runtime, at both prune points."""
    proto = stack(CASES[case]())
    feeds = _feeds(seq=8)
    for point in ("layer-input", "after-attention"):
        path = _compile(proto, tmp_path, schedule=(1.0, 0.75), recent=0.5, prune_point=point)
        got = _run(path, feeds)
        mask = got["spatten_kept_mask"]
        assert mask[0, [0, 5, 6, 7]].all() and mask[1, [0, 4, 5]].all() and not mask[1, 6:].any()
        reference = ReferenceRuntime(path).run(feeds).outputs
        for k, v in got.items():
            np.testing.assert_allclose(reference[k], v, atol=1e-4, rtol=0, err_msg=k)


def _probe(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    return probe


def _single_layer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Layer 1 of a stacked model as its own model: input x = layer 1's input (l0_y)."""
    g = proto.graph
    nodes = []
    for n in g.node:
        if not n.name.startswith("l1_"):
            continue
        m = onnx.NodeProto()
        m.CopyFrom(n)
        for i, name in enumerate(m.input):
            m.input[i] = "x" if name == "l0_y" else name
        nodes.append(m)
    inits = [i for i in g.initializer if i.name.startswith("l1_")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes[-1].output[0] = "y" if nodes[-1].output[0] == "l1_y" else nodes[-1].output[0]
    for n in nodes:
        for i, name in enumerate(n.input):
            n.input[i] = "y" if name == "l1_y" else name
        for i, name in enumerate(n.output):
            n.output[i] = "y" if name == "l1_y" else name
    return helper.make_model(helper.make_graph(nodes, "l1", list(g.input), [out], inits),
                             opset_imports=list(proto.opset_import))


@pytest.mark.parametrize("case", ["mpt_alibi", "mpt_alibi_input", "alibi"])
def test_key_term_reads_the_kept_tokens_original_positions(case: str, tmp_path) -> None:
    """A key-only position term (ALiBi; MPT's [H, 1, S] cut from a fixed table by the layer's own length,
    which the rewrite cuts at the full length instead): pruned layer 1's kept rows == the input model's
    layer 1 on the full sequence with the dropped tokens masked out - the kept keys keep their original
    positions (cut at the kept count, they would get positions 0..k-1)."""
    proto = stack(CASES[case]())
    feeds = _feeds(pad=False)
    got = _run(_compile(proto, tmp_path, schedule=(1.0, 0.5)), feeds)
    kept = got["spatten_kept_mask"].astype(np.int64)
    assert kept.sum() == 6 and not kept[:, :3].all()  # not a prefix: positions matter
    x1 = _run(_probe(proto, "l0_y"), feeds)["l0_y"]
    want = _run(_single_layer(proto), {"x": x1, "mask": kept})["y"]
    for b in range(2):
        rows = np.flatnonzero(kept[b])
        np.testing.assert_allclose(got["l1_y"][b, rows], want[b, rows], atol=1e-5, rtol=0)


def test_key_term_cut_by_a_length_other_than_tokens_is_refused(tmp_path) -> None:
    """MPT's table cut by a length read from K's batch axis, not its token axis (compiled only): what the
    cut is at the full length is not known, so the term is refused (computed from the pruned input)."""
    proto = structural_graphs.build(bias="mpt")
    next(i for i in proto.graph.initializer if i.name == "mpt_i2").CopyFrom(
        numpy_helper.from_array(np.int64(0), "mpt_i2"))
    with pytest.raises(OptionError, match="computed from the pruned layer input's length"):
        _compile(stack(proto), tmp_path, schedule=(1.0, 0.5))


def test_square_masks_with_run_time_heads(tmp_path) -> None:
    """Run-time head pruning carries head scores from layer to layer, so layer 0's data path reaches
    layer 1's scores; layer 1's own [B, 1, S, S] mask must still be rewritten with layer 1's kept
    tokens (not gathered on one axis with layer 0's): onnxruntime == the reference runtime."""
    from spatten_compiler.cli import main

    src, out = tmp_path / "sq.onnx", tmp_path / "sq_out.onnx"
    onnx.save(stack(_square_mask(structural_graphs.build()), layers=3), src)
    assert main([str(src), "-o", str(out), "-q", "--token-keep", "0.5", "--token-min-keep", "1",
                 "--head-keep", "0.5"]) == 0
    feeds = _feeds(seq=8)
    got = _run(str(out), feeds)
    reference = ReferenceRuntime(str(out)).run(feeds).outputs
    for k, v in got.items():
        np.testing.assert_allclose(reference[k], v, atol=1e-4, rtol=0, err_msg=k)


def test_term_from_the_pruned_length_is_refused(tmp_path) -> None:
    """Layer 1's T5 bias / RoPE angles computed from layer 1's own (pruned) input length would describe
    positions 0..k-1, not the kept ones: a one-line refusal, not a wrong rewrite."""
    for proto in (structural_graphs.build(bias="buckets"), structural_graphs.build(qk="partial_rope")):
        with pytest.raises(OptionError, match="computed from the pruned layer input's length"):
            _compile(stack(proto, shared_positions=False), tmp_path, schedule=(1.0, 0.5))


def _sliced_table(proto: onnx.ModelProto) -> onnx.ModelProto:
    """y += table[:S] with S read from the layer's own input: a learned position table cut to its length."""
    g = proto.graph
    last = next(n for n in g.node if n.output[0] == "y")
    last.output[0] = "y_no_table"
    table = np.random.default_rng(6).standard_normal((64, structural_graphs.D)).astype(np.float32)
    g.initializer.extend([numpy_helper.from_array(table, "pos_table"),
                          numpy_helper.from_array(np.array([0], np.int64), "tb_0")])
    g.node.extend([helper.make_node("Shape", ["x"], ["tb_s"], start=1, end=2, name="tb_s"),
                   helper.make_node("Slice", ["pos_table", "tb_0", "tb_s", "tb_0"], ["tb_rows"], name="tb_rows"),
                   helper.make_node("Add", ["y_no_table", "tb_rows"], ["y"], name="tb_add")])
    return proto


def test_shape_only_zeros_follow_the_pruned_length_a_sliced_table_not(tmp_path) -> None:
    """``zeros_like`` of an in-layer value (MoE routers, X-MOD) is the same at every position: layer 1
    prunes; a position table sliced to the layer's own (pruned) length would be rows 0..k-1: refused."""
    proto = _sliced_table(structural_graphs.build())
    with pytest.raises(OptionError, match="computed from the pruned layer input's length"):
        _compile(stack(proto, shared_positions=False), tmp_path, schedule=(1.0, 0.5))
    g = proto.graph  # the table replaced by zeros of the layer's own shape
    rows = next(n for n in g.node if n.name == "tb_rows")
    g.node.remove(rows)
    g.node.insert(list(g.node).index(next(n for n in g.node if n.name == "tb_add")), helper.make_node(
        "ConstantOfShape", ["tb_shape"], ["tb_rows"], name="tb_rows", value=helper.make_tensor("z", TensorProto.FLOAT,
                                                                                             [1], [0.0])))
    g.node.insert(0, helper.make_node("Shape", ["x"], ["tb_shape"], name="tb_shape"))
    feeds = _feeds()
    proto2 = stack(proto, shared_positions=False)
    got = _run(_compile(proto2, tmp_path, schedule=(1.0, 0.999)), _feeds(pad=False))
    np.testing.assert_allclose(got["l1_y"], _run(proto2, _feeds(pad=False))["l1_y"], atol=1e-5, rtol=0)
    path = _compile(proto2, tmp_path, schedule=(1.0, 0.5))
    got = _run(path, feeds)
    for k, v in ReferenceRuntime(path).run(feeds).outputs.items():
        np.testing.assert_allclose(got[k], v, atol=1e-4, rtol=0, err_msg=k)


def test_kv_cache_points_to_evict_kv(tmp_path) -> None:
    with pytest.raises(OptionError, match="evict-kv"):
        _compile(attention_graphs.build(mask="causal+additive", cache=True), tmp_path, schedule=(1.0,))


def _corpus_tokens() -> list:
    wanted = {"mpnet", "roformer", "modernbert", "t5", "gpt2", "gpt_neo", "gptj", "llama", "dinov2", "beit",
              "gpt_bigcode", "mpt"}
    return [r for r in _corpus() if r["family"] in wanted and not r["kv_cache"]]


@pytest.mark.corpus
@pytest.mark.parametrize("rec", _corpus_tokens() or [None], ids=lambda r: r["name"] if r else "absent")
def test_corpus_pruned_ort_equals_reference(rec: dict | None, tmp_path) -> None:
    """keep 0.5 after layer 0 on a corpus model: onnxruntime == reference runtime, last token kept."""
    if rec is None:
        pytest.skip("no corpus: run python models/corpus.py")
    from bench.coverage import tokens

    feeds = dict(np.load(CORPUS / f"{rec['name']}.npz"))
    ok, why = tokens(CORPUS / rec["onnx"], feeds, tmp_path, rec)
    assert ok, why
    model = ir.load(str(CORPUS / rec["onnx"]))
    Normalize()(model)
    PruneTokens(schedule=(1.0, 0.5), emit_kept=True)(model)
    path = str(tmp_path / "p.onnx")
    ir.save(model, path)
    got = _run(path, feeds)
    reference = ReferenceRuntime(path).run(feeds).outputs
    for k, v in got.items():
        np.testing.assert_allclose(reference[k], v, atol=1e-4, rtol=0, err_msg=k)
    if rec["kind"] == "decoder":
        lens = feeds["attention_mask"].sum(1) - 1
        assert all(int(n) in row for n, row in zip(lens, got["spatten_kept_positions.0"]))


@pytest.mark.corpus
def test_corpus_mpt_exports_prune_alike(tmp_path) -> None:
    """MPT's ALiBi: TorchScript cuts the fixed table by the layer's own K length (cut at the full length by
    the rewrite), dynamo by the graph input's; pruned at keep 0.5 after layer 0, the two exports of one
    model keep the same tokens and give the same logits (the dense ones agree to 1e-6)."""
    recs = {r["exporter"]: r for r in _corpus() if r["family"] == "mpt" and not r["kv_cache"]}
    if {"torchscript", "dynamo"} - set(recs):
        pytest.skip("no MPT exports in the corpus: run python models/corpus.py --only mpt")
    got = {}
    for exporter, rec in recs.items():
        if exporter not in ("torchscript", "dynamo"):
            continue
        model = ir.load(str(CORPUS / rec["onnx"]))
        Normalize()(model)
        PruneTokens(schedule=(1.0, 0.5), min_keep=1, emit_kept=True)(model)
        path = str(tmp_path / f"{exporter}.onnx")
        ir.save(model, path)
        got[exporter] = _run(path, dict(np.load(CORPUS / f"{rec['name']}.npz")))
    ts, dy = got["torchscript"], got["dynamo"]
    np.testing.assert_array_equal(ts["spatten_kept_positions.0"], dy["spatten_kept_positions.0"])
    np.testing.assert_allclose(ts["logits"], dy["logits"], atol=1e-4, rtol=0)


def test_attention_over_regrouped_tokens_is_refused(tmp_path) -> None:
    """Q/K/V projections that read the layer input's tokens regrouped (Swin's window partition; here
    reversed) do not attend over the layer's tokens: prune-tokens refuses in one line (Swin's dynamo
    export has static shapes, so nothing else stopped it and onnxruntime failed on the written model)."""
    proto = structural_graphs.build()
    g = proto.graph
    g.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
                         (("rev_start", -1), ("rev_end", -(2**62)), ("rev_axis", 1), ("rev_step", -1)))
    g.node.insert(0, helper.make_node("Slice", ["x", "rev_start", "rev_end", "rev_axis", "rev_step"], ["x_rev"]))
    for node in g.node:
        if node.op_type == "MatMul" and node.input[0] == "x" and node.input[1] in ("w_q", "w_k", "w_v"):
            node.input[0] = "x_rev"
    with pytest.raises(OptionError, match="the attention's rows are not the layer input's tokens"):
        _compile(stack(proto), tmp_path, schedule=(1.0, 0.5))


@pytest.mark.parametrize("case", ["parallel_residual", "parallel_after_residual", "folded"])
def test_after_attention_falls_back_to_layer_input(case: str, tmp_path, caplog) -> None:
    """The token rule's after-attention prune point, where a block does not allow it (a parallel
    block, heads folded into the batch): pruned at the next layer's
    input instead, with a warning, and onnxruntime equals the reference runtime. An explicit prune
    point refuses (test_after_attention_all_tokens_equals_input)."""
    proto = stack(CASES[case]())
    feeds = _feeds()
    with caplog.at_level("WARNING", logger="spatten_compiler.passes.prune_tokens"):
        path = _compile(proto, tmp_path, schedule=(1.0, 0.5), prune_point="after-attention",
                        prune_point_fallback=True)
    assert "pruning at the next layer's input instead" in caplog.text
    got = _run(path, feeds)
    reference = ReferenceRuntime(path).run(feeds).outputs
    for k, v in got.items():
        np.testing.assert_allclose(reference[k], v, atol=1e-4, rtol=0, err_msg=k)
    assert got["spatten_kept_positions.0"].shape == (2, 3)


def test_the_token_rule_prune_point_may_fall_back_an_explicit_one_not() -> None:
    from spatten_compiler.api import make_config

    (rule_pass,) = [p for p in make_config(token_keep=0.5).passes() if p.name == "prune-tokens"]
    (explicit,) = [p for p in make_config(token_keep=0.5, token_prune_point="after-attention").passes()
                   if p.name == "prune-tokens"]
    assert rule_pass.prune_point == explicit.prune_point == "after-attention"
    assert rule_pass.prune_point_fallback and not explicit.prune_point_fallback


def test_a_flattened_batch_times_tokens_piece_is_recognized() -> None:
    """dynamo's MoE experts view the tokens as [B * S, ...] with B * S multiplied from the inputs'
    sizes: prune-tokens rewrites that piece to -1 (qwen2_moe / olmoe / granitemoe dynamo exports ran
    into a Reshape of the full length; bench coverage tokens-0.5 on the sweep corpus runs them)."""
    from spatten_compiler.passes.prune_tokens import _flattens_tokens

    N = helper.make_node
    graph = helper.make_graph(
        [N("Shape", ["ids"], ["b"], start=0, end=1), N("Shape", ["mask"], ["s"], start=1, end=2),
         N("Mul", ["b", "s"], ["bs"]), N("Mul", ["b", "two"], ["b2"]), N("Reshape", ["bs", "m1"], ["bs_flat"])],
        "g", [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "S"]) for n in ("ids", "mask")],
        [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in ("bs_flat", "b2")],
        [numpy_helper.from_array(np.array([2], np.int64), "two"), numpy_helper.from_array(np.array([-1], np.int64), "m1")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    values = {o.name: o for n in model.graph for o in n.outputs}
    sources = set(model.graph.inputs)
    assert _flattens_tokens(values["bs_flat"], sources) and _flattens_tokens(values["bs"], sources)
    assert not _flattens_tokens(values["b2"], sources)


def test_a_constant_split_of_the_fixed_tokens_is_refused(tmp_path) -> None:
    """DINOv3's dynamo export (fixed image size) splits the tokens into [CLS + registers, patches]
    with constant sizes to rotate the patches only: prune-tokens refuses instead of writing a Split
    onnxruntime rejects."""
    proto = _static_views(structural_graphs.build())
    g = proto.graph
    seq = next(d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:2])
    g.initializer.append(numpy_helper.from_array(np.array([1, seq - 1], np.int64), "tok_split"))
    last = next(n for n in g.node if n.output[0] == "y")
    last.output[0] = "y_whole"
    g.node.extend([helper.make_node("Split", ["y_whole", "tok_split"], ["y_cls", "y_rest"], axis=1),
                   helper.make_node("Concat", ["y_cls", "y_rest"], ["y"], axis=1)])
    with pytest.raises(OptionError, match="cuts the export's fixed"):
        _compile(stack(proto), tmp_path, schedule=(1.0, 0.5))
