"""Attention sinks and the row-max shift in the score chain (GPT-OSS's eager attention).

A learned per-head "sink" logit is concatenated to the scores as extra key columns, the row max is
subtracted, the softmax taken, and the sink columns are sliced off before ``P @ V``::

    combined = Concat([scores, sink], axis=-1)            # sink: [B, H, S_q, w], from parameters only
    combined = Sub(combined, ReduceMax(combined, [-1], keepdims=1))
    P        = Slice(Softmax(combined), 0, -w, axis=-1)   # rows of P sum to < 1

:func:`score_chain` walks through both: the Sub is a pass-through (softmax is invariant to a per-row
shift), the Concat continues on its scores input and records the sink. The columns the Slice removes
are exactly the sink's: ``P`` has ``S_k + W - w`` columns and ``P @ V`` reads ``S_k`` rows of V,
so a model that runs has ``w = W`` - whatever the sequence length, so also after token pruning.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import NoMatch, const_array

FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
LONG = 2**62  # a Slice end at least this large runs to the end of the axis
# ops that move or broadcast their input 0 (the data), whatever their other inputs (shapes, axes)
BROADCASTS = frozenset({"Expand", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Tile", "Identity", "Cast",
                        "CastLike"})


def _last_axis(axis: int, value: ir.Value) -> bool:
    rank = value.shape.rank() if value.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def row_max_shift(sub: ir.Node) -> str | None:
    """None when ``sub`` is ``x - ReduceMax(x, axes=[last], keepdims=1)``, else why not."""
    x, m = sub.inputs[0], sub.inputs[1]
    red = m.producer() if m is not None else None
    if red is None or red.op_type != "ReduceMax" or red.inputs[0] is not x:
        return f"Sub '{sub.name}' subtracts something other than the row max of the scores"
    axes = red.attributes.get_ints("axes", None)
    if axes is None and len(red.inputs) > 1 and red.inputs[1] is not None:
        a = const_array(red.inputs[1])
        axes = None if a is None else a.reshape(-1).tolist()
    if axes is None or len(axes) != 1 or not _last_axis(int(axes[0]), x):
        return f"ReduceMax '{red.name}' subtracted from the scores is not over the key axis alone"
    if not red.attributes.get_int("keepdims", 1):
        return f"ReduceMax '{red.name}' subtracted from the scores drops the key axis"
    return None


def is_sink_term(term: ir.Value, depth: int = 12) -> bool:
    """A float parameter broadcast to the scores' shape: ``term`` is a float constant through ops that only
    view or broadcast their data input (their shape inputs may read anything): the same values for every
    batch row and query row, whatever the tokens."""
    for _ in range(depth):
        if term is None or term.dtype not in FLOAT:
            return False
        if const_array(term) is not None:
            return True
        node = term.producer()
        if node is None or node.op_type not in BROADCASTS:
            return False
        term = node.inputs[0]
    return False


def rebroadcast_sinks(editor: GraphEditor, sinks: list[ir.Value], concat: ir.Node) -> None:
    """Each sink of ``concat`` re-broadcast to the query length of the scores it is joined to: the
    exporter's broadcast shape may read the sequence length of a graph input (dynamo's
    ``Shape(attention_mask)``), which token pruning no longer equals. Every query row of a sink is the
    same (:func:`is_sink_term`), so its row 0 serves all::

        sink' = Expand(sink[..., 0:1, :], [1, .., 1, S_q(scores), 1])
    """
    scores = next(v for v in concat.inputs if all(v is not t for t in sinks))
    rank = scores.shape.rank() if scores.shape is not None else 4
    for i, term in enumerate(concat.inputs):
        if all(term is not t for t in sinks):
            continue
        row = editor.op("Slice", [term, editor.const("zero", np.array([0], np.int64)),
                                  editor.const("one", np.array([1], np.int64)),
                                  editor.const("axis", np.array([-2], np.int64))])
        shape = editor.op("Concat", [editor.const("ones", np.ones(rank - 2, np.int64)),
                                     editor.op("Shape", [scores], start=rank - 2, end=rank - 1),
                                     editor.const("one", np.array([1], np.int64))], axis=0)
        concat.replace_input_with(i, editor.op("Expand", [row, shape], hint="sink"))


def sink_concat(concat: ir.Node, scores: ir.Value) -> tuple[list[ir.Value], str] | NoMatch:
    """The sink terms of a key-axis ``Concat`` whose input ``scores`` is the score chain, and on which
    side of the scores they sit ("after" or "before")."""
    if not _last_axis(concat.attributes.get_int("axis", 0), concat.outputs[0]):
        return NoMatch(f"Concat '{concat.name}' joins the scores on another axis than the keys")
    at = [i for i, v in enumerate(concat.inputs) if v is scores]
    terms = [v for v in concat.inputs if v is not scores]
    if len(at) != 1 or not terms or any(v is None or not is_sink_term(v) for v in terms):
        return NoMatch(f"Concat '{concat.name}' joins the scores with columns computed from activations")
    if 0 < at[0] < len(concat.inputs) - 1:
        return NoMatch(f"Concat '{concat.name}' puts sink columns on both sides of the scores")
    return terms, "after" if at[0] == 0 else "before"


def sink_slice(softmax: ir.Node, side: str) -> ir.Node | NoMatch:
    """The Slice that drops the sink columns from the probabilities (``P[..., :-w]`` or ``P[..., w:]``)."""
    uses = [u.node for u in softmax.outputs[0].uses() if u.node.op_type not in ("Shape", "Size")]
    node = uses[0] if len(uses) == 1 else None
    if node is None or node.op_type != "Slice" or len(node.inputs) < 4:
        return NoMatch(f"the probabilities of Softmax '{softmax.name}' with sink columns are not sliced by one "
                       "Slice on the key axis")
    starts, ends, axes = (const_array(node.inputs[i]) for i in (1, 2, 3))
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None or axes is None or starts.size != 1 or ends.size != 1 or axes.size != 1 \
            or not _last_axis(int(axes.reshape(-1)[0]), softmax.outputs[0]) \
            or (steps is not None and int(steps.reshape(-1)[0]) != 1):
        return NoMatch(f"Slice '{node.name}' after the Softmax is not one constant range of the key axis")
    start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    keeps_scores = start == 0 and end < 0 if side == "after" else start > 0 and end >= LONG
    if not keeps_scores:
        return NoMatch(f"Slice '{node.name}' after the Softmax does not drop exactly the sink columns "
                       f"({start}:{end} with the sink {side} the scores)")
    return node
