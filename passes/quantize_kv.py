"""quantize-kv: SpAtten progressive quantization - split-precision K/V, MSB-first attention, LSB
recompute of the rows whose softmax is not confident.

Rewrite of each attention site (``K^T`` and ``V`` as the core consumes them, ``chain`` = the score
ops from ``K^T`` to the probabilities: MatMul, scale, mask, Softmax, as the exporter wrote them)::

    s_k, s_v         = ReduceMax(|K^T|), ReduceMax(|V|) over the granularity's axes / (2^(m+l-1) - 1)
    kmsb, klsb       = spatten.QuantizeSplit(K^T, s_k, 2^l, 2^(m+l-1) - 1)    (same for V)
    K_m, K_f         = spatten.DequantizeMSB(kmsb, s_k, 2^l), spatten.DequantizeSplit(kmsb, klsb, s_k, 2^l)
    P_m, P_f         = chain(K_m), chain(K_f)      (up to MatMul(P, V)'s input, see below)
    low              = spatten.LowConfidence(P_m, t)        (or LowConfidenceUniform: max P_m * n_keys <= t)
    ctx, need        = spatten.ProgressiveContext(rows(low), P_m, P_f, V_m, V_f, rows(qvalid))
    readers of P @ V read ctx; other readers of P (TokenImportance) read Where(low, P_f, P_m)
    (heads folded into the batch: ``low`` is taken on P @ V's [B*H, S, T] rows, viewed as P's rows)

The chain is cloned from K^T to the probabilities, then along input 0 of the ops between them and
P @ V (prune-values' LocalValuePrune, prune-tokens' in-layer GatherRows of the kept query rows); the
kept-row indices, chosen from TokenImportance of Where(low, P_f, P_m), are shared by both paths, and
``rows()`` applies the same GatherRows to the per-row decision and row validity. Head-pruned layers
(prune-heads) are quantized with their kept heads.

Static mode (``bits="6"``): ``K^T, V -> spatten.Dequantize(spatten.Quantize(x, s, qmax), s)`` in place.

Bit split: the planes are the high m and low l bits of one (m+l)-bit quantization, so threshold 1.0
is static (m+l)-bit quantization bit for bit, and threshold 0 (MSB only) is an m-bit quantizer with
2^m bins read at their middle; any threshold in between is one of the two per row (layout and
bounds in :mod:`.quant_functions`).

Semantics are exactly "MSB-only result where confident, MSB+LSB result where not", per row (batch,
head, query). Confidence rule ``fixed``: max P_m <= threshold needs LSBs (the paper's rule; 1.0 =
every row full, 0 = MSB only). Rule ``uniform``: max P_m <= threshold / n_keys, i.e. the threshold is
a multiple of the uniform probability over the row's unmasked keys, so long inputs, whose attention
is naturally flat, are not all refetched; but short inputs are then refetched too often. Rule
``min``: max P_m <= min(threshold, factor / n_keys) - the paper's threshold on short rows, the
uniform one on long rows. Rule ``peak`` (the default, threshold 0.3) is the opposite test, max P_m >
threshold: the output error of a row from K and V quantization grows with how concentrated the row
is (roughly sum_j p_j^2; a flat row averages the errors of many keys away), so the rows the paper's
rule skips are the ones whose error does not average out. On MiniLM it is the rule whose refetches
beat spending the same bytes on static bits (docs/experiments.md). onnxruntime computes both
paths and selects (no CPU time is saved); the saving is K/V memory traffic, which the accelerator
backend realises and the reference runtime counts. Layout of the planes and scales:
:mod:`.quant_functions`.

Scale granularity (default ``token``: one scale per batch element, KV head and token, over the
head's channels). It is the natural KV-cache form - a new token is quantized alone, nothing already
stored is rescaled - and on MiniLM it was clearly the most accurate (4-bit static embedding cosine
0.996 vs 0.991 per channel and 0.984 per head; docs/experiments.md), at the price of one float32 scale
per token and head (4 bytes next to Dh * bits / 8; counted in the byte statistics). Also ``head``
(per head over all tokens and channels: what SpAtten's per-head K/V buffers hold, 4 bytes per
head), ``channel`` (per head and channel, over tokens) and ``tensor`` (per batch element). Scales
are computed at run time from the tensor itself (so calibration is not needed; with ``head``,
``channel`` or ``tensor`` the padding keys take part in the abs-max).

Decoders with a KV cache: the rewrite applies to K^T and V as the core reads them, i.e. past and new
tokens after the cache Concat (and after a GQA repeat). With per-token scales a token's planes do
not depend on any other token, so this is exactly what attention over a split-precision cache
written token by token would compute; the ``present.*`` outputs stay the float projections (the
graph's cache interface is unchanged - storing the planes there is the decoder strategy's job). The
byte statistics of GQA models count the repeated heads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import NoAttentionError, OptionError
from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .find_attention import AttentionSite, find_attention
from .quant_functions import FUNCTIONS
from .score_chain import static_rank
from .spatten_ops import DOMAIN, ensure_functions

logger = logging.getLogger(__name__)

# Reduction axes of the abs-max, for K^T [B, H, Dh, S] and V [B, H, S, Dh].
GRANULARITY: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "tensor": ((1, 2, 3), (1, 2, 3)),
    "head": ((2, 3), (2, 3)),
    "channel": ((3,), (2,)),
    "token": ((2,), (3,)),
}


def _fixed(r: _Rewrite, p: ir.Value) -> ir.Value:
    return r.call("LowConfidence", p, r.thr)


def _uniform(r: _Rewrite, p: ir.Value) -> ir.Value:
    return r.call("LowConfidenceUniform", p, r.thr)


def _min(r: _Rewrite, p: ir.Value) -> ir.Value:  # max p <= min(t, c / n): both tests
    factor = r.e.const("factor", np.float32(r.opts.factor))
    return r.e.op("And", [_fixed(r, p), r.call("LowConfidenceUniform", p, factor)])


def _peak(r: _Rewrite, p: ir.Value) -> ir.Value:  # the opposite test: LSBs for rows with max p > t
    return r.e.op("Not", [_fixed(r, p)])


@dataclasses.dataclass(frozen=True)
class Rule:
    threshold: float  # the default --lsb-threshold
    low: Callable[[_Rewrite, ir.Value], ir.Value]  # MSB-only probabilities -> rows needing LSBs [B, H, Sq, 1]


# Confidence rules (see the module docstring for each test).
RULES: dict[str, Rule] = {"fixed": Rule(0.1, _fixed), "uniform": Rule(4.0, _uniform), "min": Rule(0.1, _min),
                          "peak": Rule(0.3, _peak)}


def parse_bits(text: str) -> tuple[int, int]:
    """``"6+4"`` -> (6, 4); ``"6"`` -> (6, 0) (static, MSB plane only)."""
    msb, sep, lsb = str(text).partition("+")
    try:
        m, lo = int(msb), int(lsb) if sep else 0
    except ValueError:
        raise OptionError(f"--kv-bits must look like 6+4 (MSB+LSB) or 6 (static), got {text!r}") from None
    if not 2 <= m <= 8 or not 0 <= lo <= 8 or (sep and lo == 0):
        raise OptionError(f"--kv-bits {text}: MSB bits must be 2..8 and LSB bits 1..8 (8-bit planes)")
    return m, lo


def qmax_for(bits: int) -> int:
    """Largest |q| of a symmetric quantizer with ``bits`` bits (the scale is abs-max / qmax); split
    planes use the full m+l bits."""
    return 2 ** (bits - 1) - 1


def score_chain(kt: ir.Value, probs: ir.Value) -> list[ir.Node]:
    """The nodes on paths from ``kt`` to ``probs`` (score MatMul ... Softmax), in graph order."""
    forward: dict[int, ir.Node] = {}
    todo = [kt]
    while todo:
        v = todo.pop()
        if v is probs:
            continue
        for use in v.uses():
            if id(use.node) not in forward:
                forward[id(use.node)] = use.node
                todo.extend(use.node.outputs)
    chain: dict[int, ir.Node] = {}
    todo_nodes = [probs.producer()]
    while todo_nodes:
        node = todo_nodes.pop()
        if node is None or id(node) not in forward or id(node) in chain:
            continue
        chain[id(node)] = node
        todo_nodes.extend(i.producer() for i in node.inputs if i is not None)
    graph = probs.producer().graph
    return [n for n in graph if id(n) in chain]


def probs_path(probs: ir.Value, p_used: ir.Value) -> list[ir.Node]:
    """The ops between the probabilities and MatMul(P, V)'s input, which take P as input 0:
    prune-values' LocalValuePrune, prune-tokens' in-layer GatherRows. Their other inputs (kept rows,
    chosen from TokenImportance of P) are not part of the score chain and are not cloned."""
    nodes: list[ir.Node] = []
    while p_used is not probs:
        node = p_used.producer()
        if node is None or not node.inputs:
            raise OptionError(f"MatMul(P, V) does not read the probabilities {probs.name} through input 0 of its ops")
        nodes.append(node)
        p_used = node.inputs[0]
    return nodes[::-1]


@register_pass
@dataclasses.dataclass(frozen=True)
class QuantizeKV(Pass):
    """Split-precision K/V with MSB-first attention and LSB recompute where unconfident."""

    name = "quantize-kv"
    bits: str = "6+4"
    threshold: float | None = None  # None: the rule's default (RULES)
    granularity: str = "token"
    rule: str = "peak"  # the paper's is "fixed" (bench: peak beats it and static at equal bytes)
    factor: float = 8.0  # rule "min": LSBs when max p <= min(threshold, factor / n_keys)
    values: bool = True  # quantize V as well as K
    emit_stats: bool = False  # outputs spatten_lsb_rows.<layer> [B,H,Sq] and spatten_lsb_fraction [L]

    @property
    def resolved_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return RULES[self.rule].threshold if self.rule in RULES else 0.0

    def check(self) -> tuple[int, int]:
        m, lo = parse_bits(self.bits)
        if self.granularity not in GRANULARITY:
            raise OptionError(f"granularity must be one of {', '.join(GRANULARITY)}, got {self.granularity!r}")
        if self.rule not in RULES:
            raise OptionError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        t = self.resolved_threshold
        if t < 0 or (self.rule != "uniform" and t > 1):
            raise OptionError(f"--lsb-threshold must be in [0, 1] for the {self.rule} rule (>= 0 for uniform), got {t}")
        if self.factor < 0:
            raise OptionError(f"factor must be >= 0, got {self.factor}")
        return m, lo

    def call(self, model: ir.Model) -> PassResult:
        m, lo = self.check()
        report = find_attention(model)
        sites = report.sites
        if not sites:
            raise NoAttentionError("no attention found: nothing to quantize")
        # Which side of a folded core is folded, where an earlier pass dropped the shapes: discovery tags a
        # model's folded layers only while it can see the 3-D scores (prune-tokens' GatherRows before layer 1
        # hides them), so any unknown rank of a model with a folded layer is inferred again. Unfolded models
        # keep the shapes they come with (onnxruntime's choices, and so its numbers, depend on them).
        if any(s.variant.get("layout") == "folded" for s in sites) and any(
                s.pv is not None and s.k is not None and None in (static_rank(s.pv.outputs[0]), static_rank(s.k.value))
                for s in sites):
            ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
            report = find_attention(model)
            sites = report.sites
        for softmax, reason in report.rejected:  # e.g. a layer an earlier pass left unrecognisable
            logger.warning("quantize-kv: Softmax %s not rewritten (not recognised as attention: %s)", softmax, reason)
        for s in sites:
            if s.fused is not None:
                raise OptionError(f"layer {s.layer}: fused {s.fused.op_type} op; "
                                  "quantize-kv needs decomposed attention")
            if s.pv is None or s.probs is None:
                raise OptionError(f"layer {s.layer}: cannot locate MatMul(P, V)")
            shape = s.k.value.shape
            if shape is not None and shape.rank() not in (3, 4):
                raise OptionError(f"layer {s.layer}: K^T has rank {shape.rank()}, expected [B, H, Dh, S] "
                                  "or heads folded into the batch [B*H, Dh, S]")
        rewrite = _Rewrite(model, self, m, lo)
        for site in sites:
            rewrite.site(site)
        rewrite.finish()
        if lo:
            logger.info("quantize-kv: %d sites, %d+%d-bit K/V planes, %s scales, LSBs by rule %s threshold %g",
                        len(sites), m, lo, self.granularity, self.rule, self.resolved_threshold)
        else:
            logger.info("quantize-kv: %d sites, static %d-bit K/V, %s scales", len(sites), m, self.granularity)
        return PassResult(model, True)


class _Rewrite:
    def __init__(self, model: ir.Model, opts: QuantizeKV, m: int, lo: int) -> None:
        self.model, self.opts, self.m, self.lo = model, opts, m, lo
        self.e = GraphEditor(model, "spatten_q")
        self.opset = model.opset_imports.get("", 17)
        ensure_functions(model, list(FUNCTIONS))
        e = self.e
        self.qmax = e.const("qmax", np.float32(qmax_for(m + lo)))  # static: lo = 0
        self.step = e.const("step", np.float32(2**lo))
        self.thr = e.const("threshold", np.float32(opts.resolved_threshold))
        self.fractions: list[ir.Value] = []

    def call(self, name: str, *inputs: ir.Value, outputs: int = 1):
        return self.e.op(name, list(inputs), domain=DOMAIN, outputs=outputs, hint=name)

    def scale(self, x: ir.Value, axes: tuple[int, ...]) -> ir.Value:
        e = self.e
        a = e.op("Abs", [x])
        if self.opset >= 18:
            amax = e.op("ReduceMax", [a, e.const("axes", np.array(axes, np.int64))], keepdims=1)
        else:
            amax = e.op("ReduceMax", [a], axes=list(axes), keepdims=1)
        amax = e.op("Max", [amax, e.const("tiny", np.float32(1e-12))])  # an all-zero group stays finite
        return e.op("Div", [amax, self.qmax])

    def _as4(self, x: ir.Value, folded: bool) -> ir.Value:
        """Heads folded into the batch, [B*H, ., .]: viewed as [1, B*H, ., .] for the quantization ops
        (each folded head is one head of one batch element: per-token and per-head scales are the same)."""
        return self.e.op("Unsqueeze", [x, self.e.const("axes", np.array([0], np.int64))]) if folded else x

    def _as3(self, x: ir.Value, folded: bool) -> ir.Value:
        return self.e.op("Squeeze", [x, self.e.const("axes", np.array([0], np.int64))]) if folded else x

    def site(self, site: AttentionSite) -> None:
        kt, v, pv = site.k.value, site.pv.inputs[1], site.pv
        # [B*H, Dh, S]; an earlier pass (the preset's prune-tokens) may have dropped K^T's shape
        rank = static_rank(kt)
        k_folded = rank == 3 if rank is not None else site.variant.get("layout") == "folded"
        # P @ V may run on [B, H, ., .] although K^T is folded (TF T5: the 3-D bmm's scores viewed 4-D)
        out_rank = static_rank(pv.outputs[0])
        folded = out_rank == 3 if out_rank is not None else k_folded
        p_used = pv.inputs[0]  # the probabilities, or prune-values' LocalValuePrune of them
        k_axes, v_axes = GRANULARITY[self.opts.granularity]
        chain = score_chain(kt, site.probs)
        if not chain:
            raise OptionError(f"layer {site.layer}: K^T does not reach the probabilities")
        chain += probs_path(site.probs, p_used)
        if (folded or k_folded) and any(n.domain == DOMAIN and n.op_type == "GatherRows" for n in chain):
            raise OptionError(f"layer {site.layer}: in-layer token pruning on heads folded into the batch")
        as4, as3 = (lambda x: self._as4(x, folded)), (lambda x: self._as3(x, folded))
        k4, k3 = (lambda x: self._as4(x, k_folded)), (lambda x: self._as3(x, k_folded))
        if self.lo == 0:
            k_m = k3(self._static(k4(kt), k_axes))
            for node in chain:
                for i, inp in enumerate(node.inputs):
                    if inp is kt:
                        node.replace_input_with(i, k_m)
            if self.opts.values:
                pv.replace_input_with(1, as3(self._static(as4(v), v_axes)))
            return
        k_m, k_f = (k3(x) for x in self._split(k4(kt), k_axes))
        v_m, v_f = self._split(as4(v), v_axes) if self.opts.values else (as4(v), as4(v))
        msb, full = self._clone(chain, kt, k_m), self._clone(chain, kt, k_f)
        # folded: the decision is taken on the probabilities as P @ V reads them (BLOOM's Softmax is on
        # a [B, H, S, S] view of the scores, P @ V on [B*H, S, S])
        rows = as4(msb[id(p_used if folded else site.probs)])
        low = RULES[self.opts.rule].low(self, rows)
        low_used, qvalid = low, self._qvalid(rows, site.own_keys is not False)
        for node in chain:
            if node.domain == DOMAIN and node.op_type == "GatherRows":  # in-layer token pruning: kept rows
                low_used = self.call("GatherRows", low_used, node.inputs[1])
                qvalid = self.e.op("GatherElements", [qvalid, node.inputs[1]], axis=1)
        ctx, need = self.call("ProgressiveContext", low_used, as4(msb[id(p_used)]), as4(full[id(p_used)]), v_m, v_f,
                              qvalid, outputs=2)
        self.e.replace_uses(pv.outputs[0], as3(ctx))
        if any(u.node is not pv and u.node not in chain and u.node.op_type not in ("Shape", "Size")
               for u in site.probs.uses()):
            # e.g. TokenImportance: it sees the probabilities P @ V used. Folded, the decision has one row per
            # row of P @ V's [B*H, S, T] (viewed [1, B*H, S, 1]); the probabilities are the same rows in the
            # same order, whatever their view ([B*H, S, T] or BLOOM's [B, H, S, T]): it takes their shape.
            pick = self._rows_as(low, full[id(site.probs)]) if folded else low
            where = self.e.op("Where", [pick, full[id(site.probs)], msb[id(site.probs)]])
            self.e.replace_uses(site.probs, where, keep=[pv, *chain])
        if self.opts.emit_stats:
            self._stats(site.layer, need, qvalid)

    def _rows_as(self, low: ir.Value, p: ir.Value) -> ir.Value:
        """The per-row decision ``[1, B*H, S, 1]`` viewed as the rows of ``p`` (its shape, last axis 1)."""
        e = self.e
        rows = e.op("Concat", [e.op("Shape", [p], end=-1), e.const("one", np.array([1], np.int64))], axis=0)
        return e.op("Reshape", [low, rows])

    def _static(self, x: ir.Value, axes: tuple[int, ...]) -> ir.Value:
        s = self.scale(x, axes)
        return self.call("Dequantize", self.call("Quantize", x, s, self.qmax), s)

    def _split(self, x: ir.Value, axes: tuple[int, ...]) -> tuple[ir.Value, ir.Value]:
        s = self.scale(x, axes)
        msb, lsb = self.call("QuantizeSplit", x, s, self.step, self.qmax, outputs=2)
        return self.call("DequantizeMSB", msb, s, self.step), self.call("DequantizeSplit", msb, lsb, s, self.step)

    def _clone(self, chain: list[ir.Node], kt: ir.Value, new_kt: ir.Value) -> dict[int, ir.Value]:
        """A copy of the score ops reading ``new_kt`` instead of ``kt``: id(old value) -> its copy."""
        mapping: dict[int, ir.Value] = {id(kt): new_kt}
        for node in chain:
            inputs = [mapping.get(id(i), i) if i is not None else None for i in node.inputs]
            attrs = {a.name: a.value for a in node.attributes.values()}
            outs = self.e.op(node.op_type, inputs, domain=node.domain, outputs=len(node.outputs),
                             hint=node.op_type, **attrs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            for old, new in zip(node.outputs, outs):
                mapping[id(old)] = new
        return mapping

    def _qvalid(self, p: ir.Value, own_keys: bool) -> ir.Value:
        """Which query rows are real tokens [B, S] (statistics only): the keys the last query row of
        head 0 may attend to (p > 0). In self-attention that is the padding mask - and prune-tokens'
        per-layer validity - whether the mask is causal or not. After an in-layer GatherRows it is
        gathered with the rows, so a sample's kept rows beyond its own budget (masked like padding
        from the next layer on, but computed here) still count. Keys from other tokens (a reduced
        sequence, cross-attention) say nothing about the query rows: then every row counts."""
        e = self.e
        if not own_keys:
            rows = e.op("Concat", [e.op("Shape", [p], end=1), e.op("Shape", [p], start=2, end=3)], axis=0)
            return e.op("ConstantOfShape", [rows], value=ir.tensor(np.array([1.0], np.float32)))
        last = e.op("Gather", [e.op("Gather", [p, e.const("head0", np.int64(0))], axis=1),
                               e.const("last_row", np.int64(-1))], axis=1)
        # With a KV cache the keys are past + new tokens and the query rows are the new ones: the
        # last Sq key positions (a no-op slice in self-attention).
        rows = e.op("Neg", [e.op("Shape", [p], start=2, end=3)])
        end, axis1 = e.const("end", np.array([2**62], np.int64)), e.const("axes", np.array([1], np.int64))
        last = e.op("Slice", [last, rows, end, axis1])
        return e.op("Ceil", [last])

    def _stats(self, layer: int, need: ir.Value, qvalid: ir.Value) -> None:
        e = self.e
        out = e.op("Identity", [need])
        out.name = f"spatten_lsb_rows.{layer}"
        out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", f"heads_{layer}", f"rows_{layer}"])
        self.model.graph.outputs.append(out)
        rows = e.op("Add", [e.op("Mul", [need, e.const("zero", np.float32(0))]),
                            e.op("Unsqueeze", [qvalid, e.const("axes", np.array([1], np.int64))])])
        frac = e.op("Div", [e.op("ReduceSum", [need], keepdims=0),
                            e.op("Max", [e.op("ReduceSum", [rows], keepdims=0), e.const("one", np.float32(1))])])
        self.fractions.append(e.op("Unsqueeze", [frac, e.const("axes", np.array([0], np.int64))]))

    def finish(self) -> None:
        if self.fractions:
            out = self.e.op("Concat", self.fractions, axis=0)
            out.name = "spatten_lsb_fraction"
            out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([len(self.fractions)])
            self.model.graph.outputs.append(out)
        elif self.opts.emit_stats:
            logger.info("quantize-kv: static mode has no LSB refetch; no statistics outputs")
        self.e.commit()
        RemoveUnusedNodesPass()(self.model)  # the original score chains and P @ V are dead now
