"""Slice assignments into an empty tensor -> one last-axis ``Concat`` (a normalize step).

torch code that fills a fresh tensor piece by piece along its last axis::

    k = x.new_empty(B, H, S, D); k[..., :d] = a; k[..., d:] = b         # == torch.cat((a, b), -1)

(HF DeepSeek-V2/V3 and other multi-head latent attention models assemble the key this way: a
per-head part and a RoPE part shared by all heads) is exported as ScatterND writes into a
``ConstantOfShape``. Each write is one of the forms in :data:`WRITE_FORMS`:

  index_put      ScatterND(data, Concat(i_0, .., i_{r-2}, [lo, hi), axis=-1), update)     (TorchScript)
                 with every leading index i_a = Range(0, Shape(.)[a], 1), broadcast (all of axis a)
  slice_scatter  Transpose_p(ScatterND(Transpose_p(data), [[lo] .. [hi-1]], Transpose_p(update)))  (dynamo)
                 with p swapping the first and the last axis

onnxscript's optimizer (torch's default ``optimize=True``) merges the closing ``Transpose_p`` of the last
write with the Transpose that follows (the key's ``k^T``): ``Transpose_p'`` with ``p' = p o q``; it is split
back into ``Transpose_q(Transpose_p(.))`` first (:func:`split_merged_swaps`).

A chain of writes into the empty tensor whose ``[lo, hi)`` ranges tile its last axis is rewritten
``Concat(updates in order, axis=-1)``: the key-assembly form the attention matcher reads. Anything else
keeps its ScatterNDs; :func:`assembled` says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import NoMatch, const_array

_VIEWS = ("Unsqueeze", "Expand", "Reshape", "Squeeze")


@dataclasses.dataclass
class Write:
    data: ir.Value  # the tensor written into
    lo: int  # the last-axis range written
    hi: int
    update: ir.Value


def _strip(value: ir.Value, ops: tuple[str, ...] = _VIEWS) -> ir.Value:
    while (p := value.producer()) is not None and p.op_type in ops and p.inputs:
        value = p.inputs[0]
    return value


def _span(index: np.ndarray | None) -> tuple[int, int] | None:
    """[lo, hi) when ``index`` (one non-unit axis) is lo, lo+1, .., hi-1 in order: update position j is
    written to lo + j (a permuted index would reorder the piece, which a Concat does not)."""
    if index is None or index.size == 0 or index.dtype.kind not in "iu":
        return None
    flat = index.reshape(-1).astype(np.int64)
    lo = int(flat[0])
    return (lo, lo + flat.size) if np.array_equal(flat, np.arange(lo, lo + flat.size)) else None


def _whole_axis(component: ir.Value, axis: int) -> bool:
    """``component`` is ``Range(0, Shape(x)[axis], 1)`` broadcast: every position of that axis."""
    rng = _strip(component).producer()
    if rng is None or rng.op_type != "Range":
        return False
    start, limit, step = (const_array(i) for i in rng.inputs)
    gather = _strip(rng.inputs[1], ("Cast",)).producer()
    where = const_array(gather.inputs[1]) if gather is not None and gather.op_type == "Gather" else None
    shape = gather.inputs[0].producer() if where is not None else None
    return (start is not None and int(start) == 0 and step is not None and int(step) == 1 and limit is None
            and shape is not None and shape.op_type == "Shape" and where.size == 1 and int(where) == axis)


def _index_put(value: ir.Value) -> Write | NoMatch:
    node = value.producer()
    if node is None or node.op_type != "ScatterND" or node.attributes.get_string("reduction", "none") != "none":
        return NoMatch("not a ScatterND")
    data, index, update = node.inputs
    concat = index.producer()
    rank = data.shape.rank() if data.shape is not None else None
    if concat is None or concat.op_type != "Concat" or rank is None or len(concat.inputs) != rank:
        return NoMatch(f"ScatterND '{node.name}': the index is not one component per axis")
    if not all(_whole_axis(c, a) for a, c in enumerate(concat.inputs[:-1])):
        return NoMatch(f"ScatterND '{node.name}': a leading index is not a whole axis (a Range over it)")
    span = _span(const_array(_strip(concat.inputs[-1])))
    if span is None:
        return NoMatch(f"ScatterND '{node.name}': the last-axis index is not a constant range")
    src = update.producer()
    if src is not None and src.op_type == "Reshape" and src.inputs[0].shape is not None and (
            src.inputs[0].shape.rank() == rank):
        update = src.inputs[0]  # reshaped to the index's shape, which it has already (torch expands first)
    return Write(data, *span, update)


def _swaps_last(node: ir.Node | None, rank: int | None) -> bool:
    perm = node.attributes.get_ints("perm", None) if node is not None and node.op_type == "Transpose" else None
    return bool(perm) and rank is not None and list(perm) == [rank - 1, *range(1, rank - 1), 0]


def _slice_scatter(value: ir.Value) -> Write | NoMatch:
    out = value.producer()
    rank = value.shape.rank() if value.shape is not None else None
    scatter = out.inputs[0].producer() if _swaps_last(out, rank) else None
    if scatter is None or scatter.op_type != "ScatterND":
        return NoMatch("not Transpose(ScatterND) swapping the last axis")
    data, index, update = (i.producer() for i in scatter.inputs)
    if not (_swaps_last(data, rank) and _swaps_last(update, rank)):
        return NoMatch(f"ScatterND '{scatter.name}': data and update are not moved by the same Transpose")
    idx = const_array(scatter.inputs[1])
    span = _span(idx) if idx is not None and idx.ndim == 2 and idx.shape[1] == 1 else None
    if span is None:
        return NoMatch(f"ScatterND '{scatter.name}': the index is not a constant range of rows")
    upd = update.inputs[0]
    cast = upd.producer()
    if cast is not None and cast.op_type == "CastLike" and cast.inputs[0].dtype == upd.dtype:
        upd = cast.inputs[0]
    return Write(data.inputs[0], *span, upd)


# How a single slice write looks in each exporter: form -> reader.
WRITE_FORMS: dict[str, Callable[[ir.Value], Write | NoMatch]] = {
    "index_put": _index_put,
    "slice_scatter": _slice_scatter,
}


def _empty_width(value: ir.Value) -> int | None:
    """The last-axis width of ``ConstantOfShape`` (through CastLike): the tensor written into."""
    node = _strip(value, ("CastLike", "Cast")).producer()
    if node is None or node.op_type != "ConstantOfShape":
        return None
    shape = const_array(node.inputs[0])
    if shape is not None and shape.size:
        return int(shape.reshape(-1)[-1])
    dims = node.outputs[0].shape.dims if node.outputs[0].shape is not None else ()
    return dims[-1] if dims and isinstance(dims[-1], int) else None


def assembled(value: ir.Value, limit: int = 8) -> list[ir.Value] | NoMatch:
    """The pieces ``value`` is the last-axis concatenation of, when it is a chain of slice writes
    tiling an empty tensor; else a NoMatch with the reason."""
    writes: list[Write] = []
    for _ in range(limit):
        width = _empty_width(value)
        if width is not None:
            break
        found = [f(value) for f in WRITE_FORMS.values()]
        write = next((w for w in found if isinstance(w, Write)), None)
        if write is None:
            return NoMatch("; ".join(w.reason for w in found if w.reason.startswith("ScatterND"))
                           or "not a slice write into an empty tensor")
        writes.append(write)
        value = write.data
    else:
        return NoMatch("more than 8 slice writes")
    if len(writes) < 2:
        return NoMatch("one slice write: not an assembly")
    writes.sort(key=lambda w: w.lo)
    ends = [0] + [w.hi for w in writes]
    if any(w.lo != end for w, end in zip(writes, ends, strict=False)) or ends[-1] != width:
        return NoMatch(f"the writes {[(w.lo, w.hi) for w in writes]} do not tile the last axis [0, {width})")
    return [w.update for w in writes]


def _written(value: ir.Value, limit: int = 8) -> list[ir.Value]:
    """The intermediate tensors of the write chain ending in ``value`` (the same shape as ``value``)."""
    chain = []
    for _ in range(limit):
        write = next((w for f in WRITE_FORMS.values() if isinstance(w := f(value), Write)), None)
        if write is None:
            break
        chain.append(write.data)
        value = write.data
    return chain


def _shape_only(value: ir.Value, skip: set[int], depth: int = 3) -> bool:
    """Every use of ``value`` (except nodes in ``skip``) ends in Shape/Size through at most ``depth`` views."""
    for use in value.uses():
        node = use.node
        if id(node) in skip or node.op_type in ("Shape", "Size"):
            continue
        if depth == 0 or node.op_type not in ("Slice", "Transpose", "Reshape", "CastLike", "Cast") or use.idx != 0:
            return False
        if not all(_shape_only(o, set(), depth - 1) for o in node.outputs):
            return False
    return True


def split_merged_swaps(model: ir.Model, e: GraphEditor) -> int:
    """``Transpose_r(ScatterND(Transpose_p(data), idx, Transpose_p(update)))``, p the last-axis swap and
    r another permutation -> ``Transpose_q(Transpose_p(ScatterND(..)))`` with ``q[i] = p[r[i]]`` (p is its
    own inverse): the closing swap of the slice_scatter form, then the rest. Returns how many."""
    count = 0
    for node in list(model.graph):
        live = node.outputs[0].uses() or node.outputs[0].is_graph_output()  # not one split before
        src = node.inputs[0].producer() if node.op_type == "Transpose" and node.inputs and live else None
        shape = src.outputs[0].shape if src is not None and src.op_type == "ScatterND" else None
        rank = shape.rank() if shape is not None else None
        if rank is None or rank < 2 or _swaps_last(node, rank) or not all(
                _swaps_last(src.inputs[i].producer(), rank) for i in (0, 2)):
            continue
        p = [rank - 1, *range(1, rank - 1), 0]
        swapped = e.op("Transpose", [src.outputs[0]], perm=p)
        swapped.shape, swapped.type = ir.Shape([shape.dims[i] for i in p]), src.outputs[0].type
        rest = e.op("Transpose", [swapped], perm=[p[i] for i in node.attributes.get_ints("perm")])
        rest.shape, rest.type = node.outputs[0].shape, node.outputs[0].type
        e.replace_uses(node.outputs[0], rest)
        count += 1
    return count


def slice_writes_to_concat(model: ir.Model) -> int:
    """Every slice-write chain that tiles an empty tensor -> ``Concat(pieces, axis=-1)``; returns how many."""
    e = GraphEditor(model, "spatten/normalize")
    if split_merged_swaps(model, e):
        e.commit()
    count = 0
    for node in list(model.graph):
        if node.op_type not in ("ScatterND", "Transpose") or not node.outputs[0].uses():
            continue
        out = node.outputs[0]
        if node.op_type == "Transpose" and (out.shape is None or not _swaps_last(node, out.shape.rank())):
            continue
        pieces = assembled(out)
        if isinstance(pieces, NoMatch):
            continue
        cat = e.op("Concat", pieces, axis=-1, hint="assembled")
        cat.shape, cat.type = out.shape, out.type
        e.replace_uses(out, cat)
        *inner, root = _written(out)
        for v in inner:  # a partly written tensor's shape (read to size the next write) is the empty one's
            chain = [u.node for u in v.uses() if u.node.op_type in ("ScatterND", "Transpose")]
            if _shape_only(v, {id(n) for n in chain}):
                e.replace_uses(v, root, keep=chain)
        count += 1
    if count:
        e.commit()
    return count
