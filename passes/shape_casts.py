"""A widening cast of an assembled shape, pushed onto its pieces (a normalize step).

  Cast(Concat(a, b, ..., axis=0), to=int64) -> Concat(Cast(a, to=int64), Cast(b, to=int64), ..., axis=0)
                                                 (a, b, ... int32 or int64; a constant piece is cast here)

tf2onnx computes shapes in TensorFlow's int32 and casts each assembled reshape target to int64 at the
end (``Cast(Concat(Slice(Cast(Shape(x))), [-1], [4], [16]))``). The passes that rewrite a target's
entries (prune-heads' head counts and widths, prune-tokens' lengths) read it as a ``Concat`` of
pieces, constant or not; behind the Cast they saw one opaque value and left the target unchanged.
int32 -> int64 is exact, so the cast can be applied per piece. The Concat itself is left for its other
readers (dead-code removal drops it when the Cast was the only one).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor, rewrite_each
from spatten_compiler.match import const_array

logger = logging.getLogger(__name__)

WIDENING = {(ir.DataType.INT32, ir.DataType.INT64), (ir.DataType.INT64, ir.DataType.INT64)}


def _pushable(node: ir.Node) -> ir.Node | None:
    """The 1-D int Concat under a widening ``node`` (a Cast), or None."""
    if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or "to" not in node.attributes:
        return None
    concat = node.inputs[0].producer() if node.inputs[0] is not None else None
    if concat is None or concat.op_type != "Concat" or concat.attributes.get_int("axis", 0) not in (0, -1):
        return None
    src, dst = node.inputs[0].dtype, ir.DataType(node.attributes["to"].value)
    shape = node.inputs[0].shape
    if (src, dst) not in WIDENING or shape is None or shape.rank() != 1 or any(p is None for p in concat.inputs):
        return None
    return concat


def push_shape_casts(model: ir.Model) -> int:
    """Rewrite every widening Cast of a 1-D integer Concat in the main graph; return how many."""
    def pushed(e: GraphEditor, node: ir.Node) -> ir.Value | None:
        concat = _pushable(node)
        if concat is None:
            return None
        pieces = []
        for piece in concat.inputs:
            array = const_array(piece)
            pieces.append(e.const("shape_piece", array.astype(np.int64)) if array is not None
                          else e.op("Cast", [piece], to=ir.DataType.INT64))
        return e.op("Concat", pieces, axis=0)
    return rewrite_each(model, "Cast", pushed, log=logger, what="shape casts pushed onto their pieces")
