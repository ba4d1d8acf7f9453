"""Structural fallback of the Q/K/V trace: a per-head transform of any shape between a projection
and the attention core (issue #16).

The step table of :mod:`.attention_trace` knows the common chains (views, RoPE as rotate-half, a KV
concat, a scalar pre-scale). Architectures keep adding others: rotary on part of the head (a
pass-through ``Concat``), interleaved rotary (``Slice`` with step 2, ``Unsqueeze``/``Concat``/``Reshape``),
RMS/LayerNorm of q and k per head. Rather than list them, :func:`transform_region` walks back from the
value the table could not explain to the hidden-state projection it is computed from:

* every non-constant input is followed until a ``MatMul``/``Gemm`` with a constant weight (the
  projection) or a value that does not depend on the hidden state (positions: ``position_ids``, a
  ``Range``, ``Shape``; these are the transform's parameters, like RoPE's cos/sin, whatever ops compute
  them: torch's ``repeat_interleave`` of the cos/sin tables exports as ``NonZero``/``GatherND``);
* exactly one projection must be reached, and every op on the way must be element-wise, a view, a
  slice/concat along an axis, or a normalization (:data:`REGION_OPS`): a transform that mixes heads
  or tokens (a MatMul of two activations, a Softmax, a reduction over the token axis) is not per-head;
* the ops between the projection and the value are carried along by every rewrite untouched; the
  Reshape/Expand ones are recorded as views, so head pruning retargets their head counts.
"""

from __future__ import annotations

from collections import deque

import onnx_ir as ir

from spatten_compiler.match import NoMatch, const_array

from .attention_trace import is_weight, quantized_projection

# Ops a per-head transform is built from (anything else stops the walk with the op as the reason).
REGION_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Tanh", "Sigmoid", "Erf", "Abs",
    "Cos", "Sin", "Cast", "CastLike", "Identity", "Where", "Equal", "Less", "Greater", "Not", "And", "Or",
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Expand", "Flatten", "Slice", "Split", "Concat", "Gather",
    "GatherND", "GatherElements",  # position lookups (cos/sin tables by position id); not on the data path
    "DequantizeLinear",  # a position table quantize_dynamic quantized (RoFormer's sinusoidal embedding)
    "ReduceMean", "ReduceSum", "ReduceMax", "LayerNormalization", "SimplifiedLayerNormalization",
    "RMSNormalization", "Shape", "Size", "Range", "ConstantOfShape", "Tile", "Max", "Min", "Clip", "Floor",
    "Mod", "Trilu", "Constant", "MatMul", "Gemm", "Einsum",
})
# Values computed only from these are positions or shapes, not hidden state.
POSITION_OPS = frozenset({"Shape", "Size", "Range", "ConstantOfShape", "Constant"})
LIMIT = 400  # the ops walked, position computations included (repeat_interleave tables: ~200)
GATHERS = frozenset({"Gather", "GatherND", "GatherElements"})


def _is_const_weight(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Transpose":
        return _is_const_weight(producer.inputs[0])
    return is_weight(value)


def transform_region(value: ir.Value, graph: ir.Graph) -> tuple[ir.Node, list[ir.Node]] | NoMatch:
    """(projection node, the region's ops from the projection to ``value`` in graph order) or why not."""
    inputs = {id(v) for v in graph.inputs}
    seen: set[int] = set()
    visited: list[ir.Node] = []
    projections: dict[int, ir.Node] = {}
    todo = deque([value])
    while todo:
        v = todo.popleft()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None:
            continue  # a graph input (positions) or an initializer
        if (node.op_type in ("MatMul", "Gemm") and _is_const_weight(node.inputs[1])) or (
                node.domain, node.op_type) == ("com.microsoft", "MatMulNBits") or (  # int4 blocks: a projection
                quantized_projection(v) is not None):  # int8 (quantize_dynamic): the Mul by the scales
            projections[id(node)] = node
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in REGION_OPS:
            if node.domain in ("", "ai.onnx") and _positional(node, inputs):
                continue  # computes a parameter from positions or shapes (repeat_interleave's NonZero)
            routed = "" if not _routed(node) else (
                " (its rows are placed by a router's TopK: a projection chosen per token, a mixture of experts "
                "such as JetMoE's mixture of attention, so a head is no fixed slice of weights)")
            return NoMatch(f"{node.op_type} '{node.name}' between projection and attention is not a per-head transform"
                           f"{routed}")
        if node.op_type in ("MatMul", "Einsum") and not _positional(node, inputs):
            return NoMatch(f"{node.op_type} '{node.name}' of two activations between projection and attention")
        visited.append(node)
        if len(visited) > LIMIT:
            return NoMatch(f"no projection within {LIMIT} ops")
        if node.op_type not in ("Shape", "Size"):  # a shape is not the data it measures
            todo.extend(i for i in node.inputs if i is not None)
    if len(projections) != 1:
        kinds = "no projection" if not projections else f"{len(projections)} projections"
        return NoMatch(f"the transform before attention reaches {kinds}")
    proj = next(iter(projections.values()))
    region = _descendants(proj, {id(n) for n in visited})
    position = {id(n): i for i, n in enumerate(graph)}  # graph order is a topological order
    ordered = sorted((n for n in visited if id(n) in region), key=lambda n: position.get(id(n), -1))
    for n in ordered:  # on the data path a gather picks tokens or heads: not a per-head transform
        shape_math = n.inputs[0].dtype in (ir.DataType.INT64, ir.DataType.INT32)  # Gather(Shape(x), i)
        if n.op_type in GATHERS and not shape_math and not (
                n.op_type == "Gather" and (a := const_array(n.inputs[1])) is not None and a.ndim == 0):
            return NoMatch(f"{n.op_type} '{n.name}' gathers from the projected values: not a per-head transform")
    return proj, ordered


def _routed(node: ir.Node, limit: int = 200) -> bool:
    """Whether a ``TopK`` (a router's choice) is among ``node``'s ancestors."""
    todo, seen = deque(node.inputs), 0
    while todo and seen < limit:
        v = todo.popleft()
        p = v.producer() if v is not None else None
        seen += 1
        if p is not None and p.op_type == "TopK":
            return True
        if p is not None:
            todo.extend(p.inputs)
    return False


def _positional(node: ir.Node, graph_inputs: set[int], limit: int = 200) -> bool:
    """True when ``node`` depends on no projection: e.g. RoPE's inv_freq x position_ids MatMul."""
    todo, seen = deque(node.inputs), 0
    while todo and seen < limit:
        v = todo.popleft()
        if v is None:
            continue
        seen += 1
        p = v.producer()
        if p is None or p.op_type in ("Shape", "Size"):
            continue
        if (p.op_type in ("MatMul", "Gemm") and _is_const_weight(p.inputs[1])) or p.op_type == "MatMulNBits" or (
                quantized_projection(v) is not None):
            return False
        todo.extend(p.inputs)
    return seen < limit


def _descendants(proj: ir.Node, allowed: set[int]) -> set[int]:
    """Ids of the region nodes that read (transitively) the projection's output."""
    out: set[int] = set()
    todo = deque(proj.outputs)
    while todo:
        v = todo.popleft()
        for use in v.uses():
            n = use.node
            if id(n) in allowed and id(n) not in out:
                out.add(id(n))
                todo.extend(n.outputs)
    return out
