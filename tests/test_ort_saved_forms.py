"""Forms onnxruntime's saved extended-level models leave in a dynamo export once its fused ops are
unfused (whose shapes are then inferred again, the exporter's dim names gone): a QKV split kept as
SplitToSequence + SequenceAt, a Split whose parts' head counts onnx leaves unknown, RoPE's rotate_half
halves as one Split, and views whose token axis is no longer named. Tiny graphs; the real exports are
in test_postprocessed_input.py and ``bench coverage --format ortext``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from spatten_compiler.passes.attention_patterns import ROPE
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.token_axis import flow_axis, token_axis

from spatten_compiler.errors import OptionError
from spatten_compiler.match import NoMatch, match
from spatten_compiler.shapes import infer_shapes


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _qkv_sequence(split: np.ndarray, last: int = -1) -> onnx.ModelProto:
    """x [B, S, 96] -> SplitToSequence(split, axis 2) -> SequenceAt 0, 1, 2 (GPT-2's dynamo c_attn)."""
    nodes = [helper.make_node("Relu", ["x"], ["h"]),  # x's shape is not known past this op in the test
             helper.make_node("SplitToSequence", ["h", "split"], ["seq"], axis=2),
             *[helper.make_node("SequenceAt", ["seq", f"i{i}"], [f"p{i}"]) for i in range(3)],
             helper.make_node("Concat", ["p2", "p0", "p1"], ["y"], axis=2)]
    inits = [("split", split), *[(f"i{i}", np.array(last if i == 2 else i, np.int64)) for i in range(3)]]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "S", 96])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", "S", 96])
    return _model(nodes, [x], [y], inits)


@pytest.mark.parametrize(("split", "last", "op"), [(np.array([64, 16, 16], np.int64), -1, "Split"),
                                                   (np.array(32, np.int64), -1, "Split"),
                                                   (np.array(32, np.int64), 2, "Slice")])
def test_split_to_sequence_read_by_constant_indices_becomes_split(split, last, op) -> None:
    """Sizes as a 1-D constant (no shape needed) or one chunk size of a static axis: one Split; a chunk
    of an axis not known (DeBERTa's per-head [B, H, S, 3*Dh]) read at indices >= 0: a Slice per read.
    No sequence op left, same values (index -1 included where the part count is known)."""
    proto = _qkv_sequence(split, last)
    if op == "Slice":
        proto.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "D"
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    ops = [n.op_type for n in model.graph]
    assert op in ops and "SequenceAt" not in ops and "SplitToSequence" not in ops, ops
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 96)).astype(np.float32)}
    np.testing.assert_array_equal(_run(ir.serde.serialize_model(model), feeds)[0], _run(proto, feeds)[0])


def test_split_to_sequence_read_otherwise_stays() -> None:
    """A sequence another op reads (here SequenceLength) is left as it is: zero matches."""
    proto = _qkv_sequence(np.array([64, 16, 16], np.int64))
    proto.graph.node.append(helper.make_node("SequenceLength", ["seq"], ["n"]))
    proto.graph.output.append(helper.make_tensor_value_info("n", onnx.TensorProto.INT64, []))
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    assert "SplitToSequence" in [n.op_type for n in model.graph]


def test_split_parts_get_their_sizes_when_the_axis_is_unknown() -> None:
    """Falcon's fused projection ``[B, S, 96]`` viewed as ``[B, S, -1, 16]`` (H + 2 unknown to onnx) and
    split [4, 1, 1] on that axis: the parts are [B, S, 4, 16] / [B, S, 1, 16], and what reads them too."""
    nodes = [helper.make_node("Shape", ["x"], ["bs"], end=2),
             helper.make_node("Concat", ["bs", "tail"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["v"]),
             helper.make_node("Split", ["v", "sizes"], ["q", "k", "w"], axis=-2),
             helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1, 3])]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "S", 96])
    out = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("qt", "k", "w")]
    model = ir.serde.deserialize_model(_model(nodes, [x], out, [("tail", np.array([-1, 16], np.int64)),
                                                                 ("sizes", np.array([4, 1, 1], np.int64))]))
    infer_shapes(model)
    values = {o.name: o for n in model.graph for o in n.outputs}
    assert values["v"].shape.dims[2] not in (4, 6)  # onnx cannot tell H + 2 here
    assert values["q"].shape.dims[2:] == (4, 16) and values["k"].shape.dims[2:] == (1, 16)
    assert values["qt"].shape.dims[1] == 4


@pytest.mark.parametrize("halves", ["Slice", "Split"])
def test_rope_rotate_half_from_slices_or_one_split(halves) -> None:
    """rotate_half's halves as two Slices (exporters) or one Split (onnxruntime's GatherSliceToSplitFusion)."""
    if halves == "Slice":
        cut = [helper.make_node("Slice", ["x", "h", "end", "ax"], ["x2"]),
               helper.make_node("Slice", ["x", "zero", "h", "ax"], ["x1"])]
    else:
        cut = [helper.make_node("Split", ["x", "sizes"], ["x1", "x2"], axis=-1)]
    nodes = [*cut, helper.make_node("Neg", ["x2"], ["n2"]), helper.make_node("Concat", ["n2", "x1"], ["rot"], axis=-1),
             helper.make_node("Mul", ["x", "cos"], ["a"]), helper.make_node("Mul", ["rot", "sin"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    ins = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["B", 4, "S", 16]) for n in ("x", "cos", "sin")]
    inits = [("h", np.array([8], np.int64)), ("end", np.array([16], np.int64)), ("ax", np.array([-1], np.int64)),
             ("zero", np.array([0], np.int64)), ("sizes", np.array([8, 8], np.int64))]
    model = ir.serde.deserialize_model(_model(nodes, ins, [helper.make_tensor_value_info("y", 1, None)], inits))
    y = model.graph.outputs[0]
    found = match(ROPE, y)
    assert not isinstance(found, NoMatch), found
    assert found["x"] is model.graph.inputs[0]
    assert isinstance(match(ROPE, model.graph.inputs[1]), NoMatch)


def _bloom_view() -> tuple[ir.Model, ir.Value, ir.Value]:
    """BLOOM's fused QKV ``[B, S, 192]`` viewed ``[B, S, 4, 3, 16]`` (target read from the inputs' sizes),
    split on the 3, squeezed and transposed to ``[B, 4, S, 16]``; every dim named anew (unk__*), as after
    onnxruntime's saved model is unfused and inferred again. Returns the model, the layer input, and the
    value the head-folding view ``[B * 4, S, 16]`` reads."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["qkv"]),
             helper.make_node("Shape", ["ids"], ["b"], end=1),
             helper.make_node("Shape", ["ids"], ["s"], start=1, end=2),
             helper.make_node("Concat", ["b", "s", "tail"], ["target"], axis=0),
             helper.make_node("Reshape", ["qkv", "target"], ["v"]),
             helper.make_node("Split", ["v", "sizes"], ["q", "k", "vv"], axis=3),
             helper.make_node("Squeeze", ["q", "three"], ["q3"]),
             helper.make_node("Transpose", ["q3"], ["qt"], perm=[0, 2, 1, 3])]
    ins = [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "sequence"]),
           helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "sequence", 64])]
    inits = [("w", np.zeros((64, 192), np.float32)), ("tail", np.array([4, 3, 16], np.int64)),
             ("sizes", np.array([1, 1, 1], np.int64)), ("three", np.array([3], np.int64))]
    model = ir.serde.deserialize_model(_model(nodes, ins, [helper.make_tensor_value_info("qt", 1, None)], inits))
    infer_shapes(model)
    values = {o.name: o for n in model.graph for o in n.outputs}
    qt = values["qt"]
    qt.shape = ir.Shape([ir.SymbolicDim(f"unk__{i}") if not isinstance(d, int) else d
                         for i, d in enumerate(qt.shape.dims)])
    return model, model.graph.inputs[1], qt


def test_token_axis_from_the_data_flow_when_dims_are_unnamed() -> None:
    """The view reads the sequence length: its data's token axis is 2 (the Reshape's piece at 1, moved by
    the Transpose), not the head axis 1 the old fallback took (a view of the wrong size that failed in
    onnxruntime on BLOOM and XGLM saved by onnxruntime)."""
    from spatten_compiler.passes.prune_tokens import _piece_axes, _reads_input_seq_len

    model, x, qt = _bloom_view()
    flow = flow_axis(qt, {*model.graph.inputs, x}, _reads_input_seq_len, _piece_axes)
    assert flow == 2
    assert token_axis(qt, model.graph, aligned=2, flow=flow) == 2
    # without the data flow: axis 1 holds a fixed 4 (heads), so the one later dynamic axis
    assert token_axis(qt, model.graph, aligned=2, flow=None) == 2


def test_token_axis_flows_through_a_feature_concat() -> None:
    """A partial rotary joins the rotated and passed-through features on the last axis: the token axis (2)
    flows through; joined on the token axis itself (a cache) it does not. GPT-NeoX's opset-23 SDPA export
    depends on it: the attention output's view has no inferred shape, and prune-tokens rebound its target
    with the layer input's axis 1 (the heads), a model that failed in onnxruntime."""
    from spatten_compiler.passes.prune_tokens import _piece_axes, _reads_input_seq_len

    model, x, qt = _bloom_view()
    sources = {*model.graph.inputs, x}
    for axis, want in ((-1, 2), (3, 2), (2, None)):
        node = ir.node("Concat", [qt, qt], attributes={"axis": axis})
        model.graph.append(node)
        out = node.outputs[0]
        assert flow_axis(out, sources, _reads_input_seq_len, _piece_axes) == want, axis
        out.shape = None  # no shape: the axis comes from the data flow alone (rank from the pieces)
        assert flow_axis(out, sources, _reads_input_seq_len, _piece_axes) == want, axis


def test_token_axis_refused_when_no_axis_can_hold_tokens() -> None:
    """Every axis after the batch fixed and none the export's token count: refused, never guessed."""
    model, _, qt = _bloom_view()
    qt.shape = ir.Shape([ir.SymbolicDim("unk__0"), 4, 5, 16])
    with pytest.raises(OptionError, match="token axis"):
        token_axis(qt, model.graph, aligned=2, flow=None)


def test_structural_walk_reads_a_head_axis_split_part() -> None:
    """Falcon's fused ``[B, S, H + 2G, Dh]`` split [4, 1, 1] on the head axis, then an op the step table
    does not know (here Erf), so the structural walk finds the projection: the branch has the part's 4
    heads, not the view's 6 (6 made prune-heads and the preset write a model that failed in onnxruntime)."""
    from spatten_compiler.passes.attention_trace import trace_branch

    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]), helper.make_node("Reshape", ["p", "t"], ["v"]),
             helper.make_node("Split", ["v", "sizes"], ["q", "k", "vv"], axis=-2),
             helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1, 3]), helper.make_node("Erf", ["qt"], ["y"])]
    inits = [("w", np.zeros((64, 96), np.float32)), ("t", np.array([0, 0, 6, 16], np.int64)),
             ("sizes", np.array([4, 1, 1], np.int64))]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "S", 64])
    model = ir.serde.deserialize_model(_model(nodes, [x], [helper.make_tensor_value_info("y", 1, None)], inits))
    infer_shapes(model)
    branch = trace_branch(model.graph.outputs[0], model.graph)
    assert branch.transform is not None  # the structural walk, not the table
    assert (branch.heads, branch.head_dim, branch.head_slice, branch.flat_width) == (4, 16, (0, 4), 64)
