"""Attention written in other layouts than [B, S, D] MatMuls: SqueezeBERT's pointwise Conv1d projections on a
channels-first [B, D, S] hidden state (the Transposes moved through element-wise ops until they cancel),
XLNet's einsums on a sequence-first [S, B, D] one with its mask subtracted from the scores. Hand-built graphs
for each normalize rule (pointwise Conv1d -> MatMul, einsum -> Transpose/MatMul, ``scores - term``) against
onnxruntime; the committed corpus exports (``models/families/``, ``python models/corpus.py --only
squeezebert,xlnet --exporters torchscript``): discovered, heads exact; SqueezeBERT's channels-first Transposes
cancel (tokens exact), XLNet's sequence-first hidden state is refused in one line by token pruning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import structural_graphs
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.prune_tokens import PruneTokens
from test_prune_tokens_families import stack

from spatten_compiler.errors import OptionError
from spatten_compiler.modelio import load_model

FAMILIES = Path(__file__).resolve().parents[1] / "models" / "families"
N = helper.make_node


def _model(nodes: list, inits: dict[str, np.ndarray], inputs: list, output: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _normalized_model(proto: onnx.ModelProto) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    return model


def _normalized(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    model = _normalized_model(proto)
    return ir.serde.serialize_model(model), [n.op_type for n in model.graph]


def _conv(kernel: int, groups: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 8 // groups, kernel)).astype(np.float32)
    return _model([N("Conv", ["x", "w", "b"], ["y"], group=groups, kernel_shape=[kernel])],
                  {"w": w, "b": rng.standard_normal(12).astype(np.float32)},
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8, "S"])], "y")


@pytest.mark.parametrize("groups", [1, 4])
def test_pointwise_conv_is_a_matmul(groups: int) -> None:
    """Conv1d kernel 1 on [B, C, S] (grouped: a block-diagonal weight) -> Transpose, MatMul, Add, Transpose."""
    proto = _conv(1, groups)
    x = np.random.default_rng(1).standard_normal((2, 8, 5)).astype(np.float32)
    out, ops = _normalized(proto)
    assert "Conv" not in ops and ops.count("MatMul") == 1 and ops.count("Transpose") == 2
    np.testing.assert_allclose(_run(out, {"x": x}), _run(proto, {"x": x}), atol=1e-5)


def test_wider_conv_stays() -> None:
    """A kernel-3 convolution mixes neighbouring tokens: not a projection, left alone."""
    assert "Conv" in _normalized(_conv(3, 1))[1]


EINSUMS = {  # equation, operand shapes (None: a constant weight of that shape)
    "permutation": ("ijbn->bnij", [(5, 5, 2, 1)]),
    "projection": ("ibh,hnd->ibnd", [(5, 2, 8), None, (8, 2, 4)]),
    "merge": ("ibnd,hnd->ibh", [(5, 2, 2, 4), None, (8, 2, 4)]),
    "scores": ("ibnd,jbnd->bnij", [(5, 2, 3, 4), (6, 2, 3, 4)]),
    "context": ("bnij,jbnd->ibnd", [(2, 3, 5, 6), (6, 2, 3, 4)]),
}


@pytest.mark.parametrize("case", sorted(EINSUMS))
def test_einsum_lowered(case: str) -> None:
    """Each einsum form -> Transpose / MatMul / Reshape, the same numbers in onnxruntime."""
    equation, shapes = EINSUMS[case]
    rng = np.random.default_rng(2)
    feeds, inits, names = {}, {}, []
    for i, shape in enumerate(shapes):
        if shape is None:
            continue
        weight = i > 0 and shapes[i - 1] is None
        (inits if weight else feeds)[f"t{i}"] = rng.standard_normal(shape).astype(np.float32)
        names.append(f"t{i}")
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in feeds.items()]
    proto = _model([N("Einsum", names, ["y"], equation=equation)], inits, inputs, "y")
    out, ops = _normalized(proto)
    assert "Einsum" not in ops
    np.testing.assert_allclose(_run(out, feeds), _run(proto, feeds), atol=1e-5)


def test_trace_einsum_stays() -> None:
    proto = _model([N("Einsum", ["x"], ["y"], equation="ii->i")], {},
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])], "y")
    assert "Einsum" in _normalized(proto)[1]


def _subtracted_mask() -> onnx.ModelProto:
    """The structural layer with its padding mask subtracted (XLNet: ``scores - 1e30 * mask``)."""
    proto = structural_graphs.build()
    g = proto.graph
    add = next(n for n in g.node if n.output[0] == "masked")
    g.initializer.append(numpy_helper.from_array(np.float32(1e4), "pos_fill"))
    mul = next(n for n in g.node if n.output[0] == "add2d")
    mul.input[1] = "pos_fill"
    add.op_type = "Sub"
    return proto


def test_subtracted_mask_found_and_kept_subtracted() -> None:
    """``Sub(scores, mask)``: a padding mask like an added one; prune-tokens replaces it by its own mask,
    subtracted too. Two layers, layer 1 selecting every token on padded inputs: the real tokens' rows equal
    the input model's (with the sign lost, every query would attend to the padding only)."""
    proto = stack(_subtracted_mask())
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    sites = find_attention(model).sites
    assert len(sites) == 2 and all(s.mask_kind == "padding" and s.mask_node.op_type == "Sub" for s in sites)
    PruneTokens(schedule=(1.0, 0.999), emit_kept=True, min_keep=1)(model)
    feeds = structural_graphs.feeds(seq=6)
    got = _run(ir.serde.serialize_model(model), feeds)
    real = feeds["mask"].astype(bool)
    np.testing.assert_allclose(got[real], _run(proto, feeds)[real], atol=1e-5)


FIXTURES = ("squeezebert_torchscript", "xlnet_torchscript")


def _normalized_fixture(name: str) -> ir.Model:
    model = load_model(FAMILIES / f"{name}.onnx")
    Normalize()(model)
    return model


@pytest.mark.parametrize("name", FIXTURES)
def test_family_discovered(name: str) -> None:
    report = find_attention(_normalized_fixture(name))
    got = {(s.num_heads, s.num_kv_heads, s.head_dim, s.mask_kind, s.own_keys) for s in report.sites}
    assert len(report.sites) == 2 and got == {(4, 4, 16, "padding", True)}, report.rejected
    assert all(s.out_proj is not None and s.residual is not None for s in report.sites)


@pytest.mark.parametrize("name", FIXTURES)
def test_family_heads_exact(name: str, tmp_path: Path) -> None:
    """keep 1.0 exact; the last layer without head 0 == its output-projection rows zeroed (onnxruntime)."""
    from bench.coverage import heads

    ok, why = heads(FAMILIES / f"{name}.onnx", dict(np.load(FAMILIES / f"{name}.npz")), tmp_path)
    assert ok and "last layer without group 0" in why, why


def test_squeezebert_tokens_exact(tmp_path: Path) -> None:
    """The channels-first Transposes cancel through the residual sums: the hidden state is [B, S, D] again
    and prune-tokens (keep 1.0, every token selected after layer 0) equals the input model."""
    from bench.coverage import tokens

    name = "squeezebert_torchscript"
    rec = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_dim": 16, "kv_cache": False}
    ok, why = tokens(FAMILIES / f"{name}.onnx", dict(np.load(FAMILIES / f"{name}.npz")), tmp_path, rec)
    assert ok, why


def test_xlnet_tokens_refused_naming_the_layout() -> None:
    with pytest.raises(OptionError, match=r"sequence-first \[S, B, D\]"):
        PruneTokens(keep=0.5)(_normalized_fixture("xlnet_torchscript"))


def test_channels_first_transposes_cancel() -> None:
    """x [B, S, D] -> channels-first -> pointwise Conv, Relu, pointwise Conv, + the channels-first input ->
    back to [B, S, D]: after normalize no Transpose is left (each one met its inverse), same numbers."""
    rng = np.random.default_rng(7)
    w1, w2 = (rng.standard_normal((8, 8, 1)).astype(np.float32) * 0.3 for _ in range(2))
    nodes = [N("Transpose", ["x"], ["xc"], perm=[0, 2, 1]),
             N("Conv", ["xc", "w1", "b1"], ["h1"], kernel_shape=[1]), N("Relu", ["h1"], ["r1"]),
             N("Conv", ["r1", "w2"], ["h2"], kernel_shape=[1], group=2),
             N("Mul", ["h2", "half"], ["h2s"]), N("Add", ["h2s", "xc"], ["sum"]),
             N("Transpose", ["sum"], ["y"], perm=[0, 2, 1])]
    proto = _model(nodes, {"w1": w1, "b1": rng.standard_normal(8).astype(np.float32),
                           "w2": w2[:, :4], "half": np.float32(0.5)},
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])], "y")
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    out, ops = _normalized(proto)
    assert "Transpose" not in ops and "Conv" not in ops, ops
    np.testing.assert_allclose(_run(out, {"x": x}), _run(proto, {"x": x}), atol=1e-5)


def _bottleneck(proto: onnx.ModelProto) -> onnx.ModelProto:
    """MobileBERT: Q and K read one projection of the layer input, the residual adds another (the
    bottleneck), V reads the input itself."""
    g = proto.graph
    rng = np.random.default_rng(4)
    D = structural_graphs.D
    for name in ("w_b", "w_r"):
        g.initializer.append(numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32) * 0.3, name))
    g.node.insert(0, N("MatMul", ["x", "w_b"], ["xb"], name="bottleneck_attention"))
    g.node.insert(1, N("MatMul", ["x", "w_r"], ["xr"], name="bottleneck_input"))
    for node in g.node:
        if node.op_type == "MatMul" and node.input[1] in ("w_q", "w_k"):
            node.input[0] = "xb"
        if node.output[0] == "y":
            node.input[0] = "xr"
    return proto


def test_bottleneck_residual_is_the_layer() -> None:
    """The residual adds a projection of the hidden state Q's projection reads: the layer input is that
    hidden state; token pruning (every token selected after layer 0) equals the input model; pruning
    right after the softmax (which gathers the residual's input) is refused in one line."""
    proto = stack(_bottleneck(structural_graphs.build()))
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    sites = find_attention(model).sites
    assert [s.layer_input.name for s in sites] == ["x", "l0_y"] and all(s.residual is not None for s in sites)
    PruneTokens(schedule=(1.0, 0.999), emit_kept=True, min_keep=1)(model)
    feeds = structural_graphs.feeds(seq=6)
    feeds["mask"][:] = 1
    np.testing.assert_allclose(_run(ir.serde.serialize_model(model), feeds), _run(proto, feeds), atol=1e-5)
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    with pytest.raises(OptionError, match="bottleneck"):
        PruneTokens(schedule=(1.0, 0.5), prune_point="after-attention")(model)


def _two_streams() -> onnx.ModelProto:
    """LiLT: a text stream x [B, S, 8] (2 heads of 4) and a layout stream lay [B, S, 4] (2 heads of 2); each
    stream's Softmax is over its own scores plus the other stream's, and weighs its own values."""
    rng = np.random.default_rng(3)
    nodes: list = []
    inits: dict[str, np.ndarray] = {}

    def c(name: str, a) -> str:
        inits[name] = np.asarray(a)
        return name

    streams = (("t", "l", "x", 8, 4), ("l", "t", "lay", 4, 2))
    for s, _, src, width, dh in streams:
        for p in "qkv":
            w = c(f"w_{s}{p}", rng.standard_normal((width, 2 * dh)).astype(np.float32) * 0.3)
            nodes += [N("MatMul", [src, w], [f"{s}{p}_mm"]),
                      N("Reshape", [f"{s}{p}_mm", c(f"split_{s}{p}", np.array([0, 0, 2, dh]))], [f"{s}{p}_4d"]),
                      N("Transpose", [f"{s}{p}_4d"], [f"{s}{p}_h"], perm=[0, 2, 1, 3])]
        nodes += [N("Transpose", [f"{s}k_h"], [f"{s}_kt"], perm=[0, 1, 3, 2]),
                  N("MatMul", [f"{s}q_h", f"{s}_kt"], [f"{s}_qk"]),
                  N("Div", [f"{s}_qk", c(f"{s}_scale", np.float32(np.sqrt(dh)))], [f"{s}_s"])]
    nodes += [N("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
              N("Sub", [c("one", np.float32(1)), "maskf"], ["inv"]),
              N("Mul", ["inv", c("fill", np.float32(-1e4))], ["add2d"]),
              N("Unsqueeze", ["add2d", c("axes", np.array([1, 2]))], ["add4d"])]
    for s, other, src, width, dh in streams:
        nodes += [N("Add", [f"{s}_s", f"{other}_s"], [f"{s}_sum"]),
                  N("Add", [f"{s}_sum", "add4d"], [f"{s}_masked"]),
                  N("Softmax", [f"{s}_masked"], [f"{s}_p"], axis=-1),
                  N("MatMul", [f"{s}_p", f"{s}v_h"], [f"{s}_ctx"]),
                  N("Transpose", [f"{s}_ctx"], [f"{s}_ctx_t"], perm=[0, 2, 1, 3]),
                  N("Reshape", [f"{s}_ctx_t", c(f"merge_{s}", np.array([0, 0, 2 * dh]))], [f"{s}_flat"]),
                  N("MatMul", [f"{s}_flat", c(f"w_{s}o", rng.standard_normal((2 * dh, width)).astype(np.float32))],
                    [f"{s}_o"]),
                  N("Add", [src, f"{s}_o"], [f"y_{s}"])]
    graph = helper.make_graph(
        nodes, "lilt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8]),
                        helper.make_tensor_value_info("lay", TensorProto.FLOAT, ["B", "S", 4]),
                        helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info(f"y_{s}", TensorProto.FLOAT, None) for s in "tl"],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_two_streams_found_and_pruned_together_or_not_at_all() -> None:
    """Each Softmax's scores are the ones whose queries come from the hidden state its values do; the other
    stream's scores are a term. The two sites are coupled: token pruning and head pruning that removes
    heads of either refuse in one line; keeping every head is allowed."""
    from spatten_compiler.passes.prune_heads import PruneHeads
    from spatten_compiler.passes.site_io import coupled_site

    model = ir.serde.deserialize_model(_two_streams())
    Normalize()(model)
    sites = find_attention(model).sites
    assert sorted(s.head_dim for s in sites) == [2, 4] and all(len(s.bias_terms) == 1 for s in sites)
    assert all(s.q.projection.input is s.v.projection.input for s in sites)
    assert coupled_site(sites[0], sites) is sites[1]
    with pytest.raises(OptionError, match="terms of each other's"):
        PruneTokens(keep=0.5)(model)
    with pytest.raises(OptionError, match="pruned as one set"):
        PruneHeads(rule="calibrated", heads=((0,), (0, 1)))(model)


def _beside_branch(proto: onnx.ModelProto) -> onnx.ModelProto:
    """ConvBERT: the attention's heads [B, S, H, Dh] joined on the head axis with another branch's head
    (a projection of the input, standing in for the convolution), one output projection over both."""
    g = proto.graph
    D, H, DH = structural_graphs.D, structural_graphs.H, structural_graphs.DH
    rng = np.random.default_rng(6)
    g.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((D, DH)).astype(np.float32) * 0.3, "w_conv"),
        numpy_helper.from_array(np.array([0, 0, 1, DH]), "conv_split"),
        numpy_helper.from_array(rng.standard_normal(((H + 1) * DH, D)).astype(np.float32) * 0.3, "w_o_all")])
    merge = next(n for n in g.node if n.output[0] == "ctx_flat")
    at = list(g.node).index(merge)
    for i, node in enumerate([N("MatMul", ["x", "w_conv"], ["conv_mm"], name="conv_mm"),
                              N("Reshape", ["conv_mm", "conv_split"], ["conv_h"], name="conv_h"),
                              N("Concat", ["ctx_t", "conv_h"], ["both"], axis=2, name="both")]):
        g.node.insert(at + i, node)
    merge.input[0] = "both"
    next(i for i in g.initializer if i.name == "merge").CopyFrom(
        numpy_helper.from_array(np.array([0, 0, (H + 1) * DH]), "merge"))
    next(n for n in g.node if n.output[0] == "o").input[1] = "w_o_all"
    return proto


def test_heads_beside_another_branch(tmp_path: Path) -> None:
    """The output projection is found through the Concat (token pruning with every token selected equals
    the input model); head pruning refuses in one line naming the Concat."""
    from spatten_compiler.passes.prune_heads import PruneHeads

    proto = stack(_beside_branch(structural_graphs.build()))
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    sites = find_attention(model).sites
    assert len(sites) == 2 and all(s.beside is not None and s.out_proj is not None for s in sites)
    with pytest.raises(OptionError, match="Concat 'l0_both' joins the attention's heads"):
        PruneHeads(rule="calibrated", heads=((0, 1), (1,)))(model)
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    PruneTokens(schedule=(1.0, 0.999), emit_kept=True, min_keep=1)(model)
    feeds = structural_graphs.feeds(seq=6)
    feeds["mask"][:] = 1
    np.testing.assert_allclose(_run(ir.serde.serialize_model(model), feeds), _run(proto, feeds), atol=1e-5)


def test_flattened_tokens_through_a_regrouping() -> None:
    """``B * S * 96 // 48`` (dynamo's view of a regrouped [B, S, 32, 3]) has the token count as a factor."""
    from spatten_compiler.passes.prune_tokens import _flattens_tokens

    scalar = lambda name: numpy_helper.from_array(np.array(0 if name == "i0" else 1), name)  # noqa: E731
    nodes = [N("Shape", ["x"], ["shape"]), N("Gather", ["shape", "i0"], ["b"]), N("Gather", ["shape", "i1"], ["s"]),
             N("Mul", ["b", "s"], ["bs"]), N("Mul", ["bs", "c96"], ["bs96"]), N("Div", ["bs96", "c48"], ["piece"]),
             N("Div", ["bs96", "bs"], ["not_a_factor"]), N("Mul", ["b", "c96"], ["no_tokens"])]
    inits = [scalar("i0"), scalar("i1"), numpy_helper.from_array(np.array(96), "c96"),
             numpy_helper.from_array(np.array(48), "c48")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 4])],
                              [helper.make_tensor_value_info(o, TensorProto.INT64, []) for o in
                               ("piece", "not_a_factor", "no_tokens")], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph))
    out = {v.name: v for v in model.graph.outputs}
    sources = set(model.graph.inputs)
    assert _flattens_tokens(out["piece"], sources)
    assert not _flattens_tokens(out["not_a_factor"], sources) and not _flattens_tokens(out["no_tokens"], sources)


def test_routed_projection_refused_naming_the_router() -> None:
    """JetMoE's mixture of attention: Q's rows are written by a router's choice (TopK indices into a
    scatter), so no head is a fixed slice of weights; the Softmax is refused naming the router."""
    proto = structural_graphs.build()
    g = proto.graph
    g.initializer.extend([numpy_helper.from_array(np.array([1]), "k1"), numpy_helper.from_array(np.array([0]), "s0"),
                          numpy_helper.from_array(np.array([1]), "e1"), numpy_helper.from_array(np.array([-1]), "ax")])
    reshape = next(n for n in g.node if n.output[0] == "q_4d")
    at = list(g.node).index(reshape)
    for i, node in enumerate([N("TopK", ["x", "k1"], ["top_v", "top_i"], axis=-1, name="router"),
                              N("Slice", ["q_flat", "s0", "e1", "ax"], ["q_first"], name="q_first"),
                              N("ScatterElements", ["q_flat", "top_i", "q_first"], ["q_routed"], axis=-1,
                                name="q_routed")]):
        g.node.insert(at + i, node)
    reshape.input[0] = "q_routed"
    report = find_attention(_normalized_model(proto))
    assert not report.sites and "router's TopK" in report.rejected[0][1], report.rejected


@pytest.mark.parametrize(("axis", "beside"), [(2, True), (-1, True), (1, False), (0, False)])
def test_beside_only_on_the_head_or_feature_axis(axis: int, beside: bool) -> None:
    """A Concat on the token axis joins chunks of a sequence (CANINE's local attention), not heads."""
    from spatten_compiler.passes.find_attention import _beside

    x = ir.Value(name="x", shape=ir.Shape([2, 5, 2, 4]))
    probs = ir.Node("", "Softmax", [x]).outputs[0]
    pv = ir.Node("", "MatMul", [probs, x])
    heads = ir.Node("", "Transpose", [pv.outputs[0]], attributes=[ir.AttrInt64s("perm", [0, 2, 1, 3])]).outputs[0]
    heads.shape = ir.Shape([2, 5, 2, 4])
    other = ir.Value(name="conv", shape=ir.Shape([2, 5, 2, 4]))
    node = ir.Node("", "Concat", [heads, other], attributes=[ir.AttrInt64("axis", axis)])
    assert _beside(node, heads, pv) is beside
