"""Key-mask fold: a key-padding mask enters the score MatMul as one more contraction row.

    scores = MatMul(Q, Kt) * s + bias                     bias [B, 1, 1, S]: 0 or MASK_BIAS per key
 -> scores = MatMul(Concat(Q, 1), Concat(Kt, bias)) * s   Q [B, H, S, Dh+1], Kt [B, H, Dh+1, S]

``q . k + 1 * bias_j`` is ``q . k`` for a kept key (adding 0 is exact) and about ``MASK_BIAS * s`` for a
masked one, whose probability is exactly 0 either way. prune-tokens uses it on the compact mask it
writes for the full-length layers before the first pruning decision: their scores feed the importance
pass, so onnxruntime cannot fuse them, and the mask ``Add`` over ``[B, H, S, S]`` was the largest
element-wise op of the pruned model (MiniLM at 512 tokens, docs/optimize.md 4i). One contraction row
more (Dh 32 -> 33) costs less than that pass over the scores.

Not folded (the reason is returned): anything but positive scalar scales (``Mul``/``Div``) between the
MatMul and the ``Add`` - a soft-cap (``Tanh``) would bound the bias, a clamp could lift it - or scores
of known rank other than 4 (heads folded into the batch).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import NoMatch, const_array, is_const

SCALES = frozenset({"Mul", "Div"})


def _scalar(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(the non-constant input, the constant scalar) of a Mul/Div by one constant, else None."""
    consts = [(i, a) for i, v in enumerate(node.inputs) if (a := const_array(v, max_elements=1)) is not None]
    if len(consts) != 1 or consts[0][1].size != 1 or (node.op_type == "Div" and consts[0][0] != 1):
        return None
    return node.inputs[1 - consts[0][0]], float(consts[0][1].reshape(()))


def score_matmul(add: ir.Node, bias: ir.Value) -> ir.Node | NoMatch:
    """The MatMul of two activations whose scores ``add`` adds ``bias`` to, through positive scales."""
    value = next((v for v in add.inputs if v is not bias), None)
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return NoMatch("the scores are not computed from a MatMul")
        if node.op_type == "MatMul" and not is_const(node.inputs[0]) and not is_const(node.inputs[1]):
            rank = node.outputs[0].shape.rank() if node.outputs[0].shape is not None else 4
            return node if rank == 4 else NoMatch(f"scores of rank {rank}, not [B, H, S, S]")
        scaled = _scalar(node) if node.op_type in SCALES else None
        if scaled is None or not scaled[1] > 0:
            return NoMatch(f"{node.op_type} '{node.name}' between the score MatMul and the mask is not a "
                           "positive scalar scale")
        value = scaled[0]
    return NoMatch("no score MatMul within 8 scales")


def fold_key_mask(e: GraphEditor, add: ir.Node, bias: ir.Value) -> NoMatch | None:
    """Fold ``bias`` (``[B, 1, 1, S]``, added by ``add``) into the score MatMul and drop the ``Add``;
    or the reason it was left as it is."""
    qk = score_matmul(add, bias)
    if isinstance(qk, NoMatch):
        return qk
    q, kt = qk.inputs[0], qk.inputs[1]
    one = e.const("one", np.array([1], np.int64))
    ones = e.op("Expand", [e.op("CastLike", [e.const("one", np.array(1.0, np.float32)), q]),
                           e.op("Concat", [e.op("Shape", [q], end=-1), one], axis=0)])
    row_shape = e.op("Concat", [e.op("Shape", [kt], end=-2), one, e.op("Shape", [kt], start=-1)], axis=0)
    row = e.op("Expand", [e.op("CastLike", [bias, kt]), row_shape])
    qk.replace_input_with(0, e.op("Concat", [q, ones], axis=-1))
    qk.replace_input_with(1, e.op("Concat", [kt, row], axis=-2))
    e.replace_uses(add.outputs[0], next(v for v in add.inputs if v is not bias))
    return None
