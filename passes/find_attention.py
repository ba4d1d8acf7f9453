"""find-attention: locate every attention block (an analysis; the graph is not changed).

For each ``Softmax`` the core pattern (:mod:`.attention_patterns`) is matched, Q/K/V are traced to
their projections (:mod:`.attention_trace`), the probabilities are followed to ``MatMul(P, V)``,
the head merge and output projection, and the residual ``Add`` whose other input is the layer's
hidden state. Already-fused attention ops are sites too. Every Softmax that is not taken gets a
reason. Sites are numbered in execution order.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import onnx_ir as ir

from spatten_compiler.match import NoMatch, const_array, is_const, match
from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .attention_patterns import CORE, FUSED_OPS, NAN_GUARD, UNREAD_FUSED_OPS, VIEW_OPS
from .attention_trace import (
    Branch,
    KVCache,
    Projection,
    _projection,
    is_weight,
    latent_caches,
    quantized_projection,
    token_source,
    trace_branch,
)
from .nbits_blocks import in_width, is_nbits
from .score_chain import is_mask_term, score_chain, static_rank
from .site_io import _ancestors, layer_outputs, mask_info, rope_position_source
from .unmerge_decoder import match_merged

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AttentionSite:
    layer: int
    softmax: ir.Node | None  # None for fused ops
    probs: ir.Value | None
    variant: dict[str, str]
    q: Branch | None
    k: Branch | None
    v: Branch | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    scale: float | None = None
    mask: ir.Value | None = None
    mask_node: ir.Node | None = None  # the Add/Where that applies ``mask`` to the scores
    mask_kind: str = "none"
    mask_source: str | None = None
    pv: ir.Node | None = None
    merge: list[ir.Node] = dataclasses.field(default_factory=list)
    # a per-token norm over all heads between the head merge and the output projection (BitNet's
    # attn_sub_norm, Sub-LN / Magneto): row-wise, so token rewrites pass it; it mixes the heads
    out_norm: list[ir.Node] = dataclasses.field(default_factory=list)
    out_proj: Projection | None = None
    # a Concat in ``merge`` joining another branch's heads to the attention's (ConvBERT's convolution heads)
    beside: ir.Node | None = None
    residual: ir.Node | None = None
    layer_input: ir.Value | None = None
    layer_output: ir.Value | None = None
    fused: ir.Node | None = None
    rope_source: str | None = None  # position_ids input, or computed from the sequence length
    bias_terms: list[ir.Value] = dataclasses.field(default_factory=list)  # additive position terms on the scores
    bias_adds: list[ir.Node] = dataclasses.field(default_factory=list)  # the Add applying each term
    # learned sink columns concatenated to the scores on the key axis (GPT-OSS) and sliced off the
    # probabilities: ``probs`` is after that Slice, so its rows sum to less than 1
    sinks: list[ir.Value] = dataclasses.field(default_factory=list)
    sink_concat: ir.Node | None = None
    # caches ahead of K/V (MLA caching the compressed latent and the shared RoPE key): no K/V cache at the core
    latent_caches: list[KVCache] = dataclasses.field(default_factory=list)

    @property
    def rope(self) -> bool:
        return bool(self.q and self.q.rope is not None)

    @property
    def v_head_dim(self) -> int | None:
        """V's head size: what each head contributes to the output projection (MLA's v_head_dim may
        differ from the Q/K head size); the Q/K one where V's is not known."""
        shape = self.v.value.shape if self.v is not None and self.v.value is not None else None
        last = shape.dims[-1] if shape is not None and shape.rank() == 4 else None
        return last if isinstance(last, int) else self.head_dim

    @property
    def own_keys(self) -> bool | None:
        """Whether K is computed from the tokens Q is (self-attention, with or without a cache): both
        projections read one hidden state. False: cross-attention, or keys from a reduced sequence
        (SegFormer's strided Conv, ``S_k != S_q``); None: projections not found (fused ops)."""
        qp = self.q.projection if self.q else None
        kp = self.k.projection if self.k else None
        if qp is None or kp is None:
            return None
        return qp.input is kp.input or token_source(qp.input) is token_source(kp.input)

    @property
    def kv_cache(self) -> bool:
        return bool(self.k and self.k.cache is not None)

    @property
    def latent_past(self) -> ir.Value | None:
        """The past input of the cache ahead of K's projection (MLA's compressed latent), if any."""
        return self.latent_caches[0].past if self.latent_caches else None

    @property
    def caches(self) -> list[KVCache]:
        """The cache concats one decoding step of this layer extends: K's and V's, or the latent caches."""
        if self.kv_cache:
            return [c for c in (self.k.cache, self.v.cache if self.v else None) if c is not None]
        return list(self.latent_caches)

    @property
    def hidden_size(self) -> int | None:
        w = self.q.projection.weight if self.q and self.q.projection else None
        if w is not None and in_width(self.q.projection.node):
            return in_width(self.q.projection.node)  # MatMulNBits: blocks [N, ., .], K is an attribute
        return None if w is None or w.shape is None else int(w.shape[0 if not self.q.projection.transposed_weight else 1])

    def to_dict(self) -> dict[str, Any]:
        def name(x: Any) -> str | None:
            return None if x is None else x.name

        d: dict[str, Any] = {
            "layer": self.layer,
            "kind": "fused:" + self.fused.op_type if self.fused is not None else "decomposed",
            "variant": self.variant,
            "softmax": name(self.softmax),
            "probs": name(self.probs),
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "scale": self.scale,
            "mask": {"kind": self.mask_kind, "source": self.mask_source, "tensor": name(self.mask)},
            "rope": self.rope,
            "rope_position_source": self.rope_source,
            "kv_cache": None,
            "layer_input": name(self.layer_input),
            "layer_output": name(self.layer_output),
            "residual": name(self.residual),
            "bias_terms": [name(t) for t in self.bias_terms],
            "sinks": [name(t) for t in self.sinks],
        }
        for key, br in (("q", self.q), ("k", self.k), ("v", self.v)):
            if br is None:
                continue
            p = br.projection
            d[key] = {
                "tensor": name(br.value),
                "projection": None if p is None else {"node": p.node.name, "input": name(p.input),
                                                      "weight": name(p.weight), "bias": name(p.bias)},
                "packed": br.packed,
                "heads": br.heads,
                "views": [n.name for n in br.views],
                "rope": name(br.rope),
            }
        if self.k is not None and self.k.cache is not None:
            c, vc = self.k.cache, self.v.cache if self.v else None
            d["kv_cache"] = {"past_key": c.past.name, "past_value": name(vc.past) if vc else None,
                             "present_key": name(c.present), "present_value": name(vc.present) if vc else None,
                             "axis": c.axis}
        if self.latent_caches:
            d["latent_cache"] = [{"past": c.past.name, "present": name(c.present), "axis": c.axis}
                                 for c in self.latent_caches]
        if self.out_proj is not None:
            d["out_proj"] = {"node": self.out_proj.node.name, "weight": self.out_proj.weight.name,
                             "bias": name(self.out_proj.bias)}
        return d


@dataclasses.dataclass
class AttentionReport:
    sites: list[AttentionSite]
    rejected: list[tuple[str, str]]  # (Softmax node name, reason)
    # attention spattenc cannot read at all (a fused op it cannot decompose, attention inside a subgraph):
    # what to do instead, for the compile summary
    unreadable: list[str] = dataclasses.field(default_factory=list)


def _subgraph_softmaxes(node: ir.Node) -> int:
    """Softmax ops inside ``node``'s subgraphs (an If's branches, a Loop's body), at any depth."""
    graphs = [g for a in node.attributes.values() if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
              for g in (a.value if a.type == ir.AttributeType.GRAPHS else [a.value])]
    return sum(n.op_type == "Softmax" for g in graphs for n in ir.traversal.RecursiveGraphIterator(g))


def _single_consumer(value: ir.Value) -> ir.Node | None:
    """The one consumer of ``value``, ignoring Shape/Size reads (TorchScript computes shapes) and
    SpAtten score taps (prune-heads reads the attention output for head importance)."""
    uses = [u for u in value.uses() if u.node.op_type not in ("Shape", "Size") and u.node.domain != "spatten"]
    return uses[0].node if len(uses) == 1 else None


# A norm over the last axis, decomposed or as one op: what may sit between the head merge and the
# output projection (:func:`_row_norm`). Every other input of its nodes is a constant (gamma, eps, 2).
ROW_NORM_OPS = frozenset({"Pow", "ReduceMean", "Add", "Sub", "Sqrt", "Div", "Reciprocal", "Mul", "Cast",
                          "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"})
NORM_AXIS_ATTR = {"LayerNormalization": "axis", "RMSNormalization": "axis", "SimplifiedLayerNormalization": "axis"}


def _last_axis_only(node: ir.Node, rank: int | None) -> bool:
    """A reduction or norm op that works on the last axis only (per token)."""
    if node.op_type in NORM_AXIS_ATTR:
        axis = node.attributes.get_int(NORM_AXIS_ATTR[node.op_type], -1)
        return axis == -1 or (rank is not None and axis == rank - 1)
    if node.op_type != "ReduceMean":
        return True
    attr = node.attributes.get("axes")
    axes = list(attr.as_ints()) if attr is not None else None
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        a = const_array(node.inputs[1])
        axes = None if a is None else a.reshape(-1).tolist()
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _row_norm(value: ir.Value, limit: int = 12) -> tuple[list[ir.Node], ir.Value] | None:
    """The nodes and output of a per-token norm reading ``value`` (every node of the region is in
    :data:`ROW_NORM_OPS`, reduces only the last axis, and reads only ``value``, the region's own
    results and constants), when the region has one output that a single node reads; else None."""
    rank = value.shape.rank() if value.shape is not None else None
    region: list[ir.Node] = []
    inside = {id(value)}
    todo = [value]
    while todo:
        v = todo.pop(0)
        for use in v.uses():
            node = use.node
            if any(node is r for r in region):
                continue
            if node.op_type not in ROW_NORM_OPS or not _last_axis_only(node, rank) or len(region) >= limit:
                continue
            if not all(i is None or id(i) in inside or is_const(i) for i in node.inputs):
                continue  # waits until its other inputs are in the region (Mul(x, rsqrt))
            region.append(node)
            for out in node.outputs:
                inside.add(id(out))
                todo.append(out)
            todo.append(v)  # re-scan: a reader of v and of a later result may now be complete
    if not region or not any(n.op_type in ("ReduceMean", *NORM_AXIS_ATTR) for n in region):
        return None
    ids = {id(n) for n in region}
    exits = [o for n in region for o in n.outputs if any(id(u.node) not in ids for u in o.uses())]
    if any(id(u.node) not in ids for u in value.uses()) or len(exits) != 1:
        return None  # the merged heads are read beside the norm, or the norm has several results
    out = exits[0]
    return (region, out) if _single_consumer(out) is not None else None


def row_norm_input(value: ir.Value, limit: int = 12) -> ir.Value | None:
    """The input of the per-token norm (:func:`_row_norm`) that computes ``value`` (its output or a step
    inside it), or None."""
    seen, todo = set(), [value]
    while todo and len(seen) < limit:
        node = todo.pop(0).producer()
        if node is None or id(node) in seen or node.op_type not in ROW_NORM_OPS:
            continue
        seen.add(id(node))
        for x in node.inputs:
            if x is None or is_const(x):
                continue
            found = _row_norm(x)
            if found is not None and any(o is value for n in found[0] for o in n.outputs):
                return x
            todo.append(x)
    return None


def _follow_output(pv: ir.Node, graph: ir.Graph
                   ) -> tuple[list[ir.Node], list[ir.Node], Projection | None, ir.Node | None]:
    """PV -> head merge (views) -> [per-token norm] -> output projection (+bias) -> residual Add."""
    merge: list[ir.Node] = []
    norm: list[ir.Node] = []
    value = pv.outputs[0]
    node = _single_consumer(value)
    while node is not None and (node.op_type in VIEW_OPS or _beside(node, value, pv)):
        merge.append(node)
        value = node.outputs[0]
        node = _single_consumer(value)
    if merge and (node is None or node.op_type not in ("MatMul", "Gemm")):
        found = _row_norm(value)
        if found is not None:
            norm, value = found
            node = _single_consumer(value)
    if node is not None and node.op_type == "DynamicQuantizeLinear":  # int8 (quantize_dynamic): Mul is the output
        proj, value = _quantized_after(node)
        if proj is None:
            return merge, norm, None, None
    else:
        projects = node is not None and (node.op_type in ("MatMul", "Gemm") or is_nbits(node))  # int4 blocks too
        if not projects or node.inputs[0] is not value:
            return merge, norm, None, None
        proj = _projection(node)
        if isinstance(proj, NoMatch):
            return merge, norm, None, None
        value = node.outputs[0]
    node = _single_consumer(value)
    while node is not None and node.op_type == "Reshape":  # Gemm on [B*S, D] is reshaped back
        value, node = node.outputs[0], _single_consumer(node.outputs[0])
    if node is not None and node.op_type == "Add" and any(is_weight(i) for i in node.inputs):
        proj.bias = next(i for i in node.inputs if is_weight(i))  # a constant or a QDQ one
        value, node = node.outputs[0], _single_consumer(node.outputs[0])
    while node is not None and node.op_type == "Mul" and any(is_const(i) for i in node.inputs):
        value, node = node.outputs[0], _single_consumer(node.outputs[0])  # layer scale (DINOv2, BEiT)
    residual = node if node is not None and node.op_type == "Add" else None
    return merge, norm, proj, residual


REFOLD_OPS = ("Reshape", "Where", "Cast", "Identity")  # between a folded core's probabilities and its P @ V


def _refolds_to_pv(value: ir.Value, steps: int) -> bool:
    """``value`` reaches input 0 of a MatMul through at most ``steps`` more re-fold ops."""
    for u in value.uses():
        if u.node.op_type == "MatMul" and u.idx == 0:
            return True
        if steps and u.node.op_type in REFOLD_OPS and _refolds_to_pv(u.node.outputs[0], steps - 1):
            return True
    return False


def _beside(node: ir.Node, heads: ir.Value, pv: ir.Node) -> bool:
    """A Concat joining the attention's heads with another branch's computed beside the attention (not from
    its probabilities) on the head or feature axis: ConvBERT's convolution heads, read by one output
    projection with them."""
    rank = heads.shape.rank() if heads.shape is not None else None
    if node.op_type != "Concat" or rank is None or node.attributes.get_int("axis", 0) % rank < 2:
        return False  # on the batch or token axis: chunks of a sequence (CANINE's local attention), not heads
    probs = pv.inputs[0].producer()
    others = [i for i in node.inputs if i is not None and i is not heads]
    return bool(others) and not any(n is probs or n is pv for i in others for n in _ancestors(i, limit=200)[0])


def _quantized_after(dql: ir.Node) -> tuple[Projection | None, ir.Value | None]:
    """The int8 projection reading ``DynamicQuantizeLinear`` (:func:`quantized_projection`) and its
    float output."""
    for use in dql.outputs[0].uses():
        cast = _single_consumer(use.node.outputs[0]) if use.node.op_type == "MatMulInteger" else None
        mul = _single_consumer(cast.outputs[0]) if cast is not None and cast.op_type == "Cast" else None
        proj = quantized_projection(mul.outputs[0]) if mul is not None else None
        if proj is not None and proj.node is use.node:
            return proj, mul.outputs[0]
    return None, None


def _feeds_q(q: Branch) -> set[int]:
    src = q.projection.input if q is not None and q.projection is not None else None
    if src is None:
        return set()
    nodes, inputs = _ancestors(src, limit=80)
    return {id(n) for n in nodes} | {id(v) for v in (*inputs, src)}


def _residual_after(start: ir.Value, q: Branch, limit: int = 40) -> tuple[ir.Node | None, ir.Value | None]:
    """The first Add downstream of ``start`` (the output projection) whose other input is the hidden
    state feeding Q's projection: the residual, with any per-token ops (a post-norm) on the branch."""
    feeds_q = _feeds_q(q)
    branch, todo = {id(start)}, [start]
    while todo and len(branch) < limit:
        v = todo.pop(0)
        for use in v.uses():
            node = use.node
            if node.op_type in ("Shape", "Size"):
                continue
            if node.op_type == "Add":
                other = node.inputs[1 - use.idx]
                if other is not None and id(other) not in branch and not is_weight(other) and (
                        id(other) in feeds_q or id(other.producer()) in feeds_q):
                    return node, other
            for out in node.outputs:
                if id(out) not in branch:
                    branch.add(id(out))
                    todo.append(out)
    return None, None


def _viewed(value: ir.Value, limit: int = 3) -> set[int]:
    """``value`` and what it re-views (Reshape/Identity producers): the hidden state Q's projection reads
    may be the 2-D ``[B*S, D]`` one under the 3-D residual (tf2onnx drops a Reshape pair between
    two Tensordots: ELECTRA's embedding projection feeds Q as ``[B*S, D]``)."""
    ids = {id(value)}
    for _ in range(limit):
        node = value.producer()
        if node is None or node.op_type not in ("Reshape", "Identity"):
            break
        value = node.inputs[0]
        ids.add(id(value))
    return ids


def _residual_stream(add: ir.Node, pv: ir.Node, q: Branch) -> tuple[ir.Node | None, ir.Value | None]:
    """The residual Add and the hidden state it adds back, which also feeds Q's projection (through a
    norm). A parallel block (GPT-J, GPT-NeoX, CodeGen: ``(attn + mlp) + x``) has the MLP output in the
    first Add after the output projection; the hidden state is one Add further. Else a bottleneck
    (MobileBERT): the residual adds a projection of the hidden state Q's projection also reads; that hidden
    state is the layer input."""
    feeds_q = _feeds_q(q)
    attn_out = next(i for i in add.inputs if _descends_from(i, pv))
    bottleneck: tuple[ir.Node | None, ir.Value | None] = (None, None)
    for _ in range(2):
        other = next((i for i in add.inputs if i is not attn_out), None)
        if other is None or not feeds_q or id(other.producer()) in feeds_q or _viewed(other) & feeds_q:
            return add, other
        if bottleneck[0] is None and q.projection is not None and (src := token_source(other)) is not other and (
                src is token_source(q.projection.input)):
            bottleneck = add, src  # the residual and Q are projections of one hidden state (MobileBERT)
        nxt = _single_consumer(add.outputs[0])
        if nxt is None or nxt.op_type != "Add":
            break
        attn_out, add = add.outputs[0], nxt
    return bottleneck  # unless the hidden state itself is added one Add further (a parallel block)


def _sliced_heads(br: Branch) -> int | None:
    """Heads of a branch whose projection weight prune-heads slices at run time (spatten.HeadSlice,
    head split Reshape to -1 heads): the slice's constant target shape gives the kept width."""
    node = br.projection.weight.producer() if br.projection is not None else None
    if node is None or node.domain != "spatten" or node.op_type != "HeadSlice" or not br.head_dim:
        return None
    shape = const_array(node.inputs[3])
    if shape is None or br.packed is not None:  # packed QKV: the width holds Q, K and V
        return None
    width = int(shape.reshape(-1)[0 if br.projection.transposed_weight else -1])
    return width // br.head_dim if width % br.head_dim == 0 else None


def _match_softmax(node: ir.Node, graph: ir.Graph) -> AttentionSite | NoMatch:
    found = match(CORE, node.outputs[0])
    if found and found.get("mask_variant") == "additive" and not is_mask_term(found["mask"]):
        # the added term is a position bias (Swin's table), not a mask: score_chain tells them apart
        structural = score_chain(node)
        found = found if isinstance(structural, NoMatch) else structural
    if not found:
        structural = score_chain(node)
        if isinstance(structural, NoMatch):
            return NoMatch(f"core: {structural.reason}")
        found = structural
    qk = found.get("qk")
    if not found.get("folded") and qk is not None and static_rank(qk.outputs[0]) == 3:
        found = {**found, "folded": True}  # [B*H, S, S] scores straight from the bmm (TF Whisper: no mask)
    q, kt = found["q"], found["kt"]
    if is_const(kt) or is_const(q):
        return NoMatch("one side of the score MatMul is a constant: a linear layer followed by Softmax")
    probs = found["sink_slice"].outputs[0] if "sink_slice" in found else node.outputs[0]
    for use in probs.uses():
        guarded = use.node.outputs[0] if use.node.op_type == "Where" else None
        found_guard = match(NAN_GUARD, guarded) if guarded is not None else None
        if found_guard and found_guard["p"] is probs:
            probs = guarded
            break
    pv_in = probs  # prune-values puts a SpAtten op between the probabilities and MatMul(P, V)
    for use in probs.uses():
        if use.node.domain == "spatten" and any(u.node.op_type == "MatMul" and u.idx == 0
                                                for u in use.node.outputs[0].uses()):
            pv_in = use.node.outputs[0]
    for _ in range(4 if found.get("folded") else 0):  # 3-D layout: P is re-folded (and masked) for the bmm
        uses = [u for u in pv_in.uses() if u.node.op_type not in ("Shape", "Size")]
        # other readers of P (prune-tokens' importance, through its own [B, H, S, S] view) are beside the path
        if len(uses) > 1 and not any(u.node.op_type == "MatMul" and u.idx == 0 for u in uses):
            uses = [u for u in uses if _refolds_to_pv(u.node.outputs[0], 3)]
        if len(uses) != 1 or uses[0].node.op_type not in REFOLD_OPS:
            break
        pv_in = uses[0].node.outputs[0]
    pvs = [u.node for u in pv_in.uses() if u.node.op_type == "MatMul" and u.idx == 0]
    dropout = next((u.node for u in pv_in.uses() if u.node.op_type == "Dropout"), None)
    if not pvs and dropout is not None:
        return NoMatch(f"the probabilities go through Dropout '{dropout.name}' in training mode before "
                       "MatMul(P, V): export the model in eval mode")
    if len(pvs) != 1:
        return NoMatch("the probabilities do not feed exactly one MatMul(P, V)")
    pv = pvs[0]
    branches = {}
    for key, value in (("q", q), ("k", kt), ("v", pv.inputs[1])):
        kept = value.producer()  # prune-heads under a KV cache: the core reads the kept heads of the cache
        kept = kept if kept is not None and kept.domain == "spatten" and kept.op_type == "KeptHeads" else None
        br = trace_branch(kept.inputs[0] if kept else value, graph)
        if isinstance(br, NoMatch):
            return NoMatch(f"{key}: {br.reason}")
        if kept:
            br.value, br.heads = value, None
        branches[key] = br
    qb, kb, vb = branches["q"], branches["k"], branches["v"]
    heads = qb.heads or _sliced_heads(qb)
    heads = heads or (node.inputs[0].shape.dims[1] if node.inputs[0].shape is not None else None)
    heads = heads if isinstance(heads, int) else None
    kv_heads = kb.heads or _sliced_heads(kb) or heads
    core = q.shape  # the head size is what the score MatMul contracts over, whatever the views said
    head_dim = core.dims[-1] if core is not None and core.rank() == 4 and isinstance(core.dims[-1], int) else None
    head_dim = head_dim or qb.head_dim or kb.head_dim
    if heads is None or head_dim is None:
        return NoMatch("cannot tell the number of heads / head size from the head-split Reshape")
    scale = 1.0
    for key in ("scale", "q_scale", "k_scale"):
        if f"{key}:value" in found and "bias_terms" in found:  # score_chain: the product already
            scale *= float(found[f"{key}:value"].reshape(-1)[0])
        elif f"{key}:value" in found:
            s = float(found[f"{key}:value"].reshape(()))
            scale *= 1.0 / s if found[f"{key}_node"].op_type == "Div" else s
    for br in (qb, kb):
        if br.pre_scale is not None:
            scale *= br.pre_scale
    variant = {"scale": found["scale_variant"], "mask": found["mask_variant"]}
    if found.get("folded"):
        variant["layout"] = "folded"  # 3-D scores [B*H, S, S]: found, not rewritten
    if "sink" in found:
        variant["sink"] = found["sink_variant"]  # sink columns after/before the scores, sliced off P
    merge, out_norm, out_proj, residual = _follow_output(pv, graph)
    beside = next((n for n in merge if n.op_type == "Concat"), None)
    dims = out_proj.weight.shape if out_proj is not None else None
    rows = dims[1 if out_proj.transposed_weight else 0] if dims is not None and dims.rank() == 2 else None
    if isinstance(rows, int) and rows % heads == 0 and rows // heads != head_dim and (
            core is None or not isinstance(core.dims[-1], int)):
        head_dim = rows // heads  # the output projection reads heads x head_dim (per-head packed QKV)
    site = AttentionSite(
        layer=-1, softmax=node, probs=probs, variant=variant, q=qb, k=kb, v=vb,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        scale=scale if found["scale_variant"] != "none" or scale != 1.0 else None,
        bias_terms=list(found.get("bias_terms", [])), bias_adds=list(found.get("bias_adds", [])),
        sinks=list(found.get("sink", [])), sink_concat=found.get("sink_concat"),
        mask=found.get("mask"), mask_node=found.get("mask_node"), pv=pv, merge=merge, out_norm=out_norm, out_proj=out_proj,
        residual=residual, beside=beside,
    )
    if residual is not None:
        site.residual, site.layer_input = _residual_stream(residual, pv, qb)
    elif out_proj is not None:  # a norm on the branch before the residual (Gemma 2, OLMo 2 post-norms)
        site.residual, site.layer_input = _residual_after(out_proj.node.outputs[0], qb)
    site.latent_caches = latent_caches(kb, graph)
    site.mask_kind, site.mask_source = mask_info(site.mask, graph, found.get("causal_cond"))
    site.rope_source = rope_position_source(qb.rope_cos, graph)
    return site


def _descends_from(value: ir.Value, node: ir.Node, limit: int = 12) -> bool:
    for _ in range(limit):
        producer = value.producer()
        if producer is None:
            return False
        if producer is node:
            return True
        value = next((i for i in producer.inputs if i is not None and not is_weight(i)), None)
        if value is None:
            return False
    return False


def _fused_site(node: ir.Node, graph: ir.Graph) -> AttentionSite | NoMatch:
    """A fused attention op: heads from attributes, or from 4-D Q/K shapes and the head split."""
    spec = FUSED_OPS[(node.domain, node.op_type)]
    heads = node.attributes.get_int(str(spec["heads"]), 0) or None
    kv_heads = node.attributes.get_int(str(spec.get("kv_heads", spec["heads"])), 0) or None
    branches: dict[str, Branch | None] = {}
    for key in ("q", "k", "v"):
        index = spec.get(key)
        value = node.inputs[index] if isinstance(index, int) and len(node.inputs) > index else None
        traced = trace_branch(value, graph) if value is not None else None
        branches[key] = traced if isinstance(traced, Branch) else (Branch(value=value) if value is not None else None)
    q, k = branches["q"], branches["k"]
    head_dim = None
    for br, which in ((q, "q"), (k, "k")):
        shape = br.value.shape if br is not None else None
        if shape is not None and shape.rank() == 4:
            n, d = shape.dims[1], shape.dims[3]
            if which == "q":
                heads = heads or (n if isinstance(n, int) else br.heads)
            else:  # a GQA repeat before the op hides the true KV heads: read them at the head split
                kv_heads = kv_heads or (br.heads if br.repeated and br.heads else n if isinstance(n, int) else br.heads)
            head_dim = head_dim or (d if isinstance(d, int) else br.head_dim)
    if head_dim is None and q is not None and q.value.shape is not None and heads:
        last = q.value.shape.dims[-1]
        # GroupQueryAttention with no key/value inputs reads one packed [B, S, (H + 2 H_kv) D] QKV input
        packed = k is None and branches["v"] is None and kv_heads
        width = heads + 2 * kv_heads if packed else heads
        head_dim = last // width if isinstance(last, int) and last % width == 0 else None
    weights = node.inputs[1] if "packed_input" in spec and len(node.inputs) > 1 else None
    if head_dim is None and heads and weights is not None and weights.shape is not None and weights.shape.rank() == 2:
        # com.microsoft.Attention projects the hidden state itself: W is [D, Q + K + V] (qkv_hidden_sizes)
        sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
        width = sizes[0] if sizes else weights.shape.dims[1] // 3 if isinstance(weights.shape.dims[1], int) else None
        head_dim = width // heads if isinstance(width, int) and width % heads == 0 else None
    if heads is None or head_dim is None:
        return NoMatch(f"fused {node.op_type} '{node.name}': cannot tell heads / head size")
    mask_index = spec.get("mask")
    mask = node.inputs[mask_index] if isinstance(mask_index, int) and len(node.inputs) > mask_index else None
    causal = node.attributes.get_int("is_causal", 0) or node.attributes.get_int("unidirectional", 0)
    mask_kind, mask_source = mask_info(mask, graph, None) if mask is not None else ("none", None)
    if causal:
        mask_kind = "causal" if mask_kind in ("none", "causal") else f"causal+{mask_kind.replace('causal+', '')}"
    past = spec.get("past", ())
    past_values = [node.inputs[i] for i in past if len(node.inputs) > i and node.inputs[i] is not None]  # type: ignore[union-attr]
    if past_values and k is not None and k.cache is None:
        present = node.outputs[spec["present"][0]] if "present" in spec else None  # type: ignore[index]
        k.cache = KVCache(past=past_values[0], concat=node, axis=-2, present=present)
    return AttentionSite(
        layer=-1, softmax=None, probs=None, variant={"fused": f"{node.domain or 'ai.onnx'}.{node.op_type}"},
        q=q, k=k, v=branches["v"], num_heads=heads, num_kv_heads=kv_heads or heads, head_dim=head_dim,
        mask=mask, mask_kind=mask_kind, mask_source=mask_source, fused=node,
    )


def find_attention(model: ir.Model) -> AttentionReport:
    """Every attention site of the main graph, in execution order, plus reasons for non-matches."""
    graph = model.graph
    sites: list[AttentionSite] = []
    rejected: list[tuple[str, str]] = []
    unreadable: list[str] = []
    for node in graph:
        if (node.domain, node.op_type) in FUSED_OPS:
            fused = _fused_site(node, graph)
            if isinstance(fused, NoMatch):
                rejected.append((node.name or "<unnamed>", fused.reason))
            else:
                sites.append(fused)
        elif (node.domain, node.op_type) in UNREAD_FUSED_OPS:
            unreadable.append(f"{node.op_type}: {UNREAD_FUSED_OPS[(node.domain, node.op_type)]}")
            rejected.append((node.name or "<unnamed>", unreadable[-1]))
        elif node.op_type in ("If", "Loop", "Scan") and (n := _subgraph_softmaxes(node)):
            why = match_merged(model)
            why = f" and this is not a merged decoder it can unmerge ({why.reason})" if isinstance(why, NoMatch) else ""
            unreadable.append(f"{node.op_type} '{node.name}' holds {n} Softmax ops in its subgraphs: spattenc rewrites "
                              f"the main graph{why}; compile the model with past inputs (e.g. optimum's "
                              "decoder_with_past_model.onnx)")
            rejected.append((node.name or "<unnamed>", unreadable[-1]))
        elif node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            found = _match_softmax(node, graph)
            if isinstance(found, NoMatch):
                rejected.append((node.name or "<unnamed>", found.reason))
            else:
                sites.append(found)
    for i, site in enumerate(sites):
        site.layer = i
    layer_outputs(sites, graph)
    return AttentionReport(sites, rejected, unreadable)


@register_pass
@dataclasses.dataclass(frozen=True)
class FindAttention(Pass):
    """Analysis only: logs the sites found. Passes that rewrite call :func:`find_attention`."""

    name = "find-attention"

    def call(self, model: ir.Model) -> PassResult:
        report = find_attention(model)
        logger.info("found %d attention sites; %d Softmax rejected", len(report.sites), len(report.rejected))
        return PassResult(model, False)
