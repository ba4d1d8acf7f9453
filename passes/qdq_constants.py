"""fold-qdq-constants: ``QuantizeLinear`` of a constant -> the quantized constant.

``quantize_static`` quantizes what it sees computed at run time, and that includes constants an
exporter computes in the graph: dynamo's ``Transpose(W)`` of every projection weight, a shared
weight's ``Identity``, a ``Constant`` score scale. Their Q -> DQ pairs are weights, not activations::

    QuantizeLinear(T(W), s, z)  ->  q = clip(rint(T(W) / s) + z)    (float32, ties to even: onnxruntime's
                                                                      QuantizeLinear, so exact)

``T`` is a chain of :data:`EVAL` ops over an initializer or ``Constant``. The ``DequantizeLinear``
stays: a projection then reads ``DQ(int8 constant)``, which discovery and prune-heads read as a QDQ
weight, and the file stores int8 weights. Per-axis scales (axis given) are applied along their axis.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import const_array
from spatten_compiler.pipeline import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)
ONNX = ("", "ai.onnx")
RANGE = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127), ir.DataType.UINT16: (0, 65535),
         ir.DataType.INT16: (-32768, 32767)}


def _reshape(node: ir.Node, a: np.ndarray, shape: np.ndarray) -> np.ndarray:
    dims = [a.shape[i] if d == 0 and not node.attributes.get_int("allowzero", 0) else int(d)
            for i, d in enumerate(shape.reshape(-1))]
    return a.reshape(dims)


def _squeeze(node: ir.Node, a: np.ndarray, axes: np.ndarray | None = None) -> np.ndarray:
    return np.squeeze(a, axis=None if axes is None else tuple(int(x) for x in axes.reshape(-1)))


def _unsqueeze(node: ir.Node, a: np.ndarray, axes: np.ndarray) -> np.ndarray:
    out = a
    for axis in sorted(int(x) % (a.ndim + axes.size) for x in axes.reshape(-1)):
        out = np.expand_dims(out, axis)
    return out


def _flatten(node: ir.Node, a: np.ndarray) -> np.ndarray:
    axis = node.attributes.get_int("axis", 1) % max(a.ndim, 1)
    return a.reshape(int(np.prod(a.shape[:axis])), -1)


# op -> its value from constant inputs (the ops exporters put between a weight and its reader)
EVAL: dict[str, Callable[..., np.ndarray]] = {
    "Identity": lambda node, a: a,
    "Transpose": lambda node, a: np.transpose(a, node.attributes.get_ints("perm", None)),
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Flatten": _flatten,
    "Cast": lambda node, a: a.astype(ir.DataType(node.attributes.get_int("to")).numpy()),
}


def constant_value(value: ir.Value | None, depth: int = 6) -> np.ndarray | None:
    """The value of a constant or of an :data:`EVAL` chain over constants, else None."""
    if value is None:
        return None
    a = const_array(value)
    node = value.producer()
    if a is not None or node is None or depth == 0 or node.domain not in ONNX or node.op_type not in EVAL:
        return a
    inputs = [constant_value(v, depth - 1) for v in node.inputs]
    if any(x is None for x in inputs[:1]) or any(x is None and v is not None for x, v in zip(inputs, node.inputs)):
        return None
    return EVAL[node.op_type](node, *inputs)


def quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, dtype: ir.DataType, axis: int = 1) -> np.ndarray:
    """onnxruntime's QuantizeLinear: ``clip(rint(x / scale) + zero point)`` in float32."""
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[axis % x.ndim] = -1
    zero = np.zeros(1, np.float32) if zp is None else zp.astype(np.float32).reshape(shape)
    qmin, qmax = RANGE[dtype]
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32).reshape(shape)) + zero
    return np.clip(q, qmin, qmax).astype(dtype.numpy())


@register_pass
@dataclasses.dataclass(frozen=True)
class FoldQdqConstants(Pass):
    """``QuantizeLinear`` of a constant expression -> the quantized constant (exact)."""

    name = "fold-qdq-constants"

    def call(self, model: ir.Model) -> PassResult:
        e = GraphEditor(model, "spatten/qconst")
        folded = 0
        for q in [n for n in model.graph if n.op_type == "QuantizeLinear" and n.domain in ONNX]:
            scale = const_array(q.inputs[1]) if len(q.inputs) > 1 else None
            zp_value = q.inputs[2] if len(q.inputs) > 2 else None
            zp = const_array(zp_value)
            dtype = ir.DataType.from_numpy(zp.dtype) if zp is not None else ir.DataType(
                q.attributes.get_int("output_dtype", 0) or ir.DataType.UINT8)
            if scale is None or (zp_value is not None and zp is None) or dtype not in RANGE or \
                    q.attributes.get_int("block_size", 0) or q.outputs[0].is_graph_output():
                continue
            x = constant_value(q.inputs[0])
            if x is None or x.dtype.kind != "f":
                continue
            e.replace_uses(q.outputs[0], e.const("quantized", quantize(x, scale, zp, dtype,
                                                                         q.attributes.get_int("axis", 1))))
            model.graph.remove(q, safe=True)
            folded += 1
        if folded:
            logger.info("fold-qdq-constants: %d quantized constants (weights the graph computes) folded", folded)
        return PassResult(model, bool(folded))
