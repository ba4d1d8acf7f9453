"""A pointwise 1-D convolution is a linear map of the hidden dimension (SqueezeBERT's projections).

    Conv(x [B, C, S], W [N, C/g, 1], b, group=g)  ->  Transpose(Add(MatMul(Transpose(x, [0, 2, 1]), W'), b), [0, 2, 1])

``W'`` [C, N] is block-diagonal: group ``j`` maps input channels ``j*C/g ..`` to output channels
``j*N/g ..`` by ``W[j*N/g .., :, 0]^T``. The attention finder then sees one ``MatMul`` with a constant
weight - the projection form every rewrite reads - and the head split / token axis from the data flow
(the Transposes). Only kernel 1, stride 1, no padding and a rank-3 input (a sequence of channel
vectors): a wider or strided kernel mixes tokens and is not a projection; 2-D convolutions (images)
are left alone. Numerically the same map; a grouped weight becomes ``g`` times larger.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import NoMatch, const_array

from .transpose_sink import sink_channel_transposes

MAX_WEIGHT = 1 << 26  # elements of the dense weight (a 8192 x 8192 map)


def pointwise(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | NoMatch:
    """(dense weight [C, N], bias [N] or None) of a Conv that is a per-token linear map, or why not."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return NoMatch("not a Conv")
    x = node.inputs[0]
    w = const_array(node.inputs[1], max_elements=MAX_WEIGHT) if len(node.inputs) > 1 else None
    b = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if w is None or w.ndim != 3 or w.shape[2] != 1:
        return NoMatch("not a constant kernel-1 Conv1d weight")
    if x is None or x.shape is None or x.shape.rank() != 3:
        return NoMatch("input is not [B, C, S]")
    attrs = {k: list(node.attributes.get_ints(k, [d] * n)) for k, d, n in (
        ("strides", 1, 1), ("dilations", 1, 1), ("pads", 0, 2))}
    if attrs != {"strides": [1], "dilations": [1], "pads": [0, 0]} or node.attributes.get_string(
            "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return NoMatch("strided, dilated or padded Conv")
    if len(node.inputs) > 2 and node.inputs[2] is not None and b is None:
        return NoMatch("bias is not a constant")
    groups = node.attributes.get_int("group", 1)
    n, c_g = w.shape[0], w.shape[1]
    if groups < 1 or n % groups:
        return NoMatch("output channels not divisible by the groups")
    n_g = n // groups
    if c_g * groups * n > MAX_WEIGHT:
        return NoMatch("the dense weight would be too large")  # a depthwise map of thousands of channels
    dense = np.zeros((c_g * groups, n), dtype=w.dtype)
    for j in range(groups):
        dense[j * c_g:(j + 1) * c_g, j * n_g:(j + 1) * n_g] = w[j * n_g:(j + 1) * n_g, :, 0].T
    return dense, b


def pointwise_convs_to_matmuls(model: ir.Model) -> int:
    """Every pointwise Conv1d -> channels-last MatMul (+ bias) between two Transposes; returns how many."""
    e = GraphEditor(model, "spatten/normalize")
    last: dict[int, ir.Value] = {}  # one channels-last view per input (Q, K and V read the same x)
    count = 0
    for node in list(model.graph):
        found = pointwise(node)
        if isinstance(found, NoMatch):
            continue
        dense, bias = found
        x, out = node.inputs[0], node.outputs[0]
        if id(x) not in last:
            last[id(x)] = e.op("Transpose", [x], perm=[0, 2, 1], hint="channels_last")
        y = e.op("MatMul", [last[id(x)], e.const("pointwise_weight", dense)], hint="pointwise")
        if bias is not None:
            y = e.op("Add", [y, e.const("pointwise_bias", bias)], hint="pointwise_bias")
        y = e.op("Transpose", [y], perm=[0, 2, 1], hint="channels_first")
        y.type, y.shape = out.type, out.shape
        e.replace_uses(out, y)
        node.graph.remove(node, safe=True)
        count += 1
    if count:
        e.commit()
        sink_channel_transposes(model)  # the Transposes written here cancel across the channels-first layers
    return count

