"""What a token-pruned layer reads by position, gathered to the kept tokens (prune-tokens' helper).

prune-tokens gathers a layer's hidden state to the kept tokens (``pos[b, i]`` = the original
position of kept token ``i``). Everything else the layer reads that is indexed by token position is
gathered with the same ``pos``, so kept tokens see exactly what they saw in the full sequence:

* an additive **score term** ``[1|B, 1|H, S, S]`` - T5/MPNet relative-position buckets, ALiBi, and a
  decoder's causal+padding (and sliding-window) mask: query rows and key columns,
  ``term'[b, h, i, j] = term[b, h, pos[b, i], pos[b, j]]``. Causal among the kept tokens is the
  original mask's rows/cols at the kept positions, because kept tokens stay in their original order.
  A rank-3 term on 4-D scores (MPT's ALiBi ``[H, 1, S]``) is read as it broadcasts, ``[1, H, 1, S]``; a
  key-only term (query axis of size 1, by shape or data flow: :func:`unit_axis`) is gathered on its key
  axis only. A term cut to the layer's own length is first cut at the full length (:mod:`.length_cuts`);
* a **position-indexed input** of the layer - a float tensor read from outside the layer that is
  computed from positions or shapes (no hidden state): RoPE's cos/sin ``[1|B, S, D]`` (token axis 1)
  or ``[1|B, 1, S, D]`` / ``[1|B, S, 1, D]`` (the non-unit axis of 1 and 2): the token axis.

What cannot be gathered is refused by :func:`check_term` / :func:`positional_inputs` with the reason:
a score term computed from the layer's activations (DeBERTa c2p/p2c), a term or input computed from
the pruned length itself (it would describe positions ``0..k-1``, not the kept ones), a
position-indexed input whose token axis the shape does not tell. Floats computed from the hidden state
(prune-heads' run-time weight slices) are not position tables and are left alone.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array

from .score_chain import _reaches_scores
from .site_io import POSITION_INPUTS, _ancestors, layer_region

FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


def gather_positions(e: GraphEditor, value: ir.Value, pos: ir.Value, full: ir.Value,
                     axes: tuple[int, ...], lift: int = 0) -> ir.Value:
    """``value`` broadcast to ``[B, .., S at each of axes, ..]`` (``full`` = [B, S]) and gathered along
    ``axes`` by ``pos`` [B, k]. A batch-less ``[S, D]`` table (``lift`` >= 0 for rank 2) gets a batch
    axis first and ``lift`` unit axes after it, to broadcast like the table did against its consumer."""
    rank = value.shape.rank()
    if rank == 2:
        value, rank, axes = e.op("Unsqueeze", [value, e.const("axes", np.array([0], np.int64))]), 3, (1,)
    one = e.const("one", np.array([1], np.int64))
    batch = e.op("Slice", [full, e.const("z", np.array([0], np.int64)), one])
    seq = e.op("Slice", [full, one, e.const("two", np.array([2], np.int64))])
    out = e.op("Expand", [value, e.op("Concat", [batch, *[seq if a in axes else one for a in range(1, rank)]], axis=0)])
    k = e.op("Shape", [pos], start=1, end=2)
    for axis in axes:
        pieces = [e.op("Shape", [out], start=0, end=axis), k]
        if axis + 1 < rank:
            pieces.append(e.op("Shape", [out], start=axis + 1))
        others = [a for a in range(1, rank) if a != axis]
        index = e.op("Unsqueeze", [pos, e.const("axes", np.array(others, np.int64))]) if others else pos
        index = e.op("Expand", [index, e.op("Concat", pieces, axis=0)])
        out = e.op("GatherElements", [out, index], axis=axis)
    if lift:
        out = e.op("Unsqueeze", [out, e.const("axes", np.arange(1, 1 + lift, dtype=np.int64))])
    return out


def own_region(start: ir.Value, end: ir.Value | None) -> list[ir.Node]:
    """:func:`layer_region` without the nodes downstream of ``end``: run-time head pruning carries
    head scores from layer to layer (HeadImportance -> HeadSelect -> a later layer's weight slice), a
    path that leaks the region into every later layer, whose own terms carry other kept positions."""
    later = {id(n) for n in layer_region(end, None)} if end is not None else set()
    return [n for n in layer_region(start, end) if id(n) not in later]


POSITION_OPS = frozenset({"Range", "CumSum", "Trilu", "EyeLike"})  # ops that make values differ by position


def reaches(value: ir.Value, target: ir.Value, limit: int = 600) -> bool:
    """True if ``target`` is an ancestor of ``value`` (through shape reads)."""
    seen: set[int] = set()
    todo = deque([value])
    while todo and len(seen) < limit:
        v = todo.popleft()
        if v is None or id(v) in seen:
            continue
        if v is target:
            return True
        seen.add(id(v))
        node = v.producer()
        if node is not None:
            todo.extend(node.inputs)
    return False


def check_term(layer: int, term: ir.Value, region: list[ir.Node], pruned: ir.Value, what: str,
               ranks: tuple[int, ...] = (4,)) -> None:
    """Refuse a score term that cannot be gathered: computed inside the layer, or from the pruned length
    (``ranks``: 3 too for heads folded into the batch, ``[B*H, 1|S, S]``)."""
    inside = {id(o) for n in region for o in n.outputs}
    if id(term) in inside:
        raise OptionError(f"layer {layer}: {what} {term.name} is computed from the layer's activations "
                          "(disentangled attention); prune-tokens cannot gather it")
    if term.shape is None or term.shape.rank() not in ranks:
        raise OptionError(f"layer {layer}: {what} {term.name} is not [B, H, S, S] "
                          f"(shape {term.shape}); prune-tokens cannot gather its rows and columns")
    if reaches(term, pruned):
        raise OptionError(f"layer {layer}: {what} {term.name} is computed from the pruned layer input's "
                          "length; prune a later layer (the schedule's first entries 1.0)")


SHAPE_ARITH = frozenset({"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "Reshape",
                         "Add", "Sub", "Mul", "Min", "Max"})


def _shape_read_of(value: ir.Value, target: ir.Value, limit: int = 40) -> bool:
    """``value`` is integer shape arithmetic on ``target``'s shape (reaches it only through Shape)."""
    todo, seen = deque([value]), 0
    found = False
    while todo and seen < limit:
        v = todo.popleft()
        seen += 1
        node = v.producer() if v is not None else None
        if node is None or const_array(v) is not None:
            continue
        if node.op_type not in SHAPE_ARITH:
            return False
        if node.op_type in ("Shape", "Size"):
            found = found or reaches(node.inputs[0], target)
            continue
        todo.extend(i for i in node.inputs if i is not None)
    return found and not todo


def shrinks_causal(cond: ir.Value, pruned: ir.Value, limit: int = 400) -> bool:
    """True when a causal condition is sliced to the pruned length from a full lower triangle (GPT-Neo's
    ``bias[:, :, k-q:k, :k]``): the slice of the reduced length is causal among the kept tokens, which
    stay in order; so is a comparison of two Ranges. A banded (sliding-window) buffer is not: the window
    must count original positions."""
    if not reaches(cond, pruned):
        return False
    node = _through(cond, COMPARE_VIEWS).producer()
    if node is not None and node.op_type in ("LessOrEqual", "GreaterOrEqual") and all(map(_range, node.inputs)):
        return True  # Range(k)[None] <= Range(k)[:, None]: a causal mask of the reduced length
    seen: set[int] = set()
    todo, squares = deque([cond]), []
    while todo and len(seen) < limit:
        v = todo.popleft()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        a = const_array(v, max_elements=1 << 22)
        if a is not None and a.ndim >= 2 and a.shape[-1] == a.shape[-2] > 1 and np.isin(a, (0, 1)).all():
            squares.append(a)  # a 0/1 square: a mask buffer (weights on the walk are not)
        if (node := v.producer()) is not None:
            todo.extend(node.inputs)
    return len(squares) == 1 and a_is_tril(squares[0])


# between a causal comparison and its use: views of the boolean (TF: a float 0/1 cast, reshaped to
# [1, 1, S, S], cast back by normalize's mask_forms)
COMPARE_VIEWS = ("Cast", "Reshape", "Unsqueeze", "Identity")
# between a Range and the comparison: views; a whole-axis Slice (TF's ``range(n)[:, None]``)
RANGE_VIEWS = ("Unsqueeze", "Reshape", "Cast", "Slice")


def _whole(node: ir.Node) -> bool:
    """A Slice keeping its axes whole: starts 0, steps 1, ends open (tf2onnx writes 1e9; no axis is that long)."""
    consts = [const_array(v) for v in node.inputs[1:]]
    if len(consts) < 2 or any(c is None for c in consts):
        return False
    steps = consts[3] if len(consts) > 3 else np.ones_like(consts[0])
    return bool((consts[0] == 0).all() and (consts[1] >= 10**9).all() and (steps == 1).all())


def _through(value: ir.Value, ops: tuple[str, ...], limit: int = 6) -> ir.Value:
    for _ in range(limit):
        node = value.producer()
        if node is None or node.op_type not in ops or (node.op_type == "Slice" and not _whole(node)):
            return value
        value = node.inputs[0]
    return value


def _dim_read(value: ir.Value | None) -> bool:
    """``value`` is one entry of a shape (Squeeze/Gather/Slice/Cast/Unsqueeze of a ``Shape``)."""
    for _ in range(6):
        node = value.producer() if value is not None else None
        if node is None or node.op_type not in ("Squeeze", "Unsqueeze", "Gather", "Slice", "Cast", "Shape"):
            return False
        if node.op_type == "Shape":
            return True
        value = node.inputs[0]
    return False


def _range(value: ir.Value | None, depth: int = 3) -> bool:
    """A Range through views, or such a Range offset by shape entries (TF GPT-2's ``range(ns) - ns + nd``:
    0 whenever the query and key lengths are equal, as they are without a cache, pruned or not)."""
    node = _through(value, RANGE_VIEWS).producer() if value is not None else None
    if node is not None and node.op_type == "Range":
        return True
    if node is None or node.op_type not in ("Add", "Sub") or depth == 0:
        return False
    ranges = [i for i in node.inputs if _range(i, depth - 1)]
    return len(ranges) == 1 and all(_dim_read(i) for i in node.inputs if i is not ranges[0])


def a_is_tril(a: np.ndarray) -> bool:
    return bool(np.array_equal(a.astype(bool), np.broadcast_to(np.tril(np.ones(a.shape[-2:], bool)), a.shape)))


UNIT_VIEWS = frozenset({"Slice", "Cast", "Identity", "Neg"})  # an axis of size 1 stays at most 1 through these


def unit_axis(value: ir.Value, axis: int, depth: int = 8) -> bool:
    """``value``'s ``axis`` has size 1: statically, or by its data flow where inference lost it (MPT's ALiBi
    ``[H, 1, 2048]`` table sliced with starts computed at run time: every dim unknown, its query axis 1)."""
    dims = value.shape.dims if value.shape is not None else None
    if dims is not None and dims[axis] == 1:
        return True
    node = value.producer()
    if node is None or depth == 0:
        return False
    if node.op_type == "Unsqueeze" and dims is not None:
        added = const_array(node.inputs[1])
        added = sorted(int(a) % len(dims) for a in added.reshape(-1)) if added is not None else None
        if added is None or axis in added:
            return added is not None
        return unit_axis(node.inputs[0], axis - sum(a < axis for a in added), depth - 1)
    src = node.inputs[0] if node.inputs else None
    if node.op_type not in UNIT_VIEWS or src is None or src.shape is None or dims is None or (
            src.shape.rank() != len(dims)):
        return False
    return unit_axis(src, axis, depth - 1)


def _token_axes(value: ir.Value, score_term: bool) -> tuple[int, ...] | None:
    dims = value.shape.dims
    if score_term:  # added to [B, H, S, S] scores: every query/key axis it has at full length
        axes = tuple(a for a in (2, 3) if dims[a] != 1) if len(dims) == 4 else ()
        return axes or None
    if len(dims) == 2:
        return (0,)  # [S, D]: no batch, broadcast from the right against its consumer
    if len(dims) == 3:
        return (1,)
    if len(dims) == 4:
        unit = [a for a in (1, 2) if dims[a] == 1]
        return tuple({1, 2} - set(unit)) if len(unit) == 1 else None
    return None


def _is_score_term(node: ir.Node, value: ir.Value) -> bool:
    """``value`` is added to (or selects) attention scores at ``node``."""
    if node.op_type not in ("Add", "Where"):
        return False
    return any(i is not value and _reaches_scores(i) for i in node.inputs[node.op_type == "Where":])


def _sized_inside(nodes: list[ir.Node], inputs: list[ir.Value], inside: set[int], pruned: ir.Value) -> bool:
    """A float built from no graph input, no position op and no float table (scalars only), just from the
    shapes of the layer's own values (``ConstantOfShape(Shape(router_logits))``): the same at every
    position, its size the pruned length - nothing to gather. A table sliced to that length is not."""
    shapes = [n for n in nodes if n.op_type in ("Shape", "Size")]
    tables = [i for n in nodes if n.op_type not in ("Shape", "Size") for i in n.inputs
              if i is not None and i.dtype in FLOATS and (i.producer() is None or i.producer().op_type == "Constant")
              and _size(i) != 1]
    return (not inputs and bool(shapes) and not tables and not any(n.op_type in POSITION_OPS for n in nodes)
            and all(_sized_like_inside(n.inputs[0], inside, pruned) for n in shapes))


def _sized_like_inside(value: ir.Value, inside: set[int], pruned: ir.Value, depth: int = 3) -> bool:
    """``value`` is in the layer, or zeros shaped like it (``ConstantOfShape(Shape(x))``, an MoE's index_add
    buffer whose shape sizes another buffer)."""
    if id(value) in inside or value is pruned:
        return True
    node = value.producer()
    shape = node.inputs[0].producer() if node is not None and node.op_type == "ConstantOfShape" else None
    return (depth > 0 and shape is not None and shape.op_type == "Shape"
            and _sized_like_inside(shape.inputs[0], inside, pruned, depth - 1))


def _size(value: ir.Value) -> int | None:
    dims = value.shape.dims if value.shape is not None else None
    return None if dims is None or not all(isinstance(d, int) for d in dims) else int(np.prod(dims, dtype=np.int64))


# Element-wise ops through which a constant table meets the layer's per-token values
ELEMENTWISE = frozenset({"Mul", "Add", "Sub", "Div", "Where"})


def _static_table(node: ir.Node, v: ir.Value, full_len: int | None) -> tuple[int, ...] | None:
    """The token axes of a constant float that is a position table folded at a fixed sequence length
    (an export with static input shapes, then simplified: RoPE's cos/sin ``[B, 1, S, D]``, a causal
    mask ``[1, 1, S, S]``): read element-wise by the layer, with the layer input's static length on
    every token axis. None for any other constant (weights, scales, per-channel terms)."""
    if full_len is None or full_len <= 1 or node.op_type not in ELEMENTWISE or v.dtype not in FLOATS:
        return None
    if v.shape is None or v.shape.rank() < 2 or not all(isinstance(d, int) for d in v.shape.dims):
        return None
    axes = _token_axes(v, _is_score_term(node, v))
    return axes if axes is not None and all(v.shape.dims[a] == full_len for a in axes) else None


def _lift(layer: int, node: ir.Node, v: ir.Value) -> int:
    """For an [S, D] table: the unit axes between batch and tokens of its consumer's rank."""
    if v.shape.rank() != 2:
        return 0
    out = node.outputs[0].shape
    if out is None or out.rank() < 3:
        raise OptionError(f"layer {layer}: position table {v.name} [S, D] read by {node.op_type} "
                          "of unknown rank; prune-tokens cannot gather it")
    return out.rank() - 3


def positional_inputs(layer: int, region: list[ir.Node], skip: set[int], pruned: ir.Value,
                      graph: ir.Graph, mask_source: str | None, full_len: int | None = None
                      ) -> list[tuple[ir.Value, tuple[int, ...], int]]:
    """(value, token axes, lift) of every position-indexed float the layer reads from outside itself;
    ``lift``: for an [S, D] table, the unit axes between batch and tokens of its consumer's rank. A
    term added to the scores (a mask or bias whatever produced it) is gathered on its query and key
    axes. ``full_len``: the layer input's static sequence length, when the export fixed it (constant
    position tables, :func:`_static_table`)."""
    inside = {id(o) for n in region for o in n.outputs}
    allowed = (POSITION_INPUTS - {"input_ids"}) | {mask_source, "attention_mask"}
    found: dict[int, tuple[ir.Value, tuple[int, ...], int]] = {}
    for node in region:
        if node.op_type in ("Shape", "Size"):
            continue
        for v in node.inputs:
            if v is None or id(v) in inside or id(v) in skip or id(v) in found or v.dtype not in FLOATS:
                continue
            if v.const_value is not None or const_array(v) is not None:
                axes = _static_table(node, v, full_len)
                if axes is not None:
                    found[id(v)] = (v, axes, _lift(layer, node, v))
                continue
            # the whole ancestry, not a bounded walk: a deep layer's run-time weight slice (prune-heads) reaches
            # the graph's inputs only through every earlier layer, and a walk cut short misses the hidden state
            nodes, inputs = _ancestors(v, limit=1 << 20)
            if not inputs and not any(n.op_type in ("Shape", "Size", "Range") for n in nodes):
                continue  # computed from constants only: not indexed by position
            if any(i.name not in allowed for i in inputs):
                continue  # computed from the hidden state: not a position table (e.g. prune-heads' kept weights)
            if _sized_inside(nodes, inputs, inside, pruned):
                continue  # zeros_like of an in-layer value (an MoE router's scores): follows the kept length
            if v.shape is None or v.shape.rank() < 2:
                continue  # a scalar or per-channel value
            axes = _token_axes(v, _is_score_term(node, v))
            if axes is None:
                raise OptionError(f"layer {layer}: position-indexed input {v.name} of shape {v.shape}: "
                                  "prune-tokens cannot tell its token axis")
            if reaches(v, pruned):
                raise OptionError(f"layer {layer}: {v.name} is computed from the pruned layer input's length; "
                                  "prune a later layer (the schedule's first entries 1.0)")
            found[id(v)] = (v, axes, _lift(layer, node, v))
    return list(found.values())
