"""The simulator's view of a hardware description: the few numbers the timing model charges.

``SimHw.from_description`` reads them from the backend's hardware description
(:mod:`spatten_compiler.backend.hw`); the pipeline latencies, which the description does not hold,
keep the authors' cycle-model values. Cycle counts are in accelerator clock cycles.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from spatten_compiler.backend.hw import HwDesc, load_hw


@dataclasses.dataclass(frozen=True)
class SimHw:
    name: str = "spatten"
    clock_ghz: float = 1.0  # Table I
    qk_multipliers: int = 512  # Q x K array (12-bit multipliers)
    pv_multipliers: int = 512  # Prob x V array
    dram_channels: int = 16  # HBM2, 16 x 128 bit
    channel_gbps: float = 32.0  # GB/s per channel (512 GB/s total)
    transaction_bytes: int = 32
    dram_latency: int = 0  # fixed cycles per transfer on top of the channel occupancy
    topk_parallelism: int = 16  # comparators per quick-select array
    softmax_parallelism: int = 8
    gemm_multipliers: int = 1024  # dense GEMM (projections / FFN) if the stream has any
    # Pipeline drain latencies of the authors' cycle model (bert.cpp): SRAM + multiplier + tree,
    # dequantize + exp + accumulate + divide + quantize, SRAM + multiplier + accumulator.
    qk_latency: int = 11
    softmax_latency: int = 87
    requant_latency: int = 1
    pv_latency: int = 3
    elementwise_lanes: int = 64  # element-wise / normalization ops per cycle

    @property
    def bytes_per_cycle_per_channel(self) -> float:
        return self.channel_gbps / self.clock_ghz

    @property
    def transaction_cycles(self) -> float:
        """Cycles one transaction occupies its channel."""
        return self.transaction_bytes / self.bytes_per_cycle_per_channel

    @property
    def peak_flops(self) -> float:
        """Attention datapath peak in FLOP/s (one multiply-add = 2 FLOP per multiplier per cycle)."""
        return 2.0 * (self.qk_multipliers + self.pv_multipliers) * self.clock_ghz * 1e9

    @property
    def dram_gbps(self) -> float:
        return self.channel_gbps * self.dram_channels

    def qk_cycles(self, rows: int, keys: int, dim: int) -> int:
        """Q x K: ``qk_multipliers / dim`` keys per cycle for each query row."""
        return rows * math.ceil(keys / max(1, self.qk_multipliers // max(dim, 1)))

    def pv_cycles(self, rows: int, values: int, dim: int) -> int:
        return rows * math.ceil(values / max(1, self.pv_multipliers // max(dim, 1)))

    def softmax_cycles(self, rows: int, keys: int) -> int:
        return rows * math.ceil(keys / self.softmax_parallelism)

    @classmethod
    def from_description(cls, desc: HwDesc) -> SimHw:
        """The figures of a backend hardware description; the pipeline latencies keep the authors' values."""
        return cls(
            name=desc.name, clock_ghz=desc.clock_mhz / 1000, qk_multipliers=desc.qk_multipliers,
            pv_multipliers=desc.pv_multipliers, dram_channels=desc.hbm_channels, channel_gbps=desc.channel_gbps,
            transaction_bytes=desc.transaction_bytes, topk_parallelism=desc.topk_parallelism,
            softmax_parallelism=desc.softmax_parallelism, gemm_multipliers=desc.gemm_multipliers,
        )


def sim_hw(spec: str | Path | None) -> SimHw:
    """``--hw``: a built-in name or a TOML file, read and checked by the backend."""
    return SimHw.from_description(load_hw(spec))


SPATTEN = SimHw()
