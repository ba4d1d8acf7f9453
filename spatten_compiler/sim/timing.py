"""Timing mode: what each instruction class costs, in cycles and DRAM bytes.

One handler per mnemonic in :data:`CHARGES` (registered with :func:`charges`; nothing dispatches
with if/elif over opcodes). A handler gets the run context, the instruction and its start cycle,
updates the machine state and returns the finish cycle. Compute latencies come from the hardware
description (:class:`~spatten_compiler.sim.hw.SimHw`); DRAM time from :class:`~spatten_compiler.sim.dram.Dram`.

Decisions that depend on data (which tokens/heads survive, which rows need LSBs) come from the
functional run when there is one (``ctx.oracle``), else from the stream's own ratios: top-k keeps
``ceil(n * ratio)`` (positions spread evenly) and a fixed fraction of head-rows need LSBs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable

import numpy as np

from spatten_compiler.backend.isa import Instr
from spatten_compiler.sim.dram import Dram
from spatten_compiler.sim.hw import SimHw
from spatten_compiler.sim.machine import Machine
from spatten_compiler.sim.topk import topk_cycles

Handler = Callable[["Ctx", Instr, float], "float | tuple[float, float]"]
CHARGES: dict[str, Handler] = {}

BUFFER_CATEGORY = {"q": "q", "k": "k_msb", "v": "v", "index": "indices", "score": "activations",
                   "weight": "weights", "act": "activations"}
PLANE_CATEGORY = {("k", "full"): "k_msb", ("k", "msb"): "k_msb", ("k", "lsb"): "k_lsb",
                  ("v", "full"): "v", ("v", "msb"): "v", ("v", "lsb"): "v"}


def charges(*mnemonics: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for m in mnemonics:
            CHARGES[m] = fn
        return fn
    return deco


@dataclasses.dataclass
class Ctx:
    hw: SimHw
    dram: Dram
    m: Machine = dataclasses.field(default_factory=Machine)
    lsb_fraction: float = 0.07  # head-rows needing LSBs when no functional run decides (authors' GPT-2: 7%)
    flops: float = 0.0
    counters: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    decide_lsb: Callable[[int], int] | None = None  # functional runs: head -> predicated rows
    unit_free: dict[str, float] = dataclasses.field(default_factory=dict)
    unit_busy: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    chain: dict[int, tuple[float, float, float]] = dataclasses.field(default_factory=dict)  # head -> start/end/ready
    _lsb_acc: float = 0.0

    def predicate_rows(self, rows: int) -> int:
        """Predicated rows of one head: error diffusion keeps the run's total at ``lsb_fraction``."""
        self._lsb_acc += rows * self.lsb_fraction
        n = min(rows, int(self._lsb_acc))
        self._lsb_acc -= n
        return n


    def run_unit(self, unit: str, t: float, cycles: float, latency: float, head: int = -1,
                 streams: bool = False) -> tuple[float, float]:
        """Occupy a compute unit; return (compute-stage issue done, result ready).

        The compute stage issues one instruction per cycle to its units (Q x K array, softmax, P x V
        array, top-k engine, accumulators, GEMM, element-wise), which run concurrently. An instruction
        waits for its unit and for the previous result of the same head: a streaming consumer
        (softmax behind Q x K, accumulation behind softmax) starts once the producer's first results
        leave its pipeline and cannot finish before it; others wait for the whole result.
        """
        start = max(t, self.unit_free.get(unit, 0.0))
        prev = self.chain.get(head)
        end = start + cycles
        if prev is not None:
            p_start, p_end, p_ready = prev
            if streams:
                start = max(start, p_start + (p_ready - p_end))
                end = max(start + cycles, p_end + 1)
            else:
                start = max(start, p_ready)
                end = start + cycles
        self.unit_free[unit] = end
        self.unit_busy[unit] += cycles
        ready = end + latency
        if head >= 0:
            self.chain[head] = (start, end, ready)
        return t + 1, ready


def _spread(n: int, total: int) -> np.ndarray:
    """n positions spread evenly over 0..total-1 (where timing-only runs put kept tokens)."""
    if n >= total:
        return np.arange(total)
    return np.floor(np.arange(n) * (total / max(n, 1))).astype(np.int64)


@charges("finish", "cfg.attn", "cfg.quant", "cfg.prune")
def _configure(ctx: Ctx, ins: Instr, t: float) -> float:
    return t + 1  # the configuration itself is snapshot in program order (machine.config_snapshots)


@charges("load", "store")
def _dma(ctx: Ctx, ins: Instr, t: float) -> float:
    f = ins.fields
    rows = ctx.m.rows(f["rows"], f["live"])
    if ins.symbol("buf") == "q":
        ctx.m.q_rows = rows
    stride = f["stride"] or f["row_bytes"]
    starts = f["dram"] + np.arange(rows, dtype=np.int64) * stride
    lengths = np.full(rows, f["row_bytes"], dtype=np.int64)
    if stride == f["row_bytes"] and rows:  # one contiguous region
        starts, lengths = starts[:1], np.array([rows * f["row_bytes"]], dtype=np.int64)
    return ctx.dram.transfer_arrays(t, BUFFER_CATEGORY[ins.symbol("buf")], ctx.m.cfg.layer, starts, lengths,
                                    write=ins.mnemonic == "store")


@charges("fetch.kv")
def _fetch_kv(ctx: Ctx, ins: Instr, t: float) -> float:
    f, m = ins.fields, ctx.m
    if not m.head_live(f["head"]) or (f["pred"] and not m.predicated.get(m.pred_key(f["head"]), 0)):
        ctx.counters["skipped_fetches"] += 1
        return t
    rows = m.slot(f["idx"])
    cat = PLANE_CATEGORY[(ins.symbol("kv"), ins.symbol("plane"))]
    ctx.counters[f"rows_{cat}"] += rows.size
    return ctx.dram.transfer_arrays(t, cat, m.cfg.layer, f["dram"] + rows * f["row_bytes"],
                                    np.full(rows.size, f["row_bytes"], dtype=np.int64))


@charges("store.kv")
def _store_kv(ctx: Ctx, ins: Instr, t: float) -> float:
    f, m = ins.fields, ctx.m
    rows = m.rows(f["rows"], f["live"])
    cat = PLANE_CATEGORY[(ins.symbol("kv"), ins.symbol("plane"))]
    return ctx.dram.transfer_arrays(t, cat, m.cfg.layer, np.array([f["dram"]], dtype=np.int64),
                                    np.array([rows * f["row_bytes"]], dtype=np.int64), write=True)


def _head_rows(ctx: Ctx, ins: Instr) -> tuple[int, int] | None:
    """(query rows, key rows) an attention instruction works on, or None for a dropped head."""
    f, m = ins.fields, ctx.m
    if not m.head_live(f["head"]):
        ctx.counters["skipped_head_ops"] += 1
        return None
    rows = m.predicated.get(m.pred_key(f["head"]), 0) if f.get("pred") else m.q_rows
    keys = m.slot(f.get("idx", 0)).size if "idx" in f else m.live
    return rows, keys


@charges("qk")
def _qk(ctx: Ctx, ins: Instr, t: float) -> float | tuple[float, float]:
    rk = _head_rows(ctx, ins)
    if rk is None or not rk[0]:
        return t
    rows, keys = rk
    dim = ctx.m.cfg.head_dim
    ctx.flops += 2.0 * rows * keys * dim
    ctx.m.score_keys = keys  # the score row width that softmax / accum / topk values see
    return ctx.run_unit("qk", t, ctx.hw.qk_cycles(rows, keys, dim), ctx.hw.qk_latency, ins["head"],
                        streams=bool(ins["pred"]))


@charges("softmax")
def _softmax(ctx: Ctx, ins: Instr, t: float) -> float | tuple[float, float]:
    rk = _head_rows(ctx, ins)
    if rk is None or not rk[0]:
        return t
    keys = ctx.m.score_keys or rk[1]
    return ctx.run_unit("softmax", t, ctx.hw.softmax_cycles(rk[0], keys), ctx.hw.softmax_latency, ins["head"],
                        streams=True)


@charges("requant")
def _requant(ctx: Ctx, ins: Instr, t: float) -> float | tuple[float, float]:
    rk = _head_rows(ctx, ins)
    if rk is None:
        return t
    head, rows = ins["head"], ctx.m.q_rows
    pred = ctx.decide_lsb(head) if ctx.decide_lsb is not None else ctx.predicate_rows(rows)
    ctx.m.predicated[ctx.m.pred_key(head)] = pred
    ctx.counters["rows"] += rows
    ctx.counters["rows_lsb"] += pred
    # the row maximum is known when the row leaves softmax: no extra pass over the scores
    return ctx.run_unit("requant", t, 0, ctx.hw.requant_latency, head, streams=True)


@charges("accum")
def _accum(ctx: Ctx, ins: Instr, t: float) -> float | tuple[float, float]:
    rk = _head_rows(ctx, ins)
    if rk is None:
        return t
    token = ins.symbol("kind") == "token"
    width = (ctx.m.score_keys or rk[1]) if token else ctx.m.cfg.head_dim
    return ctx.run_unit(f"accum.{ins.symbol('kind')}", t, math.ceil(rk[0] * width / ctx.hw.softmax_parallelism), 1,
                        ins["head"], streams=True)


def _topk_tokens(ctx: Ctx, ins: Instr) -> tuple[int, int]:
    m = ctx.m
    cand = m.slot(ins["idx_in"])
    k = m.keep_count(cand.size, m.cfg.token_keep, m.cfg.protect_first + m.cfg.protect_recent)
    m.slots[ins["idx_out"]] = cand[_spread(k, cand.size)]
    m.live = k
    ctx.counters["tokens_in"] += cand.size
    ctx.counters["tokens_kept"] += k
    return cand.size, k


def _topk_values(ctx: Ctx, ins: Instr) -> tuple[int, int]:
    m = ctx.m
    cand = m.slot(ins["idx_in"])
    k = m.keep_count(cand.size, m.cfg.value_keep)
    m.slots[ins["idx_out"]] = cand[_spread(k, cand.size)]
    return cand.size, k


def _topk_heads(ctx: Ctx, ins: Instr) -> tuple[int, int]:
    m = ctx.m
    cand = m.live_heads
    k = m.keep_count(cand.size, m.cfg.head_keep)
    m.live_heads = cand[:k]  # which heads survive is data; timing-only runs keep the first k
    m.slots[ins["idx_out"]] = m.live_heads
    ctx.counters["heads_in"] += cand.size
    ctx.counters["heads_kept"] += k
    return cand.size, k


TOPK_KINDS: dict[str, Callable[[Ctx, Instr], tuple[int, int]]] = {
    "tokens": _topk_tokens, "values": _topk_values, "heads": _topk_heads}


@charges("topk")
def _topk(ctx: Ctx, ins: Instr, t: float) -> float | tuple[float, float]:
    kind = ins.symbol("kind")
    if kind == "values" and not ctx.m.head_live(ins["head"]):
        return t
    n, k = TOPK_KINDS[kind](ctx, ins)
    head = ins["head"] if kind == "values" else -1
    # tokens/heads and local V have one engine each
    return ctx.run_unit(f"topk.{'values' if kind == 'values' else 'tokens'}", t,
                        topk_cycles(n, k, ctx.hw.topk_parallelism), 0, head)


@charges("pv")
def _pv(ctx: Ctx, ins: Instr, t: float) -> float | tuple[float, float]:
    rk = _head_rows(ctx, ins)
    if rk is None:
        return t
    rows, values = rk
    dim = ctx.m.cfg.head_dim
    ctx.flops += 2.0 * rows * values * dim
    # row-streaming behind softmax (each row's probabilities, then its V rows); the V fetch token is in t
    return ctx.run_unit("pv", t, ctx.hw.pv_cycles(rows, values, dim), ctx.hw.pv_latency, ins["head"], streams=True)


@charges("gemm")
def _gemm(ctx: Ctx, ins: Instr, t: float) -> float | tuple[float, float]:
    f = ins.fields
    rows = ctx.m.rows(f["rows"], f["live"])
    macs = rows * f["k"] * f["n"]
    ctx.flops += 2.0 * macs
    return ctx.run_unit("gemm", t, math.ceil(macs / ctx.hw.gemm_multipliers), 2)


@charges("elt", "compact")
def _elementwise(ctx: Ctx, ins: Instr, t: float) -> float | tuple[float, float]:
    f = ins.fields
    rows = ctx.m.slot(f["idx"]).size if "idx" in f else ctx.m.rows(f["rows"], f["live"])
    return ctx.run_unit("elt", t, math.ceil(rows * f["cols"] / ctx.hw.elementwise_lanes), 1)
