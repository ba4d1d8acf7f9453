"""Head row maps: which output columns of a Q/K/V projection feed head h at the attention core, and
the view constants that make the chain read a narrower projection (issue #16).

Rather than a case per packing layout (GPT-NeoX ``[B, S, H, 3*Dh]``, Falcon ``[B, S, H+2G, Dh]``,
ModernBERT ``[B, S, 3, H, Dh]``, Phi-3 / GPT-BigCode ``[Q | K | V]`` slices, heads folded into the
batch ``[B*H, S, Dh]``), the chain from projection to core is **evaluated on column indices**: the
projection output is replaced by ``arange(N)`` (batch and sequence dims set to 1), every view op
(Reshape, Transpose, Split, Slice, Gather, Concat, Expand, ...) moves the indices as it would move the
data, per-head element-wise transforms (RoPE, per-head norms, scales) pass their data input through,
and shape arithmetic (``Shape -> Gather -> Div -> Concat``) is computed for real. At the core, the
indices on head h's slice are the projection columns of head h.

:func:`plan` narrows a projection to given columns: for every view on the way it derives the new
constants (a head-split ``Reshape`` target, a head-axis ``Slice``/``Split``/``Gather``, an ``Expand``
repeat) from the kept-column mask, then **re-evaluates** the chain with the narrowed projection and
the new constants and accepts the plan only if each core value equals the original one restricted
to the kept heads (index for index) and no reduction mixes kept and removed columns (a norm over
all heads before the head split, OLMo 2). Anything else is a :class:`RowMapError` with the reason:
the caller then keeps the projection whole and gathers the kept heads at the core.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from spatten_compiler.match import const_array

from .nbits_blocks import out_width
from .transform_region import REGION_OPS

LIMIT = 3000  # nodes in a projection's forward region


class RowMapError(Exception):
    """The chain cannot be evaluated or narrowed; the message is the one-line reason."""


ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Tanh", "Sigmoid", "Erf", "Abs",
    "Cos", "Sin", "Cast", "CastLike", "Identity", "Where", "Max", "Min", "Clip", "Floor",
})
NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"})
REDUCES = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2"})


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _axes(node: ir.Node, ins: list, slot: int = 1) -> list[int] | None:
    if len(ins) > slot and ins[slot] is not None:
        return [int(x) for x in np.asarray(ins[slot]).reshape(-1)]
    a = _attr(node, "axes")
    return None if a is None else [int(x) for x in a]


def _reshape(node, ins):
    x, shape = ins[0], [int(s) for s in np.asarray(ins[1]).reshape(-1)]
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _slice(node, ins):
    x = ins[0]
    starts, ends = np.asarray(ins[1]).reshape(-1), np.asarray(ins[2]).reshape(-1)
    axes = np.asarray(ins[3]).reshape(-1) if len(ins) > 3 and ins[3] is not None else np.arange(len(starts))
    steps = np.asarray(ins[4]).reshape(-1) if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), int)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(*slice(int(s), int(e), int(st)).indices(x.shape[int(a)]))
    return x[tuple(index)]


def _split_sizes(node: ir.Node, x: np.ndarray, ins: list) -> tuple[int, list[int]]:
    axis = _attr(node, "axis", 0) % x.ndim
    if len(ins) > 1 and ins[1] is not None:
        return axis, [int(s) for s in np.asarray(ins[1]).reshape(-1)]
    n = len(node.outputs)
    size = -(-x.shape[axis] // n)
    return axis, [min(size, x.shape[axis] - i * size) for i in range(n)]


def _split(node, ins):
    axis, sizes = _split_sizes(node, ins[0], ins)
    return tuple(np.split(ins[0], np.cumsum(sizes)[:-1], axis=axis))


def _int_div(node, ins):
    a, b = ins
    if np.asarray(a).dtype.kind in "iu" and np.asarray(b).dtype.kind in "iu":
        return np.trunc(np.asarray(a) / np.asarray(b)).astype(np.asarray(a).dtype)
    return np.asarray(a) / np.asarray(b)


def _shape(node, ins):
    return np.array(ins[0].shape[_attr(node, "start", 0):_attr(node, "end", None)], np.int64)


def _unsqueeze(node, ins):
    x = ins[0]
    axes = sorted(a % (x.ndim + len(_axes(node, ins))) for a in _axes(node, ins))
    for a in axes:
        x = np.expand_dims(x, a)
    return x


def _squeeze(node, ins):
    axes = _axes(node, ins)
    return np.squeeze(ins[0], axis=None if axes is None else tuple(axes))


def _expand(node, ins):
    shape = np.broadcast_shapes(ins[0].shape, tuple(int(s) for s in np.asarray(ins[1]).reshape(-1)))
    return np.broadcast_to(ins[0], shape)


def _cast(node, ins):
    return ins[0] if node.op_type == "Identity" else np.asarray(ins[0]).astype(ir.DataType(_attr(node, "to")).numpy())


# Shape arithmetic and views, computed for real (a registry, not a chain of ifs).
OPS: dict[str, Callable] = {
    "Reshape": _reshape, "Slice": _slice, "Split": _split, "Shape": _shape, "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze, "Expand": _expand, "Cast": _cast, "Identity": _cast,
    "Size": lambda n, i: np.array(i[0].size, np.int64),
    "Transpose": lambda n, i: np.transpose(i[0], _attr(n, "perm")),
    "Flatten": lambda n, i: i[0].reshape(int(np.prod(i[0].shape[:_attr(n, "axis", 1)])), -1),
    "Concat": lambda n, i: np.concatenate([np.asarray(x) for x in i], axis=_attr(n, "axis")),
    "Gather": lambda n, i: np.take(i[0], np.asarray(i[1]).astype(np.int64), axis=_attr(n, "axis", 0)),
    "Tile": lambda n, i: np.tile(i[0], [int(r) for r in np.asarray(i[1]).reshape(-1)]),
    "Add": lambda n, i: np.add(*i), "Sub": lambda n, i: np.subtract(*i), "Mul": lambda n, i: np.multiply(*i),
    "Div": _int_div, "Mod": lambda n, i: np.mod(*i), "Neg": lambda n, i: -i[0], "Abs": lambda n, i: np.abs(i[0]),
    "Max": lambda n, i: np.maximum.reduce(i), "Min": lambda n, i: np.minimum.reduce(i),
    "Equal": lambda n, i: np.equal(*i), "Less": lambda n, i: np.less(*i), "Greater": lambda n, i: np.greater(*i),
    "Not": lambda n, i: np.logical_not(i[0]), "And": lambda n, i: np.logical_and(*i),
    "Or": lambda n, i: np.logical_or(*i), "Where": lambda n, i: np.where(*i),
    "ConstantOfShape": lambda n, i: np.full([int(s) for s in np.asarray(i[0]).reshape(-1)],
                                            0 if n.attributes.get("value") is None
                                            else n.attributes["value"].value.numpy().reshape(-1)[0]),
    "Range": lambda n, i: np.arange(np.asarray(i[0]).item(), np.asarray(i[1]).item(), np.asarray(i[2]).item()),
    "Floor": lambda n, i: np.floor(i[0]), "Sqrt": lambda n, i: np.sqrt(i[0]),
}
VIEWS = frozenset({"Reshape", "Slice", "Split", "Unsqueeze", "Squeeze", "Expand", "Transpose", "Flatten",
                   "Concat", "Gather", "Tile", "Identity"})


def forward_region(proj: ir.Node, stops: list[ir.Value]) -> dict[int, ir.Value]:
    """The values computed from the projection's output (not through Shape/Size), up to ``stops``, by id."""
    stop = {id(v) for v in stops}
    seen = {id(proj.outputs[0]): proj.outputs[0]}
    todo = deque([proj.outputs[0]])
    while todo:
        v = todo.popleft()
        if id(v) in stop:
            continue
        for use in v.uses():
            n = use.node
            if (n.op_type in ("Shape", "Size", "MatMul", "Gemm", "Einsum") or n.op_type not in REGION_OPS
                    or n.domain not in ("", "ai.onnx")):
                continue  # a product with another activation (a score, DeBERTa's c2p) is a reader, not a view
            for out in n.outputs:
                if id(out) not in seen:
                    seen[id(out)] = out
                    todo.append(out)
        if len(seen) > LIMIT:
            raise RowMapError(f"projection {proj.name} reaches more than {LIMIT} values")
    return seen


@dataclasses.dataclass
class Evaluator:
    """Column indices of every value computed from ``proj`` (-1: not from this projection, e.g. a
    past K/V; -2: a reduction's result). ``columns`` is what the projection outputs (its output
    columns' original ids); ``overrides`` replaces node inputs (a planned new constant)."""

    proj: ir.Node
    data: dict[int, ir.Value]
    columns: np.ndarray
    overrides: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict)
    memo: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    reductions: list[tuple[ir.Node, np.ndarray, list[int]]] = dataclasses.field(default_factory=list)

    def __call__(self, v: ir.Value) -> np.ndarray:
        if id(v) not in self.memo:
            self.memo[id(v)] = self._compute(v)
        return self.memo[id(v)]

    def input(self, node: ir.Node, slot: int) -> np.ndarray | None:
        key = (id(node), slot)
        if key in self.overrides:
            return self.overrides[key]
        v = node.inputs[slot] if slot < len(node.inputs) else None
        return None if v is None else self(v)

    def _carrier(self, v: ir.Value) -> np.ndarray:
        """A value that does not depend on the projection and is not shape arithmetic: only its shape
        matters here (symbolic dims = 1)."""
        if v.shape is None:
            raise RowMapError(f"value {v.name} has no known shape")
        return np.zeros([d if isinstance(d, int) else 1 for d in v.shape.dims], np.int64)

    def _compute(self, v: ir.Value) -> np.ndarray:
        a = const_array(v, max_elements=1 << 16)
        if a is not None:
            return a
        node = v.producer()
        if node is self.proj:
            rank = v.shape.rank() if v.shape is not None else 3
            return self.columns.reshape([1] * (rank - 1) + [-1])
        if id(v) not in self.data:
            if node is None or v.dtype not in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL):
                return self._carrier(v)
            if node.op_type not in OPS:
                raise RowMapError(f"shape arithmetic {node.op_type} '{node.name}' is not evaluated")
            out = OPS[node.op_type](node, [self.input(node, i) for i in range(len(node.inputs))])
            return out[list(node.outputs).index(v)] if isinstance(out, tuple) else np.asarray(out)
        return self._data(node, v)

    def _data(self, node: ir.Node, v: ir.Value) -> np.ndarray:
        slots = max([len(node.inputs)] + [s + 1 for (n, s) in self.overrides if n == id(node)])
        ins = [self.input(node, i) for i in range(slots)]
        if node.op_type in ELEMENTWISE:  # a per-head transform: the data input passes through
            picks = [i for i, x in enumerate(node.inputs) if x is not None and id(x) in self.data
                     and not (node.op_type == "Where" and i == 0)]
            shape = np.broadcast_shapes(*[np.shape(x) for x in ins if x is not None])
            best = max(picks, key=lambda i: np.size(ins[i]))
            return np.broadcast_to(ins[best], shape)
        if node.op_type in NORMS:
            axis = _attr(node, "axis", -1) % ins[0].ndim
            self.reductions.append((node, ins[0], list(range(axis, ins[0].ndim))))
            if len(ins) > 1:
                np.broadcast_shapes(ins[0].shape, *[np.shape(x) for x in ins[1:] if x is not None])
            return ins[0]
        if node.op_type in REDUCES:
            axes = _axes(node, ins)
            axes = list(range(ins[0].ndim)) if axes is None else [a % ins[0].ndim for a in axes]
            self.reductions.append((node, ins[0], axes))
            keep = _attr(node, "keepdims", 1)
            shape = [1 if i in axes else d for i, d in enumerate(ins[0].shape)] if keep else [
                d for i, d in enumerate(ins[0].shape) if i not in axes]
            return np.full(shape, -2, np.int64)
        if node.op_type in VIEWS:
            if node.op_type == "Concat":  # a past K/V or other non-projection piece: -1
                ins = [x if i is not None and id(i) in self.data else np.full(self._beside(node, ins, x), -1, np.int64)
                       for i, x in zip(node.inputs, ins)]
            out = OPS[node.op_type](node, ins)
            return out[list(node.outputs).index(v)] if isinstance(out, tuple) else out
        raise RowMapError(f"{node.op_type} '{node.name}' on the way from the projection is not evaluated")


    def _beside(self, node: ir.Node, ins: list, x) -> tuple[int, ...]:
        """The shape of a non-projection Concat piece: its own, with the axes it broadcasts (symbolic,
        or a head shared by all: MLA's k_pe) taken from the projection's piece."""
        data = next((y for i, y in zip(node.inputs, ins) if i is not None and id(i) in self.data), None)
        shape = list(np.shape(x))
        if data is None or np.ndim(data) != len(shape):
            return tuple(shape)
        axis = _attr(node, "axis") % len(shape)
        return tuple(s if a == axis or s != 1 else np.shape(data)[a] for a, s in enumerate(shape))


def head_axis(core: np.ndarray) -> int:
    """Heads at the core: [B, H, ., .] (axis 1) or folded [B*H, S, Dh] with B = 1 (axis 0)."""
    return 1 if core.ndim == 4 else 0


def head_columns(core: np.ndarray) -> list[np.ndarray]:
    """Per head at the core, the projection columns it reads (ascending)."""
    ax = head_axis(core)
    cols = []
    for h in range(core.shape[ax]):
        c = np.unique(np.take(core, h, axis=ax))
        cols.append(c[c >= 0])
    return cols


def _mask(idx: np.ndarray, kept: np.ndarray) -> np.ndarray:
    return np.isin(idx, kept) | (idx < 0)


def _keep(mask: np.ndarray, axis: int) -> np.ndarray:
    """Along ``axis``: which positions hold any kept entry."""
    return mask.any(axis=tuple(i for i in range(mask.ndim) if i != axis)) if mask.ndim > 1 else mask


def _changed(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    return [(a, k) for a in range(mask.ndim) if not (k := _keep(mask, a)).all()]


@dataclasses.dataclass
class Narrowing:
    """A projection narrowed to ``columns`` (original ids, ascending) and the node inputs to replace."""

    proj: ir.Node
    columns: np.ndarray
    constants: dict[tuple[int, int], np.ndarray]
    nodes: dict[int, ir.Node]


def _target_override(node: ir.Node, slot: int, mask_out: np.ndarray, at_least: int, plan: Narrowing) -> None:
    """Head-split Reshape / repeat Expand: constant target entries on a narrowed axis get the kept count."""
    changed = dict(_changed(mask_out))
    if not changed:
        return
    target = node.inputs[slot]
    arr = const_array(target)
    offset = mask_out.ndim - (arr.size if arr is not None else mask_out.ndim)
    if arr is not None:
        new = arr.reshape(-1).copy()
        for a, k in changed.items():
            if 0 <= a - offset < new.size and new[a - offset] > at_least:
                new[a - offset] = int(k.sum())
        if (new != arr.reshape(-1)).any():
            plan.constants[(id(node), slot)], plan.nodes[id(node)] = new.astype(arr.dtype), node
        return
    concat = target.producer() if target is not None else None
    if concat is None or concat.op_type != "Concat":
        return
    pos = 0
    for i, piece in enumerate(concat.inputs):
        a = const_array(piece)
        length = a.size if a is not None else 1
        if a is not None:
            new = a.reshape(-1).copy()
            for ax, k in changed.items():
                if pos <= ax < pos + length and new[ax - pos] > at_least:
                    new[ax - pos] = int(k.sum())
            if (new != a.reshape(-1)).any():
                plan.constants[(id(concat), i)], plan.nodes[id(concat)] = new.astype(a.dtype), concat
        pos += length


def _plan_reshape(node, ev, kept, plan):
    _target_override(node, 1, _mask(ev(node.outputs[0]), kept), 0, plan)


def _plan_expand(node, ev, kept, plan):
    _target_override(node, 1, _mask(ev(node.outputs[0]), kept), 1, plan)


def _plan_slice(node, ev, kept, plan):
    x = ev(node.inputs[0])
    changed = dict(_changed(_mask(x, kept)))
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if not changed or starts is None or ends is None:
        return
    axes = np.arange(starts.size) if axes is None else axes.reshape(-1)
    s, e = starts.reshape(-1).copy(), ends.reshape(-1).copy()
    for j, a in enumerate(axes):
        a = int(a) % x.ndim
        if a in changed:
            lo, hi, _ = slice(int(s[j]), int(e[j])).indices(x.shape[a])
            s[j], e[j] = changed[a][:lo].sum(), changed[a][:hi].sum()
    plan.constants[(id(node), 1)], plan.constants[(id(node), 2)] = s.astype(starts.dtype), e.astype(ends.dtype)
    plan.nodes[id(node)] = node


def _plan_split(node, ev, kept, plan):
    x = ev(node.inputs[0])
    ins = [x] + [ev(i) if i is not None else None for i in node.inputs[1:]]
    axis, sizes = _split_sizes(node, x, ins)
    keep = dict(_changed(_mask(x, kept))).get(axis)
    if keep is not None:
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        plan.constants[(id(node), 1)] = np.array([keep[a:b].sum() for a, b in zip(bounds, bounds[1:])], np.int64)
        plan.nodes[id(node)] = node


def _plan_gather(node, ev, kept, plan):
    x, idx = ev(node.inputs[0]), const_array(node.inputs[1])
    axis = _attr(node, "axis", 0) % x.ndim
    keep = dict(_changed(_mask(x, kept))).get(axis)
    if keep is not None and idx is not None:
        plan.constants[(id(node), 1)] = (np.cumsum(keep) - 1)[idx % x.shape[axis]].astype(idx.dtype)
        plan.nodes[id(node)] = node


def _plan_constants(node, ev, kept, plan):
    """A constant operand of an element-wise op spanning a narrowed axis (a bias, a per-head scale)
    is narrowed with it."""
    out = _mask(ev(node.outputs[0]), kept)
    changed = _changed(out)
    for slot, v in enumerate(node.inputs):
        a = const_array(v, max_elements=1 << 20) if v is not None and id(v) not in ev.data else None
        if a is None or a.ndim == 0:
            continue
        new = a
        for ax, k in changed:
            pos = ax - (out.ndim - a.ndim)
            if pos >= 0 and a.shape[pos] == k.size > 1:
                new = np.compress(k, new, axis=pos)
        if new is not a:
            plan.constants[(id(node), slot)], plan.nodes[id(node)] = new, node


PLANS: dict[str, Callable] = {
    "Reshape": _plan_reshape, "Expand": _plan_expand, "Slice": _plan_slice, "Split": _plan_split,
    "Gather": _plan_gather, **{op: _plan_constants for op in ELEMENTWISE | NORMS},
}


def evaluate(proj: ir.Node, cores: list[ir.Value]) -> tuple[Evaluator, list[np.ndarray]]:
    """The column indices at each core value (``cores``: the Q, K^T, V values read by attention)."""
    data = forward_region(proj, cores)
    missing = [c.name for c in cores if id(c) not in data]
    if missing:
        raise RowMapError(f"{missing[0]} is not computed from projection {proj.name}")
    width = proj.outputs[0].shape.dims[-1] if proj.outputs[0].shape is not None else None
    width = out_width(proj) or width  # MatMulNBits: its N (the blocks' shape is [N, k_blocks, blob])
    if not isinstance(width, int):
        w = proj.inputs[1].shape
        width = w.dims[-1] if w is not None else None
    if not isinstance(width, int):
        raise RowMapError(f"projection {proj.name} has no static output width")
    ev = Evaluator(proj, data, np.arange(width, dtype=np.int64))
    try:
        return ev, [ev(c) for c in cores]
    except (ValueError, IndexError, TypeError, KeyError) as e:
        raise RowMapError(f"chain from {proj.name} not evaluated: {e}") from None


def narrow(proj: ir.Node, cores: list[ir.Value], heads: list[np.ndarray | None], kept: np.ndarray
           ) -> Narrowing:
    """Plan the projection narrowed to ``kept`` columns; ``heads[i]``: the heads core ``i`` keeps
    (None: all). Verified by re-evaluation (see the module docstring)."""
    ev, before = evaluate(proj, cores)
    plan = Narrowing(proj, np.asarray(kept, np.int64), {}, {})
    for node, x, axes in ev.reductions:
        m = _mask(x, kept)
        if (m.any(axis=tuple(axes)) != m.all(axis=tuple(axes))).any():
            raise RowMapError(f"{node.op_type} '{node.name}' reduces over kept and removed heads together")
    graph_outputs = {id(v) for v in (proj.graph.outputs if proj.graph is not None else [])}
    core_ids = {id(c) for c in cores}
    for vid, v in ev.data.items():  # read outside the chain (a KV-cache output, a position term): must not change
        if vid in core_ids:
            continue
        escapes = vid in graph_outputs or any(
            u.node.op_type not in ("Shape", "Size") and not any(id(o) in ev.data for o in u.node.outputs)
            for u in v.uses())
        try:
            full = ev(v) if escapes else None
        except (ValueError, IndexError, TypeError, KeyError, RowMapError) as e:
            raise RowMapError(f"{v.name} is read outside the attention core ({e})") from None
        if full is not None and not _mask(full, kept).all():
            raise RowMapError(f"{v.name} is read outside the attention core and would lose columns")
    for core, h in zip(cores, heads):  # the core op is its one reader; another (DeBERTa's c2p) needs all heads
        readers = [u for u in core.uses() if u.node.op_type not in ("Shape", "Size")]
        if h is not None and (len(readers) > 1 or id(core) in graph_outputs):
            raise RowMapError(f"{core.name} is read outside the attention core and would lose heads")
    order = {id(n): i for i, n in enumerate(proj.graph or [])}
    nodes = {id(u.node): u.node for vid in ev.data for u in _uses(proj, vid, ev)}
    for node in sorted(nodes.values(), key=lambda n: order.get(id(n), 0)):
        rule = PLANS.get(node.op_type)
        if rule is not None and all(id(o) in ev.memo for o in node.outputs[:1]):
            rule(node, ev, plan.columns, plan)
    after = Evaluator(proj, ev.data, plan.columns, plan.constants)
    for core, idx, h in zip(cores, before, heads):
        want = idx if h is None else np.take(idx, h, axis=head_axis(idx))
        try:
            got = after(core)
        except (ValueError, IndexError, TypeError, KeyError) as e:
            raise RowMapError(f"narrowed chain from {proj.name} does not evaluate: {e}") from None
        if got.shape != want.shape or not np.array_equal(got, want):
            raise RowMapError(f"narrowing {proj.name} does not give {core.name} the kept heads")
    return plan


def _uses(proj: ir.Node, vid: int, ev: Evaluator):
    return list(ev.data[vid].uses())
