"""The normalize and matching rules tf2onnx's graphs needed, on tiny hand-built graphs (positive and
negative cases, each checked numerically against onnxruntime on the input graph):

* opset 13-16 raised to 17 (tf2onnx writes 15); older opsets left for the rewrites to refuse;
* ``Cast(Concat(int32 pieces), to=int64)`` -> ``Concat(int64 pieces)`` (reshape targets built in int32);
* ``Sub(Mul(x, keep), Mul(c, Sub(1, keep)))`` with a boolean ``keep`` -> ``Where(keep, x, -c)`` (TF GPT-2);
* two masks added in turn to the scores -> one summed mask (TF CTRL);
* a scalar added to the scores (Keras' stable_softmax: +1e-9) carried along, not counted as a mask;
* a Tile repeating only size-1 axes -> Expand (TF Mistral's K/V repeat);
* ``static_rank`` through Reshape / MatMul / Unsqueeze once the inferred shapes are dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.score_chain import score_chain, static_rank

N = helper.make_node
F, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _normalized(proto: onnx.ModelProto) -> tuple[ir.Model, onnx.ModelProto]:
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    return model, ir.serde.serialize_model(model)


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _producer(model: ir.Model, output: int = 0) -> ir.Node:
    return model.graph.outputs[output].producer()


def _softmax_model(opset: int) -> onnx.ModelProto:
    return _model([N("Add", ["x", "x"], ["s"]), N("Softmax", ["s"], ["y"], axis=-1)],
                  [helper.make_tensor_value_info("x", F, [2, 3])], [helper.make_tensor_value_info("y", F, [2, 3])],
                  opset=opset)


def test_opset_15_raised_to_17() -> None:
    proto = _softmax_model(15)
    model, out = _normalized(proto)
    assert model.opset_imports[""] == 17
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, {"x": x})[0], _run(proto, {"x": x})[0])


def test_opset_12_left_alone() -> None:
    model, _ = _normalized(_softmax_model(12))
    assert model.opset_imports[""] == 12  # the rewrites refuse it in one line (spatten_ops.ensure_functions)


def _reshape_with_int32_target(to: int) -> onnx.ModelProto:
    """Reshape(x [B, 8], Cast(Concat(Cast(Shape(x)[:1], int32), [2, 4] int32), to))."""
    nodes = [N("Shape", ["x"], ["shp"], end=1), N("Cast", ["shp"], ["b32"], to=I32),
             N("Concat", ["b32", "tail"], ["t32"], axis=0), N("Cast", ["t32"], ["target"], to=to),
             N("Reshape", ["x", "target"], ["y"]) if to == I64 else N("Identity", ["target"], ["y"])]
    out = helper.make_tensor_value_info("y", *((F, ["B", 2, 4]) if to == I64 else (to, [3])))
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["B", 8])], [out],
                  [numpy_helper.from_array(np.array([2, 4], np.int32), "tail")])


def test_shape_cast_pushed_onto_the_pieces() -> None:
    proto = _reshape_with_int32_target(I64)
    model, out = _normalized(proto)
    target = _producer(model).inputs[1].producer()
    assert target.op_type == "Concat"  # its constant entries are visible to the shape rewrites
    assert [p.const_value.numpy().tolist() for p in target.inputs if p.const_value is not None] == [[2, 4]]
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    np.testing.assert_array_equal(_run(out, {"x": x})[0], _run(proto, {"x": x})[0])


def test_float_cast_of_a_shape_left_alone() -> None:
    model, _ = _normalized(_reshape_with_int32_target(F))
    assert any(n.op_type == "Cast" and n.attributes["to"].value == F for n in model.graph)


def _arith_mask(keep_from_bool: bool, op: str = "Sub") -> onnx.ModelProto:
    """y = x * keep - 1e4 * (1 - keep) (op Sub) or x * keep + c * (1 - keep) (op Add)."""
    nodes = [N("Greater", ["a", "b"], ["gt"]), N("Cast", ["gt"], ["keep"], to=F)] if keep_from_bool else []
    nodes += [N("Mul", ["x", "keep"], ["gated"]), N("Sub", ["one", "keep"], ["off"]), N("Mul", ["c", "off"], ["rest"]),
              N(op, ["gated", "rest"], ["y"])]
    ins = [helper.make_tensor_value_info(n, F, [2, 4]) for n in ("x", *(("a", "b") if keep_from_bool else ("keep",)))]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(1e4 if op == "Sub" else -1e4, np.float32), "c")]
    return _model(nodes, ins, [helper.make_tensor_value_info("y", F, [2, 4])], inits)


def test_arithmetic_mask_becomes_where() -> None:
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((2, 4)).astype(np.float32) for k in ("x", "a", "b")}
    for op in ("Sub", "Add"):
        proto = _arith_mask(True, op)
        model, out = _normalized(proto)
        assert _producer(model).op_type == "Where", op
        np.testing.assert_array_equal(_run(out, feeds)[0], _run(proto, feeds)[0])


def test_arithmetic_mask_of_any_float_left_alone() -> None:
    """keep a float input: it may hold other values than 0 and 1, where the two forms differ."""
    model, _ = _normalized(_arith_mask(False))
    assert _producer(model).op_type == "Sub"


def _two_masks(m2_const: bool) -> onnx.ModelProto:
    """y = Softmax(Add(Add(MatMul(q, kt), m1), m2)); m2 a graph input (a mask) or a float table (a bias)."""
    nodes = [N("MatMul", ["q", "kt"], ["s"]), N("Add", ["s", "m1"], ["s1"]), N("Add", ["s1", "m2"], ["s2"]),
             N("Softmax", ["s2"], ["y"], axis=-1)]
    ins = [helper.make_tensor_value_info("q", F, [1, 2, 4, 3]), helper.make_tensor_value_info("kt", F, [1, 2, 3, 4]),
           helper.make_tensor_value_info("m1", F, [1, 1, 4, 4])]
    inits = []
    if m2_const:
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 1, 4, 4), "m2"))
    else:
        ins.append(helper.make_tensor_value_info("m2", F, [1, 1, 1, 4]))
    return _model(nodes, ins, [helper.make_tensor_value_info("y", F, [1, 2, 4, 4])], inits)


def test_two_masks_summed() -> None:
    rng = np.random.default_rng(0)
    causal = np.where(np.tril(np.ones((4, 4), bool)), 0, -1e4).astype(np.float32)[None, None]
    feeds = {"q": rng.standard_normal((1, 2, 4, 3)).astype(np.float32),
             "kt": rng.standard_normal((1, 2, 3, 4)).astype(np.float32), "m1": causal,
             "m2": np.array([0, 0, 0, -1e4], np.float32).reshape(1, 1, 1, 4)}
    proto = _two_masks(False)
    model, out = _normalized(proto)
    found = score_chain(_producer(model))
    assert found and found["mask_variant"] == "additive"
    summed = found["mask"].producer()
    assert summed.op_type == "Add" and {i.name for i in summed.inputs} == {"m1", "m2"}
    np.testing.assert_allclose(_run(out, feeds)[0], _run(proto, feeds)[0], atol=1e-7)


def test_mask_and_position_bias_not_summed() -> None:
    model, _ = _normalized(_two_masks(True))
    found = score_chain(_producer(model))
    assert found and found["mask_variant"] == "additive+bias" and found["mask"].name == "m1"


def test_scalar_shift_carried_along_the_scores() -> None:
    """Keras' stable_softmax: Softmax(scores + mask + 1e-9): one mask, the shift stays in the graph."""
    nodes = [N("MatMul", ["q", "kt"], ["s"]), N("Add", ["s", "m"], ["s1"]), N("Add", ["s1", "eps"], ["s2"]),
             N("Softmax", ["s2"], ["y"], axis=-1)]
    ins = [helper.make_tensor_value_info("q", F, [1, 2, 4, 3]), helper.make_tensor_value_info("kt", F, [1, 2, 3, 4]),
           helper.make_tensor_value_info("m", F, [1, 1, 1, 4])]
    proto = _model(nodes, ins, [helper.make_tensor_value_info("y", F, [1, 2, 4, 4])],
                   [numpy_helper.from_array(np.array(1e-9, np.float32), "eps")])
    model, _ = _normalized(proto)
    found = score_chain(_producer(model))
    assert found and found["mask_variant"] == "additive" and found["mask"].name == "m"


def test_static_rank_without_inferred_shapes() -> None:
    """Reshape(x, Concat(Unsqueeze(n), [4, 16])) -> 3; MatMul of it with a rank-3 value -> 3."""
    x = ir.Value(name="x")
    n = ir.Value(name="n", const_value=ir.tensor(np.array(2, np.int64)))
    axes = ir.Value(name="axes", const_value=ir.tensor(np.array([0], np.int64)))
    tail = ir.Value(name="tail", const_value=ir.tensor(np.array([4, 16], np.int64)))
    unsq = ir.Node("", "Unsqueeze", [n, axes])
    cat = ir.Node("", "Concat", [unsq.outputs[0], tail], attributes=[ir.AttrInt64("axis", 0)])
    view = ir.Node("", "Reshape", [x, cat.outputs[0]])
    mm = ir.Node("", "MatMul", [view.outputs[0], view.outputs[0]])
    assert static_rank(view.outputs[0]) == 3 and static_rank(mm.outputs[0]) == 3
    assert static_rank(ir.Node("", "Reshape", [x, x]).outputs[0]) is None  # a target of unknown length


def _tile(reps: list[int]) -> onnx.ModelProto:
    """y = Tile(Unsqueeze(x [2, 3], 1), reps): x repeated along the new unit axis (TF's tf.repeat)."""
    nodes = [N("Unsqueeze", ["x", "axes"], ["u"]), N("Tile", ["u", "reps"], ["y"])]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axes"),
             numpy_helper.from_array(np.array(reps, np.int64), "reps")]
    out = [2 * reps[0], reps[1], 3 * reps[2]]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3])],
                  [helper.make_tensor_value_info("y", F, out)], inits)


def test_unit_axis_tile_becomes_expand() -> None:
    proto = _tile([1, 4, 1])
    model, out = _normalized(proto)
    assert _producer(model).op_type == "Expand"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_run(out, {"x": x})[0], _run(proto, {"x": x})[0])


def test_tile_of_a_longer_axis_left_alone() -> None:
    """Repeating an axis of size 3 concatenates copies; Expand cannot broadcast it."""
    model, _ = _normalized(_tile([1, 2, 2]))
    assert _producer(model).op_type == "Tile"
