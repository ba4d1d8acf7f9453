"""prune-tokens' compact key mask for the layers before the first decision: only for a mask that is
provably the same row for every query (passes/prune_tokens.py ``_same_for_every_query``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.passes.prune_tokens import _same_for_every_query

from spatten_compiler.shapes import infer_shapes

N = helper.make_node


def _mask(kind: str) -> ir.Value:
    """[B, 1, S, S] masks from a [B, S] attention_mask, as exporters write them."""
    c = {n: numpy_helper.from_array(np.array(v), n) for n, v in (
        ("zero", 0), ("one", 1), ("start", 0), ("step", 1), ("ax01", [0, 1]), ("ax1", [1]), ("ax2", [2]),
        ("ax3", [3]), ("ax12", [1, 2]), ("fill", np.float32(-1e9)), ("zf", np.float32(0)), ("bound", -1 if kind ==
        "q_idx >= -1" else 1 if kind == "q_idx >= 1" else 0))}
    nodes = [N("Shape", ["m"], ["shape"]), N("Gather", ["shape", "one"], ["seq"], axis=0),
             N("Range", ["start", "seq", "step"], ["q_idx"]),
             N("Unsqueeze", ["q_idx", "ax01"], ["q2"]), N("Unsqueeze", ["q2", "ax3"], ["q4"]),  # [1, 1, S, 1]
             N("Cast", ["m"], ["mb"], to=TensorProto.BOOL), N("Unsqueeze", ["mb", "ax12"], ["row"])]  # [B, 1, 1, S]
    if kind == "deberta":  # m[:, None, :, None] * m[:, None, None, :]: padded query rows masked too
        nodes += [N("Unsqueeze", ["mb", "ax1"], ["m3"]), N("Unsqueeze", ["m3", "ax3"], ["col"]),
                  N("And", ["col", "row"], ["keep"])]
    else:  # transformers' SDPA builders: and(q_idx >= bound, padding row), expanded
        nodes += [N("GreaterOrEqual", ["q4", "bound"], ["ge"]), N("And", ["ge", "row"], ["and"]),
                  N("Shape", ["and"], ["ashape"]), N("Expand", ["and", "ashape"], ["keep"])]
    nodes.append(N("Where", ["keep", "zf", "fill"], ["mask"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("m", TensorProto.INT64, ["B", "S"])],
                              [helper.make_tensor_value_info("mask", TensorProto.FLOAT, None)], list(c.values()))
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    infer_shapes(model)  # as normalize does before prune-tokens runs
    return model.graph.outputs[0]


@pytest.mark.parametrize(("kind", "same"), [
    ("q_idx >= 0", True),  # the query test is true everywhere: one row per sample
    ("q_idx >= -1", True),
    ("q_idx >= 1", False),  # masks query row 0: not the same row for every query
    ("deberta", False),
])
def test_same_for_every_query(kind: str, same: bool) -> None:
    assert _same_for_every_query(_mask(kind)) is same
