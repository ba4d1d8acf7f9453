"""Score terms evict-kv rebuilds at the kept slots (evict-kv's helper): a registry of term forms.

evict-kv keeps cache slots whose original positions have gaps, so an additive score term indexed by
key (ALiBi) must describe the kept slots, not the slot indices ``0..n-1``. A form is data
(:data:`TERM_FORMS`): ``find`` returns its plan or why the term is not of that form, ``build`` emits the
term at the kept slots (``Slots``: their positions, the row's newest position, the KV head each query
head reads). A term no form accepts is refused with every form's reason.

* ``mask positions`` (BLOOM's ALiBi): computed only from ``attention_mask`` through its CumSum (key
  positions ``(cumsum - 1) * mask``) and shapes; its nodes are copied with ``attention_mask`` -> the
  slots' validity, the CumSum -> kept position + 1. One kept set per layer.
* ``table suffix`` (MPT's ALiBi): ``table[..., C - n:]``, the last ``n`` columns of a constant
  ``[(1,) H|1, 1, C]`` table with ``n`` read from this layer's cache length (:func:`.length_cuts.suffix_cut`).
  Slot ``j`` of a full cache reads column ``C - n + j = C - 1 - (last - j)``, ``last`` the newest slot;
  rebuilt as the table gathered at column ``C - 1 - (last - pos)`` with ``pos`` each kept slot's original
  position and ``last`` the row's newest (equal at budget 1.0; clipped to the table, empty slots are
  masked anyway). Per KV head too: query head ``h`` reads KV head ``h // g``'s positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array

from .find_attention import AttentionSite
from .length_cuts import suffix_cut
from .site_io import _ancestors


@dataclasses.dataclass(frozen=True)
class Slots:
    """A layer's slots after the step's append: original positions ``pos`` ([B, n], or [B, Hkv, n] per KV
    head; -1 = empty), the row's newest position ``last`` (int64 [B, 1], or [B, 1, 1]), and per query head
    the KV head it reads (``kvh``, [H] constant; None for one kept set per layer)."""

    pos: ir.Value
    last: ir.Value
    kvh: ir.Value | None


@dataclasses.dataclass(frozen=True)
class TermForm:
    find: Callable[[AttentionSite, ir.Value], Any]  # the plan, or why not (str)
    build: Callable[[GraphEditor, ir.Graph, Any, Slots], ir.Value]
    per_head: bool  # can be built from per-KV-head positions
    why: str


def mask_position_term(site: AttentionSite, term: ir.Value) -> tuple[list[ir.Node], ir.Value] | str:
    """BLOOM's ALiBi: (the term's nodes in graph order, the term), or why not."""
    nodes, inputs = _ancestors(term, limit=200, through_shapes=True)
    if any(v.name != "attention_mask" and not v.name.startswith("past_key_values.") for v in inputs):
        return f"reads {', '.join(sorted({v.name for v in inputs}))}, not only attention_mask positions"
    if not any(n.op_type == "CumSum" and n.inputs[0] is not None and n.inputs[0].name == "attention_mask"
               for n in nodes):
        return "not computed from the positions of attention_mask (its cumulative sum)"
    order = {id(n): i for i, n in enumerate(term.graph or site.softmax.graph)}
    return sorted((n for n in nodes if id(n) in order), key=lambda n: order[id(n)]), term


def at_mask_positions(ed: GraphEditor, graph: ir.Graph, plan: tuple[list[ir.Node], ir.Value],
                      slots: Slots) -> ir.Value:
    """A copy of the term's nodes reading this layer's slots: ``attention_mask`` -> the slots' validity
    ``[B, n]``, ``CumSum(attention_mask)`` -> kept position + 1 (so ``(cumsum - 1) * mask`` is each slot's
    original position, 0 where empty)."""
    nodes, term = plan
    amask = next(v for v in graph.inputs if v.name == "attention_mask")
    valid = ed.op("Cast", [ed.op("GreaterOrEqual", [slots.pos, ed.const("z", np.array(0, np.int64))])],
                  to=amask.type.dtype if amask.type is not None else ir.DataType.INT64)
    mapping: dict[int, ir.Value] = {id(amask): valid}
    for node in nodes:
        if node.op_type == "CumSum" and node.inputs[0] is amask:
            mapping[id(node.outputs[0])] = ed.op("CastLike", [ed.op("Add", [slots.pos, ed.const(
                "one", np.array(1, np.int64))]), node.outputs[0]])
            continue
        attrs = {a.name: a.value for a in node.attributes.values()}
        outs = ed.op(node.op_type, [mapping.get(id(i), i) if i is not None else None for i in node.inputs],
                     domain=node.domain, outputs=len(node.outputs), hint=node.op_type, **attrs)
        for old, new in zip(node.outputs, outs if isinstance(outs, tuple) else (outs,), strict=True):
            mapping[id(old)] = new
    return mapping[id(term)]


def table_suffix(site: AttentionSite, term: ir.Value) -> tuple[ir.Value, int, int] | str:
    """MPT's ALiBi: (the table, its width C, its head count) when ``term`` is ``table[..., C - n:]`` of a
    constant key-only table and ``n`` this layer's cache length; or why not."""
    cut = next((c for cache in site.caches if (c := suffix_cut(term, cache.concat.outputs[0], cache.axis))), None)
    if cut is None:
        return "not the last n columns of a table, n read from this layer's cache length"
    table = cut.node.inputs[0]
    a = const_array(table, max_elements=1 << 24)
    if a is None:
        return f"the table {table.name} is not a constant"
    lead = a.shape[:-1]  # [.., H|1, 1] against the scores' [B, H, q]
    if len(lead) < 1 or len(lead) > 3 or lead[-1] != 1 or (len(lead) == 3 and lead[0] != 1):
        return f"the table {table.name} {list(a.shape)} is not key-only ([(1,) H|1, 1, C])"
    return table, a.shape[-1], lead[-2] if len(lead) > 1 else 1


def at_table_columns(ed: GraphEditor, graph: ir.Graph, plan: tuple[ir.Value, int, int], slots: Slots) -> ir.Value:
    """``table[h, 0, C - 1 - (last - pos)]`` as ``[B, H|1, 1, n]``: one Gather from the table viewed flat
    (``h * C + column``); per KV head, query head ``h`` takes KV head ``kvh[h]``'s columns."""
    table, c, heads = plan
    i64 = lambda h, v: ed.const(h, np.array(v, np.int64))  # noqa: E731
    col = ed.op("Sub", [i64("c1", c - 1), ed.op("Sub", [slots.last, slots.pos])])
    col = ed.op("Clip", [col, i64("z", 0), i64("c1", c - 1)])
    col = (ed.op("Unsqueeze", [col, i64("a1", [1])]) if slots.kvh is None
           else ed.op("Gather", [col, slots.kvh], axis=1))  # [B, 1 or H, n]
    flat = ed.op("Add", [col, i64("rows", (np.arange(heads) * c).reshape(1, heads, 1))])
    values = ed.op("Gather", [ed.op("Reshape", [table, i64("m1", [-1])]), flat], axis=0)
    return ed.op("Unsqueeze", [values, i64("a2", [2])])


TERM_FORMS: dict[str, TermForm] = {
    "mask positions": TermForm(mask_position_term, at_mask_positions, False,
                               "BLOOM's ALiBi: recomputed from the kept slots' positions"),
    "table suffix": TermForm(table_suffix, at_table_columns, True,
                             "MPT's ALiBi: the table's columns at the kept slots' positions"),
}


def term_form(site: AttentionSite, term: ir.Value) -> tuple[str, Any]:
    """(the form of a score term, its plan); refuses a term no form accepts, with every form's reason."""
    why = []
    for name, form in TERM_FORMS.items():
        plan = form.find(site, term)
        if not isinstance(plan, str):
            return name, plan
        why.append(f"not {name}: {plan}")
    raise OptionError(f"layer {site.layer}: score term {term.name} ({'; '.join(why)}); evict-kv cannot move it "
                      "to the kept slots")
