"""Which axis of a value inside a layer holds the tokens, for prune-tokens' view targets.

A pruned layer's view targets must read the current token count: ``Shape(data)[a]`` for the data's
token axis ``a``. The exporter's symbolic dim names tell it when they survive (dynamo); TorchScript
leaves intermediate dims unnamed, and a model saved by onnxruntime whose fused ops were unfused has its
shapes inferred again under fresh names (``unk__35``). So the axis is derived from the data flow first:
from a value whose token axis is known (a graph input ``[B, S]``, the layer input ``[B, S, D]``),
through the ops between, each of which moves the axis by a rule declared below (a Transpose permutes
it, a Squeeze shifts it, a view puts it where its target's piece reads the sequence length, ...).
An op without a rule ends the walk (no answer, never a guess).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array

from .score_chain import static_rank

# A rule: (node, output, axis walker) -> the output's token axis, or None (not derivable).
Rule = Callable[[ir.Node, ir.Value, Callable[[ir.Value | None], int | None]], int | None]


# prune-tokens' own gathers (spatten domain): they pick token rows of their first input, keeping its rank
ROW_GATHERS = ("GatherRows", "GatherTokens")


def _rank(v: ir.Value | None) -> int | None:
    """From the shape, else from the producer (a gather prune-tokens just added has no inferred shape)."""
    node = v.producer() if v is not None and v.shape is None else None
    if node is not None and node.op_type in ROW_GATHERS:
        return _rank(node.inputs[0])
    return static_rank(v)


def _aligned(node: ir.Node, out: ir.Value, walk) -> int | None:
    """Elementwise, broadcasting from the end (x + bias, Where(mask, x, y), Softmax, Cast, ...): the
    axis of the first input that has one, shifted by the rank difference."""
    for v in node.inputs:
        a = walk(v) if v is not None and const_array(v) is None else None
        if a is not None:
            r_in, r_out = _rank(v), _rank(out)
            return a + (r_out - r_in if r_in is not None and r_out is not None else 0)
    return None


def _first(node: ir.Node, out: ir.Value, walk) -> int | None:
    """Ops that keep their data input's axes (Split, Slice, a norm over the last axis)."""
    return walk(node.inputs[0])


def _concat(node: ir.Node, out: ir.Value, walk) -> int | None:
    """Pieces joined on another axis (a partial rotary's rotated and passed-through features): their
    common token axis stays. Joined on the token axis (a KV cache) or with pieces that disagree: None."""
    axes = {walk(v) for v in node.inputs if v is not None and const_array(v) is None}
    rank = _rank(out) or next((r for v in node.inputs if (r := _rank(v)) is not None), None)
    cat = node.attributes.get_int("axis", 0)
    if len(axes) != 1 or None in axes or (cat < 0 and rank is None):
        return None
    (a,) = axes
    return a if cat % (rank or cat + 1) != a else None


def _transpose(node: ir.Node, out: ir.Value, walk) -> int | None:
    a, perm = walk(node.inputs[0]), node.attributes.get_ints("perm")
    return list(perm).index(a) if a is not None and perm is not None and a in perm else None


def _axes(node: ir.Node) -> list[int] | None:
    a = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    return a.reshape(-1).tolist() if a is not None else node.attributes.get_ints("axes")


def _squeeze(node: ir.Node, out: ir.Value, walk) -> int | None:
    a, axes, rank = walk(node.inputs[0]), _axes(node), _rank(node.inputs[0])
    if a is None or axes is None or rank is None:
        return None
    axes = [x % rank for x in axes]
    return None if a in axes else a - sum(x < a for x in axes)


def _unsqueeze(node: ir.Node, out: ir.Value, walk) -> int | None:
    a, axes, rank = walk(node.inputs[0]), _axes(node), _rank(out)
    if a is None or axes is None or rank is None:
        return None
    for x in sorted(x % rank for x in axes):
        a += x <= a
    return a


def _matmul(node: ir.Node, out: ir.Value, walk) -> int | None:
    """``[.., S, K] @ [.., K, N]``: A's rows stay at their axis; B's columns become the last axis."""
    (a_in, b_in), r_out = node.inputs[:2], _rank(out)
    a, r = walk(a_in), _rank(a_in)
    if a is not None and r is not None and r_out is not None and a != r - 1:
        return a + r_out - r
    b, r = walk(b_in), _rank(b_in)
    return r_out - 1 if b is not None and r is not None and r_out is not None and b == r - 1 else None


def _gather(node: ir.Node, out: ir.Value, walk) -> int | None:
    """Gather on a later axis (a packed QKV's q, k or v): the axis stays."""
    a, g, rank = walk(node.inputs[0]), node.attributes.get_int("axis", 0), _rank(node.inputs[0])
    return a if a is not None and rank is not None and g % rank > a else None


RULES: dict[str, Rule] = {
    **dict.fromkeys(("Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "Pow", "Cast", "CastLike", "Softmax",
                     "Identity", "Dropout", "Neg", "Erf", "Tanh", "Sigmoid", "Relu", "Sqrt", "Exp", "Gelu"), _aligned),
    **dict.fromkeys(("Split", "Slice", "LayerNormalization", "SequenceAt", "SplitToSequence"), _first),
    **dict.fromkeys(ROW_GATHERS, _first),  # rows picked on the token axis: it stays
    "Concat": _concat,
    "Transpose": _transpose,  # out[i] = in[perm[i]]
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "MatMul": _matmul,
    "Gather": _gather,
}


def flow_axis(value: ir.Value | None, sources: set[ir.Value], reads_len: Callable[[ir.Value, set], bool],
              piece_axes: Callable[[ir.Node], tuple[list[int], int]], depth: int = 16) -> int | None:
    """The token axis of ``value`` derived from ``sources`` (token axis 1) through the ops between;
    None where an op has no rule. A Reshape (a view) puts the tokens where its target Concat's one piece
    reading the sequence length sits: ``reads_len(piece, sources)``, or ``Shape(v)[a]`` of a value
    ``v`` whose token axis is ``a`` (a target already rebound by prune-tokens)."""
    memo: dict[int, int | None] = {}

    def walk(v: ir.Value | None, left: int = depth) -> int | None:
        if v is None:
            return None
        if v in sources:
            return 1
        node = v.producer()
        if node is None or left == 0:
            return None
        if id(v) not in memo:
            memo[id(v)] = None  # a cycle never answers
            if node.op_type == "Reshape":
                memo[id(v)] = _view(node, lambda u: walk(u, left - 1))
            else:
                rule = RULES.get(node.op_type)
                memo[id(v)] = rule(node, v, lambda u: walk(u, left - 1)) if rule is not None else None
        return memo[id(v)]

    def _view(node: ir.Node, sub) -> int | None:
        target = const_array(node.inputs[1], max_elements=16)
        if target is not None:  # a target folded to one constant (the token count written into it)
            data = node.inputs[0]
            dims = data.shape.dims if data.shape is not None else None
            return view_entry(target.reshape(-1), dims, sub(data)) if dims is not None else None
        concat = node.inputs[1].producer() if node.inputs[1] is not None else None
        if concat is None or concat.op_type != "Concat":
            return None
        starts, _ = piece_axes(concat)
        hits = [starts[j] for j, p in enumerate(concat.inputs) if p is not None
                and (reads_len(p, sources) or _shape_of_token_axis(p, sub))]
        return hits[0] if len(hits) == 1 else None

    return walk(value)


def view_groups(target: np.ndarray, dims: Sequence) -> list[tuple[range, range]]:
    """A Reshape of data ``dims`` to the constant ``target`` as groups ``(target entries, data axes)``,
    last first: row-major order maps each group's axes onto its entries (a split ``[S, 64] -> [S, 4, 16]``,
    a merge ``[H, S, Dh] -> [H, S*Dh]``). Boundaries are where both sides hold the same number of elements
    after them, read from the end while every size is static (a -1 is resolved when every dim is); the
    leading rest (the batch, a -1) is one group."""
    t = [int(v) for v in np.asarray(target).reshape(-1)]
    if t.count(-1) == 1 and all(isinstance(d, int) for d in dims):
        rest = int(np.prod([v for v in t if v != -1], dtype=np.int64))
        t[t.index(-1)] = int(np.prod(dims, dtype=np.int64)) // rest if rest > 0 else -1
    groups, j, a, tj, da = [], len(t), len(dims), 1, 1
    while j > 0 and a > 0:
        j0, a0, tp, dp = j - 1, a - 1, tj * t[j - 1], da * (dims[a - 1] if isinstance(dims[a - 1], int) else -1)
        while tp != dp and tp > 0 and dp > 0:  # grow the side with fewer elements
            if tp < dp and j0 > 0 and t[j0 - 1] > 0:
                j0, tp = j0 - 1, tp * t[j0 - 1]
            elif dp < tp and a0 > 0 and isinstance(dims[a0 - 1], int):
                a0, dp = a0 - 1, dp * dims[a0 - 1]
            else:
                break
        if tp != dp or tp <= 0:
            break
        groups.append((range(j0, j), range(a0, a)))
        j, a, tj, da = j0, a0, tp, dp
    if j > 0 or a > 0:
        groups.append((range(0, j), range(0, a)))
    return groups


def view_axes(target: np.ndarray, dims: Sequence) -> dict[int, int]:
    """For a Reshape of data ``dims`` to the constant ``target``: each target entry ``j`` that indexes one
    data axis ``a`` exactly (a group of one entry and one axis of :func:`view_groups`), as ``{j: a}``:
    ``[B, 4, 16, 16] -> [-1, 4, 16, 16]`` maps entry 2 to axis 2 and entry 3 to axis 3 (the head size,
    also 16); ``[B*H, S, S] -> [B, H, S, S]`` maps both S entries. Replacing ``target[j]`` by
    ``Shape(data)[a]`` is then exact whatever size axis ``a`` has at run time."""
    return {g.start: d.start for g, d in view_groups(target, dims)
            if len(g) == 1 and len(d) == 1 and isinstance(dims[d.start], int)
            and int(np.asarray(target).reshape(-1)[g.start]) == dims[d.start]}


def view_entry(target: np.ndarray, dims: Sequence, axis: int | None) -> int | None:
    """The entry of a constant view target that indexes the data's token axis ``axis`` (:func:`view_axes`),
    or None (the axis unknown, merged with others, or no entry fits)."""
    hits = [j for j, a in view_axes(target, dims).items() if a == axis] if axis is not None else []
    return hits[0] if len(hits) == 1 else None


def _shape_of_token_axis(piece: ir.Value, walk) -> bool:
    node = piece.producer()
    if node is None or node.op_type != "Shape":
        return False
    start = node.attributes.get_int("start", 0)
    return node.attributes.get_int("end", start + 1) == start + 1 and walk(node.inputs[0]) == start


def token_axis(data: ir.Value, graph: ir.Graph, aligned: int, flow: int | None, static: int | None = None) -> int:
    """The token axis of a view's data for the target piece at output axis ``aligned`` (counted from
    the data's end). By the exporter's names: the one axis whose dim is the inputs' symbolic sequence
    length (GPT-BigCode's dynamo ``[B, 1, S, 3D]``), or of several such (folded scores ``[B, H, S, S]``)
    the aligned one. Else ``flow`` (:func:`flow_axis`). Else axis 1 unless its dim is a fixed size other
    than the export's token count ``static`` (a head count), then the one later axis that can hold the
    tokens, or of several the aligned one; none: refused (a wrong axis writes a view that fails)."""
    syms = {d.value for v in graph.inputs if v.shape is not None and v.shape.rank() >= 2
            and isinstance(d := v.shape.dims[1], ir.SymbolicDim) and d.value}
    dims = data.shape.dims if data.shape is not None else ()
    hits = [i for i, d in enumerate(dims) if isinstance(d, ir.SymbolicDim) and d.value in syms]
    if hits:
        return hits[0] if len(hits) == 1 else aligned if aligned in hits else 1
    if flow is not None and (not dims or 0 <= flow < len(dims)):
        return flow
    fits = [i for i, d in enumerate(dims) if i >= 1 and (not isinstance(d, int) or d == static)]
    if len(dims) < 2 or 1 in fits:
        return 1
    if len(fits) == 1 or aligned in fits:
        return fits[0] if len(fits) == 1 else aligned
    raise OptionError(f"cannot tell the token axis of '{data.name}' {list(dims)} (a view's target reads the "
                      "sequence length): prune-tokens would write a view of the wrong size")
