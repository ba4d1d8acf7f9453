"""Timing mode: what each instruction class costs, in cycles and DRAM bytes.

One handler per mnemonic in :data:`PLAN` (registered with :func:`plans`; nothing dispatches with
if/elif over opcodes). Handlers run in program order: each updates the machine state and returns
the instruction's :class:`DramWork` (bytes, channels) or :class:`UnitWork` (a compute unit's
cycles) or None (an issue cycle). The engine then schedules that work on the three stages.

Decisions that depend on data (which tokens and heads survive, which rows need LSBs) come from a
functional run when there is one (``Ctx.decide``), else from the stream's own ratios: top-k keeps
``ceil(n * ratio)`` (protected tokens, the rest spread evenly) and a fixed fraction of head-rows
needs LSBs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from spatten_compiler.backend.isa import Instr
from spatten_compiler.sim.dram import BUFFER_CATEGORY, PLANE_CATEGORY, TENSOR_CATEGORY, Dram
from spatten_compiler.sim.hw import SimHw
from spatten_compiler.sim.machine import LIVE_HEADS, Machine
from spatten_compiler.sim.topk import topk_cycles

NO_LAYER = 0xFFFF


@dataclasses.dataclass
class DramWork:
    category: str
    layer: int
    counts: np.ndarray  # transactions per channel
    requested: int
    write: bool
    tx: np.ndarray | None = None  # transaction numbers, only when tracing


@dataclasses.dataclass
class UnitWork:
    unit: str
    cycles: float
    latency: float
    head: int = -1
    streams: bool = False


Work = DramWork | UnitWork | None
Handler = Callable[["Ctx", Instr], Work]
PLAN: dict[str, Handler] = {}


def plans(*mnemonics: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for m in mnemonics:
            PLAN[m] = fn
        return fn
    return deco


@dataclasses.dataclass
class Ctx:
    hw: SimHw
    dram: Dram
    m: Machine = dataclasses.field(default_factory=Machine)
    lsb_fraction: float = 0.07  # head-rows needing LSBs when no functional run decides (authors' GPT-2: 7%)
    decide: Any = None  # functional run: .topk(ctx, ins, cand, k) -> kept, .lsb_rows(ctx, head) -> rows
    tensor: Any = None  # the tensor-table entry of the current instruction (from its relocation), if any
    flops: float = 0.0
    counters: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    unit_free: dict[str, float] = dataclasses.field(default_factory=dict)
    unit_busy: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    chain: dict[int, tuple[float, float, float]] = dataclasses.field(default_factory=dict)
    _lsb_acc: float = 0.0
    current_head: int = 0  # query head of the last live per-head instruction

    def predicate_rows(self, rows: int) -> int:
        """Predicated rows of one head: error diffusion keeps the run's total at ``lsb_fraction``."""
        self._lsb_acc += rows * self.lsb_fraction
        n = min(rows, int(self._lsb_acc + 1e-9))
        self._lsb_acc -= n
        return n

    def query_head(self, kv_head: int) -> int:
        """The query head a K/V fetch serves: the one whose per-head instructions ran last (the stream
        fetches each query head's K/V right before or after them), if it is of that K/V head's group."""
        g = self.m.group
        return self.current_head if self.current_head // g == kv_head else kv_head * g

    def layer(self) -> int:
        t = self.tensor
        return t.layer if t is not None and t.layer != NO_LAYER else self.m.layer

    def transfer(self, category: str, starts: np.ndarray, lengths: np.ndarray, write: bool = False) -> DramWork:
        counts, first, n = self.dram.channel_counts(starts, lengths)
        tx = None
        if self.dram.trace is not None:
            tx = np.concatenate([np.arange(f, f + c) for f, c in zip(first.tolist(), n.tolist()) if c] or [first[:0]])
        return DramWork(category, self.layer(), counts, int(lengths.sum()), write, tx)

    def run_unit(self, w: UnitWork, t: float) -> tuple[float, float]:
        """Occupy a compute unit; return (compute stage free to issue again, result ready).

        The compute stage issues one instruction per cycle to its units (Q x K array, softmax, P x V
        array, top-k engines, accumulators, GEMM, element-wise), which run concurrently. An
        instruction waits for its unit and for the previous result of the same head: a streaming
        consumer (softmax behind Q x K, P x V behind softmax) starts once the producer's first
        results leave its pipeline and cannot finish before it; others wait for the whole result.
        """
        start = max(t, self.unit_free.get(w.unit, 0.0))
        prev = self.chain.get(w.head) if w.head >= 0 else None
        end = start + w.cycles
        if prev is not None:
            p_start, p_end, p_ready = prev
            if w.streams:
                start = max(start, p_start + (p_ready - p_end))
                end = max(start + w.cycles, p_end + 1)
            else:
                start = max(start, p_ready)
                end = start + w.cycles
        self.unit_free[w.unit] = end
        self.unit_busy[w.unit] += w.cycles
        ready = end + w.latency
        if w.head >= 0:
            self.chain[w.head] = (start, end, ready)
        return t + 1, ready


def _spread(n: int, total: int) -> np.ndarray:
    """n of 0..total-1, evenly spread (where timing-only runs put the kept entries)."""
    if n >= total:
        return np.arange(total)
    return np.floor(np.arange(n) * (total / max(n, 1))).astype(np.int64)


@plans("finish", "sync.compute")
def _issue(ctx: Ctx, ins: Instr) -> Work:
    return None


@plans("sync.load", "sync.store")
def _nothing(ctx: Ctx, ins: Instr) -> Work:
    return UnitWork("sync", 0, 0)


CONFIGURE = {"cfg.attn": Machine.configure_attention, "cfg.quant": Machine.configure_quant,
             "cfg.prune": Machine.configure_prune}


@plans(*CONFIGURE)
def _configure(ctx: Ctx, ins: Instr) -> Work:
    CONFIGURE[ins.mnemonic](ctx.m, ins.fields)
    return None


def _category(ctx: Ctx, buf: str) -> str:
    if buf != "q" and ctx.tensor is not None:
        return TENSOR_CATEGORY[ctx.tensor.kind]
    return BUFFER_CATEGORY[buf]


@plans("load", "store")
def _dma(ctx: Ctx, ins: Instr) -> Work:
    f = ins.fields
    if f.get("hmask") and not ctx.m.head_live(f["head"]):
        ctx.counters["skipped_transfers"] += 1
        return UnitWork("sync", 0, 0)
    rows, row = ctx.m.rows(f["rows"], f["live"]), f["row_bytes"]
    if ins.mnemonic == "load" and ins.symbol("buf") == "index":
        # `sram` names the index slot filled, one entry per row (token ids for embedding gathers);
        # timing-only runs do not know the ids: rows 0..n-1 stand in for them
        ctx.m.set_slot(f["sram"], np.arange(rows, dtype=np.int64))
    stride = f["stride"] or row
    if stride == row:  # one contiguous region
        starts, lengths = np.array([f["dram"]], dtype=np.int64), np.array([rows * row], dtype=np.int64)
    else:
        starts = f["dram"] + np.arange(rows, dtype=np.int64) * stride
        lengths = np.full(rows, row, dtype=np.int64)
    return ctx.transfer(_category(ctx, ins.symbol("buf")), starts, lengths, write=ins.mnemonic == "store")


@plans("fetch.rows")
def _gather(ctx: Ctx, ins: Instr) -> Work:
    f = ins.fields
    rows = ctx.m.slot(f["idx"])
    cat = TENSOR_CATEGORY[ctx.tensor.kind] if ctx.tensor is not None else "weights"  # tables are weights
    return ctx.transfer(cat, f["dram"] + rows * f["row_bytes"], np.full(rows.size, f["row_bytes"], dtype=np.int64))


@plans("fetch.kv")
def _fetch_kv(ctx: Ctx, ins: Instr) -> Work:
    f, m = ins.fields, ctx.m
    # `head` is a K/V head; the predicate belongs to the query head the fetch serves (its group's first
    # live one under GQA, where each query head fetches its group's rows)
    if not m.kv_head_live(f["head"]) or (f["pred"] and not m.predicated.get(ctx.query_head(f["head"]), 0)):
        ctx.counters["skipped_fetches"] += 1
        return UnitWork("sync", 0, 0)
    rows = m.slot(f["idx"])
    cat = PLANE_CATEGORY[(ins.symbol("kv"), ins.symbol("plane"))]
    ctx.counters[f"rows_{cat}"] += rows.size
    return ctx.transfer(cat, f["dram"] + rows * f["row_bytes"], np.full(rows.size, f["row_bytes"], dtype=np.int64))


@plans("store.kv")
def _store_kv(ctx: Ctx, ins: Instr) -> Work:
    f, m = ins.fields, ctx.m
    # a K/V head none of whose query heads is live is not written - unless later token blocks read the
    # cache again (a decoder: cfg.attn tokens beyond this block), where a later step may keep it
    if not m.kv_head_live(f["head"]) and m.tokens <= m.past + m.live:
        return UnitWork("sync", 0, 0)
    rows = m.rows(f["rows"], f["live"])
    cat = PLANE_CATEGORY[(ins.symbol("kv"), ins.symbol("plane"))]
    return ctx.transfer(cat, np.array([f["dram"]], dtype=np.int64), np.array([rows * f["row_bytes"]], dtype=np.int64),
                        write=True)


def _live_head(ctx: Ctx, ins: Instr) -> bool:
    if ctx.m.head_live(ins["head"]):
        ctx.current_head = ins["head"]
        return True
    ctx.counters["skipped_head_ops"] += 1
    return False


@plans("qk")
def _qk(ctx: Ctx, ins: Instr) -> Work:
    if not _live_head(ctx, ins):
        return None
    m, head = ctx.m, ins["head"]
    rows = m.predicated.get(head, 0) if ins["pred"] else m.live
    keys = m.slot(ins["idx"]).size
    m.score_keys = keys
    if not rows:
        return None
    ctx.flops += 2.0 * rows * keys * m.head_dim
    return UnitWork("qk", ctx.hw.qk_cycles(rows, keys, m.head_dim), ctx.hw.qk_latency, head, bool(ins["pred"]))


@plans("softmax")
def _softmax(ctx: Ctx, ins: Instr) -> Work:
    if not _live_head(ctx, ins):
        return None
    m, head = ctx.m, ins["head"]
    rows = m.predicated.get(head, 0) if ins["pred"] else m.live
    if not rows:
        return None
    return UnitWork("softmax", ctx.hw.softmax_cycles(rows, m.score_keys), ctx.hw.softmax_latency, head, True)


@plans("requant")
def _requant(ctx: Ctx, ins: Instr) -> Work:
    if not _live_head(ctx, ins):
        return None
    head, rows = ins["head"], ctx.m.live
    pred = ctx.decide.lsb_rows(ctx, head) if ctx.decide is not None else ctx.predicate_rows(rows)
    ctx.m.predicated[head] = pred
    ctx.counters["rows"] += rows
    ctx.counters["rows_lsb"] += pred
    # the row maximum is known as the row leaves softmax: no extra pass over the scores
    return UnitWork("requant", 0, ctx.hw.requant_latency, head, True)


@plans("accum")
def _accum(ctx: Ctx, ins: Instr) -> Work:
    if not _live_head(ctx, ins):
        return None
    kind = ins.symbol("kind")
    width = ctx.m.score_keys if kind == "token" else ctx.m.head_dim
    cycles = math.ceil(ctx.m.live * width / ctx.hw.softmax_parallelism)
    return UnitWork(f"accum.{kind}", cycles, 1, ins["head"], True)


def _keep(ctx: Ctx, ins: Instr, cand: np.ndarray, k: int) -> np.ndarray:
    """The kept candidates (ascending). Timing-only: protected tokens, then evenly spread."""
    if ctx.decide is not None:
        return ctx.decide.topk(ctx, ins, cand, k)
    if ins.symbol("kind") == "heads":
        return cand[:k]
    if ins.symbol("kind") == "tokens":
        m = ctx.m
        prot = np.zeros(cand.size, dtype=bool)
        prot[:m.protect_first] = True
        if m.protect_recent:
            prot[-m.protect_recent:] = True
        rest = np.flatnonzero(~prot)
        pick = rest[_spread(max(0, k - int(prot.sum())), rest.size)]
        return cand[np.sort(np.concatenate([np.flatnonzero(prot), pick]))]
    return cand[_spread(k, cand.size)]


@plans("topk")
def _topk(ctx: Ctx, ins: Instr) -> Work:
    m, kind = ctx.m, ins.symbol("kind")
    if kind == "values" and not _live_head(ctx, ins):
        return None
    if kind == "heads":  # ranks K/V groups (GQA; a group is one head otherwise): their query heads stay or go
        heads = m.slot(ins["idx_in"])
        heads = heads if heads.size or ins["idx_in"] != LIVE_HEADS else m.live_heads
        cand = np.unique(heads // m.group)
        k = m.keep_count(cand.size, m.head_keep)
    else:
        cand = m.slot(ins["idx_in"])
        ratio = m.token_keep if kind == "tokens" else m.value_keep
        protect = m.protect_first + m.protect_recent if kind == "tokens" else 0
        k = min(cand.size, max(m.keep_count(cand.size, ratio), protect))
    kept = _keep(ctx, ins, cand, k)
    n_in = cand.size
    if kind == "heads":  # counters in query heads
        kept, n_in = (kept[:, None] * m.group + np.arange(m.group)).reshape(-1), cand.size * m.group
    m.set_slot(ins["idx_out"], kept)
    ctx.counters[f"{kind}_in"] += n_in
    ctx.counters[f"{kind}_kept"] += kept.size
    engine = "topk.values" if kind == "values" else "topk.tokens"  # two engines (tokens/heads, local V)
    return UnitWork(engine, topk_cycles(int(cand.size), int(kept.size) // (m.group if kind == "heads" else 1),
                                      ctx.hw.topk_parallelism), 0,
                    ins["head"] if kind == "values" else -1)


@plans("pv")
def _pv(ctx: Ctx, ins: Instr) -> Work:
    if not _live_head(ctx, ins):
        return None
    m = ctx.m
    rows, values = m.live, m.slot(ins["idx"]).size
    ctx.flops += 2.0 * rows * values * m.head_dim
    # row-streaming behind softmax; the V fetch's token is already in the start time
    return UnitWork("pv", ctx.hw.pv_cycles(rows, values, m.head_dim), ctx.hw.pv_latency, ins["head"], True)


@plans("gemm")
def _gemm(ctx: Ctx, ins: Instr) -> Work:
    f = ins.fields
    if f.get("hmask") and not ctx.m.head_live(f["head"]):
        ctx.counters["skipped_head_ops"] += 1
        return None
    macs = ctx.m.rows(f["rows"], f["live"]) * f["k"] * f["n"]
    ctx.flops += 2.0 * macs
    return UnitWork("gemm", math.ceil(macs / ctx.hw.gemm_multipliers), 2)


@plans("elt")
def _elt(ctx: Ctx, ins: Instr) -> Work:
    f = ins.fields
    return UnitWork("elt", math.ceil(ctx.m.rows(f["rows"], f["live"]) * f["cols"] / ctx.hw.elementwise_lanes), 1)


@plans("compact")
def _compact(ctx: Ctx, ins: Instr) -> Work:
    return UnitWork("elt", math.ceil(ctx.m.slot(ins["idx"]).size * ins["cols"] / ctx.hw.elementwise_lanes), 1)


ILIST = {
    "iota": lambda m, f: np.arange(min(f["value"], m.live) if f["live"] else f["value"]),
    "append": lambda m, f: np.append(m.slot(f["dst"]), f["value"]),
    "copy": lambda m, f: m.slot(f["src"]).copy(),
}


@plans("ilist")
def _ilist(ctx: Ctx, ins: Instr) -> Work:
    ctx.m.set_slot(ins["dst"], ILIST[ins.symbol("op")](ctx.m, ins.fields).astype(np.int64))
    return None
