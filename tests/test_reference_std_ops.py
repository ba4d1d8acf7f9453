"""The reference runtime's corrections to onnx.reference's standard ops agree with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_ort
from onnx import TensorProto, helper
from spatten_compiler.runtime.reference import ReferenceRuntime


@pytest.mark.parametrize("data_shape, index_shape, axis", [
    ((2, 100), (2, 45), 1),      # past np.choose's 64 choices: onnx.reference failed here
    ((3, 70, 5), (3, 20, 5), 1),
    ((130, 4), (7, 3), 0),       # indices smaller than data on the other axis
    ((4, 10), (4, 10), -1),
])
def test_gather_elements_matches_onnxruntime(data_shape, index_shape, axis, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=data_shape).astype(np.float32)
    size = data_shape[axis]
    indices = rng.integers(-size, size, index_shape).astype(np.int64)  # negative ones count from the end
    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["x", "i"], ["y"], axis=axis)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, data_shape),
         helper.make_tensor_value_info("i", TensorProto.INT64, index_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    feeds = {"x": data, "i": indices}
    np.testing.assert_array_equal(ReferenceRuntime(path).run(feeds).outputs["y"], run_ort(path, feeds)["y"])
