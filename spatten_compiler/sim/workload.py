"""Attention workloads written directly in the ISA (the paper's GPT-2 / BERT schedules).

The backend's ``emit`` lowers whole ONNX models; the paper's evaluation runs the attention layers
only (SpAtten accelerates attention), with per-layer keep counts taken from the authors' workload
files. :func:`attention_stream` writes such a workload with the same instruction classes the
backend emits, so the simulator runs it like any other stream. Per (iteration, layer):

    cfg.attn / cfg.quant / cfg.prune
    [ilist ...]                        first layer: reset the live tokens / heads (and the cache keys)
    [topk tokens, topk heads]          cascade pruning: the kept sets for this layer
    load q                             the iteration's query rows
    per head h, software-pipelined one head ahead:
      load:    fetch.kv k msb h  ->  compute: qk h, softmax h, requant h
      load:    fetch.kv k lsb h pred=1  ->  compute: qk h pred=1, softmax h pred=1  (progressive)
      compute: accum token h, topk values h  ->  load: fetch.kv v h  ->  compute: pv h, accum head h
    store act                          the attention output rows
    store.kv                           the new token's K/V planes (generation steps)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from spatten_compiler.backend.isa import POP_NEXT, POP_PREV, PUSH_NEXT, PUSH_PREV, Instr, spec
from spatten_compiler.backend.opcodes import FIXED

# index slots (docs/backend.md): 0 = live tokens = query rows, 1 = live heads; ours: the kept keys of a
# generation step, the local-V rows of the current head, and one left empty
LIVE, HEADS, KEYS, VALUES, EMPTY = 0, 1, 2, 3, 4095


@dataclasses.dataclass(frozen=True)
class Quant:
    k_msb: int = 32  # 32 / 0 / 32 = float32, no quantization
    k_lsb: int = 0
    v_bits: int = 32
    q_bits: int = 32
    threshold: float = 0.1  # progressive: LSBs when the row's max probability is below this
    progressive: bool = False


FP32 = Quant()


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model's attention over ``iterations``; ``keys[i][l]`` / ``heads[i][l]`` are the kept counts."""

    name: str
    layers: int
    heads: int
    head_dim: int
    context: Sequence[int]  # tokens in the context at each iteration
    query_rows: Sequence[int]  # query rows at each iteration (prompt: all, generation step: 1)
    keys: Sequence[Sequence[int]]  # [iteration][layer] tokens kept (fetched)
    kept_heads: Sequence[Sequence[int]]  # [iteration][layer]
    value_keep: float = 1.0  # local V pruning: fraction of the fetched keys whose V rows are read
    quant: Quant = FP32
    max_tokens: int = 1024

    def dense(self) -> Workload:
        """The same model without any SpAtten feature (the baseline stream)."""
        return dataclasses.replace(self, name=f"{self.name} dense", keys=[[c] * self.layers for c in self.context],
                                   kept_heads=[[self.heads] * self.layers for _ in self.context],
                                   value_keep=1.0, quant=FP32)


def make(mnemonic: str, deps: int = 0, **values: int | str) -> Instr:
    """``isa.make`` that also takes enum fields by symbol (``kind="tokens"``)."""
    sp = spec(mnemonic)
    return sp.make(deps, **{k: sp.field(k).symbols.index(v) if isinstance(v, str) else v for k, v in values.items()})


def _ratio(x: float) -> int:
    """A threshold in fixed point (rounded up)."""
    return min(FIXED, max(0, math.ceil(x * FIXED)))


def _keep(x: float) -> int:
    """A keep ratio k / n in fixed point, rounded down so that ceil(n * ratio) == k for n < 32768."""
    return min(FIXED, max(0, math.floor(x * FIXED)))


class _Layout:
    """DRAM regions of the K MSB / K LSB / V planes, Q and outputs (one per layer and head)."""

    def __init__(self, w: Workload) -> None:
        self.w = w
        self.k_row = _row(w.head_dim, w.quant.k_msb)
        self.l_row = _row(w.head_dim, w.quant.k_lsb) if w.quant.k_lsb else 32
        self.v_row = _row(w.head_dim, w.quant.v_bits)
        self.q_row = _row(w.heads * w.head_dim, w.quant.q_bits)
        self.o_row = _row(w.heads * w.head_dim, 16)
        span = {"k": self.k_row, "l": self.l_row, "v": self.v_row}
        base, self.base = 1 << 24, {}
        for kind, row in span.items():
            self.base[kind] = base
            base += _align(w.layers * w.heads * w.max_tokens * row)
        self.base["q"], base = base, base + _align(w.layers * w.max_tokens * self.q_row)
        self.base["o"] = base

    def plane(self, kind: str, layer: int, head: int) -> int:
        row = {"k": self.k_row, "l": self.l_row, "v": self.v_row}[kind]
        return self.base[kind] + (layer * self.w.heads + head) * self.w.max_tokens * row

    def rows(self, kind: str, layer: int) -> int:
        row = {"q": self.q_row, "o": self.o_row}[kind]
        return self.base[kind] + layer * self.w.max_tokens * row


def _row(elems: int, bits: int) -> int:
    return max(1, math.ceil(elems * bits / 8))


def _align(n: int) -> int:
    return (n + 4095) // 4096 * 4096


def attention_stream(w: Workload) -> list[Instr]:
    """The workload's instruction stream (ends with ``finish``; dependency tokens balance)."""
    lay, q = _Layout(w), w.quant
    out: list[Instr] = []
    emit = out.append
    for it, (ctx, rows) in enumerate(zip(w.context, w.query_rows)):
        live, live_heads = ctx, w.heads
        decode = rows < ctx  # a generation step: the query rows are new tokens, the keys the cache
        slot = KEYS if decode else LIVE
        for layer in range(w.layers):
            keep, heads = w.keys[it][layer], w.kept_heads[it][layer]
            emit(make("cfg.attn", layer=layer, heads=w.heads, kv_heads=w.heads, head_dim=w.head_dim, tokens=ctx,
                      causal=1, past=ctx - rows, scale=_f32_bits(1 / math.sqrt(w.head_dim))))
            emit(make("cfg.quant", q_bits=min(q.q_bits, 31), k_msb=min(q.k_msb, 31), k_lsb=q.k_lsb,
                      v_bits=min(q.v_bits, 31), threshold=_ratio(q.threshold)))
            emit(make("cfg.prune", token_keep=_keep(keep / live), head_keep=_keep(heads / live_heads),
                      value_keep=_keep(w.value_keep), protect_first=0, protect_recent=0))
            gate = 0  # the first load waits for the index lists
            if layer == 0:  # a new pass: every token and head is live again
                emit(make("ilist", op="iota", dst=LIVE, value=rows))
                emit(make("ilist", op="copy", dst=HEADS, src=EMPTY))
                if decode:
                    emit(make("ilist", op="iota", dst=KEYS, value=ctx))
                gate = 1
            if keep < live:
                emit(make("topk", kind="tokens", idx_in=slot, idx_out=slot))
                live, gate = keep, 1
            if heads < live_heads:
                emit(make("topk", kind="heads", idx_in=HEADS, idx_out=HEADS))
                live_heads, gate = heads, 1
            if gate:
                out[-1] = out[-1].with_deps(PUSH_PREV)
            emit(make("load", buf="q", dram=lay.rows("q", layer), rows=rows, row_bytes=lay.q_row, live=1,
                      deps=POP_NEXT if gate else 0))
            _heads(out, w, lay, layer, slot, rows)
            emit(make("store", buf="act", dram=lay.rows("o", layer), rows=rows, row_bytes=lay.o_row, live=1,
                      deps=POP_PREV))
            if decode:  # generation step: the new token's K / V planes
                for h in range(w.heads):
                    pos = ctx - 1
                    emit(make("store.kv", kv="k", plane="msb", head=h, dram=lay.plane("k", layer, h) + pos * lay.k_row,
                              row_bytes=lay.k_row, rows=1))
                    if q.k_lsb:
                        emit(make("store.kv", kv="k", plane="lsb", head=h, row_bytes=lay.l_row, rows=1,
                                  dram=lay.plane("l", layer, h) + pos * lay.l_row))
                    emit(make("store.kv", kv="v", plane="msb", head=h, dram=lay.plane("v", layer, h) + pos * lay.v_row,
                              row_bytes=lay.v_row, rows=1))
    emit(make("finish"))
    return out


def _heads(out: list[Instr], w: Workload, lay: _Layout, layer: int, slot: int, rows: int) -> None:
    """Per-head fetch / compute, consumed in the order K0 LSB0 K1 V0 LSB1 K2 V1 ... so the load of
    head h+1's keys overlaps head h's compute (token queues match pushes to pops in order)."""
    q = w.quant
    prog = q.progressive and q.k_lsb > 0
    vprune = w.value_keep < 1.0
    vslot = VALUES if vprune else slot
    plane = "msb" if q.k_lsb or q.k_msb < 32 else "full"
    loads: list[list[Instr]] = []
    comps: list[list[Instr]] = []
    for h in range(w.heads):
        fk = make("fetch.kv", kv="k", plane=plane, head=h, dram=lay.plane("k", layer, h), row_bytes=lay.k_row,
                  idx=slot, deps=PUSH_NEXT)
        a = [make("qk", head=h, idx=slot, deps=POP_PREV), make("softmax", head=h)]
        b: list[Instr] = []
        lsb: list[Instr] = []
        if prog:
            a.append(make("requant", head=h, deps=PUSH_PREV))
            lsb = [make("fetch.kv", kv="k", plane="lsb", head=h, dram=lay.plane("l", layer, h), row_bytes=lay.l_row,
                        idx=slot, pred=1, deps=POP_NEXT | PUSH_NEXT)]
            b += [make("qk", head=h, idx=slot, pred=1, deps=POP_PREV), make("softmax", head=h, pred=1)]
        b.append(make("accum", kind="token", head=h, idx=slot))
        if vprune:
            b.append(make("topk", kind="values", head=h, idx_in=slot, idx_out=VALUES, deps=PUSH_PREV))
        fv = make("fetch.kv", kv="v", plane="msb" if q.v_bits < 32 else "full", head=h, dram=lay.plane("v", layer, h),
                  row_bytes=lay.v_row, idx=vslot, deps=(POP_NEXT if vprune else 0) | PUSH_NEXT)
        c = [make("pv", head=h, idx=vslot, deps=POP_PREV), make("accum", kind="head", head=h)]
        loads.append([fk, *lsb, fv])
        comps.append([a, b, c])
    # program order: A0 [LSB0] B0 | K1 A1 V0 C0 [LSB1] B1 | K2 A2 V1 C1 ...
    out.append(loads[0][0])
    out += comps[0][0]
    for h in range(w.heads):
        out += loads[h][1:-1]  # LSB plane
        out += comps[h][1]
        if h + 1 < w.heads:
            out.append(loads[h + 1][0])
            out += comps[h + 1][0]
        out.append(loads[h][-1])
        out += comps[h][2]
    out[-1] = out[-1].with_deps(PUSH_NEXT)


def to_program(w: Workload, hw: Any = None) -> Any:
    """The workload as a backend :class:`~spatten_compiler.backend.program.Program` (tensor table with
    one region per K MSB / K LSB / V plane of each layer and head, Q and outputs per layer, and a
    relocation for every DRAM address), so it can be written as a ``.spbin`` and run by ``spattenc sim``."""
    from spatten_compiler.backend.hw import SPATTEN
    from spatten_compiler.backend.program import Program, Reloc, Tensor

    lay, instrs = _Layout(w), attention_stream(w)
    tensors: list[Tensor] = []
    planes = [("k", "k_msb" if w.quant.k_msb < 32 else "k_full", lay.k_row, w.quant.k_msb),
              ("v", "v", lay.v_row, w.quant.v_bits)]
    if w.quant.k_lsb:
        planes.insert(1, ("l", "k_lsb", lay.l_row, w.quant.k_lsb))
    for key, kind, row, bits in planes:
        for layer in range(w.layers):
            for h in range(w.heads):
                tensors.append(Tensor(f"L{layer}.h{h}.{kind}", kind, lay.plane(key, layer, h), w.max_tokens * row,
                                      bits, "", layer))
    for key, row, what in (("q", lay.q_row, "q"), ("o", lay.o_row, "attn_out")):
        for layer in range(w.layers):
            tensors.append(Tensor(f"L{layer}.{what}", "activation", lay.rows(key, layer), w.max_tokens * row, 16, "",
                                  layer))
    tensors.sort(key=lambda t: t.dram)
    starts = np.array([t.dram for t in tensors])
    relocs = [Reloc(i, int(np.searchsorted(starts, ins["dram"], side="right") - 1))
              for i, ins in enumerate(instrs) if "dram" in ins.spec.field_names]
    return Program(hw or SPATTEN, instrs, tensors, relocs, [(0, f"{w.name} attention")])


def _f32_bits(x: float) -> int:
    return int(np.array([x], np.float32).view(np.uint32)[0])
