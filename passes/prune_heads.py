"""prune-heads: SpAtten cascade head pruning; pruned heads' projections are really not computed.

Two rules pick the heads (``rule``):

**paper** (SpAtten, at run time) - with ``acc`` (one score per head group) and ``sel`` (kept groups,
ascending) carried from layer to layer::

    sel_l          = spatten.HeadSelect(acc, sel_{l-1}, n_l)         # top n_l of the still-kept groups
    W_q/k/v, b     = spatten.HeadSlice(W, sel_l)                     # kept heads' columns only
    W_o            = spatten.HeadSlice(W_o, sel_l)                   # kept heads' rows only
    reshape / split / expand targets: H -> kept heads, H*Dh -> kept width
    acc            = acc + scatter(sel_l, spatten.HeadImportance(E_l, P_l))   # E_l = MatMul(P, V)

**calibrated** (at compile time) - the kept groups of every layer are chosen once, from scores on
calibration inputs (:mod:`.head_calibration`) or given explicitly (``heads``), and the weights are
sliced here: the output has smaller initializers and no extra op (encoders), so onnxruntime keeps
its constant-weight prepacking and fusions. The paper rule gathers weights on every run; that
costs onnxruntime the prepacked B matrices (docs/experiments.md, head pruning section).

``n_l = ceil(G * ratio_l)`` (at least ``min_keep``); SpAtten's schedule leaves the first 30% of
layers unpruned, layer 0 always (no scores exist before it). A pruned group never comes back under
the paper rule (``HeadSelect`` ranks only the groups still kept). An explicit schedule is a cascade
(layer 0 keeps 1.0, never increasing) except under the calibrated rule with ``layer`` or
``ablation`` importance: each layer's heads are chosen alone, so its ratio is taken as given and
layer 0 may be pruned (``0.5,1``: layer 0 keeps half, the rest all; missing entries repeat the
last). ``ablation`` ranks a layer's heads by the output change when the head alone is removed
(:func:`.head_calibration.ablation_scores`) instead of by |attention output|. The Q/K/V MatMuls
of a pruned layer have width ``n_l * Dh`` and the output projection reads ``n_l * Dh`` rows.

``reconstruct`` (calibrated rule, with calibration data): the output projection of a pruned layer
gets refitted rows instead of the plain slice, ``W_K + A W_P`` with ``A`` the ridge regression of
the pruned heads' contexts on the kept heads' (:func:`.head_calibration.reconstruct_output`), so
the kept heads stand in for the pruned ones as far as a linear map can; same shapes, no run-time
cost. On MiniLM it brings the embedding closer to the dense one, not the task accuracy
(docs/experiments.md, head reconstruction).

Design choices (the paper runs batch 1, MHA only):
- Batch: one head set per batch (scores summed over the batch), so weight slices are shared.
- Valid tokens: the score sums ``|E|`` over query rows whose token is a valid key of the last query
  row in some head (padding and tokens masked by prune-tokens have probability 0 as keys; causal
  attention's last row sees every earlier key); once prune-tokens has gathered the kept query rows
  (fewer rows than keys), every kept row votes. Reading one row, not ``P`` summed over all rows,
  matters: onnxruntime's ReduceSum over ``P``'s middle axes cost more than the pruning saved.
- GQA: the unit of pruning is a KV group (one KV head and the ``H / Hkv`` query heads sharing it);
  its score is the sum of its query heads' scores. Pruning a query head alone would still need its
  KV head, and would make the GQA repeat uneven. For MHA a group is one head.
- Packed QKV (GPT-2 ``Gemm -> Split``): the packed weight is viewed as ``[D, 3, H, Dh]`` and sliced
  on the head axis; the Split sizes shrink. Every other layout (per-head packing ``[B, S, H, 3*Dh]``,
  ``[B, S, H+2G, Dh]``, ``[B, S, 3, H, Dh]``, packed GQA, heads folded into the batch, a norm over all
  heads, Q/K read by a position term) goes through :mod:`.head_narrow`: the projection is narrowed
  by its row map (:mod:`.head_rows`) or kept whole with the kept heads gathered at the core; the
  calibrated rule only (the paper rule refuses these layouts in one line), except heads folded into the
  batch: the paper rule's head scores read the probabilities and P @ V viewed ``[B, H, ., .]``.
- Decoders with a KV cache: the cache must stay complete for later steps, so K and V of every head
  are still projected, concatenated with the past and written to ``present``; the attention core
  reads only the kept heads of it (``spatten.KeptHeads``, a Gather on the head axis after the GQA
  repeat). Q's columns, the scores, P x V and the output-projection rows of pruned heads are not
  computed. In a generation step the new tokens' rows are all real, so every query row votes
  (``HeadImportanceAll``); scores are not carried from step to step (each step picks its heads).
- int4 blocks (com.microsoft ``MatMulNBits``: the model builder's ``-p int4``, ``--weights int4``):
  the kept columns' rows of the blocks (Q/K/V) and the kept heads' whole K blocks (output
  projection) are sliced, exactly, never requantized (:mod:`.nbits_blocks`; the paper rule gathers
  them with ``HeadSlice``). A block shared by a kept and a removed head group is refused in one line
  (the paper rule: any group that is not whole blocks, since any heads may be kept).
- Fused attention ops are refused: decompose them first (the compile command does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import NoAttentionError, OptionError
from spatten_compiler.match import const_array
from spatten_compiler.pipeline import Pass, PassResult, register_pass
from spatten_compiler.schedule import check_schedule, full_schedule, spatten_schedule

from . import nbits_blocks as nbits
from .attention_trace import Projection, column_constants, quantized_projection
from .find_attention import AttentionSite, find_attention
from .head_functions import FUNCTIONS
from .head_narrow import core_reader, gather_heads, narrow_layer, needs_rows, score_views
from .prune_tokens import _reads_input_seq_len
from .qdq import dequantized_weight, slice_dequantized, unsliceable_weight
from .score_chain import static_rank
from .site_io import coupled_site
from .spatten_ops import DOMAIN, ensure_functions
from .token_axis import view_axes

logger = logging.getLogger(__name__)



def kept_groups(groups: int, ratio: float, min_keep: int = 1) -> int:
    """How many head groups a layer with keep ``ratio`` runs: ceil(G * ratio) in [min_keep, G]."""
    return max(min(min_keep, groups), min(groups, math.ceil(round(groups * ratio, 6))))


def _folded(site: AttentionSite) -> bool:
    """Heads folded into the batch: 3-D scores (tagged by discovery) or a 3-D Q at the core."""
    shape = site.q.value.shape if site.q is not None else None
    return site.variant.get("layout") == "folded" or (shape is not None and shape.rank() == 3)


def _folded_term(site: AttentionSite, term: ir.Value) -> bool:
    """A score term on heads folded into the batch, ``[B*H | 1, ., .]`` (BLOOM's ALiBi)."""
    shape = _term_shape(term)
    return _folded(site) and shape is not None and shape.rank() == 3


def _on_4d_scores(add: ir.Node) -> bool:
    """The node applying a term yields a 4-D ``[B, H, S, S]`` view of the scores, although the core may fold
    heads into the batch (TF T5: its 3-D bmm's scores viewed as ``[B, H, S, S]`` for the position bias and the
    Softmax): the term is aligned there like an unfolded site's, its head axis rank - 3."""
    shape = add.outputs[0].shape
    return shape is not None and shape.rank() == 4


def _term_shape(term: ir.Value) -> ir.Shape | None:
    """A score term's shape; without an inferred one, its rank from its data flow (Optimum's DeBERTa p2c
    term comes out of an ``If``) with unknown dims: the head axis is then rank - 3, gathered as dynamic."""
    rank = static_rank(term) if term.shape is None else None
    return term.shape if rank is None else ir.Shape([None] * rank)


def _folds(node: ir.Node) -> tuple[int, int] | None:
    """(input rank, output rank) of a Reshape."""
    src, dst = node.inputs[0].shape, node.outputs[0].shape
    return None if src is None or dst is None else (src.rank(), dst.rank())


def _unfold_units(node: ir.Node) -> int | None:
    """The unit axes a ``[B*H, S, T] -> [B, H, S, T, 1..]`` unfold appends (tf2onnx's Einsum lowering keeps a
    unit axis, squeezed after: T5), 0 for ``[B, H, S, T]``; None for any other view."""
    folds = _folds(node)
    if folds is None or folds[0] != 3 or folds[1] < 4:
        return None
    extra = node.outputs[0].shape.dims[4:]
    return len(extra) if all(d == 1 for d in extra) else None


def _importance_views(site: AttentionSite) -> bool:
    """What the paper rule's head scores read, the probabilities and ``P @ V``, can be viewed ``[B, H, ., .]``:
    each is 4-D (TF T5: the folded bmm's scores viewed 4-D for the position bias, Softmax and ``P @ V``) or
    3-D with heads folded into the batch ``[B*H, ., .]`` (tf2onnx's BART family: both bmm's 3-D; BLOOM: the
    Softmax on a 4-D view, ``P @ V`` 3-D), unfolded by :meth:`_Rewrite._unfold` with the layer's head count."""
    values = (site.probs, site.pv.outputs[0] if site.pv is not None else None)
    return all(v is not None and static_rank(v) in (3, 4) for v in values)


def _check_sites(sites: list[AttentionSite]) -> None:
    for s in sites:
        if s.fused is not None:
            raise OptionError(f"layer {s.layer}: fused {s.fused.op_type} op; prune-heads needs decomposed attention")
        if any(b is None or b.projection is None for b in (s.q, s.k, s.v)) or s.out_proj is None or s.pv is None:
            raise OptionError(f"layer {s.layer}: cannot locate the Q/K/V and output projections")
        if s.beside is not None:
            raise OptionError(f"layer {s.layer}: Concat '{s.beside.name}' joins the attention's heads with another "
                              "branch's (ConvBERT's convolution heads) before the output projection; prune-heads "
                              "slices the projection's rows as the attention's heads only")
        if s.out_norm:
            raise OptionError(f"layer {s.layer}: a norm over all heads ('{s.out_norm[0].name}') sits between the head "
                              "merge and the output projection (Sub-LN, BitNet); removing heads would change its "
                              "statistics for the kept ones")
        for p in (s.q.projection, s.k.projection, s.v.projection, s.out_proj):
            why = _unsliceable(p)
            if why is not None:
                raise OptionError(f"layer {s.layer}: projection {p.node.op_type} '{p.node.name}' has quantized weights "
                                  f"prune-heads cannot slice ({why}): compile the float model and add --weights "
                                  "int8|int4")
        for term, add in [*zip(s.bias_terms, s.bias_adds), *((t, s.sink_concat) for t in s.sinks)]:
            shape = _term_shape(term)
            if shape is None or shape.rank() not in (1, 2, 3, 4) or (
                    _folded(s) and shape.rank() == 4 and not _on_4d_scores(add)):
                raise OptionError(f"layer {s.layer}: score term {term.name} has no static head axis "
                                  f"(shape {shape}); prune-heads cannot slice it")
        if s.num_heads % s.num_kv_heads:
            raise OptionError(f"layer {s.layer}: {s.num_heads} query heads do not divide into "
                              f"{s.num_kv_heads} KV heads")
        if s.kv_cache:
            for b in (s.k, s.v):  # the kept heads are gathered from the cached K/V the core reads
                if _folded(s) and b.value.shape is not None and b.value.shape.rank() == 3:
                    continue
                if b.value.shape is None or b.value.shape.rank() != 4 or b.value.shape.dims[1] not in (
                        s.num_heads, s.num_kv_heads) or (s.num_heads != s.num_kv_heads and not b.repeated):
                    raise OptionError(f"layer {s.layer}: KV cache whose K/V are not [B, heads, ., .] at the "
                                      "attention core; prune-heads cannot pick heads there")


def _from(value: ir.Value | None, node: ir.Node) -> bool:
    for _ in range(4):
        producer = value.producer() if value is not None else None
        if producer is node:
            return True
        quantized = quantized_projection(value)
        if quantized is not None:  # int8: the bias adds to Mul(Cast(MatMulInteger), scales)
            return quantized.node is node
        if producer is None or producer.op_type != "Reshape":
            return False
        value = producer.inputs[0]
    return False


def _unsliceable(proj: Projection) -> str | None:
    """Why prune-heads cannot slice this projection's weights (quantized in a way it does not handle)."""
    op, producer = proj.node.op_type, proj.weight.producer()
    if op == "MatMulInteger":  # per-column zero points / scales are sliced with the columns
        return "a per-column scale or zero point computed in the graph" if column_constants(proj.node) is None else None
    if nbits.is_nbits(proj.node):  # whole blocks are sliced (nbits_blocks); the output projection's at slicing time
        return nbits.unsliceable(proj.node)
    if producer is not None and producer.op_type == "DequantizeLinear":  # QDQ: per tensor or per axis
        return unsliceable_weight(proj.weight)
    return None if op in ("MatMul", "Gemm") else f"a {op} weight format"


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


def _split_head_axis(node: ir.Node) -> tuple[int, ...]:
    """Target positions of a 4-D head view that may hold the head count: 1 or 2 ([B, H, S, Dh] or
    [B, S, H, Dh]). A reshape ``[X, S, H*Dh] -> [X, S, H, Dh]`` (by its inferred shapes) splits the last
    axis, so only position 2 is heads; position 1 copies the length, which a window of S = H tokens
    (Swin) would otherwise get rewritten as a head count."""
    src, dst = node.inputs[0].shape, node.outputs[0].shape
    if src is None or dst is None or src.rank() != 3 or dst.rank() != 4:
        return (1, 2)
    s, w, h, d = src.dims[1], src.dims[2], dst.dims[2], dst.dims[3]
    if isinstance(s, int) and s == dst.dims[1] and all(isinstance(x, int) for x in (w, h, d)) and w == h * d:
        return (2,)
    return (1, 2)


def _refuse_coupled(sites: list[AttentionSite], counts: list[int], groups: int) -> None:
    """A site that loses heads while its scores and another site's are terms of each other's (LiLT)."""
    for s, n in zip(sites, counts):
        other = coupled_site(s, sites) if n < groups else None
        if other is not None:
            raise OptionError(f"layer {s.layer}: its scores and layer {other.layer}'s are terms of each other's (two "
                              "streams attending together, e.g. LiLT's text and layout); their heads would have to "
                              "be pruned as one set")


def _merged_width_axis(site: AttentionSite) -> int:
    """Where the heads-merge Reshape's target holds heads x head size, counted from its end: the head
    axis of ``P @ V`` ([B, H, S, Dh]: 1) carried through the merge's Transposes is merged with the head
    size after it, and the axes after those are kept. 0 (the last axis) for ``[B, S, H*Dh]`` or
    ``[B*S, H*Dh]``; 1 for a channels-first ``[B, H*Dh, S]`` (SqueezeBERT's pointwise convolutions)."""
    axis, shape = 1, site.pv.outputs[0].shape if site.pv is not None else None
    rank = shape.rank() if shape is not None else 4
    if rank != 4 or site.variant.get("layout") == "folded":  # [B*H, S, Dh]: no head axis to follow (WavLM)
        return 0
    for node in site.merge:
        if node.op_type == "Transpose":
            perm = list(node.attributes.get_ints("perm", []))
            if axis not in perm:
                return 0
            axis = perm.index(axis)
        elif node.op_type == "Reshape":
            kept = _kept_axes(node)
            if axis not in kept:
                return max(rank - axis - 2, 0)
            axis = kept[axis]  # a view that keeps the head axis whole (SDPA's folded [-1, H, S, Dh]): follow it
    return 0


def _kept_axes(node: ir.Node) -> dict[int, int]:
    """For a Reshape to a constant target of the same rank: data axis -> the target entry that indexes it
    exactly (:func:`.token_axis.view_axes`); {} otherwise."""
    target = const_array(node.inputs[1], max_elements=16)
    src = node.inputs[0].shape
    if target is None or src is None or target.size != src.rank():
        return {}
    return {a: j for j, a in view_axes(target, list(src.dims)).items()}


def _cache_write(node: ir.Node, outputs: set[int], limit: int = 6) -> bool:
    """``node`` only carries the cache to ``present`` (a sliding window's ``Slice`` of the last W
    positions, ModernBERT-decoder): it must keep every head, so it is not redirected to the kept ones."""
    for _ in range(limit):
        if len(node.outputs) != 1 or node.op_type in ("MatMul", "Einsum"):
            return False
        out = node.outputs[0]
        if id(out) in outputs:
            return not out.uses()
        uses = list(out.uses())
        if len(uses) != 1:
            return False
        node = uses[0].node
    return False


def _unwhere(value: ir.Value) -> ir.Value:
    """torch's ``expand`` target ``Where(Equal(t, -1), ones, t)`` -> ``t`` when no constant entry of ``t``
    is -1 (the Where then selects ``t`` everywhere: its shape pieces are never negative), or when the
    condition is a constant that is false everywhere (onnxslim / onnxsim fold it)."""
    p = value.producer()
    if p is None or p.op_type != "Where" or len(p.inputs) != 3:
        return value
    target, folded = p.inputs[2], const_array(p.inputs[0])
    if folded is not None:
        return value if folded.any() else target
    cond = p.inputs[0].producer()
    if cond is None or cond.op_type != "Equal" or target not in cond.inputs:
        return value
    other = next((i for i in cond.inputs if i is not target), None)
    minus_one = const_array(other) if other is not None else None
    if minus_one is None or not (minus_one == -1).all():
        return value
    pieces = _pieces(target)
    return value if any(a is not None and (a == -1).any() for _, a in pieces) else target


def _pieces(value: ir.Value) -> list[tuple[ir.Value, np.ndarray | None]]:
    a = const_array(value)
    if a is not None:
        return [(value, a.reshape(-1))]
    value = _unwhere(value)
    if (a := const_array(value)) is not None:
        return [(value, a.reshape(-1))]
    p = value.producer()
    if p is not None and p.op_type == "Concat":
        return [(x, None if const_array(x) is None else const_array(x).reshape(-1)) for x in p.inputs]
    return [(value, None)]


@register_pass
@dataclasses.dataclass(frozen=True)
class PruneHeads(Pass):
    """Cascade head pruning with SpAtten's schedule (or an explicit one).

    ``rule``: ``paper`` picks the heads at run time from this input's scores (SpAtten);
    ``calibrated`` picks them once at compile time from ``calibration`` (an ``.npz`` of input
    feeds, see :mod:`.head_calibration`) or takes the explicit ``heads`` (kept groups per layer),
    and slices the weights in the file: nothing is computed for pruned heads and nothing is added."""

    name = "prune-heads"
    keep: float = 1.0
    schedule: tuple[float, ...] = ()
    unpruned: float = 0.3
    min_keep: int = 1
    rule: str = "paper"
    calibration: str = ""
    importance: str = "layer"  # calibrated: each layer's own scores (layer), SpAtten's accumulation (cascade),
    # or each layer's own ablation costs (ablation: output change when the head alone is removed)
    heads: tuple[tuple[int, ...], ...] = ()
    reconstruct: bool = False  # calibrated: refit the output projection to make up for the pruned heads
    ridge: float = 0.3

    def ratios(self, layers: int) -> list[float]:
        if self.schedule and self.rule == "calibrated" and self.importance in ("layer", "ablation"):
            return full_schedule(list(self.schedule), layers)  # heads chosen per layer: no cascade needed
        if self.schedule:
            return check_schedule(list(self.schedule), layers)
        return spatten_schedule(layers, self.keep, self.unpruned)

    def call(self, model: ir.Model) -> PassResult:
        if self.min_keep < 1:
            raise OptionError(f"min_keep must be >= 1, got {self.min_keep}")
        if self.rule not in ("paper", "calibrated"):
            raise OptionError(f"head rule must be paper or calibrated, got {self.rule!r}")
        if self.importance not in ("layer", "cascade", "ablation"):
            raise OptionError(f"head importance must be layer, cascade or ablation, got {self.importance!r}")
        if self.rule == "calibrated" and not self.heads and not self.calibration:
            raise OptionError("the calibrated head rule needs a calibration file (--head-calibration) or explicit heads")
        if self.reconstruct and (self.rule != "calibrated" or not self.calibration):
            raise OptionError("head reconstruction needs the calibrated rule and a calibration file "
                              "(--head-calibration)")
        if self.ridge < 0:
            raise OptionError(f"ridge must be >= 0, got {self.ridge}")
        sites = find_attention(model).sites
        if not sites:
            raise NoAttentionError("no attention found: nothing to prune")
        if any(s.kv_cache and s.k.value.shape is None for s in sites if s.k is not None):
            # e.g. just decomposed from a fused op: the K/V head layout is checked on inferred shapes
            ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
            sites = find_attention(model).sites
        _check_sites(sites)
        if len({s.num_kv_heads for s in sites}) > 1:
            raise OptionError("attention layers have different head counts; prune-heads needs one head set")
        groups = sites[0].num_kv_heads
        if self.heads:
            kept = _check_heads(self.heads, len(sites), groups)
        else:
            counts = [kept_groups(groups, r, self.min_keep) for r in self.ratios(len(sites))]
            if all(n == groups for n in counts):
                return PassResult(model, False)
            if self.rule == "paper":
                folded = next((s for s in sites if _folded(s) and not _importance_views(s)), None)
                if folded is not None:
                    raise OptionError(f"layer {folded.layer}: heads folded into the batch axis: the paper rule's "
                                      "run-time head scores need [B, H, S, S] or [B*H, S, S] probabilities "
                                      "(their rank is unknown here); use --head-rule calibrated")
                if counts[0] < groups:
                    raise OptionError("the first attention layer cannot be head-pruned: "
                                      "head scores come from earlier layers")
                _refuse_runtime_blocks(sites)
                _refuse_coupled(sites, counts, groups)
                _Rewrite(model, sites, counts).run()
                logger.info("prune-heads (paper rule, run time): kept head groups per layer %s", counts)
                return PassResult(model, True)
            from .head_calibration import ablation_scores, calibration_scores, choose_heads

            if self.importance == "ablation":  # only the layers that lose heads are worth ablating
                pruned = [i for i, n in enumerate(counts) if n < groups]
                scores = ablation_scores(model, sites, self.calibration, pruned)
            else:
                scores = calibration_scores(model, sites, self.calibration)
            kept = choose_heads(scores, counts, self.importance)
        if all(len(k) == groups for k in kept):
            return PassResult(model, False)
        _check_blocks(sites, kept, self.reconstruct)
        _refuse_coupled(sites, [len(k) for k in kept], groups)
        outputs = self._reconstructed(model, sites, kept) if self.reconstruct else {}
        _Rewrite(model, sites, [len(k) for k in kept]).run([np.array(k, np.int64) for k in kept], outputs)
        model.metadata_props["spatten.heads_kept"] = json.dumps([list(map(int, k)) for k in kept])
        logger.info("prune-heads (calibrated, compile time): kept head groups per layer %s", [len(k) for k in kept])
        logger.debug("prune-heads: kept head groups %s", kept)
        return PassResult(model, True)

    def _reconstructed(self, model: ir.Model, sites: list[AttentionSite],
                       kept: list[list[int]]) -> dict[int, np.ndarray]:
        """Per pruned layer: the refitted output-projection rows of its kept heads, ``[n * Dh, D]``."""
        from .head_calibration import context_stats, reconstruct_output

        groups = sites[0].num_kv_heads
        layers = [i for i, k in enumerate(kept) if len(k) < groups]
        stats = context_stats(model, sites, self.calibration, layers)
        out = {}
        for i in layers:
            site = sites[i]
            g, dh = site.num_heads // groups, site.v_head_dim
            cols = (_query_heads(np.array(kept[i]), g)[:, None] * dh + np.arange(dh)).reshape(-1)
            w = const_array(site.out_proj.weight)
            w = w.T if site.out_proj.transposed_weight else w
            out[i] = reconstruct_output(w, stats[i], cols, self.ridge)
        logger.info("prune-heads: output projections of layers %s refitted for their pruned heads", layers)
        return out


def _refuse_runtime_blocks(sites: list[AttentionSite]) -> None:
    """The paper rule gathers the kept heads' weights at run time: an int4 output projection's K blocks
    must then be whole head groups, whatever heads are kept (every group ``g * Dh`` rows, whole blocks,
    and whole bytes of packed zero points)."""
    for s in sites:
        node = s.out_proj.node
        if not nbits.is_nbits(node):
            continue
        nb, g = nbits.layout(node), s.num_heads // s.num_kv_heads
        rows = g * s.v_head_dim
        zp = nb.array("zero_points")
        why = (f"head groups of {rows} rows are not whole blocks of {nb.block_size}" if rows % nb.block_size
               or nb.K != s.num_kv_heads * rows else
               "a head group's packed zero points are not whole bytes" if zp is not None and zp.dtype == np.uint8
               and (rows // nb.block_size * nb.bits) % 8 else
               nbits.row_blocks(nb, np.arange(nb.K)) if nb.input("g_idx") is not None else None)
        if isinstance(why, str):
            raise OptionError(f"layer {s.layer}: output projection MatMulNBits '{node.name}': {why}; the paper rule "
                              "gathers whole blocks at run time: use --head-rule calibrated")


def _out_rows(site: AttentionSite, sel: np.ndarray) -> np.ndarray:
    """The output-projection input rows of the kept groups ``sel`` (their query heads' contexts)."""
    g, dh = site.num_heads // site.num_kv_heads, site.v_head_dim
    return (_query_heads(np.asarray(sel), g)[:, None] * dh + np.arange(dh)).reshape(-1)


def _check_blocks(sites: list[AttentionSite], kept: list[list[int]], reconstruct: bool) -> None:
    """Before any edit: each pruned layer's int4 output projection keeps whole blocks of rows."""
    for site, k in zip(sites, kept):
        if len(k) == site.num_kv_heads or not nbits.is_nbits(site.out_proj.node):
            continue
        if reconstruct:
            raise OptionError(f"layer {site.layer}: head reconstruction refits float rows; the output projection "
                              f"'{site.out_proj.node.name}' has int4 blocks (MatMulNBits) it would requantize")
        why = nbits.row_blocks(nbits.layout(site.out_proj.node), _out_rows(site, k))
        if isinstance(why, str):
            g = site.num_heads // site.num_kv_heads
            raise OptionError(f"layer {site.layer}: {why}: head groups of {g * site.v_head_dim} rows; prune-heads "
                              "slices int4 blocks whole and never requantizes")


def _query_heads(groups: np.ndarray, g: int) -> np.ndarray:
    """The query heads of the KV groups ``groups`` (``g`` query heads per group), ascending."""
    return (groups[:, None] * g + np.arange(g)).reshape(-1)


def _check_heads(heads: tuple[tuple[int, ...], ...], layers: int, groups: int) -> list[list[int]]:
    if len(heads) != layers:
        raise OptionError(f"explicit heads list {len(heads)} layers, the model has {layers}")
    kept = []
    for i, h in enumerate(heads):
        k = sorted(set(int(x) for x in h)) if h else list(range(groups))
        if len(k) != len(h) and h or any(not 0 <= x < groups for x in k):
            raise OptionError(f"layer {i}: kept heads {list(h)} must be distinct groups in 0..{groups - 1}")
        kept.append(k)
    return kept


class _Rewrite:
    """Narrows each pruned layer. ``sel`` is a runtime value (paper rule) or a constant array
    (calibrated rule: every slice is computed here and written as a smaller initializer)."""

    def __init__(self, model: ir.Model, sites: list[AttentionSite], counts: list[int]):
        self.e = GraphEditor(model, "spatten_heads")
        self.model, self.sites, self.counts = model, sites, counts

    def call(self, name: str, *inputs: ir.Value, **attrs: object) -> ir.Value:
        return self.e.op(name, list(inputs), domain=DOMAIN, hint=name, **attrs)

    def run(self, static: list[np.ndarray] | None = None,
            outputs: dict[int, np.ndarray] | None = None) -> None:
        """``outputs`` (static only): per layer, output-projection rows ``[n * Dh, D]`` that replace
        the plain slice (head reconstruction)."""
        e = self.e
        groups = self.sites[0].num_kv_heads
        if static is not None:  # only KV-cache layers need an op at run time: the kept heads of the cache
            ensure_functions(self.model, ["KeptHeads"] if any(s.kv_cache for s in self.sites) else [])
            for i, (site, sel, n) in enumerate(zip(self.sites, static, self.counts)):
                if n < groups:
                    self._slice_layer(site, sel, n, (outputs or {}).get(i))
            e.commit()
            RemoveUnusedNodesPass()(self.model)  # the full weights, now unused, leave the file
            self._reinfer_shapes()
            return
        ensure_functions(self.model, FUNCTIONS)
        last = max(i for i, (n, s) in enumerate(zip(self.counts, self.sites)) if n < s.num_kv_heads)
        acc = e.const("acc", np.zeros(groups, np.float32))
        sel = e.const("all_heads", np.arange(groups, dtype=np.int64))
        for i, (site, n) in enumerate(zip(self.sites[: last + 1], self.counts)):
            if n < groups:
                sel = self.call("HeadSelect", acc, sel, e.const("k", np.array([n], np.int64)))
                self._slice_layer(site, sel, n)
            if i < last:
                # In a KV-cache step the query rows are the new tokens: all of them vote.
                # Every row votes with a cache (the new rows) or keys from other tokens (the probabilities'
                # last row says nothing about which query rows are real)
                g = site.num_heads // groups
                heads = n * g  # the layer's heads after its slice: [B*heads, S, .] when folded
                ctx, probs = (self._unfold(v, heads) for v in (site.pv.outputs[0], site.probs))
                score = (self.call("HeadImportanceAll", ctx) if site.kv_cache or site.own_keys is False
                         else self.call("HeadImportance", ctx, probs))
                if g > 1:
                    score = e.op("ReduceSum", [e.op("Reshape", [score, e.const("shape", np.array([-1, g], np.int64))]),
                                               e.const("axes", np.array([1], np.int64))], keepdims=0)
                acc = e.op("ScatterElements", [acc, sel, e.op("Add", [e.op("Gather", [acc, sel]), score])])
        e.commit()
        self._reinfer_shapes()

    def _unfold(self, x: ir.Value, heads: int) -> ir.Value:
        """``[B*H, S, T] -> [B, H, S, T]`` (heads folded into the batch); a 4-D value as it is."""
        if static_rank(x) != 3:
            return x
        e = self.e
        lead = e.const("unfold", np.array([-1, heads], np.int64))
        return e.op("Reshape", [x, e.op("Concat", [lead, e.op("Shape", [x], start=1)], axis=0)])

    def _slice(self, slot: tuple[ir.Node, int], value: ir.Value, sel: ir.Value | np.ndarray, units: list[int],
               axis: int, shape: list[int], rest: np.ndarray | None = None, cat_axis: int = 0) -> None:
        """``value`` viewed as ``units`` blocks, the ``sel`` ones along ``axis``, reshaped to ``shape``;
        ``rest`` (KV-cache packed QKV: the K/V columns) is appended unchanged along the last axis."""
        if isinstance(sel, np.ndarray) and dequantized_weight(value) is not None and rest is None:
            out = slice_dequantized(self.e, value, lambda a: np.take(a.reshape(units), sel, axis=axis).reshape(shape))
        elif isinstance(sel, np.ndarray):
            arr = np.take(const_array(value).reshape(units), sel, axis=axis).reshape(shape)
            if rest is not None:
                arr = np.concatenate([arr, rest], axis=cat_axis)
            out = self.e.const("head_slice", arr.astype(const_array(value).dtype))
        else:
            args = [value, sel, self.e.const("units", np.array(units, np.int64)),
                    self.e.const("shape", np.array(shape, np.int64))]
            if rest is None:
                out = self.call("HeadSlice", *args, axis=axis)
                out.shape = ir.Shape(shape)
            else:
                out = self.call("HeadSliceConcat", *args, self.e.const("kv_columns", rest), axis=axis, cat_axis=cat_axis)
            out.type = value.type
        slot[0].replace_input_with(slot[1], out)

    def _slice_projection(self, proj: Projection, sel, groups: int, width: int, n: int, packs: int,
                          q_only: bool = False) -> None:
        """Keep the columns (rows if transposed) of the kept groups; ``packs`` = 3 for packed QKV.
        ``q_only`` (packed QKV with a KV cache): only the Q part is narrowed, K/V stay whole."""
        lead = [packs] if packs > 1 and not q_only else []
        if nbits.is_nbits(proj.node):
            self._nbits_columns(proj, sel, groups, width, n, lead, q_only)
            return
        t = proj.transposed_weight
        d = int(proj.weight.shape[1 if t else 0])
        axis = len(lead) + (0 if t else 1)
        w, rest, b_rest = proj.weight, None, None
        wslot, slot = _weight_slot(proj), _bias_slot(proj)
        if q_only:  # split the constant packed weight: [Q | K V]; Q is sliced, K V appended whole
            (full, wslot), qw = self._packed(proj.weight, wslot), groups * width
            w = self.e.const("q_weight", full[:qw] if t else full[:, :qw])
            rest = full[qw:] if t else full[:, qw:]
            if proj.bias is not None and slot is not None:
                fb, slot = self._packed(proj.bias, slot)
                b_rest, bias = fb[qw:], self.e.const("q_bias", fb[:qw])
        cols = (1 if q_only else packs) * n * width
        if t:
            self._slice(wslot, w, sel, [*lead, groups, width, d], axis, [cols, d], rest)
        else:
            self._slice(wslot, w, sel, [d, *lead, groups, width], axis, [d, cols], rest, cat_axis=1)
        if slot is not None:
            self._slice(slot, bias if q_only else proj.bias, sel, [*lead, groups, width], len(lead), [cols], b_rest)
        for node, i in column_constants(proj.node) or []:
            vec = const_array(node.inputs[i]).reshape(-1)  # int8 per column: the kept columns' scales and zero points
            head, tail = (vec[:groups * width], vec[groups * width:]) if q_only else (vec, None)
            self._slice((node, i), self.e.const("column_q", head) if q_only else node.inputs[i], sel,
                        [*lead, groups, width], len(lead), [cols], tail)

    def _nbits_columns(self, proj: Projection, sel, groups: int, width: int, n: int, lead: list[int],
                       q_only: bool) -> None:
        """int4 blocks: the kept columns' rows of B, scales, zero points and bias, each viewed
        ``[*lead, groups, width, per column]`` (a constant slice, or gathered at run time); N shrinks."""
        node, nb = proj.node, nbits.layout(proj.node)
        qw, cols = groups * width, (1 if q_only else (lead[0] if lead else 1)) * n * width
        for name in ("B", "scales", "zero_points", "bias"):
            a = nb.array(name)
            if a is None:
                continue
            by_col = a.reshape(nb.N, -1)
            per = by_col.shape[1]
            shape = [cols, *a.shape[1:]] if a.ndim > 1 else [cols * per]
            value, rest = node.inputs[nbits.SLOTS[name]], None
            if q_only:  # [Q | K V] by output column: Q sliced, K V appended whole
                value = self.e.const(f"q_{name}", by_col[:qw])
                rest = by_col[qw:].reshape([-1, *a.shape[1:]] if a.ndim > 1 else [-1])
            self._slice((node, nbits.SLOTS[name]), value, sel, [*lead, groups, width, per], len(lead), shape, rest)
        self.e.set_attr(node, "N", cols + (nb.N - qw if q_only else 0))
        slot = _bias_slot(proj)  # an Add after the projection
        if slot is not None:
            bias, b_rest = proj.bias, None
            if q_only:
                fb = const_array(proj.bias)
                bias, b_rest = self.e.const("q_bias", fb[:qw]), fb[qw:]
            self._slice(slot, bias, sel, [*lead, groups, width], len(lead), [cols], b_rest)

    def _nbits_rows(self, site: AttentionSite, sel, n: int) -> None:
        """int4 output projection: the kept groups' whole K blocks (checked before: ``_check_blocks``); at
        run time each group is ``bpg`` whole blocks (``_refuse_runtime_blocks``), gathered; K shrinks."""
        node, nb, groups = site.out_proj.node, nbits.layout(site.out_proj.node), site.num_kv_heads
        if isinstance(sel, np.ndarray):  # any whole blocks (several groups may share one)
            nbits.take_rows(self.e, node, nbits.row_blocks(nb, _out_rows(site, sel)))
            return
        bpg = nb.blocks // groups
        for name in ("B", "scales", "zero_points"):
            a = nb.array(name)
            if a is None:
                continue
            per = a.size // (nb.N * nb.blocks)  # bytes (B), 1 (scales, unpacked zero points)
            units, size = [nb.N, groups, bpg, per], n * bpg
            if name == "zero_points" and a.dtype == np.uint8:  # packed: a group's codes are whole bytes
                units, size, per = [nb.N, groups, bpg * nb.bits // 8], n * bpg * nb.bits // 8, 1
            shape = [nb.N, size, per] if a.ndim == 3 else [nb.N, size] if a.ndim == 2 else [nb.N * size]
            self._slice((node, nbits.SLOTS[name]), node.inputs[nbits.SLOTS[name]], sel, units, 1, shape)
        k = n * bpg * nb.block_size
        if nb.input("g_idx") is not None:  # trivial (checked): rebuilt for the kept rows
            node.replace_input_with(nbits.SLOTS["g_idx"], self.e.const(
                "g_idx", (np.arange(k) // nb.block_size).astype(nb.array("g_idx").dtype)))
        self.e.set_attr(node, "K", k)

    def _packed(self, value: ir.Value, slot: tuple[ir.Node, int]) -> tuple[np.ndarray, tuple[ir.Node, int]]:
        """The constant behind a packed weight or bias and the slot its sliced form goes in. A QDQ one
        (one scale per tensor) is sliced on its int8 constant, read through a DequantizeLinear of its own."""
        dq = dequantized_weight(value)
        if dq is None:
            return const_array(value), slot
        if unsliceable_weight(value) or const_array(dq.inputs[1]).size != 1:
            raise OptionError(f"{dq.name}: packed QKV quantized per axis with a KV cache; prune-heads slices "
                              "per-tensor QDQ weights there")
        new = self.e.op("DequantizeLinear", list(dq.inputs), **{k: a.value for k, a in dq.attributes.items()})
        new.type = value.type
        slot[0].replace_input_with(slot[1], new)
        return const_array(dq.inputs[0]), (new.producer(), 0)

    def _head_index(self, sel, g: int):
        """Kept query heads of the kept groups (g query heads per group)."""
        if g == 1:
            return sel
        if isinstance(sel, np.ndarray):
            return _query_heads(sel, g)
        e = self.e
        base = e.op("Unsqueeze", [e.op("Mul", [sel, e.const("g", np.array(g, np.int64))]),
                                  e.const("axes", np.array([1], np.int64))])
        return e.op("Reshape", [e.op("Add", [base, e.const("offsets", np.arange(g, dtype=np.int64))]),
                                e.const("flat", np.array([-1], np.int64))])

    def _gather_cached(self, site: AttentionSite, sel, g: int) -> None:
        """KV cache: K/V of every head are projected and cached; the core reads only kept heads."""
        for branch in (site.k, site.v):
            heads = int(branch.value.shape.dims[1])
            idx = self._head_index(sel, g if heads == site.num_heads else 1)
            if isinstance(idx, np.ndarray):
                idx = self.e.const("kept_heads", idx)
            picked = self.call("KeptHeads", branch.value, idx)
            outputs = {id(v) for v in self.model.graph.outputs}
            for use in list(branch.value.uses()):
                if use.node is not picked.producer() and not _cache_write(use.node, outputs):
                    use.node.replace_input_with(use.idx, picked)

    def _slice_layer(self, site: AttentionSite, sel, n: int,
                     output: np.ndarray | None = None) -> None:
        G, H, dh = site.num_kv_heads, site.num_heads, site.head_dim
        dv = site.v_head_dim  # the output projection reads H x dv (MLA: v_head_dim may differ from Q/K's)
        g = H // G
        cache = site.kv_cache
        layout = needs_rows(site)
        scores = score_views(site) if layout is not None else []  # before the core's inputs are redirected
        if layout is not None:
            done = narrow_layer(self.e, site, sel, self._head_index(sel, g))
            logger.info("prune-heads layer %d (%s): %s", site.layer, layout, "; ".join(done))
        elif site.q.packed is not None:
            self._slice_projection(site.q.projection, sel, G, dh, n, 3, q_only=cache)
        else:
            self._slice_projection(site.q.projection, sel, G, g * dh, n, 1)
            if not cache:
                self._slice_projection(site.k.projection, sel, G, dh, n, 1)
                self._slice_projection(site.v.projection, sel, G, dh, n, 1)
        if cache and _folded(site):
            for b in (site.k, site.v):
                reader = core_reader(site, "v" if b is site.v else "k")
                gather_heads(self.e, b.value, self._head_index(sel, g), H, reader=reader)
        elif cache:
            self._gather_cached(site, sel, g)
        if site.mask is not None:
            self._unexpand_heads(site.mask, H)
        # per-head score terms: position biases (added) and sink columns (concatenated): the kept heads' rows
        for term, add in [*zip(site.bias_terms, site.bias_adds), *((t, site.sink_concat) for t in site.sinks)]:
            if _folded_term(site, term) and _term_shape(term).dims[0] != 1:
                # (dims unknown, rank from the data flow: DeBERTa-v2's p2c from Optimum, [B*H, S, S]; one of
                # [1, S, S] would stop at the [B, H, ., .] view at run time, never give wrong scores)
                gather_heads(self.e, term, self._head_index(sel, g), H, reader=add)
            elif ((not _folded(site) or _on_4d_scores(add)) and (shape := _term_shape(term)).rank() >= 3
                  and shape.dims[shape.rank() - 3] != 1):
                # [B|1, H|1, S, S] or [H|1, S, S] aligned with the scores: the head axis is rank - 3
                axis = shape.rank() - 3
                idx = self._head_index(sel, g)
                idx = self.e.const("kept_heads", idx) if isinstance(idx, np.ndarray) else idx
                if shape.dims[axis] != H:  # not static: a broadcast axis of 1 reads row 0 for every head
                    last = self.e.op("Sub", [self.e.op("Shape", [term], start=axis, end=axis + 1),
                                             self.e.const("one", np.array([1], np.int64))])
                    idx = self.e.op("Min", [idx, last])
                add.replace_input_with(list(add.inputs).index(term), self.e.op("Gather", [term, idx], axis=axis))
        out = site.out_proj
        d = int(out.weight.shape[0 if out.transposed_weight else 1])
        if nbits.is_nbits(out.node):
            self._nbits_rows(site, sel, n)
        elif output is not None:
            self._set_output(out, output)
        elif out.transposed_weight:
            self._slice(_weight_slot(out), out.weight, sel, [d, G, g * dv], 1, [d, n * g * dv])
        else:
            self._slice(_weight_slot(out), out.weight, sel, [G, g * dv, d], 0, [n * g * dv, d])
        packed_width = n * g * dh + 2 * G * dh if cache else 3 * n * dh
        widths = {H * dv: n * g * dv, H * dh: n * g * dh, G * dh: n * dh, 3 * H * dh: packed_width}
        counts = {H: n * g, G: n}
        seen: set[int] = set()
        views = [*site.q.views, *site.merge] if cache else [*site.q.views, *site.k.views, *site.v.views, *site.merge]
        fold_ids = {id(x) for x in scores}
        merged_axis = _merged_width_axis(site)
        views = [*site.merge, *scores] if layout is not None else views
        for node in views:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Split" and cache:
                self._set_split(node, [n * g * dh, G * dh, G * dh])
            elif node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None:
                self._retarget(node, lambda pos, size, v: widths.get(v, v))
            elif node.op_type == "Reshape" and _folded(site) and (
                    _folds(node) == (3, 4) or id(node) in fold_ids and (
                        _unfold_units(node) is not None or _folds(node) in ((4, 3), (3, 3)))):
                # [B, H, S, T] <-> [B*H, S, T] (heads folded into the batch): B may be computed as B*H / H
                # from the folded shape; the views are rebuilt from the input's shape and the kept heads.
                # [B*H, S, T] -> [B*H, S, T] is such a pair that onnx-simplifier merged into one view.
                units = _unfold_units(node)
                lead = [-1] if units is None else [-1, n * g]
                rest = self.e.op("Shape", [node.inputs[0]], start=2 if _folds(node) == (4, 3) else 1)
                ones = [self.e.const("units", np.ones(units, np.int64))] if units else []
                node.replace_input_with(1, self.e.op("Concat", [self.e.const("fold", np.array(lead, np.int64)), rest,
                                                                *ones], axis=0))
            elif node.op_type == "Reshape":
                heads_at = _split_head_axis(node)
                width_at = merged_axis if any(node is m for m in site.merge) else 0  # from the end
                self._copy_seq_dim(node)
                self._retarget(node, lambda pos, size, v, at=heads_at, w=width_at: widths.get(v, v)
                               if pos == size - 1 - w and size <= 3
                               else counts.get(v, v) if size == 4 and pos in at else v)
                if any(node is m for m in site.merge) and width_at == 0:  # channels-first: the last axis is S
                    self._pin_width(node, n * g * dv)
            elif node.op_type == "Expand":  # GQA repeat [1, G, g, S, Dh]
                self._retarget(node, lambda pos, size, v: counts.get(v, v) if pos == 1 and v == G else v)

    def _unexpand_heads(self, mask: ir.Value, heads: int, limit: int = 8) -> None:
        """A mask expanded to the scores' literal shape (XLM under dynamo: ``expand_as(scores)`` becomes
        ``Expand(mask[B, 1, 1, S], [B, H, S, S])``) would not broadcast against the kept heads' scores.
        Its head entry becomes 1: the input's head axis is 1, so every head reads the same row
        whatever their number."""
        value = mask
        for _ in range(limit):
            node = value.producer()
            if node is None or node.op_type not in ("Expand", "Cast", "Not", "Identity"):
                return
            src = node.inputs[0].shape
            if node.op_type == "Expand" and src is not None and src.rank() == 4 and src.dims[1] == 1:
                self._retarget(node, lambda pos, size, v: 1 if size == 4 and pos == 1 and v == heads else v)
            value = node.inputs[0]

    def _set_output(self, proj: Projection, rows: np.ndarray) -> None:
        """Write refitted output-projection rows (``[n * Dh, D]``; transposed if the weight is)."""
        w = rows.T if proj.transposed_weight else rows
        slot = _weight_slot(proj)
        arr = np.ascontiguousarray(w).astype(const_array(proj.weight).dtype)
        slot[0].replace_input_with(slot[1], self.e.const("head_refit", arr))

    def _set_split(self, node: ir.Node, sizes: list[int]) -> None:
        """Packed QKV with a KV cache: Q is narrower than K and V now, so the split gets explicit sizes."""
        if "num_outputs" in node.attributes:
            del node.attributes["num_outputs"]
        sizes_value = self.e.const("split", np.array(sizes, np.int64))
        if len(node.inputs) > 1:
            node.replace_input_with(1, sizes_value)
        else:
            node.resize_inputs(2)
            node.replace_input_with(1, sizes_value)

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

    def _pin_width(self, node: ir.Node, width: int) -> None:
        """The heads-merge Reshape's target [B, S, W] with W read from a shape (CLIP under transformers 4:
        the layer input's hidden size): the kept heads' width instead."""
        pieces = _pieces(node.inputs[1])
        last, array = pieces[-1]
        if array is not None or len(pieces) not in (2, 3) or last.shape is None or list(last.shape.dims) != [1]:
            return
        new = [p for p, _ in pieces[:-1]] + [self.e.const("width", np.array([width], np.int64))]
        node.replace_input_with(1, self.e.op("Concat", new, axis=0))

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
