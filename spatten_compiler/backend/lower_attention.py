"""Lowering rules for attention blocks, projections, norms and the SpAtten functions.

The attention template of one layer (``lower_group``), for each head h (K/V head ``h // group``)::

    store.kv  K, V planes of the block's rows (MSB + LSB planes with progressive quantization)
    sync      DRAM barrier: the planes are read back below
    fetch.kv  K rows of the key list, MSB plane     qk, softmax
    requant   -> fetch.kv K LSB plane (pred=1), qk pred=1, softmax pred=1    (progressive)
    accum     token importance                       topk values -> local-V list (value pruning)
    fetch.kv  V rows of the (local-)V list            pv          accum head importance
    topk tokens (+ compact of the accumulator) when the layer prunes tokens

Which of these appear follows the SpAtten functions found in the block; ratios, bit widths and the
LSB threshold are read from their constant inputs. Keys are listed in an index slot (encoder:
``[0, live rows)``; decoder: one list per layer that grows by one row per generated token).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import onnx

from spatten_compiler.backend.emitter import ACT_BYTES, LINE, LoweringError
from spatten_compiler.backend.graphinfo import Group, tensor_bytes
from spatten_compiler.backend.opcodes import (
    ACCUM_KINDS,
    BUFFERS,
    ELT_OPS,
    FIXED,
    ILIST_OPS,
    PLANES,
    REQUANT_RULES,
    SCORE_RULES,
    TOPK_KINDS,
)

if TYPE_CHECKING:
    from spatten_compiler.backend.lower import Lowering

logger = logging.getLogger(__name__)

BUF = {b: i for i, b in enumerate(BUFFERS)}
ILIST = {b: i for i, b in enumerate(ILIST_OPS)}
PLANE = {b: i for i, b in enumerate(PLANES)}
TOPK = {b: i for i, b in enumerate(TOPK_KINDS)}
ACCUM = {b: i for i, b in enumerate(ACCUM_KINDS)}
_ELT = {b: i for i, b in enumerate(ELT_OPS)}
ELT_OF = {op: _ELT[e] for op, e in {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Neg": "neg", "Relu": "relu", "Gelu": "gelu",
    "FastGelu": "gelu_tanh", "Erf": "gelu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Sqrt": "sqrt",
    "Reciprocal": "recip", "Pow": "pow", "Max": "max", "Min": "min", "Cos": "rope", "Sin": "rope",
    "ReduceMean": "add", "ReduceSum": "add", "Softplus": "exp", "Softmax": "exp", "QuickGelu": "gelu",
}.items()}
NORM_OF = {"LayerNormalization": "layernorm", "SkipLayerNormalization": "layernorm"}
SLOT_CACHE, SLOT_VALUES, SLOT_KEPT = 16, 1024, 15
SCORE_OF = {"TokenImportance": "sum", "TokenImportanceMean": "mean", "TokenImportanceValue": "value"}


def fixed(x: float) -> int:
    return max(0, min(FIXED, int(math.floor(x * FIXED + 1e-9))))


# ---- K/V planes ------------------------------------------------------------------------------
class KVPlanes:
    """DRAM regions of each layer's K and V planes: [kv head][row][plane bytes]."""

    def __init__(self, lw: Lowering) -> None:
        self.lw = lw
        self.regions: dict[tuple[int, str, str], tuple[int, int]] = {}  # (layer, k|v, plane) -> (tensor, row bytes)

    def bits(self, g: Group) -> tuple[int, int]:
        """(MSB bits, LSB bits); (16, 0) for an unquantized model. From the stored K's source (the
        codes its dequantization reads, backend.kvsource), else the block's quantizer constants."""
        if g.k_src is not None:
            return g.k_src.msb_bits, g.k_src.lsb_bits
        for node in g.spatten.get("QuantizeSplit", []):
            step, qmax = (self.lw.gi.const_value(i) for i in node.input[2:4])
            if step is not None and qmax is not None:
                total = int(round(math.log2(float(qmax) + 1))) + 1
                lsb = int(round(math.log2(float(step))))
                return total - lsb, lsb
        for node in g.spatten.get("Quantize", []):
            qmax = self.lw.gi.const_value(node.input[2])
            if qmax is not None:
                return int(round(math.log2(float(qmax) + 1))) + 1, 0
        return 16, 0

    def plane(self, g: Group, kv: str, plane: str) -> tuple[int, int]:
        key = (g.layer, kv, plane)
        if key not in self.regions:
            msb, lsb = self.bits(g)
            bits = {"msb": msb, "lsb": lsb, "full": msb}[plane]
            row_bytes = -(-g.head_dim * bits // 8)
            kind = "v" if kv == "v" else f"k_{plane}"
            t = self.lw.e.region(f"kv.L{g.layer}.{kv}.{plane}", kind, g.kv_heads * self.lw.max_rows * row_bytes,
                                 bits, "", g.layer)
            self.regions[key] = (t, row_bytes)
        return self.regions[key]


# ---- the attention template ---------------------------------------------------------------------
def _const(lw: Lowering, name: str) -> float | None:
    v = lw.gi.const_value(name)
    return None if v is None or v.size != 1 else float(v.reshape(-1)[0])


def _pv_and_v(lw: Lowering, g: Group) -> tuple[str | None, list[str]]:
    nodes = [lw.gi.by_id[i] for i in sorted(g.nodes, key=lambda i: lw.gi.position[i])]
    if g.qk[0].op_type == "Attention":
        return g.qk[0].input[2], list(g.qk[0].output[:1])
    v = None
    for n in nodes:
        if n.op_type == "MatMul" and n not in g.qk:
            v = n.input[1]
        elif n.op_type == "ProgressiveContext":
            v = n.input[3]
    exits = [o for n in nodes for o in n.output
             if o and any(id(c) not in g.nodes for c in lw.gi.consumers.get(o, []))]
    return v, exits


def score_scale(lw: Lowering, g: Group) -> tuple[float, bool]:
    """(factor, divide) between Q x K and the softmax: the graph's one constant Mul or Div on that path
    (kept as that operation, so a functional run rounds as the graph does; several are folded into
    one multiplier; 1.0 when the exporter scaled Q or K before the MatMul); the fused Attention op's
    ``scale`` attribute."""
    qk = g.qk[0]
    if qk.op_type == "Attention":
        attr = next((a.f for a in qk.attribute if a.name == "scale"), None)
        return (float(attr) if attr else 1.0 / math.sqrt(g.head_dim)), False
    ops: list[tuple[float, bool]] = []
    value = qk.output[0]
    for _ in range(8):
        nxt = [c for c in lw.gi.consumers.get(value, []) if id(c) in g.nodes and c.op_type != "Softmax"]
        if not nxt or nxt[0].op_type not in ("Mul", "Div", "Add", "Sub", "Where", "Cast"):
            break
        n = nxt[0]
        c = next((_const(lw, i) for i in n.input if i != value and _const(lw, i) is not None), None)
        if c is not None and n.op_type in ("Mul", "Div"):
            ops.append((c, n.op_type == "Div"))
        value = n.output[0]
    k_factor = _dequantized_k_factor(lw, g)
    if len(ops) == 1 and k_factor == 1.0:
        return ops[0]
    factor = k_factor
    for c, div in ops:
        factor = factor / c if div else factor * c
    return factor, False


def _dequantized_k_factor(lw: Lowering, g: Group) -> float:
    """Constant factors applied to K between its dequantization and Q x K (exporters that scale Q and
    K by sqrt(scale) each): store.kv quantizes K before them, so the score scale carries them."""
    if g.k_src is not None:
        return g.k_src.factor
    factor, value = 1.0, g.qk[0].input[1]
    for _ in range(8):
        n = lw.gi.producer.get(value)
        if n is None or (n.domain == "spatten" and n.op_type.startswith("Dequantize")):
            return factor if n is not None else 1.0
        c = next((_const(lw, i) for i in n.input[1:] if _const(lw, i) is not None), None)
        if n.op_type == "Mul" and c is not None:
            factor *= c
        elif n.op_type == "Div" and c is not None:
            factor /= c
        elif n.op_type not in ("Transpose", "Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Expand"):
            return 1.0
        value = n.input[0]
    return 1.0


def requant_rule(lw: Lowering, g: Group) -> str:
    """The quantize-kv confidence rule of the block (``--lsb-rule``): which rows fetch K/V LSBs."""
    low = g.spatten.get("LowConfidence", [])
    if low and g.spatten.get("LowConfidenceUniform"):
        return "min"
    if g.spatten.get("LowConfidenceUniform"):
        return "uniform"
    negated = any(c.op_type == "Not" for n in low for c in lw.gi.consumers.get(n.output[0], []))
    return "peak" if negated else "low"


def lower_group(lw: Lowering, g: Group) -> None:
    """One attention block. With token pruning that gathers the kept query rows before P x V
    (``spatten.GatherRows``, encoders) the heads run twice: scores and importance of every live row,
    the token top-k, then scores, values and P x V of the kept rows only (what the graph computes)."""
    e, rows, decoder = lw.e, lw.rows, lw.opts.decoder
    msb, lsb = lw.kv.bits(g)
    progressive = lsb > 0
    sp = g.spatten
    causal = int(decoder or lw.gi.causal)
    scale, divide = score_scale(lw, g)
    e.emit("cfg.attn", layer=g.layer % 256, heads=g.heads, kv_heads=g.kv_heads, head_dim=g.head_dim,
           tokens=min(lw.max_rows, 65535), causal=causal, past=lw.past,
           scale=int(np.array([scale], np.float32).view(np.uint32)[0]), div=int(divide))
    if msb != 16:
        thr = next((_const(lw, n.input[1]) for n in sp.get("LowConfidence", []) + sp.get("LowConfidenceUniform", [])),
                   None)
        e.emit("cfg.quant", q_bits=16, k_msb=msb, k_lsb=lsb, v_bits=msb, threshold=fixed(thr if thr is not None else 0),
               rule=REQUANT_RULES.index(requant_rule(lw, g)))
    value_keep = next((_const(lw, n.input[1]) for n in sp.get("LocalValuePrune", [])), None)
    token = token_plan(lw, g)
    score_rule = next((SCORE_OF[k] for k in SCORE_OF if k in sp), "sum")
    if value_keep is not None or token is not None or any(k.startswith("HeadImportance") for k in sp):
        keep, first, recent = token or (1.0, 0, 0)
        e.emit("cfg.prune", token_keep=fixed(keep), head_keep=FIXED, value_keep=fixed(value_keep or 1.0),
               protect_first=min(first, 255), protect_recent=min(recent, 65535), score=SCORE_RULES.index(score_rule))
    q_addr = lw.addr_of(g.q)
    k_addr = lw.addr_of(g.qk[0].input[1])
    v_value, exits = _pv_and_v(lw, g)
    v_addr = lw.addr_of(v_value) if v_value else k_addr
    planes = ("msb", "lsb") if progressive else ("full",)
    for kv, src in (("k", k_addr), ("v", v_addr)):
        for plane in planes:
            t, rb = lw.kv.plane(g, kv, plane)
            for h in range(g.kv_heads):
                base = (h * lw.max_rows + lw.past) * rb
                e.emit("store.kv", t, kv=int(kv == "v"), plane=PLANE[plane], head=h, sram=src, rows=rows,
                       row_bytes=rb, live=1, dram=e.dram(t, base))
    e.barrier()
    # the key list of each K/V head: one per layer (decoder: its K/V cache list; encoder: slot 2), or
    # one per K/V head when each keeps its own rows (per-KV-head eviction)
    key_slot = (lambda kvh: lw.evict.key_slot(g.layer, kvh)) if decoder and lw.evict is not None else (
        lambda kvh: SLOT_CACHE + g.layer if decoder else 2)
    for keys in dict.fromkeys(key_slot(kvh) for kvh in range(g.kv_heads)):
        if decoder and lw.past:
            e.emit("ilist", op=ILIST["append"], dst=keys, value=lw.past)
        else:
            e.emit("ilist", op=ILIST["iota"], dst=keys, value=rows, live=int(not decoder))
    out = e.sram("act", rows * g.heads * g.head_dim * ACT_BYTES)
    head_lines = max(1, g.head_dim * ACT_BYTES // LINE)
    kbuf_half = max(1, lw.opts.hw.sram_bytes("k") // LINE // 2)
    score = e.sram("score", rows * min(lw.max_rows, 4096) * 2)
    tacc = e.sram("score", 4 * lw.max_rows) if token is not None or "TokenImportance" in "".join(sp) else None
    taccs = {kvh: tacc for kvh in range(g.kv_heads)}
    if lw.evict is not None:  # KV-cache eviction: importance accumulated across blocks (lower_evict)
        taccs = {kvh: lw.evict.accumulator(g.layer, kvh) for kvh in range(g.kv_heads)}
        tacc = taccs[0]

    def scores(h: int, accumulate: bool) -> None:
        kvh = h * g.kv_heads // g.heads
        keys = key_slot(kvh)
        fetch = {"head": kvh, "idx": keys, "sram": (h % 2) * kbuf_half}
        t, rb = lw.kv.plane(g, "k", planes[0])
        e.emit("fetch.kv", t, kv=0, plane=PLANE[planes[0]], row_bytes=rb, dram=e.dram(t, kvh * lw.max_rows * rb),
               **fetch)
        q = q_addr + h * head_lines
        e.emit("qk", head=h, q=q, k=fetch["sram"], out=score, idx=keys)
        e.emit("softmax", head=h, src=score, dst=score)
        if progressive:
            e.emit("requant", head=h, src=score)
            t, rb = lw.kv.plane(g, "k", "lsb")
            e.emit("fetch.kv", t, kv=0, plane=PLANE["lsb"], row_bytes=rb, pred=1,
                   dram=e.dram(t, kvh * lw.max_rows * rb), **fetch)
            e.emit("qk", head=h, q=q, k=fetch["sram"], out=score, idx=keys, pred=1)
            e.emit("softmax", head=h, src=score, dst=score, pred=1)
        if accumulate and tacc is not None:
            e.emit("accum", kind=ACCUM["token"], head=h, src=score, dst=taccs[kvh], idx=keys)

    def values(h: int) -> None:
        kvh = h * g.kv_heads // g.heads
        keys = key_slot(kvh)
        buf = (h % 2) * kbuf_half
        vlist = keys
        if value_keep is not None:
            vlist = SLOT_VALUES + h
            e.emit("topk", kind=TOPK["values"], head=h, src=score, idx_in=keys, idx_out=vlist)
        for plane in planes:
            t, rb = lw.kv.plane(g, "v", plane)
            e.emit("fetch.kv", t, kv=1, plane=PLANE[plane], row_bytes=rb, pred=int(plane == "lsb"),
                   dram=e.dram(t, kvh * lw.max_rows * rb), head=kvh, idx=vlist, sram=buf)
        e.emit("pv", head=h, prob=score, v=buf, out=out + h * head_lines, idx=vlist)
        if any(k.startswith("HeadImportance") for k in sp):
            e.emit("accum", kind=ACCUM["head"], head=h, src=out + h * head_lines, dst=lw.head_acc())

    def select_tokens() -> None:
        e.emit("topk", kind=TOPK["tokens"], head=0, src=tacc, idx_in=key_slot(0), idx_out=0)
        e.emit("compact", buf=1, src=tacc, dst=tacc, idx=0, cols=1)
        e.emit("ilist", op=ILIST["copy"], dst=SLOT_KEPT, src=0)  # this layer's compacts of activations

    prunes = token is not None and tacc is not None
    if prunes and "GatherRows" in sp:  # the graph gathers the kept query rows before P x V
        for h in range(g.heads):
            scores(h, True)
        select_tokens()
        for h in range(g.heads):
            scores(h, False)
            values(h)
    else:
        for h in range(g.heads):
            scores(h, True)
            values(h)
        if prunes:
            select_tokens()
    if prunes:  # later layers address the compacted rows 0..kept-1
        e.emit("ilist", op=ILIST["iota"], dst=0, value=min(rows, 65535), live=1)
    if lw.evict is not None:
        lw.evict.lower(g.layer)
    for o in exits:
        lw.addr[o] = out


def token_plan(lw: Lowering, g: Group) -> tuple[float, int, int] | None:
    """(keep ratio of the live rows, protected first rows, protected last rows) of TokenSelect."""
    sel = g.spatten.get("TokenSelect")
    if not sel:
        return None
    node = sel[0]
    k, protect = lw.evaluate([node.input[3], node.input[2]])
    before = lw.live_bound
    kept = int(np.asarray(k).reshape(-1)[0]) if k is not None else before
    lw.live_bound = max(1, min(before, kept))
    first = recent = 0
    if protect is not None:
        p = np.asarray(protect).reshape(-1).astype(bool)
        first = int(np.argmin(p)) if not p.all() else len(p)
        recent = int(np.argmin(p[::-1])) if not p.all() else 0
    return lw.live_bound / max(1, before), first, recent


# ---- other rules ----------------------------------------------------------------------------------
def _weight_layout(lw: Lowering, n: onnx.NodeProto, w: str) -> tuple[int, int, bool, int | None]:
    """(K, N, stored transposed as [N, K], head-slice axis or None) of a weight operand."""
    dims = list(lw.gi.inits[w].dims)[-2:]
    if len(dims) < 2:
        dims = [1, *dims]
    transposed, axis = False, None
    name = n.input[1]
    while name != w:
        p = lw.gi.producer[name]
        if p.op_type == "Transpose":
            transposed = not transposed
        if p.op_type == "HeadSlice":
            axis = next((int(onnx.helper.get_attribute_value(a)) for a in p.attribute if a.name == "axis"), 1)
        name = p.input[0]
    if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
        transposed = not transposed
    k, nn = (dims[1], dims[0]) if transposed else (dims[0], dims[1])
    if axis is not None and transposed:
        axis = 1 - axis
    return k, nn, transposed, axis


def lower_gemm(lw: Lowering, n: onnx.NodeProto, w: str) -> None:
    e, hw = lw.e, lw.opts.hw
    t = lw.gi.inits[w]
    elem = max(1, tensor_bytes(t) // max(1, int(np.prod(t.dims))))
    K, N, transposed, axis = _weight_layout(lw, n, w)
    if (K if transposed else N) * elem >= 1 << 19:
        raise LoweringError(f"node '{n.name}': weight rows of {(K if transposed else N) * elem} bytes exceed the "
                            "19-bit DRAM stride")
    a = lw.addr_of(n.input[0])
    out = lw.new_act(n.output[0])
    rows = lw.act_rows(n.output[0])
    budget = hw.sram_bytes("weight") // 2
    half = max(1, budget // LINE)
    limit = 16383 // elem
    d = lw.gi.groups[0].head_dim if axis is not None else None
    spans = [(h * d, (h + 1) * d, h) for h in range((N if axis == 1 else K) // d)] if d else [(0, None, None)]
    tile = 0
    for lo, hi, head in spans:
        k_lo, k_hi = (lo, hi) if axis == 0 else (0, K)
        n_lo, n_hi = (lo, hi) if axis == 1 else (0, N)
        if transposed:
            tk = min(k_hi - k_lo, limit)
            tn = min(n_hi - n_lo, max(1, budget // (tk * elem)), 16383)
        else:
            tn = min(n_hi - n_lo, limit)
            tk = min(k_hi - k_lo, max(1, budget // (tn * elem)), 16383)
        for n0 in range(n_lo, n_hi, tn):
            for k0 in range(k_lo, k_hi, tk):
                cn, ck = min(tn, n_hi - n0), min(tk, k_hi - k0)
                if transposed:
                    load = {"rows": cn, "row_bytes": ck * elem, "stride": K * elem, "off": (n0 * K + k0) * elem}
                else:
                    load = {"rows": ck, "row_bytes": cn * elem, "stride": N * elem, "off": (k0 * N + n0) * elem}
                wbuf = (tile % 2) * half
                mask = {"hmask": int(head is not None), "head": head or 0}
                e.emit("load", lw.weights[w], buf=BUF["weight"], sram=wbuf, rows=load["rows"],
                       row_bytes=load["row_bytes"], stride=load["stride"], dram=e.dram(lw.weights[w], load["off"]),
                       **mask)
                acc = int(k0 > k_lo or bool(axis == 0 and head))
                # operands start at the tile's column offsets (activation rows are ACT_BYTES per element)
                e.emit("gemm", inp=(a + k0 * ACT_BYTES // LINE) % (1 << 16), wgt=wbuf,
                       out=(out + n0 * ACT_BYTES // LINE) % (1 << 16), rows=rows, k=ck, n=cn, acc=acc, live=1, **mask)
                tile += 1
    if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in lw.gi.inits:
        b = lw.load_weight_row(n.input[2])
        e.emit("elt", op=_ELT["add"], a=out, b=b, out=out, rows=rows, cols=min(N, 16383), live=1, bcast=1)


def lower_norm(lw: Lowering, n: onnx.NodeProto) -> None:
    x, out = n.input[0], n.output[0]
    cols = lw.cols(out) or lw.cols(x) or 1
    a = lw.addr_of(x)
    b = 0
    for i in n.input[1:]:
        w = lw.gi.weight_source(i) if i else None
        if w is not None:
            b = lw.load_weight_row(w)
    op = NORM_OF.get(n.op_type, "rmsnorm")
    lw.e.emit("elt", op=_ELT[op], a=a, b=b, out=lw.new_act(out), rows=lw.act_rows(out), cols=cols, live=1, bcast=1)


def lower_head_select(lw: Lowering, n: onnx.NodeProto) -> None:
    k = _const(lw, n.input[2]) if len(n.input) > 2 else None
    before = lw.heads_live  # a cascade ranks the groups kept so far: the ratio is of those
    keep = (k or before) / before
    lw.heads_live = int(k or before)
    lw.e.emit("cfg.prune", token_keep=FIXED, head_keep=fixed(keep), value_keep=FIXED)
    lw.e.emit("topk", kind=TOPK["heads"], head=0, src=lw.head_acc(), idx_in=1, idx_out=1)


def lower_gather_tokens(lw: Lowering, n: onnx.NodeProto) -> None:
    cols = lw.cols(n.output[0]) or lw.cols(n.input[0]) or 1
    lw.e.emit("compact", buf=0, src=lw.addr_of(n.input[0]), dst=lw.new_act(n.output[0]), idx=SLOT_KEPT, cols=cols)


def lower_scatter_tokens(lw: Lowering, n: onnx.NodeProto) -> None:
    cols = lw.cols(n.output[0]) or 1
    lw.e.emit("elt", op=_ELT["copy"], a=lw.addr_of(n.input[2]), b=0, out=lw.new_act(n.output[0]),
              rows=lw.act_rows(n.input[0]), cols=cols, live=0)
