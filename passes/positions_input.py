"""positions-input: a KV-cache decoder that derives its new tokens' positions from the cache length
reads them from a ``position_ids`` input instead (what evict-kv needs: once slots are evicted, the
cache length is no longer the number of tokens so far).

Exporters without a ``position_ids`` input compute transformers' ``cache_position``::

    past = Shape(past_key_values.<l>.key)[2]            (any layer's cache, any dim read)
    p    = Range(past, past + q, 1)                      the new tokens' positions, [q] (dynamo)
    p    = Range(0, q, 1) + past                                                 (TorchScript)

and everything position-dependent reads ``p``: RoPE angles (Llama, Qwen, Gemma, OLMo, GPT-NeoX, ...),
learned tables with their offsets (GPT-2, BioGPT's +2), sinusoidal tables (XGLM). The rewrite is
one ``Add`` per such ``p``, so every consumer and offset stays as exported::

    p' = p + (position_ids[0, 0] - past)                 = position_ids[0, 0] + arange(q)

``position_ids`` [B, q] is a new graph input fed with tokens so far + arange(q) (convention
``arange``: transformers' own default without position ids, padding included;
``decoding.DecoderSession`` feeds it). Ranges that start at a constant (key positions of a mask,
``arange(q)``) are left alone; the exporter's mask is replaced by evict-kv.

OPT computes its positions from the mask, not from a Range::

    p = Slice(CumSum(attention_mask) * attention_mask - 1, starts=past, axes=[1])   [B, q]  (padding -1)

and indexes its learned table with ``p + 2``. Under eviction the fed mask covers the kept cache only
(its cumulative sum would count kept slots, not tokens so far), so the Slice that cuts the new
tokens' columns at the cache length is replaced by the ``position_ids`` input itself (convention
``input``: the cumulative sum of the whole mask so far, minus 1 - OPT's own rule; a padding token gets
0 instead of -1, a row nobody reads). Every consumer (the offset, the table) stays.

Non-matches, with the reason: a model that already has ``position_ids`` (nothing to do); no Range
starting at a cache length (positions not derived from the cache: nothing to carry); a cumulative sum
of ``attention_mask`` indexing a position table that is not sliced at the cache length (the new
tokens' positions cannot be told apart from the past's).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import const_array
from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .site_io import _ancestors

logger = logging.getLogger(__name__)
CACHE_PREFIX = "past_key_values."


def _reads_cache_length(value: ir.Value | None) -> bool:
    if value is None or const_array(value) is not None:
        return False
    _, inputs = _ancestors(value, limit=60, through_shapes=True)
    return any((v.name or "").startswith(CACHE_PREFIX) for v in inputs)


def _from_range(value: ir.Value | None) -> bool:
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in ("Cast", "Unsqueeze", "Reshape"):
        node = node.inputs[0].producer()
    return node is not None and node.op_type == "Range"


def _cache_positions(graph: ir.Graph) -> list[tuple[ir.Value, ir.Value]]:
    """(positions, the cache length they start at): ``Range(past, past + q)`` (dynamo) or
    ``Range(0, q) + past`` (TorchScript), ``past`` computed from a cache input's shape."""
    found = []
    for n in graph:
        if n.op_type == "Range" and _reads_cache_length(n.inputs[0]):
            found.append((n.outputs[0], n.inputs[0]))
        elif n.op_type == "Add" and len(n.inputs) == 2:
            for a, b in (n.inputs, n.inputs[::-1]):
                if _from_range(a) and _reads_cache_length(b) and not _reads_cache_length(a):
                    found.append((n.outputs[0], b))
                    break
    return found


def _mask_cumsum_positions(graph: ir.Graph, limit: int = 200) -> ir.Node | None:
    """A CumSum of attention_mask whose values index a constant position table (OPT's learned positions)."""
    return next(iter(_mask_cumsum_tables(graph, limit)), None)


def _new_token_slice(cumsum: ir.Node, limit: int = 20) -> ir.Value | None:
    """The new tokens' positions cut from a mask cumulative sum: the ``Slice`` on axis 1 downstream of
    ``cumsum`` whose start reads a cache length and that runs to the end (``p[:, past:]``)."""
    todo, seen = deque([cumsum.outputs[0]]), 0
    while todo and seen < limit:
        v = todo.popleft()
        seen += 1
        for use in v.uses():
            n = use.node
            if n.op_type == "Slice" and use.idx == 0 and len(n.inputs) >= 4:
                axes, ends = const_array(n.inputs[3]), const_array(n.inputs[2])
                steps = const_array(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] is not None else np.ones(1)
                if (axes is not None and axes.reshape(-1).tolist() in ([1], [-1]) and ends is not None
                        and int(ends.reshape(-1)[0]) >= 1 << 62 and steps is not None
                        and steps.reshape(-1).tolist() == [1] and _reads_cache_length(n.inputs[1])):
                    return n.outputs[0]
            if n.op_type in ("Mul", "Sub", "Add", "Cast"):
                todo.extend(n.outputs)
    return None


def _mask_cumsum_tables(graph: ir.Graph, limit: int = 200) -> list[ir.Node]:
    """Every CumSum of attention_mask whose values index a constant position table."""
    found = []
    for node in graph:
        if node.op_type != "CumSum":
            continue
        _, inputs = _ancestors(node.outputs[0], limit=40)
        if not any(v.name == "attention_mask" for v in inputs):
            continue
        todo, seen = deque([node.outputs[0]]), 0
        while todo and seen < limit:
            v = todo.popleft()
            seen += 1
            for use in v.uses():
                n = use.node
                if n.op_type == "Gather" and use.idx == 1 and const_array(n.inputs[0], max_elements=1 << 24) is not None:
                    found.append(node)
                    todo.clear()
                    break
                if n.op_type not in ("Shape", "Size"):
                    todo.extend(n.outputs)
    return found


def _mask_positions(graph: ir.Graph) -> tuple[list[ir.Value], ir.Node | None]:
    """(the new tokens' positions cut from each mask cumulative sum that indexes a table, the first
    such CumSum that has no such cut)."""
    cuts, uncut = [], None
    for cumsum in _mask_cumsum_tables(graph):
        cut = _new_token_slice(cumsum)
        if cut is None and uncut is None:
            uncut = cumsum
        elif cut is not None:
            cuts.append(cut)
    return cuts, uncut


def why_not(graph: ir.Graph) -> str | None:
    """Why the positions cannot be given by a position_ids input, or None."""
    cuts, uncut = _mask_positions(graph)
    if uncut is not None:
        return (f"positions are a cumulative sum of attention_mask ({uncut.name}) indexing a position table, "
                "not cut to the new tokens at the cache length; under eviction the mask covers the kept cache only")
    if not cuts and not _cache_positions(graph):
        return "no positions start at the cache length (a Range from it, or a Range plus it)"
    return None


@register_pass
@dataclasses.dataclass(frozen=True)
class PositionsInput(Pass):
    """Positions derived from the cache length -> a ``position_ids`` input (convention arange); cut from
    the mask's cumulative sum at the cache length (OPT) -> that input (convention input)."""

    name = "positions-input"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        if any(v.name == "position_ids" for v in graph.inputs):
            return PassResult(model, False)
        if (reason := why_not(graph)) is not None:
            logger.info("positions-input: %s", reason)
            return PassResult(model, False)
        ed = GraphEditor(model, "spatten/positions")
        positions = ir.Value(name="position_ids", shape=ir.Shape(["batch", "sequence"]),
                             type=ir.TensorType(ir.DataType.INT64))
        graph.inputs.append(positions)
        for node in graph:  # an exporter's own intermediate of that name must not shadow the input
            for out in node.outputs:
                if out.name == "position_ids":
                    out.name = "position_ids_derived"
        # position_ids[0, 0]: the tokens so far (the arange convention); scalar Gathers, which the
        # structural walk of q/k (transform_region) reads as position lookups
        zero = ed.const("zero", np.array(0, np.int64))
        first = ed.op("Gather", [ed.op("Gather", [positions, zero], axis=1), zero], axis=0)
        cuts, _ = _mask_positions(graph)
        for cut in cuts:  # OPT: the new tokens' positions are the input itself
            ed.replace_uses(cut, ed.op("CastLike", [positions, cut]), keep=ed.added)
        # the cut's convention (input) would not match a cache-length shift (arange): one or the other
        found = [] if cuts else _cache_positions(graph)
        for out, start in found:
            shift = ed.op("Sub", [ed.op("CastLike", [first, start]), start])
            moved = ed.op("Add", [out, shift])
            ed.replace_uses(out, moved, keep=ed.added)
        ed.commit()
        logger.info("positions-input: %d position computation(s) now read position_ids (%s)", len(found) + len(cuts),
                    "the mask's cumulative sum so far" if cuts else "tokens so far")
        return PassResult(model, True)


def wire_positions(model: ir.Model) -> tuple[str | None, str | None]:
    """(the convention of the position_ids input added - ``arange`` or ``input`` - or None when none
    was added, the reason when the model derives positions it cannot take from an input)."""
    if any(v.name == "position_ids" for v in model.graph.inputs):
        return None, None
    if (reason := why_not(model.graph)) is not None:
        return None, reason
    convention = "input" if _mask_positions(model.graph)[0] else "arange"
    return (convention if PositionsInput()(model).modified else None), None


__all__ = ["PositionsInput", "why_not", "wire_positions"]
