"""Timing mode must charge what it should: tests that fail if the model stops counting a byte or a
cycle it owes (kept tokens, bit planes, pruned heads, deadlocks)."""

from __future__ import annotations

import dataclasses

import pytest

from spatten_compiler.backend.deps import check_deps
from spatten_compiler.sim.engine import simulate
from spatten_compiler.sim.hw import SimHw
from spatten_compiler.sim.scheduler import Deadlock
from spatten_compiler.sim.topk import topk_cycles
from spatten_compiler.sim.workload import FP32, Quant, Workload, _Layout, attention_stream, make

CTX = 1024


def decode(keys: list[int], heads: list[int] | None = None, quant: Quant = FP32, value_keep: float = 1.0,
           n_heads: int = 4) -> Workload:
    """One generation step (1 query row) over a 1024-token context."""
    layers = len(keys)
    return Workload("t", layers, n_heads, 64, [CTX], [1], [keys], [heads or [n_heads] * layers], value_keep, quant,
                    CTX)


def kv(report, layer: int) -> int:
    b = report.dram_bytes_by_layer[layer]
    return b["k_msb"] + b["k_lsb"] + b["v"]


def test_streams_are_well_formed() -> None:
    for w in (decode([CTX, 512]), decode([CTX, 512], [4, 2], Quant(6, 4, 6, 16, 0.1, True), 0.5)):
        stream = attention_stream(w)
        check_deps(stream)  # the backend's own balance / deadlock check
        assert stream[-1].mnemonic == "finish"


def test_dense_fetches_every_key_and_value_once() -> None:
    r = simulate(attention_stream(decode([CTX, CTX])))
    # fp32 rows of 64 dims = 256 bytes = 8 whole transactions: no rounding
    for layer in (0, 1):
        assert r.dram_bytes_by_layer[layer]["k_msb"] == 4 * CTX * 256 + 4 * 256  # + the new token's row
        assert r.dram_bytes_by_layer[layer]["v"] == 4 * CTX * 256 + 4 * 256


@pytest.mark.parametrize("quant", [Quant(), Quant(6, 4, 6, 16, 0.1, True)], ids=["fp32", "6+4"])
def test_halving_kept_tokens_halves_kv_bytes_of_pruned_layers(quant: Quant) -> None:
    full = simulate(attention_stream(decode([CTX, 512], quant=quant)), lsb_fraction=0.0)
    half = simulate(attention_stream(decode([CTX, 256], quant=quant)), lsb_fraction=0.0)
    new_row = 4 * (_Layout(decode([1], quant=quant)).k_row + _Layout(decode([1], quant=quant)).v_row)
    assert kv(full, 0) == kv(half, 0)  # the unpruned layer is unchanged
    ratio = (kv(full, 1) - new_row) / (kv(half, 1) - new_row)
    assert ratio == pytest.approx(2.0, rel=0.02)
    assert full.counters["tokens_kept"] == 512 and half.counters["tokens_kept"] == 256


def test_msb_only_reads_fewer_bytes_than_msb_plus_lsb() -> None:
    w = decode([CTX, CTX], quant=Quant(6, 4, 6, 16, 0.1, True))
    msb = simulate(attention_stream(w), lsb_fraction=0.0)
    both = simulate(attention_stream(w), lsb_fraction=1.0)
    # only the new token's LSB rows are written (2 layers x 4 heads x one 32-byte row); none read
    assert msb.dram_bytes["k_lsb"] == 8 * 32 and msb.counters["skipped_fetches"] == 8
    assert both.dram_bytes["k_lsb"] >= 8 * CTX * 32  # every head reads its 4-bit plane (32-byte rows)
    assert both.dram_bytes["k_msb"] == msb.dram_bytes["k_msb"]
    assert both.total_bytes > msb.total_bytes
    assert both.cycles > msb.cycles  # the LSB fetch and the recompute take time


def test_a_pruned_heads_kv_is_never_fetched(tmp_path) -> None:
    w = decode([CTX, CTX], heads=[4, 2])
    trace = tmp_path / "dram.trace"
    r = simulate(attention_stream(w), trace=trace)
    lay = _Layout(w)
    span = CTX * lay.k_row
    dropped = [(lay.plane(kind, 1, h), lay.plane(kind, 1, h) + span) for kind in ("k", "v") for h in (2, 3)]
    kept = [(lay.plane(kind, 1, h), lay.plane(kind, 1, h) + span) for kind in ("k", "v") for h in (0, 1)]
    addrs = [int(line.split()[0], 16) for line in trace.read_text().splitlines()]
    reads = [a for a, line in zip(addrs, trace.read_text().splitlines()) if line.endswith(" R")]

    def hits(ranges: list[tuple[int, int]]) -> int:
        return sum(1 for a in reads if any(lo <= a < hi for lo, hi in ranges))

    assert hits(dropped) == 0
    assert hits(kept) == 2 * 2 * CTX * 8  # K and V of the two kept heads, 8 transactions per row
    assert r.counters["heads_kept"] == 2 and r.counters["skipped_head_ops"] > 0
    # the layer moves half the K/V bytes of the unpruned one: the new token's K/V rows of a pruned
    # head are not written either (store.kv of a dropped head is a no-op)
    assert kv(r, 1) * 2 == kv(r, 0)


def test_local_value_pruning_reads_fewer_v_rows() -> None:
    dense = simulate(attention_stream(decode([CTX])))
    pruned = simulate(attention_stream(decode([CTX], value_keep=0.25)))
    assert pruned.dram_bytes["v"] - 4 * 256 == (dense.dram_bytes["v"] - 4 * 256) // 4
    assert pruned.dram_bytes["k_msb"] == dense.dram_bytes["k_msb"]


def test_memory_bound_decode_gets_faster_with_fewer_bytes_and_topk_is_charged() -> None:
    dense = simulate(attention_stream(decode([CTX] * 4)))
    spatten = simulate(attention_stream(decode([CTX, 512, 256, 128], quant=Quant(6, 4, 6, 16, 0.1, True),
                                               value_keep=0.25)))
    assert spatten.cycles < dense.cycles / 2
    slow_dram = simulate(attention_stream(decode([CTX] * 4)), SimHw(dram_channels=4))
    assert slow_dram.cycles > 2 * dense.cycles  # decode is bound by DRAM bandwidth
    # the top-k engine's quick-select rounds are on the critical path: a slower engine costs cycles
    slow_topk = simulate(attention_stream(decode([CTX, 512, 256, 128])), SimHw(topk_parallelism=1))
    fast_topk = simulate(attention_stream(decode([CTX, 512, 256, 128])))
    assert slow_topk.cycles - fast_topk.cycles >= topk_cycles(CTX, 512, 1) - topk_cycles(CTX, 512, 16)


def test_prompt_is_compute_bound_at_the_multiplier_rate() -> None:
    w = dataclasses.replace(decode([512]), context=[512], query_rows=[512], max_tokens=512)
    r = simulate(attention_stream(w))
    per_head = 512 * 512 // 8  # 512 rows x 512 keys at 8 keys per cycle (512 multipliers / 64 dims)
    assert 4 * per_head <= r.cycles <= 4 * per_head * 1.1
    assert r.flops == 4 * 2 * (2.0 * 512 * 512 * 64)


def test_a_deadlocking_stream_is_reported_not_hung() -> None:
    stream = [make("cfg.attn", layer=0, heads=1, kv_heads=1, head_dim=64, tokens=8, causal=0, scale=0x3E000000),
              make("qk", head=0, deps=1),  # pop_prev: waits for a load that never pushes
              make("fetch.kv", kv="k", plane="full", head=0, dram=0, row_bytes=256, deps=2),  # pop_next
              make("finish")]
    with pytest.raises(Deadlock, match=r"deadlock after 1/4 instructions: load #2 fetch.kv waits .*compute->load"
                                       r".*compute #1 qk waits for a token load->compute"):
        simulate(stream)


def test_embedding_gathers_read_one_row_per_index_entry() -> None:
    stream = [make("load", buf="index", sram=3, dram=0, rows=10, row_bytes=8, deps=0),
              make("fetch.rows", buf="act", dram=1 << 20, row_bytes=128, idx=3),
              make("finish")]
    r = simulate(stream)
    assert r.dram_bytes["indices"] == 96  # 80 bytes of ids -> 3 transactions
    assert r.dram_bytes["weights"] == 10 * 128
