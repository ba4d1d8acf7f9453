"""prune-heads for any Q/K/V layout: narrow each projection to the kept heads' columns found by
:mod:`.head_rows`, or keep it whole and gather the kept heads at the attention core (issue #16).

For one layer with kept KV groups ``sel`` (compile time)::

    per projection P feeding Q, K and/or V (one for packed QKV, three for separate ones):
        cols      = columns of P read by the kept heads (row map), + columns no head reads
        W_P, b_P  = W_P[:, cols], b_P[cols]                 # a smaller initializer
        views     = head-split Reshape / head-axis Slice / Split / Gather / repeat Expand retargeted
    if the narrowed chain does not verify (a norm over all heads before the head split, a packing whose
    kept columns are not a box, heads folded with a KV cache):
        P stays whole; core input X -> Gather(X, kept heads, axis=1)

A key/query assembled from a per-head piece and pieces shared by all heads (multi-head latent attention:
``Concat(k_nope, Expand(k_pe))``) has each shared piece broadcast to the per-head piece's heads first
(``Expand(k_pe, Shape(k_nope)[:-1] + [d])``), so it follows the narrowed heads; the shared projection
stays whole.

A KV-cache layer keeps K and V whole (the cache must stay complete): only Q's columns are narrowed
(where the packing allows) and the core reads the kept heads of K/V (``spatten.KeptHeads``).
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import onnx_ir as ir

from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array

from . import head_rows
from .attention_trace import column_constants
from .find_attention import AttentionSite
from .nbits_blocks import is_nbits, take_columns
from .score_chain import reads_projection

logger = logging.getLogger(__name__)


def needs_rows(site: AttentionSite) -> str | None:
    """Why ``site``'s Q/K/V layout is beyond the declared slicing of prune-heads (None: it is not)."""
    if any(reads_projection(t) for t in site.bias_terms):  # DeBERTa c2p/p2c: read Q and K whole
        return "a position term computed from activations (disentangled attention)"
    if site.variant.get("layout") == "folded" or site.q.value.shape is not None and site.q.value.shape.rank() == 3:
        return "heads folded into the batch axis"
    if any(b.assembly is not None for b in (site.q, site.k)):
        return "a key/query assembled from per-head and shared pieces (multi-head latent attention)"
    if any(b.cross_head is not None for b in (site.q, site.k)):
        return "a norm over all heads before the head split"
    if site.q.packed is None and site.q.projection.node is site.k.projection.node:
        return "Q and K from one projection in a per-head packing"
    if site.q.packed is not None:
        order = [n.op_type for n in site.q.views]
        split = next((i for i, t in enumerate(order) if t in ("Split", "Slice")), None)
        reshape = next((i for i, t in enumerate(order) if t == "Reshape"), None)
        if split is not None and reshape is not None and split < reshape:
            return "QKV packed in one head-split tensor"
        if site.num_kv_heads != site.num_heads:
            return "packed QKV with fewer KV heads"
        if next((n.op_type for n in site.q.views if n.op_type in ("Split", "Slice")), None) != "Split":
            return "packed QKV split by Slice"
    return None


def _core_heads(core: np.ndarray, site: AttentionSite, sel: np.ndarray, q_heads: np.ndarray) -> np.ndarray:
    count = core.shape[head_rows.head_axis(core)]
    if count == site.num_heads:
        return q_heads
    if count == site.num_kv_heads:
        return sel
    raise head_rows.RowMapError(f"{count} heads at the core, expected {site.num_heads} or {site.num_kv_heads}")


def _columns(cores: list[np.ndarray], heads: list[np.ndarray | None], width: int) -> np.ndarray:
    """Kept columns: those of the kept heads, and those no head reads; a column both kept and removed
    (two heads sharing it) cannot be sliced."""
    kept, removed, used = set(), set(), set()
    for core, h in zip(cores, heads):
        cols = head_rows.head_columns(core)
        for i, c in enumerate(cols):
            used.update(c.tolist())
            (kept if h is None or i in set(h.tolist()) else removed).update(c.tolist())
    if kept & removed:
        raise head_rows.RowMapError("kept and removed heads share projection columns")
    return np.array(sorted(set(range(width)) - removed), np.int64)


def narrow_layer(editor, site: AttentionSite, sel: np.ndarray | ir.Value, q_heads: np.ndarray | ir.Value) -> list[str]:
    """Narrow (or gather) Q/K/V of one layer to the kept groups ``sel``; returns how each projection
    was handled (for the log). A run-time ``sel`` (the paper rule) always gathers at the core: the
    weights cannot be sliced before the heads are known."""
    for b in (site.q, site.k):
        if b.assembly is not None:
            _follow_heads(editor, b.assembly)
    by_proj: dict[int, tuple[ir.Node, list[tuple[str, ir.Value]]]] = {}
    for name, b in (("q", site.q), ("k", site.k), ("v", site.v)):
        by_proj.setdefault(id(b.projection.node), (b.projection.node, []))[1].append((name, b.value))
    done = []
    for proj, branches in by_proj.values():
        cores = [v for _, v in branches]
        idx: list[np.ndarray] = []
        try:
            ev, idx = head_rows.evaluate(proj, cores)
            if not isinstance(sel, np.ndarray):
                raise head_rows.RowMapError("heads chosen at run time")
            heads = [None if site.kv_cache and n in "kv" else _core_heads(c, site, sel, q_heads)
                     for (n, _), c in zip(branches, idx)]
            plan = head_rows.narrow(proj, cores, heads, _columns(idx, heads, ev.columns.size))
        except head_rows.RowMapError as why:
            if any(v.shape is None or v.shape.rank() not in (3, 4) for v in cores):
                raise OptionError(f"layer {site.layer}: {why}; the core inputs have no known head axis") from None
            for i, (name, v) in enumerate(branches):  # whole projection; the core reads the kept heads
                if not (site.kv_cache and name in "kv"):
                    count = (idx[i].shape[head_rows.head_axis(idx[i])] if idx else
                             v.shape.dims[1] if v.shape.rank() == 4 else site.num_heads)
                    if count not in (site.num_heads, site.num_kv_heads):
                        raise OptionError(f"layer {site.layer}: {why}; the head count of {v.name} at the core "
                                          "is not known") from None
                    gather_heads(editor, v, q_heads if count == site.num_heads else sel, count,
                                 reader=core_reader(site, name))
            done.append(f"{proj.name}: whole, heads gathered at the core ({why})")
            continue
        _apply(editor, plan, ev)
        done.append(f"{proj.name}: {plan.columns.size} of {ev.columns.size} columns")
    return done


def _follow_heads(editor, assembly) -> None:
    """Each shared piece ``Expand(x [B, 1, S, d], target)`` of an assembly -> ``Expand(x, Shape(per_head)[:-1] ++
    Shape(x)[-1:])``: broadcast to however many heads the per-head piece has (a constant target would keep all)."""
    concat = assembly.concat
    per_head = concat.inputs[assembly.per_head]
    for i, piece in enumerate(concat.inputs):
        expand = piece.producer() if piece is not None else None
        if i == assembly.per_head or expand is None or expand.op_type != "Expand":
            continue
        src = expand.inputs[0]
        target = editor.op("Concat", [editor.op("Shape", [per_head], end=-1), editor.op("Shape", [src], start=-1)],
                           axis=0)
        out = editor.op("Expand", [src, target], hint="shared_heads")
        out.type = piece.type
        if piece.shape is not None:
            out.shape = ir.Shape([d if a != 1 else ir.SymbolicDim(None) for a, d in enumerate(piece.shape.dims)])
        concat.replace_input_with(i, out)


def core_reader(site: AttentionSite, name: str) -> ir.Node | None:
    """The attention op reading Q, K^T or V (other readers, e.g. DeBERTa's c2p term, keep all heads):
    the score MatMul reads Q and (maybe through a scalar scale) K^T."""
    if name == "v":
        return site.pv
    score = next((u.node for u in site.q.value.uses() if u.node.op_type == "MatMul"
                  and _near(u.node.inputs[1 - u.idx], site.k.value)), None)
    if name == "q" or score is None:
        return score
    return next((u.node for u in site.k.value.uses() if u.node is score or _near(score.inputs[1], u.node.outputs[0])),
                None)


def _near(value: ir.Value | None, target: ir.Value, steps: int = 3) -> bool:
    """``value`` is ``target`` or computed from it through at most ``steps`` single-data-input ops."""
    for _ in range(steps + 1):
        if value is target:
            return True
        p = value.producer() if value is not None else None
        if p is None or p.op_type not in ("Mul", "Div", "Cast", "Transpose", "Identity"):
            return False
        value = p.inputs[0]
    return False


def gather_heads(editor, value: ir.Value, heads: np.ndarray | ir.Value, count: int,
                 reader: ir.Node | None = None) -> None:
    """Readers of ``value`` get its kept heads: ``[B, H, ., .]`` -> Gather on axis 1; heads folded into
    the batch, ``[B*H, ., .]`` (batch-major, as every folding exporter writes it) -> viewed as
    ``[B, H, ., .]``, gathered, folded back."""
    uses = [u for u in value.uses() if reader is None or u.node is reader]
    idx = editor.const("kept_heads", np.asarray(heads, np.int64)) if isinstance(heads, np.ndarray) else heads
    if value.shape is not None and value.shape.rank() == 4:
        picked = editor.op("Gather", [value, idx], axis=1)
    else:
        rest = editor.op("Shape", [value], start=1)
        split = editor.op("Concat", [editor.const("batch_heads", np.array([-1, count], np.int64)), rest], axis=0)
        heads4 = editor.op("Gather", [editor.op("Reshape", [value, split]), idx], axis=1)
        picked = editor.op("Reshape", [heads4, editor.op("Concat", [editor.const("fold", np.array([-1], np.int64)),
                                                                     rest], axis=0)])
    picked.type = value.type
    for use in uses:
        use.node.replace_input_with(use.idx, picked)


def _apply(editor, plan: head_rows.Narrowing, ev: head_rows.Evaluator) -> None:
    proj, cols = plan.proj, plan.columns
    if is_nbits(proj):  # int4 blocks: whole output rows of B, scales, zero points and bias
        take_columns(editor, proj, cols)
    else:
        _slice_weight(editor, proj, cols)
    _apply_constants(editor, plan, ev)


def _slice_weight(editor, proj: ir.Node, cols: np.ndarray) -> None:
    weight = proj.inputs[1]
    slot_node, slot = proj, 1
    transposed = proj.op_type == "Gemm" and bool(proj.attributes.get_int("transB", 0))
    if const_array(weight) is None and weight.producer() is not None and weight.producer().op_type == "Transpose":
        slot_node, slot, weight = weight.producer(), 0, weight.producer().inputs[0]
        transposed = True
    w = const_array(weight)
    slot_node.replace_input_with(slot, editor.const("head_cols", np.ascontiguousarray(
        w[cols] if transposed else w[:, cols])))
    for node, i in column_constants(proj) or []:
        node.replace_input_with(i, editor.const("head_cols", const_array(node.inputs[i]).reshape(-1)[cols]))
    if proj.op_type == "Gemm" and len(proj.inputs) > 2 and proj.inputs[2] is not None:
        b = const_array(proj.inputs[2])
        proj.replace_input_with(2, editor.const("head_bias", b[..., cols] if b.shape[-1] == w.shape[
            0 if transposed else 1] else b))


def _apply_constants(editor, plan: head_rows.Narrowing, ev: head_rows.Evaluator) -> None:
    clones: dict[int, dict[int, np.ndarray]] = {}
    for (nid, s), arr in plan.constants.items():
        node = plan.nodes[nid]
        if node.op_type == "Concat" and id(node.outputs[0]) not in ev.data:
            clones.setdefault(nid, {})[s] = arr  # a shape target: cloned, other readers keep the original
            continue
        if s >= len(node.inputs):
            node.resize_inputs(s + 1)
            if "num_outputs" in node.attributes:
                del node.attributes["num_outputs"]
        node.replace_input_with(s, editor.const("head_target", arr))
    for nid, pieces in clones.items():
        concat = plan.nodes[nid]
        new = editor.op("Concat", [editor.const("head_target", pieces[i]) if i in pieces else x
                                   for i, x in enumerate(concat.inputs)], axis=concat.attributes["axis"].value)
        for use in list(concat.outputs[0].uses()):
            if any(i is not None and id(i) in ev.data for i in use.node.inputs):
                use.node.replace_input_with(use.idx, new)


def _forward(start: ir.Value, stop: ir.Node, limit: int = 60) -> dict[int, ir.Node]:
    out: dict[int, ir.Node] = {}
    todo = deque([start])
    while todo and len(out) < limit:
        for use in todo.popleft().uses():
            n = use.node
            if n is stop or id(n) in out or n.op_type in ("Shape", "Size"):
                continue
            out[id(n)] = n
            todo.extend(n.outputs)
    return out


def score_views(site: AttentionSite) -> list[ir.Node]:
    """The Reshapes between the score MatMul and ``MatMul(P, V)`` (heads folded into the batch: the
    scores are viewed as ``[B, H, S, S]`` for the mask and back): their head counts follow the pruning."""
    score = next((u.node for u in site.q.value.uses() if u.node.op_type == "MatMul"), None)
    if score is None or site.softmax is None:
        return []
    before = _forward(score.outputs[0], site.softmax)
    after = _forward(site.softmax.outputs[0], site.pv)
    back: set[int] = set()
    todo = deque([site.softmax.inputs[0]])
    while todo:
        v = todo.popleft()
        p = v.producer() if v is not None else None
        if p is None or id(p) in back or id(p) not in before:
            continue
        back.add(id(p))
        todo.extend(p.inputs)
    nodes = [n for i, n in before.items() if i in back] + [n for n in after.values() if _reaches(n, site.pv)]
    return [n for n in nodes if n.op_type == "Reshape"]


def _reaches(node: ir.Node, target: ir.Node, depth: int = 8) -> bool:
    if depth == 0:
        return False
    return any(u.node is target or _reaches(u.node, target, depth - 1) for o in node.outputs for u in o.uses())
