"""prune-heads: SpAtten cascade head pruning; pruned heads' projections are really not computed.

Rewrite, with ``acc`` (one score per head group) and ``sel`` (kept groups, ascending) carried from
layer to layer::

    sel_l          = spatten.HeadSelect(acc, sel_{l-1}, n_l)         # top n_l of the still-kept groups
    W_q/k/v, b     = spatten.HeadSlice(W, sel_l)                     # kept heads' columns only
    W_o            = spatten.HeadSlice(W_o, sel_l)                   # kept heads' rows only
    reshape / split / expand targets: H -> kept heads, H*Dh -> kept width
    acc            = acc + scatter(sel_l, spatten.HeadImportance(E_l, P_l))   # E_l = MatMul(P, V)

``n_l = ceil(G * ratio_l)`` (at least ``min_keep``); SpAtten's schedule leaves the first 30% of
layers unpruned, layer 0 always (no scores exist before it). A pruned group never comes back:
``HeadSelect`` ranks only the groups still kept. The Q/K/V MatMuls of a pruned layer have width
``n_l * Dh`` and the output projection reads ``n_l * Dh`` rows, so onnxruntime does less work.

Design choices (the paper runs batch 1, MHA only):
- Batch: one head set per batch (scores summed over the batch), so weight slices are shared.
- Valid tokens: the score sums ``|E|`` over query rows whose token is a valid key somewhere in the
  probabilities (``sum P[:, :, :, i] > 0``), so padding (and tokens masked by prune-tokens) does not
  count; needs self-attention (no KV cache).
- GQA: the unit of pruning is a KV group (one KV head and the ``H / Hkv`` query heads sharing it);
  its score is the sum of its query heads' scores. Pruning a query head alone would still need its
  KV head, and would make the GQA repeat uneven. For MHA a group is one head.
- Packed QKV (GPT-2 ``Gemm -> Split``): the packed weight is viewed as ``[D, 3, H, Dh]`` and sliced
  on the head axis; the Split sizes shrink. Packed GQA and Slice-packed QKV are refused.
- Decoders with a KV cache and fused attention ops are refused (OptionError): the cache stores all
  heads of every past step, and a fused op hides the projections.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import NoAttentionError, OptionError
from spatten_compiler.match import const_array
from spatten_compiler.pipeline import Pass, PassResult, register_pass
from spatten_compiler.schedule import check_schedule, spatten_schedule

from .attention_trace import Projection
from .find_attention import AttentionSite, find_attention
from .prune_tokens import _reads_input_seq_len
from .spatten_ops import DOMAIN, define, ensure_functions

logger = logging.getLogger(__name__)

define("HeadSlice", """
<domain: "spatten", opset_import: ["" : 17]>
HeadSlice <axis> (w, sel, units, shape) => (y) {
    blocks = Reshape (w, units)
    picked = Gather <axis: int = @axis> (blocks, sel)
    y = Reshape (picked, shape)
}""")
define("HeadImportance", """
<domain: "spatten", opset_import: ["" : 17]>
HeadImportance (e, probs) => (score) {
    axes12 = Constant <value_ints = [1, 2]> ()
    colsum = ReduceSum <keepdims = 0> (probs, axes12)
    zero = Constant <value_float = 0.0> ()
    valid = Greater (colsum, zero)
    validf = Cast <to = 1> (valid)
    one = Constant <value_ints = [1]> ()
    qv = Unsqueeze (validf, one)
    mag = Abs (e)
    axes3 = Constant <value_ints = [3]> ()
    rows = ReduceSum <keepdims = 0> (mag, axes3)
    weighted = Mul (rows, qv)
    axes02 = Constant <value_ints = [0, 2]> ()
    score = ReduceSum <keepdims = 0> (weighted, axes02)
}""")
define("HeadSelect", """
<domain: "spatten", opset_import: ["" : 17]>
HeadSelect (acc, sel, k) => (kept) {
    sub = Gather <axis = 0> (acc, sel)
    vals, idx = TopK <axis = -1, largest = 1, sorted = 1> (sub, k)
    idxf = Cast <to = 1> (idx)
    ordered, order = TopK <axis = -1, largest = 0, sorted = 1> (idxf, k)
    picked = Gather <axis = 0> (idx, order)
    kept = Gather <axis = 0> (sel, picked)
}""")
FUNCTIONS = ["HeadSlice", "HeadImportance", "HeadSelect"]


def kept_groups(groups: int, ratio: float, min_keep: int = 1) -> int:
    """How many head groups a layer with keep ``ratio`` runs: ceil(G * ratio) in [min_keep, G]."""
    return max(min(min_keep, groups), min(groups, math.ceil(round(groups * ratio, 6))))


def _check_sites(sites: list[AttentionSite]) -> None:
    for s in sites:
        if s.fused is not None:
            raise OptionError(f"layer {s.layer}: fused {s.fused.op_type} op; prune-heads needs decomposed attention")
        if s.kv_cache:
            raise OptionError(f"layer {s.layer} has a KV cache: prune-heads does not support decoders with a KV "
                              "cache (the cache holds every head of past steps); export without past inputs")
        if any(b is None or b.projection is None for b in (s.q, s.k, s.v)) or s.out_proj is None or s.pv is None:
            raise OptionError(f"layer {s.layer}: cannot locate the Q/K/V and output projections")
        if s.num_heads % s.num_kv_heads:
            raise OptionError(f"layer {s.layer}: {s.num_heads} query heads do not divide into "
                              f"{s.num_kv_heads} KV heads")
        if s.q.packed is not None:
            if s.num_kv_heads != s.num_heads:
                raise OptionError(f"layer {s.layer}: packed QKV with grouped-query attention is not supported")
            split = next((n for n in s.q.views if n.op_type in ("Split", "Slice")), None)
            if split is None or split.op_type != "Split":
                raise OptionError(f"layer {s.layer}: packed QKV split by Slice is not supported by prune-heads")


def _from(value: ir.Value | None, node: ir.Node) -> bool:
    for _ in range(4):
        producer = value.producer() if value is not None else None
        if producer is node:
            return True
        if producer is None or producer.op_type != "Reshape":
            return False
        value = producer.inputs[0]
    return False


def _weight_slot(proj: Projection) -> tuple[ir.Node, int]:
    """The node input that reads the projection weight (the projection, or its weight Transpose)."""
    w = proj.node.inputs[1]
    if w is proj.weight:
        return proj.node, 1
    return w.producer(), 0


def _bias_slot(proj: Projection) -> tuple[ir.Node, int] | None:
    if proj.bias is None:
        return None
    for use in proj.bias.uses():
        n = use.node
        if n is proj.node or (n.op_type == "Add" and any(_from(i, proj.node) for i in n.inputs if i is not proj.bias)):
            return n, use.idx
    return None


def _pieces(value: ir.Value) -> list[tuple[ir.Value, np.ndarray | None]]:
    a = const_array(value)
    if a is not None:
        return [(value, a.reshape(-1))]
    p = value.producer()
    if p is not None and p.op_type == "Concat":
        return [(x, None if const_array(x) is None else const_array(x).reshape(-1)) for x in p.inputs]
    return [(value, None)]


@register_pass
@dataclasses.dataclass(frozen=True)
class PruneHeads(Pass):
    """Cascade head pruning with SpAtten's schedule (or an explicit one)."""

    name = "prune-heads"
    keep: float = 1.0
    schedule: tuple[float, ...] = ()
    unpruned: float = 0.3
    min_keep: int = 1

    def ratios(self, layers: int) -> list[float]:
        if self.schedule:
            return check_schedule(list(self.schedule), layers)
        return spatten_schedule(layers, self.keep, self.unpruned)

    def call(self, model: ir.Model) -> PassResult:
        if self.min_keep < 1:
            raise OptionError(f"min_keep must be >= 1, got {self.min_keep}")
        sites = find_attention(model).sites
        if not sites:
            raise NoAttentionError("no attention found: nothing to prune")
        ratios = self.ratios(len(sites))
        _check_sites(sites)
        counts = [kept_groups(s.num_kv_heads, r, self.min_keep) for s, r in zip(sites, ratios)]
        if all(n == s.num_kv_heads for n, s in zip(counts, sites)):
            return PassResult(model, False)
        if len({s.num_kv_heads for s in sites}) > 1:
            raise OptionError("attention layers have different head counts; prune-heads needs one head set")
        if counts[0] < sites[0].num_kv_heads:
            raise OptionError("the first attention layer cannot be head-pruned: head scores come from earlier layers")
        _Rewrite(model, sites, counts).run()
        logger.info("prune-heads: schedule %s, kept head groups %s", ratios, counts)
        return PassResult(model, True)


class _Rewrite:
    def __init__(self, model: ir.Model, sites: list[AttentionSite], counts: list[int]):
        self.e = GraphEditor(model, "spatten_heads")
        self.model, self.sites, self.counts = model, sites, counts
        ensure_functions(model, FUNCTIONS)

    def call(self, name: str, *inputs: ir.Value, **attrs: object) -> ir.Value:
        return self.e.op(name, list(inputs), domain=DOMAIN, hint=name, **attrs)

    def run(self) -> None:
        e = self.e
        groups = self.sites[0].num_kv_heads
        last = max(i for i, (n, s) in enumerate(zip(self.counts, self.sites)) if n < s.num_kv_heads)
        acc = e.const("acc", np.zeros(groups, np.float32))
        sel = e.const("all_heads", np.arange(groups, dtype=np.int64))
        for i, (site, n) in enumerate(zip(self.sites[: last + 1], self.counts)):
            if n < groups:
                sel = self.call("HeadSelect", acc, sel, e.const("k", np.array([n], np.int64)))
                self._slice_layer(site, sel, n)
            if i < last:
                score = self.call("HeadImportance", site.pv.outputs[0], site.probs)
                g = site.num_heads // groups
                if g > 1:
                    score = e.op("ReduceSum", [e.op("Reshape", [score, e.const("shape", np.array([-1, g], np.int64))]),
                                               e.const("axes", np.array([1], np.int64))], keepdims=0)
                acc = e.op("ScatterElements", [acc, sel, e.op("Add", [e.op("Gather", [acc, sel]), score])])
        e.commit()
        self._reinfer_shapes()

    def _slice(self, slot: tuple[ir.Node, int], value: ir.Value, sel: ir.Value, units: list[int], axis: int,
               shape: list[int]) -> None:
        out = self.call("HeadSlice", value, sel, self.e.const("units", np.array(units, np.int64)),
                        self.e.const("shape", np.array(shape, np.int64)), axis=axis)
        out.type, out.shape = value.type, ir.Shape(shape)
        slot[0].replace_input_with(slot[1], out)

    def _slice_projection(self, proj: Projection, sel: ir.Value, groups: int, width: int, n: int, packs: int) -> None:
        """Keep the columns (rows if transposed) of the kept groups; ``packs`` = 3 for packed QKV."""
        d = int(proj.weight.shape[1 if proj.transposed_weight else 0])
        lead = [packs] if packs > 1 else []
        axis = len(lead) + (0 if proj.transposed_weight else 1)
        if proj.transposed_weight:
            self._slice(_weight_slot(proj), proj.weight, sel, [*lead, groups, width, d], axis, [packs * n * width, d])
        else:
            self._slice(_weight_slot(proj), proj.weight, sel, [d, *lead, groups, width], axis, [d, packs * n * width])
        slot = _bias_slot(proj)
        if slot is not None:
            self._slice(slot, proj.bias, sel, [*lead, groups, width], len(lead), [packs * n * width])

    def _slice_layer(self, site: AttentionSite, sel: ir.Value, n: int) -> None:
        G, H, dh = site.num_kv_heads, site.num_heads, site.head_dim
        g = H // G
        if site.q.packed is not None:
            self._slice_projection(site.q.projection, sel, G, dh, n, 3)
        else:
            self._slice_projection(site.q.projection, sel, G, g * dh, n, 1)
            self._slice_projection(site.k.projection, sel, G, dh, n, 1)
            self._slice_projection(site.v.projection, sel, G, dh, n, 1)
        out = site.out_proj
        d = int(out.weight.shape[0 if out.transposed_weight else 1])
        if out.transposed_weight:
            self._slice(_weight_slot(out), out.weight, sel, [d, G, g * dh], 1, [d, n * g * dh])
        else:
            self._slice(_weight_slot(out), out.weight, sel, [G, g * dh, d], 0, [n * g * dh, d])
        widths = {H * dh: n * g * dh, G * dh: n * dh, 3 * H * dh: 3 * n * dh}
        counts = {H: n * g, G: n}
        seen: set[int] = set()
        for node in [*site.q.views, *site.k.views, *site.v.views, *site.merge]:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None:
                self._retarget(node, lambda pos, size, v: widths.get(v, v))
            elif node.op_type == "Reshape":
                self._copy_seq_dim(node)
                self._retarget(node, lambda pos, size, v: widths.get(v, v) if pos == size - 1 and size <= 3
                               else counts.get(v, v) if size == 4 and pos in (1, 2) else v)
            elif node.op_type == "Expand":  # GQA repeat [1, G, g, S, Dh]
                self._retarget(node, lambda pos, size, v: counts.get(v, v) if pos == 1 and v == G else v)

    def _copy_seq_dim(self, node: ir.Node) -> None:
        """Dynamo builds reshape targets from the graph input's length; in a head-pruned layer the
        score chain links this layer to earlier ones, and prune-tokens (which rebinds such pieces to
        the current token count layer by layer) would bind them to an earlier layer's count. Where
        the reshape keeps dim 1 (``[B, S, H*Dh] <-> [B, S, H, Dh]``) the piece becomes 0 = copy."""
        pieces = _pieces(node.inputs[1])
        src, dst = node.inputs[0].shape, node.outputs[0].shape
        if (len(pieces) < 2 or pieces[0][1] is not None and len(pieces[0][1]) != 1 or src is None or dst is None
                or src.rank() < 2 or dst.rank() < 2 or src.dims[1] != dst.dims[1]
                or not _reads_input_seq_len(pieces[1][0], self.model.graph)
                or any(a is not None and (a == 0).any() for _, a in pieces)):
            return
        new = [p for p, _ in pieces]
        new[1] = self.e.const("copy_dim", np.array([0], np.int64))
        node.replace_input_with(1, self.e.op("Concat", new, axis=0))
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)

    def _retarget(self, node: ir.Node, rule) -> None:
        """Rewrite the constant entries of a shape/sizes input (constant or Concat of pieces)."""
        pieces = _pieces(node.inputs[1])
        lengths = [len(a) if a is not None else (p.shape.dims[0] if p.shape is not None and p.shape.rank() == 1
                                                 and isinstance(p.shape.dims[0], int) else 1) for p, a in pieces]
        size, pos, changed, new = sum(lengths), 0, False, []
        for (p, a), length in zip(pieces, lengths):
            if a is None:
                new.append(p)
            else:
                b = np.array([rule(pos + j, size, int(v)) for j, v in enumerate(a)], dtype=a.dtype)
                changed |= bool((b != a).any())
                new.append(p if (b == a).all() else self.e.const("target", b))
            pos += length
        if changed:
            single = len(new) == 1 and const_array(node.inputs[1]) is not None
            node.replace_input_with(1, new[0] if single else self.e.op("Concat", new, axis=0))

    def _reinfer_shapes(self) -> None:
        """Value shapes inside pruned layers are stale (they say H heads): forget, then re-infer."""
        graph = self.model.graph
        keep = {id(v) for v in (*graph.inputs, *graph.outputs)}
        for node in graph:
            if node.domain == DOMAIN and node.op_type == "HeadSlice":
                continue  # static shapes set at creation; inference does not see through the function
            for v in node.outputs:
                if id(v) not in keep and v.const_value is None:
                    v.shape = None
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(self.model)
