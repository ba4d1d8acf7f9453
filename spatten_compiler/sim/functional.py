"""Functional mode for attention streams: the numbers, in NumPy, decided by the hardware's own
instructions (which tokens and heads survive, which rows refetch K LSBs, the attention outputs).

:class:`Functional` executes the attention instruction classes (registry :data:`EXEC`, keyed by
mnemonic) on per-layer Q, K, V given as arrays (:class:`AttentionData`); K and V are stored as the
quantizer's MSB / LSB planes (``runtime.quant_ops.split``) exactly as ``store.kv`` would write them,
and ``fetch.kv`` / ``qk pred=1`` read them back plane by plane. It also serves as the timing run's
``decide`` (kept sets and LSB rows come from the data instead of the ratios), so one call gives both.

Rules follow the reference runtime's SpAtten ops: token importance = column sums of P over live
query rows and heads (``score=mean`` / ``value``: per valid row / weighted by the key's V norm),
accumulated across layers and compacted with the kept tokens; top-k keeps the highest scores, ties
to the lower index, ascending order out; the LSB predicate is ``max P <= threshold`` (``rule=low``)
or ``max P > threshold`` (``rule=peak``); predicated rows use the K and V LSB planes; local value
pruning keeps, per query row, the ``ceil(n x keep)`` largest probabilities (ties kept; ``topk
kind=values`` lists the union of the rows' V rows, the ones fetched); P x V without renormalising.
Query row ``r`` of ``qk`` / ``pv`` is entry ``r`` of index slot 0, a row number of the Q activation.
Whole emitted models run through :mod:`.model_run` (this class for attention, the reference
runtime for the host ops).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from spatten_compiler.backend.isa import Instr
from spatten_compiler.errors import SpattencError
from spatten_compiler.runtime.quant_ops import dequantize_msb, split

Exec = Callable[["Functional", Instr], None]
EXEC: dict[str, Exec] = {}


def executes(*mnemonics: str) -> Callable[[Exec], Exec]:
    def deco(fn: Exec) -> Exec:
        for m in mnemonics:
            EXEC[m] = fn
        return fn
    return deco


@dataclasses.dataclass
class AttentionData:
    """One layer's inputs: q [query rows, heads, dim], k / v [tokens, kv heads, dim] (float32);
    ``k_planes`` / ``v_planes``: the planes ``store.kv`` wrote (default: per-head quantization of k / v)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    k_planes: Planes | None = None
    v_planes: Planes | None = None
    # the graph's K^T operand is a transposed view (K rows contiguous): a one-row Q x K then rounds as
    # BLAS does on that layout (gemv over rows), which differs from a contiguous K^T by an ulp
    kt_view: bool = False


@dataclasses.dataclass
class Planes:
    msb: np.ndarray
    lsb: np.ndarray
    scale: np.ndarray  # per head, or per element ([rows, heads, dim], broadcast from the graph's scale)
    step: float

    def read(self, rows: np.ndarray, head: int, full: bool) -> np.ndarray:
        s = self.scale[head] if self.scale.ndim == 1 else self.scale[rows, head]
        if full or self.step == 1:
            q = self.msb[rows, head].astype(np.int32) * int(round(self.step)) + self.lsb[rows, head].astype(np.int32)
            return (q.astype(np.float32) * s).astype(np.float32)
        return dequantize_msb(self.msb[rows, head], s, np.float32(self.step))


def quantize_planes(x: np.ndarray, msb_bits: int, lsb_bits: int) -> Planes | None:
    """Symmetric per-head quantization into MSB / LSB planes; None for float32 (32-bit) storage."""
    if msb_bits >= 16:
        return None
    qmax = np.float32(2 ** (msb_bits + lsb_bits - 1) - 1)
    scale = (np.abs(x).max(axis=(0, 2)) / qmax).astype(np.float32)
    scale[scale == 0] = 1
    step = np.float32(2**lsb_bits)
    msb, lsb = split(x, scale[None, :, None], step, qmax)
    return Planes(msb, lsb, scale, float(step))


class Functional:
    """Runs the attention instructions in program order on ``data`` (one AttentionData per layer)."""

    def __init__(self, data: list[AttentionData] | dict[int, AttentionData]) -> None:
        self.data = data
        self.ctx = None  # the timing Ctx whose machine state (config, index slots) we share
        self.planes: dict[tuple[int, str], Planes | None] = {}
        self.scores: dict[int, np.ndarray] = {}  # head -> S / P of the current layer [rows, keys]
        self.keys: dict[int, np.ndarray] = {}  # head -> key rows of its scores
        self.rows: dict[int, np.ndarray] = {}  # head -> query rows of its scores
        self.pred: dict[int, np.ndarray] = {}  # head -> predicated rows (bool)
        self.vmask: dict[int, np.ndarray] = {}  # head -> probabilities local value pruning keeps (bool)
        self.out: dict[int, np.ndarray] = {}  # layer -> attention output [rows, heads, dim]
        self.out_rows: dict[int, np.ndarray] = {}  # layer -> query rows P x V wrote
        self.token_acc: np.ndarray | None = None
        # token accumulators kept across token blocks (a decoder's KV-cache eviction, evict-kv's
        # past_importance): score-buffer address -> importance by K/V row number
        self.acc_at: dict[int, np.ndarray] = {}
        self.kv_kept: list[tuple[int, np.ndarray]] = []  # (layer, K/V rows kept) of each eviction top-k
        self.kv_importance: dict[int, np.ndarray] = {}  # K/V list slot -> its eviction accumulator (by row number)
        self.head_acc: np.ndarray | None = None
        self.kept_tokens: list[np.ndarray] = []  # each topk kind=tokens, in order
        self.kept_heads: list[np.ndarray] = []
        self.lsb_log: list[tuple[int, int, int]] = []  # (layer, head, predicated rows)
        self.lsb_sets: list[tuple[int, int, np.ndarray]] = []  # (layer, head, predicated query rows)
        self.recompute = np.zeros(0, np.int64)  # score rows of the last qk pred=1

    # ---- the timing run's "decide" protocol --------------------------------------------------
    def topk(self, ctx, ins: Instr, cand: np.ndarray, k: int) -> np.ndarray:
        kind = ins.symbol("kind")
        if kind == "values":
            return self._values(ins["head"], cand, ctx.m.value_keep)
        if kind == "tokens" and _kv_list(ins["idx_out"]):  # KV-cache eviction: the layer's own accumulator
            score = self.acc_at[ins["src"]][cand].astype(np.float64)
            score = np.where(_protected(ctx.m, cand.size), np.inf, score)
            kept = cand[np.sort(np.argsort(-score, kind="stable")[:k])]
            self.kv_kept.append((ctx.m.layer, kept))
            self.kv_importance[ins["idx_out"]] = self.acc_at[ins["src"]]
            return kept
        if kind == "tokens":
            score = self.token_acc[cand].astype(np.float64)
            score = np.where(_protected(ctx.m, cand.size), np.inf, score)
        else:  # K/V groups: a group's score is the sum of its query heads' (prune-heads' rule)
            score = self.head_acc.reshape(-1, ctx.m.group).sum(axis=1)[cand].astype(np.float64)
        order = np.argsort(-score, kind="stable")[:k]  # ties: the lower index first
        kept = cand[np.sort(order)]
        (self.kept_tokens if kind == "tokens" else self.kept_heads).append(kept)
        return kept

    def _values(self, head: int, cand: np.ndarray, keep: float) -> np.ndarray:
        """Local value pruning (runtime LocalValuePrune): per query row the ceil(n x keep) largest
        probabilities, n = keys with P > 0; the V rows fetched are the union over the rows."""
        p = self.scores[head]
        keep32 = np.float32(keep)
        kmax = max(1, int(np.ceil(np.float32(p.shape[-1]) * keep32)))
        n = (p > 0).sum(axis=-1, keepdims=True).astype(np.float32)
        k = np.clip(np.ceil(n * keep32), 1, kmax).astype(np.int64)
        top = -np.sort(-p, axis=-1)[..., :kmax]
        thr = np.take_along_axis(top, k - 1, axis=-1)
        self.vmask[head] = p >= thr
        used = self.keys[head][self.vmask[head].any(axis=0)]
        return cand[np.isin(cand, used)]

    def lsb_rows(self, ctx, head: int) -> int:
        return int(self.pred.get(head, np.zeros(0, bool)).sum())

    # ---- execution -----------------------------------------------------------------------------
    def step(self, ins: Instr) -> None:
        fn = EXEC.get(ins.mnemonic)
        if fn is not None:
            fn(self, ins)

    def layer_data(self) -> AttentionData:
        return self.data[self.ctx.m.layer]

    def kv(self, which: str) -> Planes | None:
        m = self.ctx.m
        key = (m.layer, which)
        if key not in self.planes:
            d = self.layer_data()
            given = d.k_planes if which == "k" else d.v_planes
            self.planes[key] = given if given is not None else (
                quantize_planes(d.k, m.k_msb, m.k_lsb) if which == "k" else quantize_planes(d.v, m.v_bits, 0))
        return self.planes[key]

    def read(self, which: str, rows: np.ndarray, head: int, full: bool) -> np.ndarray:
        """K or V rows of query head ``head`` (its K/V head under GQA), one plane or both."""
        d = self.layer_data()
        kvh = head * d.k.shape[1] // d.q.shape[1]
        planes = self.kv(which)
        if planes is None:
            return getattr(d, which)[rows, kvh]
        return planes.read(rows, kvh, full)


def _kv_list(slot: int) -> bool:
    """Index slots 16..1023 hold the decoders' per-layer K/V lists (row numbers kept across blocks)."""
    return 16 <= slot < 1024


@executes("cfg.attn")
def _new_layer(f: Functional, ins: Instr) -> None:
    # runs before the timing handler configures the machine: read the fields themselves
    f.scores.clear()
    f.keys.clear()
    f.pred.clear()
    f.vmask.clear()
    f.planes.pop((ins["layer"], "k"), None)  # this block's K/V (a decoder block adds rows)
    f.planes.pop((ins["layer"], "v"), None)
    if ins["layer"] == 0:  # a new pass: importance starts from zero
        f.token_acc = np.zeros(max(ins["tokens"], 1), np.float32)
        f.head_acc = np.zeros(ins["heads"], np.float32)
        if ins["past"] == 0:  # the prompt block: accumulators kept across blocks start too
            f.acc_at.clear()
    f.out[ins["layer"]] = np.zeros_like(f.data[ins["layer"]].q)
    f.out_rows.pop(ins["layer"], None)


def _scores(f: Functional, head: int, rows: np.ndarray, keys: np.ndarray, full: bool) -> np.ndarray:
    """Scores of query rows ``rows`` (rows of Q; position past + row) against key rows ``keys``."""
    m = f.ctx.m
    q = np.ascontiguousarray(f.layer_data().q[:, head])
    rows_k = np.ascontiguousarray(f.read("k", keys, head, full))
    k = rows_k.T if f.layer_data().kt_view else np.ascontiguousarray(rows_k.T)
    scale = np.float32(m.scale) if m.scale else np.float32(1) / np.float32(np.sqrt(m.head_dim))
    # every Q row in one product, then the live rows (the same float rounding as the graph's MatMul)
    s = ((q @ k) / scale if m.scale_div else (q @ k) * scale)[rows]
    if m.causal:
        s = np.where(keys[None, :] > (m.past + rows)[:, None], -np.inf, s)
    return s.astype(np.float32)


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@executes("qk")
def _qk(f: Functional, ins: Instr) -> None:
    m, h = f.ctx.m, ins["head"]
    if not m.head_live(h):
        return
    keys = m.slot(ins["idx"])
    live = m.slot(0)  # the live query rows (cascade: pruned tokens' queries are gone too)
    if ins["pred"]:
        sel = np.flatnonzero(f.pred.get(h, np.zeros(live.size, bool)))
        if sel.size:  # the predicated rows' scores with MSB+LSB (evaluated as one product, as the graph does)
            f.scores[h][sel] = _scores(f, h, live, keys, True)[sel]
        f.recompute = sel
    else:
        f.scores[h], f.keys[h], f.rows[h] = _scores(f, h, live, keys, m.k_lsb == 0), keys, live
        f.pred.pop(h, None)
        f.vmask.pop(h, None)


@executes("softmax")
def _softmax_rows(f: Functional, ins: Instr) -> None:
    h = ins["head"]
    if h not in f.scores:
        return
    if ins["pred"]:
        rows = f.recompute
        if rows.size:
            f.scores[h][rows] = _softmax(f.scores[h])[rows]
    else:
        f.scores[h] = _softmax(f.scores[h])


REQUANT = {  # cfg.quant rule -> rows that fetch LSBs, from the MSB-only probabilities
    "low": lambda p, thr: p.max(axis=-1) <= thr,
    "peak": lambda p, thr: ~(p.max(axis=-1) <= thr),
}


@executes("requant")
def _requant(f: Functional, ins: Instr) -> None:
    h, m = ins["head"], f.ctx.m
    if h not in f.scores:
        return
    rule = REQUANT.get(m.rule)
    if rule is None:
        raise SpattencError(f"functional mode: requantization rule '{m.rule}' is not implemented (low, peak are)")
    f.pred[h] = rule(f.scores[h], np.float32(m.threshold))
    f.lsb_log.append((m.layer, h, int(f.pred[h].sum())))
    f.lsb_sets.append((m.layer, h, f.rows[h][f.pred[h]]))


@executes("accum")
def _accum(f: Functional, ins: Instr) -> None:
    h, m = ins["head"], f.ctx.m
    if ins.symbol("kind") == "token" and h in f.scores and _kv_list(ins["idx"]):
        acc = f.acc_at.setdefault(ins["dst"], np.zeros(max(m.tokens, 1), np.float32))
        np.add.at(acc, f.keys[h], f.scores[h].sum(axis=0).astype(np.float32))
    elif ins.symbol("kind") == "token" and h in f.scores:
        col = f.scores[h].sum(axis=0)
        if m.score_rule == "value":
            col = col * np.linalg.norm(f.layer_data().v[f.keys[h], h * f.layer_data().v.shape[1] // m.heads], axis=-1)
        if m.score_rule in ("mean", "value"):
            col = col / max(1, f.scores[h].shape[0])
        np.add.at(f.token_acc, f.keys[h], col.astype(np.float32))
    elif ins.symbol("kind") == "head" and m.head_live(h):
        rows = f.out_rows.get(m.layer, m.slot(0))
        f.head_acc[h] += np.abs(f.out[m.layer][rows, h]).sum()


@executes("pv")
def _pv(f: Functional, ins: Instr) -> None:
    m, h = f.ctx.m, ins["head"]
    if h not in f.scores:
        return
    keys = f.keys[h]
    kept = np.isin(keys, m.slot(ins["idx"]))  # local value pruning: the other rows are never read
    p = f.scores[h] if h not in f.vmask else np.where(f.vmask[h], f.scores[h], np.float32(0))
    p = np.where(kept[None, :], p, np.float32(0))
    rows = f.rows[h]
    pred = f.pred.get(h, np.zeros(rows.size, bool))
    # unread V rows have probability 0: the sum runs over every key (same terms, the graph's rounding);
    # predicated rows read the V LSB plane too
    o = p @ f.read("v", keys, h, not pred.size or False)
    if pred.any():
        o = np.where(pred[:, None], p @ f.read("v", keys, h, True), o)
    f.out[m.layer][rows, h] = o
    f.out_rows[m.layer] = rows


@executes("compact")
def _compact(f: Functional, ins: Instr) -> None:
    if ins.symbol("buf") == "score" and f.token_acc is not None:  # the token accumulator follows the kept rows
        idx = f.ctx.m.slot(ins["idx"])
        acc = np.zeros_like(f.token_acc)
        acc[:idx.size] = f.token_acc[idx]
        f.token_acc = acc


def _protected(m, n: int) -> np.ndarray:
    """Candidates a token top-k never drops: the first ``protect_first`` (sinks) and the last
    ``protect_recent`` (the recent window) of the ``n`` candidates."""
    prot = np.zeros(n, dtype=bool)
    prot[:m.protect_first] = True
    if m.protect_recent:
        prot[-m.protect_recent:] = True
    return prot
