"""unfuse-qop: onnxruntime's QOperator format -> the QDQ form (then :mod:`passes.qdq` reads it as float).

``quantize_static(..., quant_format=QuantFormat.QOperator)`` writes quantized kernels whose inputs and
output are uint8/int8 with (scale, zero point) inputs. Each is rewritten into the float op between
``DequantizeLinear`` of its inputs and ``QuantizeLinear`` of its output, which onnxruntime fuses back
into the same kernels when it loads the model::

    QLinearMatMul(a, sa, za, b, sb, zb, sy, zy)      -> Q(MatMul(DQ(a), DQ(b)), sy, zy)
    QLinearAdd | QLinearMul(a, sa, za, b, sb, zb, sy, zy) -> Q(Add | Mul(DQ(a), DQ(b)), sy, zy)
    QLinearSoftmax(x, sx, zx, sy, zy)                -> Q(Softmax(DQ(x)), sy, zy)   (and Sigmoid,
                                                        LeakyRelu, GlobalAveragePool, AveragePool)
    QLinearConcat(sy, zy, x1, s1, z1, ...)           -> Q(Concat(DQ(x1), ...), sy, zy)
    QLinearConv(x, sx, zx, w, sw, zw, sy, zy, B)     -> Q(Conv(DQ(x), DQ(w), DQ(B, sx * sw)), sy, zy)
    QGemm(a, sa, za, b, sb, zb, C, sy, zy)           -> Q(Gemm(DQ(a), DQ(b), DQ(C, sa * sb)), sy, zy)

The ops the quantizer leaves reading the integer tensors (Reshape, Transpose, a Gather of the int8
embedding table: :data:`passes.qdq.DATA_MOVEMENT`) then read the dequantized tensor instead, with a
Q -> DQ pair after them (``DQ(T(q)) = T(DQ(q))``: exact). The float ops compute what the integer
kernels approximate: onnxruntime's requantization rounds ``a * b`` sums in float or fixed point, so
an output can differ by one quantization step from the fused kernel's (docs/design.md, quantized inputs).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array
from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .qdq import DATA_MOVEMENT, ONNX

logger = logging.getLogger(__name__)
MS = "com.microsoft"
QUANTIZED = {ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.UINT16, ir.DataType.INT16}
MOVES = {**DATA_MOVEMENT, "Split": 0}  # and Split (GPT-2's packed QKV): each output is data of the input


def _ins(node: ir.Node, n: int) -> list[ir.Value | None]:
    return list(node.inputs) + [None] * (n - len(node.inputs))


def _dq(e: GraphEditor, x: ir.Value, scale: ir.Value, zp: ir.Value | None) -> ir.Value:
    per_axis = scale.shape is not None and scale.shape.rank() == 1 and scale.shape.dims[0] != 1
    inputs = [x, scale, zp] if zp is not None else [x, scale]
    return e.op("DequantizeLinear", inputs, **({"axis": -1} if per_axis else {}))


def _bias(e: GraphEditor, node: ir.Node, bias: ir.Value | None, sa: ir.Value, sb: ir.Value,
          axis: int) -> ir.Value | None:
    """An int32 bias quantized with scale ``sa * sb`` and zero point 0, dequantized (constant scales)."""
    if bias is None:
        return None
    a, b = const_array(sa), const_array(sb)
    if a is None or b is None:
        raise OptionError(f"{node.op_type} '{node.name}': the bias scale is computed; spattenc reads constant scales")
    scale = (a.astype(np.float32).reshape(-1) * b.astype(np.float32).reshape(-1)).astype(np.float32)
    extra = {"axis": axis} if scale.size > 1 else {}
    scale_value = e.const("bias_scale", scale if scale.size > 1 else scale.reshape(()))
    return e.op("DequantizeLinear", [bias, scale_value], **extra)


def _attrs(node: ir.Node, drop: tuple[str, ...] = ()) -> dict[str, object]:
    return {k: a.value for k, a in node.attributes.items() if k not in drop}


# Each rewrite returns (float output, its scale, its zero point); a None scale: the output stays float.
Rewrite = Callable[[GraphEditor, ir.Node], tuple[ir.Value, ir.Value | None, ir.Value | None]]


def _binary(op: str) -> Rewrite:
    def rewrite(e: GraphEditor, node: ir.Node):
        a, sa, za, b, sb, zb, sy, zy = _ins(node, 8)
        return e.op(op, [_dq(e, a, sa, za), _dq(e, b, sb, zb)]), sy, zy
    return rewrite


def _unary(op: str, drop: tuple[str, ...] = ()) -> Rewrite:
    def rewrite(e: GraphEditor, node: ir.Node):
        x, sx, zx, sy, zy = _ins(node, 5)
        return e.op(op, [_dq(e, x, sx, zx)], **_attrs(node, drop)), sy, zy
    return rewrite


def _softmax(e: GraphEditor, node: ir.Node):
    axis, opset = node.attributes.get_int("axis", -1), node.attributes.get_int("opset", 13)
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    if opset < 13 and axis != -1 and (rank is None or axis != rank - 1):
        raise OptionError(f"QLinearSoftmax '{node.name}': opset {opset} softmax over axis {axis} (2-D coerced), "
                          "not the last axis")
    x, sx, zx, sy, zy = _ins(node, 5)
    return e.op("Softmax", [_dq(e, x, sx, zx)], axis=axis), sy, zy


def _pool(op: str) -> Rewrite:
    plain = _unary(op, drop=("channels_last",))

    def rewrite(e: GraphEditor, node: ir.Node):
        if node.attributes.get_int("channels_last", 0):
            raise OptionError(f"{node.op_type} '{node.name}': channels_last pooling has no standard-op form here")
        return plain(e, node)
    return rewrite


def _concat(e: GraphEditor, node: ir.Node):
    sy, zy, *rest = node.inputs
    parts = [_dq(e, rest[i], rest[i + 1], rest[i + 2]) for i in range(0, len(rest), 3)]
    return e.op("Concat", parts, **_attrs(node)), sy, zy


def _conv(e: GraphEditor, node: ir.Node):
    x, sx, zx, w, sw, zw, sy, zy, b = _ins(node, 9)
    weight = e.op("DequantizeLinear", [w, sw, zw], **({"axis": 0} if const_array(sw) is not None
                                                       and const_array(sw).size > 1 else {}))
    inputs = [_dq(e, x, sx, zx), weight, _bias(e, node, b, sx, sw, 0)]
    return e.op("Conv", [i for i in inputs if i is not None], **_attrs(node)), sy, zy


def _gemm(e: GraphEditor, node: ir.Node):
    a, sa, za, b, sb, zb, c, sy, zy = _ins(node, 9)
    inputs = [_dq(e, a, sa, za), _dq(e, b, sb, zb) if not node.attributes.get_int("transB", 0)
              else e.op("DequantizeLinear", [b, sb, zb], **({"axis": 0} if const_array(sb) is not None
                                                             and const_array(sb).size > 1 else {}))]
    if c is not None:
        inputs.append(_bias(e, node, c, sa, sb, 0))
    return e.op("Gemm", inputs, **_attrs(node)), sy, zy


UNFUSE: dict[tuple[str, str], Rewrite] = {
    ("", "QLinearMatMul"): _binary("MatMul"),
    ("", "QLinearConv"): _conv,
    (MS, "QLinearAdd"): _binary("Add"),
    (MS, "QLinearMul"): _binary("Mul"),
    (MS, "QLinearSoftmax"): _softmax,
    (MS, "QLinearSigmoid"): _unary("Sigmoid"),
    (MS, "QLinearLeakyRelu"): _unary("LeakyRelu"),
    (MS, "QLinearGlobalAveragePool"): _pool("GlobalAveragePool"),
    (MS, "QLinearAveragePool"): _pool("AveragePool"),
    (MS, "QLinearConcat"): _concat,
    (MS, "QGemm"): _gemm,
}


def _key(node: ir.Node) -> tuple[str, str]:
    return ("" if node.domain in ONNX else node.domain, node.op_type)


def _is_quantized(v: ir.Value | None, depth: int = 8) -> bool:
    """An integer tensor the quantizer made: a QuantizeLinear's output or data moved from one."""
    if v is None or depth == 0:
        return False
    if v.dtype in QUANTIZED:
        return True
    p = v.producer()
    if p is None:
        return False
    if p.op_type == "QuantizeLinear":
        return True
    data = MOVES.get(p.op_type) if p.domain in ONNX else None
    return data is not None and _is_quantized(p.inputs[data], depth - 1)


def _per_tensor(dq: ir.Node) -> bool:
    scale = const_array(dq.inputs[1]) if len(dq.inputs) > 1 else None
    return scale is not None and scale.size == 1


def hoist_dequantize(e: GraphEditor, graph: ir.Graph) -> int:
    """``DQ(T(q))`` -> ``Q -> DQ`` after ``T(DQ(q))`` for the data-movement ops T reading integer
    tensors (every reader of T's output a DequantizeLinear with the same inputs); returns how many."""
    moved = 0
    for node in reversed(list(graph)):  # consumers first: a Reshape -> Transpose chain in one sweep
        data = MOVES.get(node.op_type) if node.domain in ONNX else None
        if data is None or any(out.is_graph_output() for out in node.outputs):
            continue
        src, outs = node.inputs[data], list(node.outputs)
        readers = [[u.node for u in out.uses()] for out in outs]
        first = next((r[0] for r in readers if r), None)
        if first is None or not _is_quantized(src) or any(
                r.op_type != "DequantizeLinear" or r.inputs[0] is not out or not _per_tensor(r)
                or list(r.inputs[1:]) != list(first.inputs[1:]) for out, rs in zip(outs, readers) for r in rs):
            continue
        params = list(first.inputs[1:])
        node.replace_input_with(data, e.op("DequantizeLinear", [src, *params]))
        zero = const_array(params[1]) if len(params) > 1 and params[1] is not None else None
        quantized_type = ir.DataType.from_numpy(zero.dtype) if zero is not None else ir.DataType.UINT8
        for out, rs in zip(outs, readers):  # Split: every output read through the same pair
            out.dtype = first.outputs[0].dtype or ir.DataType.FLOAT
            if not rs:
                continue
            q = e.op("QuantizeLinear", [out, *params])
            q.dtype = quantized_type
            for r in rs:
                r.replace_input_with(0, q)
        moved += 1
    return moved


@register_pass
@dataclasses.dataclass(frozen=True)
class UnfuseQop(Pass):
    """QOperator-format kernels -> DQ -> float op -> Q (the QDQ format)."""

    name = "unfuse-qop"

    def call(self, model: ir.Model) -> PassResult:
        nodes = [n for n in model.graph if _key(n) in UNFUSE]
        if not nodes:
            return PassResult(model, False)
        e = GraphEditor(model, "spatten/qop")
        for node in nodes:
            value, scale, zp = UNFUSE[_key(node)](e, node)
            out = node.outputs[0]
            if scale is not None:
                value.dtype = ir.DataType.FLOAT
                value = e.op("QuantizeLinear", [value, scale, zp] if zp is not None else [value, scale])
                zero = const_array(zp) if zp is not None else None
                value.dtype = out.dtype or (ir.DataType.from_numpy(zero.dtype) if zero is not None
                                            else ir.DataType.UINT8)
            e.replace_uses(out, value)
        for node in nodes:
            model.graph.remove(node, safe=True)
        hoisted = hoist_dequantize(e, model.graph)
        e.forget_shapes()
        e.commit()
        logger.info("unfuse-qop: %d QOperator kernels -> DQ, float op, Q; %d data-movement ops read float", len(nodes),
                    hoisted)
        return PassResult(model, True)
