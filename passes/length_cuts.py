"""Cuts of a position table to a layer's own length, made full-length for token pruning (prune-tokens' helper).

A layer without a cache sometimes cuts a table (a mask, a position bias) to its own key length ``k``,
read from a shape inside the layer. Once prune-tokens gives the layer ``k`` kept tokens, that cut
describes positions ``0..k-1``, not the kept ones. Where the cut's form is known, it is rewritten to
cut at the full length ``S`` (what it cut before pruning, since ``k = S`` then), and the full-length
term is gathered at the kept positions like any other (:mod:`.token_positions`):

* ``term[..., :k]`` -> ``term[..., :]``  (transformers 4's ``causal_mask[:, :, :, :key_states.shape[-2]]``)
* ``table[..., C - k:]`` -> ``table[..., C - S:]``  (MPT's ALiBi: the last k columns of a fixed
  ``[H, 1, 2048]`` table; the suffix's ``k`` must be read from the token axis of a shape)

Any other use of the pruned length in a term stays refused by :func:`.token_positions.check_term`.
evict-kv reads the same suffix cut by a KV cache's length (:func:`suffix_cut`; :mod:`.evict_terms`).
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import const_array

from .token_positions import _shape_read_of, _through, reaches

INT64_MAX = np.iinfo(np.int64).max
LENGTH_VIEWS = ("Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity")  # between a length and the Slice reading it


@dataclasses.dataclass(frozen=True)
class LengthCut:
    """A Slice of a table the pruned input does not feed, on the table's last (key) axis, whose bound is
    read from the pruned layer's own length ``k``. Without a cache ``k`` is the full length ``S``; the cut
    at ``S`` is the full-length term, which prune-tokens gathers at the kept positions like any other.

    ``form``: ``prefix`` - ``term[..., :k]`` (transformers 4's ``causal_mask[:, :, :, :key_states.shape[-2]]``):
    the bound becomes the axis' end (the mask is built S wide); ``suffix`` - ``table[..., C - k:]``, the
    last k columns of a fixed C-wide table (MPT's ALiBi ``[H, 1, 2048]``): the start becomes ``C - S``
    (``width`` = C)."""

    node: ir.Node
    form: str
    width: int = 0


def _token_length_read(value: ir.Value | None, pruned: ir.Value, token_dim) -> bool:
    """``value`` is, through views, the token-axis entry of the shape of a value computed from ``pruned``:
    ``Gather(Shape(v), i)`` or ``Shape(v, start=i, end=i + 1)`` where ``v``'s dim ``i`` is ``token_dim`` (the
    layer input's named or static token dim; an unnamed dim proves nothing)."""
    if token_dim is None or (isinstance(token_dim, ir.SymbolicDim) and token_dim.value is None):
        return False
    node = _through(value, LENGTH_VIEWS).producer() if value is not None else None
    if node is not None and node.op_type == "Gather" and const_array(node.inputs[1]) is not None:
        index = const_array(node.inputs[1]).reshape(-1)
        shape_node = node.inputs[0].producer()
        if index.size != 1 or shape_node is None or shape_node.op_type != "Shape":
            return False
        start = shape_node.attributes.get("start")
        axis, node = int(index[0]) + (start.value if start is not None else 0), shape_node
    elif node is not None and node.op_type == "Shape":
        start, end = node.attributes.get("start"), node.attributes.get("end")
        if start is None or end is None or end.value != start.value + 1:
            return False
        axis = start.value
    else:
        return False
    src = node.inputs[0]
    dims = src.shape.dims if src.shape is not None else None
    return dims is not None and -len(dims) <= axis < len(dims) and dims[axis] == token_dim and reaches(src, pruned)


def _suffix_width(start: ir.Value, pruned: ir.Value, token_dim) -> int | None:
    """C when ``start`` is ``C - k`` (through views; dynamo writes ``C + -1 * k``) with ``k`` the token length."""
    node = _through(start, LENGTH_VIEWS).producer()
    if node is None or node.op_type not in ("Sub", "Add"):
        return None
    c = const_array(node.inputs[0])
    k = node.inputs[1]
    if node.op_type == "Add":  # C + (-1 * k)
        mul = k.producer() if k is not None else None
        if mul is None or mul.op_type != "Mul":
            return None
        minus = [i for i in mul.inputs
                 if (a := const_array(i)) is not None and a.size == 1 and int(a.reshape(-1)[0]) == -1]
        k = next((i for i in mul.inputs if i not in minus), None) if len(minus) == 1 else None
    if c is None or c.size != 1 or not _token_length_read(k, pruned, token_dim):
        return None
    return int(c.reshape(-1)[0])


def _slice_bound(node: ir.Node, slot: int) -> int | None:
    a = const_array(node.inputs[slot]) if len(node.inputs) > slot and node.inputs[slot] is not None else None
    return int(a.reshape(-1)[0]) if a is not None and a.size == 1 else None


def _length_cut(node: ir.Node, pruned: ir.Value, token_dim) -> LengthCut | None:
    """The cut ``node`` makes, if it is one (:class:`LengthCut`): a Slice of one axis, the data's last,
    step 1, its data not computed from ``pruned``."""
    if node.op_type != "Slice" or len(node.inputs) < 4 or reaches(node.inputs[0], pruned):
        return None
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    axis = _slice_bound(node, 3)
    if rank not in (3, 4) or axis not in (rank - 1, -1) or _slice_bound(node, 4) not in (None, 1) or (
            len(node.inputs) > 4 and node.inputs[4] is not None and _slice_bound(node, 4) is None):
        return None
    if _slice_bound(node, 1) == 0 and rank == 4 and _shape_read_of(node.inputs[2], pruned):
        return LengthCut(node, "prefix")
    end = _slice_bound(node, 2)
    width = node.inputs[0].shape.dims[-1]
    if end is not None and (end >= 2**62 or isinstance(width, int) and end >= width):
        c = _suffix_width(node.inputs[1], pruned, token_dim)
        if c is not None:
            return LengthCut(node, "suffix", c)
    return None


def length_slices(term: ir.Value, pruned: ir.Value, token_dim=None, limit: int = 40) -> list[LengthCut]:
    """The :class:`LengthCut` s on ``term``'s float ancestry that read the pruned layer's own length.
    ``token_dim``: the layer input's token dim, which a suffix cut's length must be read from."""
    found, todo, seen = [], deque([term]), set()
    while todo and len(seen) < limit:
        v = todo.popleft()
        node = v.producer() if v is not None else None
        if node is None or id(node) in seen or not reaches(v, pruned):
            continue
        seen.add(id(node))
        cut = _length_cut(node, pruned, token_dim)
        if cut is not None:
            found.append(cut)
            continue
        todo.extend(i for i in node.inputs if i is not None and i.dtype is not None and not i.dtype.is_integer())
    return found


def suffix_cut(term: ir.Value, keys: ir.Value, axis: int) -> LengthCut | None:
    """``term`` is ``table[..., C - n:]`` with ``n`` the length of ``keys`` on ``axis`` (a KV cache's concat:
    evict-kv's MPT ALiBi), read through a shape; or None."""
    node = term.producer()
    dims = keys.shape.dims if keys.shape is not None else None
    if node is None or dims is None or not -len(dims) <= axis < len(dims):
        return None
    cut = _length_cut(node, keys, dims[axis])
    return cut if cut is not None and cut.form == "suffix" else None


def full_length_cut(e: GraphEditor, cut: LengthCut, full: ir.Value) -> None:
    """Rewrite ``cut`` to take the full length (``full`` = [B, S]): see :class:`LengthCut`."""
    if cut.form == "prefix":
        cut.node.replace_input_with(2, e.const("to_end", np.array([INT64_MAX], np.int64)))
        return
    seq = e.op("Slice", [full, e.const("one", np.array([1], np.int64)), e.const("two", np.array([2], np.int64))])
    cut.node.replace_input_with(1, e.op("Sub", [e.const("width", np.array([cut.width], np.int64)), seq]))
