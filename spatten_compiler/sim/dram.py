"""DRAM model: 32-byte transactions, tagged by what they carry, spread over HBM channels.

Every transfer is a list of contiguous byte regions. Each region is rounded out to whole
transactions; transaction ``t`` (byte address ``t * 32``) goes to channel ``t mod channels``
(``(addr >> 5) mod channels``). A channel serves one transaction per ``transaction_cycles``; a transfer
that starts at cycle ``t0`` finishes when its busiest channel is done, so transfers from the load and
store stages contend for the same channels. Bytes are counted per (category, layer) as transaction
bytes (what the DRAM moves), next to the bytes actually requested.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import numpy as np

from spatten_compiler.sim.hw import SimHw

# What a transfer carries; the report keeps this order.
CATEGORIES = ("q", "k_msb", "k_lsb", "v", "indices", "weights", "activations", "instructions")
# How transfers are tagged: by the relocated tensor's kind, else by the buffer / K-V plane they fill.
BUFFER_CATEGORY = {"q": "q", "k": "k_msb", "v": "v", "index": "indices", "score": "activations",
                   "weight": "weights", "act": "activations"}
TENSOR_CATEGORY = {"weight": "weights", "k_full": "k_msb", "k_msb": "k_msb", "k_lsb": "k_lsb", "v": "v",
                   "activation": "activations", "input": "activations", "output": "activations",
                   "index": "indices", "scratch": "activations"}
PLANE_CATEGORY = {("k", "full"): "k_msb", ("k", "msb"): "k_msb", ("k", "lsb"): "k_lsb",
                  ("v", "full"): "v", ("v", "msb"): "v", ("v", "lsb"): "v"}


class TraceWriter:
    """A DRAM request trace: ``ramulator`` ("0xADDR R|W" per line, as Ramulator's --mode=dram reads)
    or ``dramsim3`` ("0xADDR READ|WRITE CYCLE", DRAMsim3's trace format)."""

    FORMATS = ("ramulator", "dramsim3")

    def __init__(self, path: Path, fmt: str = "ramulator") -> None:
        if fmt not in self.FORMATS:
            raise ValueError(f"unknown trace format {fmt!r} (one of {', '.join(self.FORMATS)})")
        self.fmt, self.path = fmt, path
        self._file: TextIO = open(path, "w")  # noqa: SIM115 - closed by close()
        self.lines = 0

    def write(self, tx: np.ndarray, write: bool, cycle: float) -> None:
        addrs = tx * 32
        if self.fmt == "ramulator":
            op = "W" if write else "R"
            self._file.write("".join(f"0x{a:x} {op}\n" for a in addrs.tolist()))
        else:
            op = "WRITE" if write else "READ"
            self._file.write("".join(f"0x{a:x} {op} {int(cycle)}\n" for a in addrs.tolist()))
        self.lines += int(addrs.size)

    def close(self) -> None:
        self._file.close()


class Dram:
    def __init__(self, hw: SimHw, trace: TraceWriter | None = None) -> None:
        self.hw = hw
        self.channels = hw.dram_channels
        self.tx_bytes = hw.transaction_bytes
        self.tx_cycles = hw.transaction_cycles
        self.free = np.zeros(self.channels)
        self.busy = np.zeros(self.channels)  # cycles each channel spent transferring
        self.bytes: collections.Counter[tuple[str, int]] = collections.Counter()  # (category, layer) -> bytes
        self.requested: collections.Counter[str] = collections.Counter()
        self.transactions = 0
        self.trace = trace
        self._lanes = np.arange(self.channels)

    def channel_counts(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Transactions per channel for the regions, and each region's first transaction and count."""
        c = self.channels
        first = starts // self.tx_bytes
        n = (starts + lengths + self.tx_bytes - 1) // self.tx_bytes - first
        n[lengths <= 0] = 0
        full = n // c
        rem = n - full * c
        counts = np.full(c, int(full.sum()), dtype=np.int64)
        extra = int(rem.sum())
        if extra:  # the partial round of each region starts at its own channel
            offset = np.arange(extra) - np.repeat(np.cumsum(rem) - rem, rem)
            counts += np.bincount((np.repeat(first % c, rem) + offset) % c, minlength=c)
        return counts, first, n

    def transfer(self, t0: float, category: str, layer: int, regions: Iterable[tuple[int, int]] | np.ndarray,
                 write: bool = False) -> float:
        """Move ``regions`` ((byte address, length) pairs) starting at cycle ``t0``; return the finish cycle."""
        arr = np.asarray(regions if isinstance(regions, np.ndarray) else list(regions), dtype=np.int64).reshape(-1, 2)
        if arr.size == 0:
            return t0
        return self.transfer_arrays(t0, category, layer, arr[:, 0], arr[:, 1], write)

    def transfer_arrays(self, t0: float, category: str, layer: int, starts: np.ndarray, lengths: np.ndarray,
                        write: bool = False) -> float:
        counts, first, n = self.channel_counts(starts, lengths)
        tx = None
        if self.trace is not None:
            tx = np.concatenate([np.arange(f, f + c) for f, c in zip(first.tolist(), n.tolist()) if c] or [first[:0]])
        return self.occupy(t0, category, layer, counts, int(lengths.sum()), write, tx)

    def occupy(self, t0: float, category: str, layer: int, counts: np.ndarray, requested: int, write: bool,
               tx: np.ndarray | None = None) -> float:
        """Charge ``counts`` transactions per channel from cycle ``t0``; return the finish cycle."""
        total = int(counts.sum())
        if total == 0:
            return t0
        self.transactions += total
        self.bytes[(category, layer)] += total * self.tx_bytes
        self.requested[category] += requested
        used = counts > 0
        start = np.maximum(self.free, t0)
        done = start + counts * self.tx_cycles
        self.free = np.where(used, done, self.free)
        self.busy += counts * self.tx_cycles
        if self.trace is not None and tx is not None:
            self.trace.write(tx, write, t0)
        return float(done[used].max()) + self.hw.dram_latency

    def by_category(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for (cat, _), b in self.bytes.items():
            out[cat] = out.get(cat, 0) + b
        return out

    def by_layer(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for (cat, layer), b in sorted(self.bytes.items(), key=lambda kv: kv[0][1]):
            out.setdefault(layer, dict.fromkeys(CATEGORIES, 0))[cat] += b
        return out
