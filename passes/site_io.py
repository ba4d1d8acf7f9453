"""Where an attention site connects to the rest of the model: its mask and the residual stream.

* :func:`mask_info` classifies the mask by what it is built from: a graph input such as
  ``attention_mask`` makes it a padding mask; a comparison of two ``Range`` positions, a ``Trilu``
  or a constant triangular matrix makes it causal.
* :func:`layer_outputs` sets each site's ``layer_output``: the next site's ``layer_input``, and for
  the last site the same residual-stream path (op types from one layer input to the next) replayed
  from its own input. Token pruning gathers kept tokens at these tensors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from spatten_compiler.match import const_array, is_const

if TYPE_CHECKING:
    from .find_attention import AttentionSite

COMPARISONS = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual"}
POSITION_INPUTS = {"input_ids", "position_ids", "token_type_ids", "cache_position"}


def _ancestors(value: ir.Value, limit: int = 400, *, through_shapes: bool = False,
               stop: Callable[[ir.Node], bool] | None = None) -> tuple[list[ir.Node], list[ir.Value]]:
    """Producers of ``value`` (breadth first, at most ``limit``) and the graph inputs reached. The walk
    stops at Shape/Size (a mask built from a shape is not built from that input) unless
    ``through_shapes`` (evict-kv: GPT-2's positions are a Range over the past cache's length), and at
    the nodes ``stop`` names (listed, their inputs not followed)."""
    nodes: list[ir.Node] = []
    inputs: list[ir.Value] = []
    seen: set[int] = set()
    todo = deque([value])
    while todo and len(nodes) < limit:
        v = todo.popleft()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None:
            if v.const_value is None and v.graph is not None:
                inputs.append(v)
            elif ((a := const_array(v, max_elements=1 << 16)) is not None and a.ndim >= 2
                  and a.shape[-1] == a.shape[-2] > 1):
                if np.array_equal(a.astype(bool), np.tril(a.astype(bool))):
                    nodes.append(ir.Node("", "Trilu", [], name="<constant tril>"))
            continue
        nodes.append(node)
        if (through_shapes or node.op_type not in ("Shape", "Size")) and not (stop is not None and stop(node)):
            todo.extend(node.inputs)
        # an If's value is its branches' outputs (TF XGLM/BART build the causal mask under
        # ``if seq_len > 1``); their nodes read outer values, which the walk reaches from there
        todo.extend(o for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH for o in a.value.outputs)
    return nodes, inputs


# ops that number positions: Range, and CumSum (tf2onnx lowers tf.linalg.band_part, TF OPT's causal mask,
# to the row and column of a running count)
INDEX_OPS = frozenset({"Range", "CumSum"})


def _from_range(value: ir.Value) -> bool:
    return any(n.op_type in INDEX_OPS for n in _ancestors(value, limit=12)[0])


def _compares_positions(node: ir.Node) -> bool:
    """A comparison of two position numbers (``i >= j``), or of their difference with a constant
    (tf2onnx's band_part: ``0 > j - i``). A position against a constant or a length is not one (a
    padding mask compares the key index with each row's length)."""
    ins = list(node.inputs)
    if node.op_type not in COMPARISONS or len(ins) != 2 or any(i is None for i in ins):
        return False
    return all(map(_from_range, ins)) or any(map(is_const, ins)) and any(map(_position_difference, ins))


def _position_difference(value: ir.Value) -> bool:
    node = value.producer()
    return node is not None and node.op_type == "Sub" and all(i is not None and _from_range(i) for i in node.inputs)


def _square(v: ir.Value | None) -> bool:
    """A value whose last two dims are one static size > 1 (a [.., S, S] table), read without loading it."""
    dims = v.shape.dims if v is not None and v.shape is not None else ()
    return len(dims) >= 2 and isinstance(dims[-1], int) and dims[-1] > 1 and dims[-1] == dims[-2]


def causal_table(a: np.ndarray | None) -> bool:
    """A constant ``[.., S, S]`` (S > 1) that masks keys after the query and none on the diagonal: the
    causal (or sliding-window) part of a mask folded at a fixed length (an export with static shapes,
    simplified). Either convention: allowed (True / 0) or masked (True / a large negative) entries."""
    if a is None or a.ndim < 2 or a.shape[-1] != a.shape[-2] or a.shape[-1] < 2 or a.size > (1 << 24):
        return False
    if a.dtype == np.bool_:
        candidates = (a, ~a)
    elif np.issubdtype(a.dtype, np.floating):
        candidates = (a > -1e4,)
    else:
        return False
    above = np.triu(np.ones(a.shape[-2:], bool), 1)
    diag = np.eye(a.shape[-1], dtype=bool)
    for allowed in candidates:
        allowed = allowed.reshape(-1, *a.shape[-2:])
        if not (allowed & above).any() and (allowed | ~diag).all() and not allowed.all(axis=(1, 2)).any():
            return True
    return False


def mask_info(mask: ir.Value | None, graph: ir.Graph, causal_cond: ir.Value | None) -> tuple[str, str | None]:
    """(kind, source input name): kind is none | padding | causal | causal+padding."""
    if mask is None and causal_cond is None:
        return "none", None
    nodes: list[ir.Node] = []
    inputs: list[ir.Value] = []
    for v in (mask, causal_cond):
        if v is not None:
            n, i = _ancestors(v)
            nodes += n
            inputs += i
    causal = any(n.op_type == "Trilu" for n in nodes) or any(map(_compares_positions, nodes)) or any(
        causal_table(const_array(v)) for v in (mask, causal_cond, *(i for n in nodes for i in n.inputs))
             if _square(v) and is_const(v))
    padding = [v for v in inputs if v in graph.inputs and v.name not in POSITION_INPUTS and "past" not in v.name]
    source = padding[0].name if padding else None
    kind = "+".join(k for k, on in (("causal", causal), ("padding", bool(padding))) if on) or "constant"
    return kind, source


def rope_position_source(cos: ir.Value | None, graph: ir.Graph) -> str | None:
    """Where RoPE's angles come from: a position input (e.g. ``position_ids``) or the sequence length."""
    if cos is None:
        return None
    _, inputs = _ancestors(cos, limit=200)
    named = [v.name for v in inputs if v in graph.inputs and "position" in (v.name or "")]
    return named[0] if named else "sequence length (computed)"


def _stream_path(start: ir.Value, end: ir.Value, limit: int = 4000) -> list[tuple[str, int]] | None:
    """Op types (and the input slot used) on the shortest forward path from start to end."""
    parents: dict[int, tuple[ir.Value, ir.Node, int]] = {}
    todo = deque([start])
    seen = {id(start)}
    while todo and len(seen) < limit:
        v = todo.popleft()
        if v is end:
            path: list[tuple[str, int]] = []
            while v is not start:
                prev, node, slot = parents[id(v)]
                path.append((node.op_type, slot))
                v = prev
            return path[::-1]
        for use in v.uses():
            for out in use.node.outputs:
                if id(out) not in seen:
                    seen.add(id(out))
                    parents[id(out)] = (v, use.node, use.idx)
                    todo.append(out)
    return None


def _replay(start: ir.Value, path: list[tuple[str, int]]) -> ir.Value | None:
    value = start
    for op, slot in path:
        nodes = [u.node for u in value.uses() if u.node.op_type == op and u.idx == slot]
        if len(nodes) != 1:
            return None
        value = nodes[0].outputs[0]
    return value


def layer_outputs(sites: list[AttentionSite], graph: ir.Graph) -> None:
    for here, nxt in zip(sites, sites[1:]):
        here.layer_output = nxt.layer_input
    if len(sites) >= 2 and sites[-1].layer_input is not None and sites[-2].layer_input is not None:
        path = _stream_path(sites[-2].layer_input, sites[-1].layer_input)
        if path:
            sites[-1].layer_output = _replay(sites[-1].layer_input, path)
        prev, last = sites[-2].residual, sites[-1].residual
        if sites[-1].layer_output is None and prev is not None and last is not None:
            # the input's first steps are ambiguous (a bottleneck: several projections of it, MobileBERT):
            # replay from the residual Add on
            path = _stream_path(prev.outputs[0], sites[-1].layer_input)
            sites[-1].layer_output = _replay(last.outputs[0], path) if path is not None else None


def layer_region(start: ir.Value, end: ir.Value | None) -> list[ir.Node]:
    """The nodes of one layer's data path: downstream of ``start`` up to the one producing ``end``.

    Shape/Size reads are not followed: TorchScript exports compute later layers' reshape targets
    from earlier tensors' shapes, and following them would leak into every later layer.
    """
    seen: dict[int, ir.Node] = {}
    todo = [start]
    while todo:
        v = todo.pop()
        if v is end:
            continue
        for use in v.uses():
            if use.node.op_type in ("Shape", "Size") or id(use.node) in seen:
                continue
            seen[id(use.node)] = use.node
            todo.extend(use.node.outputs)
    return list(seen.values())


def _projection_or_softmax(node: ir.Node) -> bool:
    return node.op_type == "Softmax" or node.op_type in ("MatMul", "Gemm") and is_const(node.inputs[1])


def _score_inputs(term: ir.Value) -> set[int]:
    """Ids of the values a score term is computed from, up to (not through) projections and Softmax ops:
    the q and k it multiplies, not the hidden states (which every later layer reads)."""
    nodes, _ = _ancestors(term, limit=200, stop=_projection_or_softmax)
    return {id(term)} | {id(i) for n in nodes for i in n.inputs if i is not None}


def coupled_site(site: AttentionSite, sites: list[AttentionSite]) -> AttentionSite | None:
    """Another site whose scores are a term of ``site``'s or read ``site``'s: LiLT's text and layout
    attentions each add the other stream's scores to their own. Their heads and tokens are one set: pruning
    either alone changes the other's scores (or leaves them at the old count)."""
    def core(s: AttentionSite) -> set[int]:
        return {id(b.value) for b in (s.q, s.k) if b is not None and b.value is not None}

    def reads(s: AttentionSite, values: set[int]) -> bool:
        return any(_score_inputs(t) & values for t in s.bias_terms)

    mine = core(site)
    return next((o for o in sites if o is not site and (reads(site, core(o)) or reads(o, mine))), None)
