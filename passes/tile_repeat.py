"""A Tile that only repeats unit axes -> the Expand it equals (a normalize step).

  Tile(x, reps) -> Expand(x, [r if r > 1 else 1 for r in reps])   (every axis with r > 1 has size 1 in x)

tf2onnx lowers ``tf.repeat(tf.expand_dims(kv, 2), n_rep, axis=2)`` (TF Mistral's grouped-query K/V
repeat) to Unsqueeze -> Tile; torch exports the same repeat as Unsqueeze -> Expand, the form the
attention tracer and head pruning read. Repeating a size-1 axis r times and broadcasting it to r are
the same copy; axes repeated once keep their size under Expand's 1.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor, rewrite_each
from spatten_compiler.match import const_array

logger = logging.getLogger(__name__)


def expand_target(node: ir.Node) -> np.ndarray | None:
    """The Expand target equal to Tile ``node``, or None (repeats not constant, or a repeated axis not 1)."""
    reps = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if reps is None or shape is None or reps.ndim != 1 or len(reps) != shape.rank() or (reps < 1).any():
        return None
    if any(r > 1 and shape.dims[a] != 1 for a, r in enumerate(reps.tolist())):
        return None
    return np.maximum(reps.astype(np.int64), 1)


def tiles_to_expands(model: ir.Model) -> int:
    """Rewrite every unit-axis Tile of the main graph; return how many."""
    def expand(e: GraphEditor, node: ir.Node) -> ir.Value | None:
        target = expand_target(node)
        return None if target is None else e.op("Expand", [node.inputs[0], e.const("repeat", target)], hint="repeat")
    return rewrite_each(model, "Tile", expand, log=logger, what="unit-axis Tiles -> Expand")
