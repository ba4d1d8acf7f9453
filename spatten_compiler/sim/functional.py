"""Functional mode for attention streams: the numbers, in NumPy, decided by the hardware's own
instructions (which tokens and heads survive, which rows refetch K LSBs, the attention outputs).

:class:`Functional` executes the attention instruction classes (registry :data:`EXEC`, keyed by
mnemonic) on per-layer Q, K, V given as arrays (:class:`AttentionData`); K and V are stored as the
quantizer's MSB / LSB planes (``runtime.quant_ops.split``) exactly as ``store.kv`` would write them,
and ``fetch.kv`` / ``qk pred=1`` read them back plane by plane. It also serves as the timing run's
``decide`` (kept sets and LSB rows come from the data instead of the ratios), so one call gives both.

Rules follow the reference runtime's SpAtten ops: token importance = column sums of P over live
query rows and heads, accumulated across layers; top-k keeps the highest scores, ties to the lower
index, ascending order out; the LSB predicate is ``max P <= threshold``; P x V uses the kept V rows
without renormalising. Not covered: whole-model binaries from ``emit`` (projections, FFN, norms),
and data read from DRAM bytes (the arrays are addressed by layer, head and row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from spatten_compiler.backend.isa import Instr
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
    """One layer's inputs: q [query rows, heads, dim], k / v [tokens, heads, dim] (float32)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray


@dataclasses.dataclass
class Planes:
    msb: np.ndarray
    lsb: np.ndarray
    scale: np.ndarray  # per head
    step: float

    def read(self, rows: np.ndarray, head: int, full: bool) -> np.ndarray:
        s = self.scale[head]
        if full or self.step == 1:
            q = self.msb[rows, head].astype(np.float32) * self.step + self.lsb[rows, head]
            return (q * s).astype(np.float32)
        return dequantize_msb(self.msb[rows, head], s, np.float32(self.step))


def quantize_planes(x: np.ndarray, msb_bits: int, lsb_bits: int) -> Planes | None:
    """Symmetric per-head quantization into MSB / LSB planes; None for float32 (32-bit) storage."""
    if msb_bits >= 31:
        return None
    qmax = np.float32(2 ** (msb_bits + lsb_bits - 1) - 1)
    scale = (np.abs(x).max(axis=(0, 2)) / qmax).astype(np.float32)
    scale[scale == 0] = 1
    step = np.float32(2**lsb_bits)
    msb, lsb = split(x, scale[None, :, None], step, qmax)
    return Planes(msb, lsb, scale, float(step))


class Functional:
    """Runs the attention instructions in program order on ``data`` (one AttentionData per layer)."""

    def __init__(self, data: list[AttentionData]) -> None:
        self.data = data
        self.ctx = None  # the timing Ctx whose machine state (config, index slots) we share
        self.planes: dict[tuple[int, str], Planes | None] = {}
        self.scores: dict[int, np.ndarray] = {}  # head -> S / P of the current layer [rows, keys]
        self.keys: dict[int, np.ndarray] = {}  # head -> key rows of its scores
        self.pred: dict[int, np.ndarray] = {}  # head -> predicated rows (bool)
        self.out: dict[int, np.ndarray] = {}  # layer -> attention output [rows, heads, dim]
        self.token_acc: np.ndarray | None = None
        self.head_acc: np.ndarray | None = None
        self.kept_tokens: list[np.ndarray] = []  # each topk kind=tokens, in order
        self.kept_heads: list[np.ndarray] = []
        self.lsb_log: list[tuple[int, int, int]] = []  # (layer, head, predicated rows)
        self.recompute = np.zeros(0, np.int64)  # score rows of the last qk pred=1

    # ---- the timing run's "decide" protocol --------------------------------------------------
    def topk(self, ctx, ins: Instr, cand: np.ndarray, k: int) -> np.ndarray:
        kind = ins.symbol("kind")
        if kind == "tokens":
            score = self.token_acc[cand].astype(np.float64)
            m = ctx.m
            prot = np.zeros(cand.size, dtype=bool)
            prot[:m.protect_first] = True
            if m.protect_recent:
                prot[-m.protect_recent:] = True
            score = np.where(prot, np.inf, score)
        elif kind == "heads":
            score = self.head_acc[cand].astype(np.float64)
        else:
            p = self.scores[ins["head"]]
            col = np.zeros(int(cand.max()) + 1 if cand.size else 0)
            col[self.keys[ins["head"]]] = p.sum(axis=0)
            score = col[cand]
        order = np.argsort(-score, kind="stable")[:k]  # ties: the lower index first
        kept = cand[np.sort(order)]
        (self.kept_tokens if kind == "tokens" else self.kept_heads if kind == "heads" else []).append(kept)
        return kept

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
            self.planes[key] = (quantize_planes(d.k, m.k_msb, m.k_lsb) if which == "k"
                                else quantize_planes(d.v, m.v_bits, 0))
        return self.planes[key]

    def read(self, which: str, rows: np.ndarray, head: int, full: bool) -> np.ndarray:
        planes = self.kv(which)
        if planes is None:
            return getattr(self.layer_data(), which)[rows, head]
        return planes.read(rows, head, full)


@executes("cfg.attn")
def _new_layer(f: Functional, ins: Instr) -> None:
    # runs before the timing handler configures the machine: read the fields themselves
    f.scores.clear()
    f.keys.clear()
    f.pred.clear()
    if ins["layer"] == 0:  # a new pass: importance starts from zero
        f.token_acc = np.zeros(max(ins["tokens"], 1), np.float32)
        f.head_acc = np.zeros(ins["heads"], np.float32)
    f.out.setdefault(ins["layer"], np.zeros_like(f.data[ins["layer"]].q))


def _scores(f: Functional, head: int, rows: np.ndarray, keys: np.ndarray, full: bool) -> np.ndarray:
    """Scores of query rows ``rows`` (rows of Q; position past + row) against key rows ``keys``."""
    m = f.ctx.m
    q = f.layer_data().q[rows, head]
    k = f.read("k", keys, head, full)
    s = (q @ k.T) / np.float32(np.sqrt(m.head_dim))
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
        if sel.size:
            f.scores[h][sel] = _scores(f, h, live[sel], keys, True)
        f.recompute = sel
    else:
        f.scores[h], f.keys[h] = _scores(f, h, live, keys, m.k_lsb == 0), keys


@executes("softmax")
def _softmax_rows(f: Functional, ins: Instr) -> None:
    h = ins["head"]
    if h not in f.scores:
        return
    if ins["pred"]:
        rows = f.recompute
        if rows.size:
            f.scores[h][rows] = _softmax(f.scores[h][rows])
    else:
        f.scores[h] = _softmax(f.scores[h])


@executes("requant")
def _requant(f: Functional, ins: Instr) -> None:
    h = ins["head"]
    if h not in f.scores:
        return
    f.pred[h] = f.scores[h].max(axis=-1) <= np.float32(f.ctx.m.threshold)
    f.lsb_log.append((f.ctx.m.layer, h, int(f.pred[h].sum())))


@executes("accum")
def _accum(f: Functional, ins: Instr) -> None:
    h = ins["head"]
    if ins.symbol("kind") == "token" and h in f.scores:
        np.add.at(f.token_acc, f.keys[h], f.scores[h].sum(axis=0))
    elif ins.symbol("kind") == "head" and f.ctx.m.head_live(h):
        f.head_acc[h] += np.abs(f.out[f.ctx.m.layer][f.ctx.m.slot(0), h]).sum()


@executes("pv")
def _pv(f: Functional, ins: Instr) -> None:
    m, h = f.ctx.m, ins["head"]
    if h not in f.scores:
        return
    kept = np.isin(f.keys[h], m.slot(ins["idx"]))  # local V pruning: the other rows are never read
    f.out[m.layer][m.slot(0), h] = f.scores[h][:, kept] @ f.read("v", f.keys[h][kept], h, True)
