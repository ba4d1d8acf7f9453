"""Pass infrastructure: registry, pipeline text, and the check that names a breaking pass."""

from __future__ import annotations

import dataclasses

import onnx
import onnx_ir as ir
import pytest
from conftest import tiny_model

from spatten_compiler.errors import OptionError, PassCheckError
from spatten_compiler.pipeline import PASSES, Pass, PassResult, Pipeline, parse_pipeline, register_pass


@register_pass
@dataclasses.dataclass(frozen=True)
class _Noop(Pass):
    name = "test-noop"
    ratio: float = 1.0
    flag: bool = False

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, False)


@register_pass
@dataclasses.dataclass(frozen=True)
class _Breaks(Pass):
    """Rewires MatMul to a tensor that does not exist: onnx.checker must reject the result."""

    name = "test-breaks"

    def call(self, model: ir.Model) -> PassResult:
        node = next(n for n in model.graph if n.op_type == "MatMul")
        node.outputs[0].name = "y"
        model.graph.outputs[0].name = "h"  # now 'h' is an output that nothing produces
        model.graph.remove(next(n for n in model.graph if n.op_type == "Softmax"))
        return PassResult(model, True)


def _model() -> ir.Model:
    return ir.serde.deserialize_model(tiny_model())


def test_registry_and_pipeline_text() -> None:
    assert PASSES["test-noop"] is _Noop
    (p,) = parse_pipeline("test-noop{ratio=0.5;flag=true}")
    assert p == _Noop(ratio=0.5, flag=True)
    assert p.describe() == "test-noop{ratio=0.5;flag=True}"


def test_a_compile_reports_its_passes_as_a_pipeline_that_reruns_it(tmp_path) -> None:
    """The report's pass list (``--report``) is ``--pipeline`` text: tuples (schedules) round-trip."""
    from conftest import MODELS

    from spatten_compiler.api import compile as sc_compile

    first = sc_compile(MODELS / "bert_torchscript.onnx", token_keep_schedule=(1.0, 0.5), token_min_keep=2)
    again = parse_pipeline(",".join(first.report["passes"]))
    assert [p.describe() for p in again] == first.report["passes"]
    assert any("schedule=1.0:0.5" in p for p in first.report["passes"])


@pytest.mark.parametrize(
    "text, message",
    [("nope", "unknown pass"), ("test-noop{bad=1}", "no option 'bad'"), ("test-noop{ratio}", "key=value"),
     ("test-noop{ratio=abc}", "test-noop")],
)
def test_bad_pipeline_text(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_pipeline(text)


def test_pipeline_names_the_pass_that_broke_the_model() -> None:
    with pytest.raises(PassCheckError, match="pass 'test-breaks' produced an invalid model"):
        Pipeline([_Noop(), _Breaks()])(_model())


def test_identity_pipeline_keeps_model_valid() -> None:
    model = _model()
    result = Pipeline([_Noop()])(model)
    assert not result.modified
    onnx.checker.check_model(ir.serde.serialize_model(model))


@pytest.mark.parametrize("axis, folded", [(-1, True), (3, True), (1, False), (2, False)])
def test_normalize_folds_the_head_size_read_from_a_shape(axis: int, folded: bool) -> None:
    """SDPA exports compute the scale 1/sqrt(q.shape[-1]) from the shape: the head size of a per-head
    [B, H, S, Dh] tensor is static and folds (with the scale after it); the head and sequence axes,
    which pruning changes, stay computed."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper
    from spatten_compiler.passes.normalize import Normalize

    nodes = [helper.make_node("Shape", ["q"], ["shape"]),
             helper.make_node("Slice", ["shape", "start", "end"], ["dim"]),
             helper.make_node("Cast", ["dim"], ["dimf"], to=TensorProto.FLOAT),
             helper.make_node("Sqrt", ["dimf"], ["root"]),
             helper.make_node("Div", ["one", "root"], ["scale"]),
             helper.make_node("Mul", ["q", "scale"], ["y"])]
    inits = [helper.make_tensor("start", TensorProto.INT64, [1], [axis]),
             helper.make_tensor("end", TensorProto.INT64, [1], [2**62]),
             helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", 4, "S", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    Normalize()(model)
    mul = next(n for n in model.graph if n.op_type == "Mul")
    scale = mul.inputs[1].const_value
    assert (scale is not None) == folded
    if folded:
        np.testing.assert_allclose(scale.numpy(), [0.25])


@pytest.mark.parametrize("index", [-2, -1, 0, 3])
def test_normalize_reads_a_one_index_gather_as_a_slice(index: int) -> None:
    """transformers 4's Falcon picks K and V out of its fused [B, S, H + 2, Dh] projection with
    ``fused[..., [-2], :]``: a float Gather of one constant index becomes the equal Slice (the per-head
    slice form discovery reads) along a static axis; on a token (dynamic) axis or a shape it stays."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from spatten_compiler.passes.normalize import Normalize

    nodes = [helper.make_node("Gather", ["x", "idx"], ["y"], axis=2),
             helper.make_node("Gather", ["x", "idx"], ["token"], axis=1),  # a dynamic (token) axis: stays
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["dims"])]
    inits = [helper.make_tensor("idx", TensorProto.INT64, [1], [index]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 6, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("token", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("dims", TensorProto.INT64, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    assert sorted(n.op_type for n in model.graph) == ["Gather", "Gather", "Shape", "Slice"]
    x = np.random.default_rng(0).standard_normal((2, 5, 6, 16)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    got = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_editor_names_never_collide_with_an_earlier_run() -> None:
    """A pass run again on its own output (normalize in the plan probe, then in the pipeline) names new
    constants and nodes after the ones its first run left in the graph."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from spatten_compiler.editor import GraphEditor

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    first = GraphEditor(model, "p")
    a, b = first.const("c", np.float32(1)), first.op("Neg", [model.graph.inputs[0]])
    second = GraphEditor(model, "p")
    c, d = second.const("c", np.float32(2)), second.op("Neg", [model.graph.inputs[0]])
    assert len({a.name, b.name, c.name, d.name}) == 4
