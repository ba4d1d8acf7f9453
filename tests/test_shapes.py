"""spatten_compiler.shapes and the load-time check: the fast paths give what onnx-ir's passes give."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from conftest import MODELS, fixture_names
from onnx import TensorProto, helper
from onnx_ir.passes.common import ShapeInferencePass

from spatten_compiler.errors import ModelLoadError
from spatten_compiler.modelio import load_model
from spatten_compiler.shapes import infer_shapes


def _types(model) -> dict[str, tuple]:
    return {v.name: (v.dtype, None if v.shape is None else tuple(str(d) for d in v.shape))
            for g in model.graphs() for n in g for v in n.outputs}


@pytest.mark.parametrize("name", fixture_names())
def test_infer_shapes_equals_onnx_ir_pass(name: str) -> None:
    ours, theirs = load_model(MODELS / f"{name}.onnx"), load_model(MODELS / f"{name}.onnx")
    infer_shapes(ours)
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(theirs)
    assert _types(ours) == _types(theirs)


def test_infer_shapes_reaches_subgraphs() -> None:
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.UNDEFINED, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.UNDEFINED, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    import onnx_ir as ir

    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert infer_shapes(model)
    types = _types(model)
    assert types["t"] == (ir.DataType.FLOAT, ("2", "3")) and types["e"][0] == ir.DataType.FLOAT


def test_infer_shapes_keeps_sequences_sequences() -> None:
    """A SplitToSequence output is a sequence of tensors: inference gives it that type, never its
    element's dtype as a tensor (which made normalize write an invalid SequenceAt; JetMoE's dynamo
    export)."""
    import onnx_ir as ir

    from spatten_compiler.pipeline import make_pass

    graph = helper.make_graph(
        [helper.make_node("SplitToSequence", ["x"], ["seq"], axis=0),
         helper.make_node("SequenceAt", ["seq", "i"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(__import__("numpy").array(1, "int64"), "i")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    infer_shapes(model)
    seq = next(n for n in model.graph if n.op_type == "SplitToSequence").outputs[0]
    assert isinstance(seq.type, ir.SequenceType) and seq.type.dtype == ir.DataType.FLOAT
    make_pass("normalize")(model)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def _dangling(tmp_path: Path, *, link: bool) -> Path:
    """A graph whose node reads a value nothing produces, with a 128 KB weight (mapped by lazyproto)."""
    import numpy as np

    w = onnx.numpy_helper.from_array(np.ones((256, 128), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "ghost"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])], [w])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    if link:  # a hard-linked file is parsed whole: the check falls back to onnx-ir's pass
        os.link(path, tmp_path / "bad-link.onnx")
    return path


@pytest.mark.parametrize("link", [False, True], ids=["mapped", "hard-linked"])
def test_invalid_graph_refused_on_both_check_paths(tmp_path: Path, link: bool) -> None:
    path = _dangling(tmp_path, link=link)
    with pytest.raises(ModelLoadError, match="invalid ONNX graph"):
        load_model(path)
