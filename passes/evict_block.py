"""Block eviction for evict-kv (``slack``): run the eviction only on the steps that need it.

A decode step's eviction (scores, TopK, the kept-slot index, the row Gathers of every layer's K/V
cache) costs ~50 small ops per layer whether or not anything changes. With ``slack = S`` each layer's
cache may grow to its budget ``k_l`` plus ``S`` slots; the step at which any layer would exceed that
evicts every layer back to its budget by the usual rule, and the other steps only append::

    over    = ReduceMax(Concat(n_0, n_1, ...) - Concat(k_0, k_1, ...)) > S     n_l: slots after the append
    outputs = If(over, then: <the eviction nodes of every layer, unchanged>,
                       else: Identity(Concat(past, new)), importance, positions)

The then-branch is not rebuilt: the eviction nodes the pass already emitted are *moved* into it
(every node whose results feed only the evicted outputs), so its arithmetic is exactly the
``slack = 0`` graph's; the else-branch passes the appended cache, importance and positions through.
So between evictions the step runs ``O(1)`` ops per layer (mask, importance update, the appends),
and TopK/Gathers run once every ``S / q`` steps of ``q`` tokens, at the price of up to ``S`` more slots
held (and attended over) between evictions.

A later pass that rewrites what the block evicts (pack-kv-cache: the cache crosses steps as packed
planes) calls :func:`inline_block` first - the then-branch's nodes back in the graph, the ``slack = 0``
form - rewrites that, and defers again with its own (evicted, appended) pairs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor

logger = logging.getLogger(__name__)
# The block's If is named in evict-kv's namespace whichever pass defers it: the backend and the simulator
# find evict-kv's nodes by it (backend/lower_evict.NODE_PREFIX).
NAMESPACE = "spatten/evict/"


def over_budget(ed: GraphEditor, lengths: list[ir.Value], budgets: list[ir.Value], slack: int) -> ir.Value:
    """Scalar bool: some layer holds more than its budget + ``slack`` slots after this step's append."""
    n = ed.op("Concat", lengths, axis=0)
    k = budgets[0] if all(b is budgets[0] for b in budgets) else ed.op("Concat", budgets, axis=0)
    excess = ed.op("ReduceMax", [ed.op("Sub", [n, k])], keepdims=0)
    return ed.op("Greater", [excess, ed.const("slack", np.array(slack, np.int64))])


def find_block(graph: ir.Graph) -> ir.Node | None:
    """The If :func:`defer_eviction` wrote, if any."""
    return next((n for n in graph if n.op_type == "If" and (n.name or "").startswith(NAMESPACE + "evict_block_")),
                None)


def inline_block(ed: GraphEditor, graph: ir.Graph) -> tuple[ir.Value, list[tuple[ir.Value, ir.Value]]] | None:
    """Undo :func:`defer_eviction`: the block's then-branch nodes go back into ``graph`` (registered
    with ``ed``, so that a later :func:`defer_eviction` through it moves them again) and each If output
    is replaced by its then-branch value, under the output's name. Returns the condition and the
    (evicted, appended) pairs for :func:`defer_eviction`, or None when the graph has no block."""
    block = find_block(graph)
    if block is None:
        return None
    then_g = block.attributes["then_branch"].value
    else_g = block.attributes["else_branch"].value
    pairs = []
    for out, evicted, kept in zip(block.outputs, then_g.outputs, else_g.outputs):
        ident = kept.producer()
        if ident is None or ident.op_type != "Identity":
            raise ValueError(f"{block.name}: else-branch output {kept.name} is not an Identity of an outer value")
        pairs.append((out, evicted, ident.inputs[0]))
    body = list(then_g)
    then_g.outputs.clear()
    then_g.remove(body, safe=False)
    else_g.outputs.clear()
    else_g.remove(list(else_g), safe=True)  # detached: its Identities would keep reading the appended values
    graph.insert_before(block, body)
    ed.added.extend(body)
    for out, evicted, _ in pairs:
        ed.replace_uses(out, evicted)  # graph-output slots too, under the output's name
    graph.remove(block, safe=False)
    logger.info("evict-kv: block of %d nodes inlined for a rewrite of what it evicts", len(body))
    return block.inputs[0], [(evicted, full) for _, evicted, full in pairs]


def defer_eviction(ed: GraphEditor, graph: ir.Graph, cond: ir.Value,
                   pairs: list[tuple[ir.Value, ir.Value]]) -> ir.Node:
    """Move the nodes that only compute the ``evicted`` outputs (graph outputs, one per pair) into the
    then-branch of an ``If(cond)`` whose else-branch returns the paired ``full`` values; the If's
    outputs take the graph outputs' places and names."""
    targets = {id(e) for e, _ in pairs}
    outputs = {id(o) for o in graph.outputs} | {id(f) for _, f in pairs}  # the else-branch reads the full values
    moved: dict[int, ir.Node] = {}
    for node in reversed(ed.added):  # creation order is topological among the pass's nodes
        if node.graph is not graph:
            continue
        needed_here = any((id(o) in outputs and id(o) not in targets)
                          or any(id(u.node) not in moved for u in o.uses()) for o in node.outputs)
        feeds_eviction = any(id(o) in targets or o.uses() for o in node.outputs)
        if not needed_here and feeds_eviction:
            moved[id(node)] = node
    body = [n for n in ed.added if id(n) in moved]
    graph.remove(body, safe=False)
    for node in body:  # the exporter's / build-time shapes are stale after eviction (see forget_shapes)
        for out in node.outputs:
            if id(out) not in targets:
                out.shape = None
    slots = [next(i for i, o in enumerate(graph.outputs) if o is e) for e, _ in pairs]
    outs = [ir.Value(name=e.name, type=e.type, shape=e.shape) for e, _ in pairs]
    for i, (evicted, _), out in zip(slots, pairs, outs):  # the If's outputs take the graph outputs' places
        graph.outputs[i] = out
        evicted.name = ed._name("evicted")
    then_graph = ir.Graph([], [e for e, _ in pairs], nodes=body, name="evict")
    else_nodes = [ir.Node("", "Identity", [full], name=ed._name("keep_all")) for _, full in pairs]
    for node, (evicted, _) in zip(else_nodes, pairs):
        node.outputs[0].name, node.outputs[0].type = f"{node.name}:0", evicted.type
    else_graph = ir.Graph([], [n.outputs[0] for n in else_nodes], nodes=else_nodes, name="append")
    block = ir.Node("", "If", [cond], attributes=[ir.AttrGraph("then_branch", then_graph),
                                                  ir.AttrGraph("else_branch", else_graph)],
                    outputs=outs, name=NAMESPACE + ed._name("evict_block").rsplit("/", 1)[-1])
    graph.append(block)
    logger.info("evict-kv: %d eviction nodes run only when a layer exceeds its budget + slack", len(body))
    return block
