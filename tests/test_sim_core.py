"""The simulator's building blocks: DRAM transactions and channels, top-k latency, the stage scheduler."""

from __future__ import annotations

import numpy as np
import pytest

from spatten_compiler.sim import scheduler as sched
from spatten_compiler.sim.dram import Dram, TraceWriter
from spatten_compiler.sim.hw import SimHw
from spatten_compiler.sim.topk import cycles_for_rounds, quickselect_rounds, topk_cycles

HW = SimHw()


def test_transactions_round_out_and_spread_over_channels() -> None:
    d = Dram(HW)
    # 16 aligned transactions: one per channel, 1 cycle each at 32 GB/s/channel and 1 GHz
    assert d.transfer(0, "k_msb", 0, [(0, 512)]) == 1.0
    # 2 bytes straddling a 32-byte boundary are 2 transactions on 2 channels
    counts, _, n = d.channel_counts(np.array([31]), np.array([2]))
    assert n.tolist() == [2] and counts.sum() == 2 and counts.max() == 1
    # channel = (addr >> 5) mod 16: 17 transactions from 0 put two on channel 0
    counts, _, _ = d.channel_counts(np.array([0]), np.array([17 * 32]))
    assert counts[0] == 2 and counts[1:].tolist() == [1] * 15
    assert d.by_category()["k_msb"] == 512


def test_transfer_time_scales_with_bytes_and_channels_contend() -> None:
    d = Dram(HW)
    one = d.transfer(0, "v", 0, [(0, 32 * 16 * 100)])
    assert one == 100.0
    # a second transfer issued at cycle 0 waits for the channels: they are shared by all stages
    assert d.transfer(0, "activations", 1, [(1 << 20, 32 * 16 * 50)], write=True) == 150.0
    assert d.by_layer()[1]["activations"] == 32 * 16 * 50
    half = Dram(SimHw(dram_channels=8)).transfer(0, "v", 0, [(0, 32 * 16 * 100)])
    assert half == 200.0


def test_gathered_rows_count_per_row() -> None:
    d = Dram(HW)
    rows = np.array([3, 10, 700])
    row_bytes = 64 * 6 // 8  # one 6-bit key of 64 dims: 48 bytes, 2 transactions unless aligned
    d.transfer_arrays(0, "k_msb", 0, 4096 + rows * row_bytes, np.full(3, row_bytes))
    starts = 4096 + rows * row_bytes
    expect = sum((s + row_bytes + 31) // 32 - s // 32 for s in starts.tolist())
    assert d.transactions == expect
    assert d.requested["k_msb"] == 3 * row_bytes


@pytest.mark.parametrize("fmt,line", [("ramulator", "0x40 R"), ("dramsim3", "0x40 WRITE 7")])
def test_trace_formats(tmp_path, fmt: str, line: str) -> None:
    trace = TraceWriter(tmp_path / "t.trace", fmt)
    d = Dram(HW, trace=trace)
    d.transfer(7, "q", 0, [(64, 64)], write=fmt == "dramsim3")
    trace.close()
    lines = (tmp_path / "t.trace").read_text().splitlines()
    assert lines[0] == line and len(lines) == 2


def test_quickselect_latency_model() -> None:
    # ceil(m / p) + 3 cycles per round over the remaining candidates, then k / p to drain
    assert cycles_for_rounds([100, 40], 10, 16) == (7 + 3) + (3 + 3) + 1
    rng = np.random.default_rng(0)
    scores = rng.random(1000)
    sizes = quickselect_rounds(scores, 100, np.random.default_rng(1))
    assert sizes[0] == 1000 and all(a > b for a, b in zip(sizes, sizes[1:]))
    assert topk_cycles(1024, 102, 16) == topk_cycles(1024, 102, 16)  # deterministic
    assert topk_cycles(1024, 1024, 16) == 64  # keep all: no rounds, only the drain
    # more comparators, fewer cycles
    assert topk_cycles(4096, 400, 64) < topk_cycles(4096, 400, 16)


def test_stages_overlap_through_tokens() -> None:
    # load i -> compute i, three times: 10 + 3 x 10 = 40 cycles when overlapped, not 60
    deps = []
    for _ in range(3):
        deps += [sched.Deps(0, push_next=True), sched.Deps(1, pop_prev=True)]
    res = sched.run(deps, lambda i, t: t + 10)
    assert res.finish == 40 and res.stage_busy["load"] == 30


def test_deadlock_is_reported_not_hung() -> None:
    # compute waits for a store token that the store stage only sends after compute's own token
    deps = [sched.Deps(1, pop_next=True, push_next=True), sched.Deps(2, pop_prev=True, push_prev=True)]
    with pytest.raises(sched.Deadlock, match=r"deadlock after 0/2 .*compute #0 .*store->compute"):
        sched.run(deps, lambda i, t: t + 1)
