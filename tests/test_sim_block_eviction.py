"""Block eviction (``--kv-slack``, passes/evict_block.py) in the stream: per token block the stream takes
the graph's ``If`` (every layer evicts to its budget, or every layer keeps all its rows), so in every block
the K/V rows each layer (and K/V head) keeps equal the reference runtime's and onnxruntime's, logits within
1e-4 - layer, cascade with head pruning, per-KV-head, the min-keep floor, a per-layer schedule. Replayed
steps equal walked ones; timing mode's K/V reads grow between evictions and drop after one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS
from test_evict_kv import compiled as compiled_pass
from test_sim_generate import assert_steps_equal_ort, assert_steps_equal_reference
from test_sim_model import feeds_for

from spatten_compiler.backend import program
from spatten_compiler.backend.emitter import Emitter
from spatten_compiler.backend.lower import emit_model
from spatten_compiler.backend.opcodes import FIXED
from spatten_compiler.cli import main as spattenc
from spatten_compiler.sim import timing
from spatten_compiler.sim.engine import simulate
from spatten_compiler.sim.model_run import run_functional

PROMPT, STEPS = 8, 8
TOKENS = ["--kv-bits", "none", "--kv-budget", "4", "--kv-sinks", "1", "--kv-recent", "2", "--kv-slack", "2"]
# fixture, spattenc options or evict-kv pass options; each evicts at the prompt, then appends and evicts again
CASES: dict[str, tuple[str, list[str] | dict]] = {
    "layer": ("llama_dynamo", TOKENS),  # lists 4, 5, 6, 7 -> 4, ...
    "cascade": ("gpt2_kv_torchscript", [*TOKENS, "--kv-evict", "cascade", "--head-keep", "0.5", "--value-keep", "0.5"]),
    "head": ("llama_dynamo", [*TOKENS, "--kv-evict", "head"]),
    # the cache crosses steps as packed 6+4 planes, gathered as bytes in the block
    "packed": ("llama_sdpa_dynamo", [*TOKENS[2:], "--kv-bits", "6+4"]),
    # budget ceil(T / 2) under a floor of 9: the prompt is kept whole, the floor decides when to evict
    "floor": ("llama_torchscript", ["--kv-bits", "none", "--kv-budget", "0.5", "--kv-sinks", "1", "--kv-recent", "2",
                                    "--kv-min-keep", "9", "--kv-slack", "1"]),
    # layers 2-3 keep ceil(T / 4) (at least 3): they pass budget + slack first and evict every layer
    "schedule": ("llama_torchscript", {"budget": 0.5, "sinks": 1, "recent": 2, "schedule": (1.0, 1.0, 0.5),
                                       "slack": 2}),
}


def compiled(case: str, tmp: Path) -> Path:
    name, opts = CASES[case]
    if isinstance(opts, dict):  # a per-layer schedule is a pass option only
        return compiled_pass(name, str(tmp), **opts)
    dst = tmp / f"{name}.slack-{case}.spatten.onnx"
    if not dst.exists():
        assert spattenc(["compile", str(MODELS / f"{name}.onnx"), "-o", str(dst), "-q", *opts]) == 0
    return dst


@pytest.mark.parametrize("case", CASES)
def test_block_eviction_equals_the_reference_runtime(case: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled(case, tmp_path_factory.getbasetemp())
    feeds = feeds_for(path, PROMPT)
    r = run_functional(emit_model(path, PROMPT, STEPS), feeds, model=path)
    assert_steps_equal_reference(path, r, feeds["input_ids"], STEPS)
    assert_steps_equal_ort(path, r, feeds["input_ids"], STEPS, atol=1e-4)
    # not vacuous: some steps only append (every list one row longer), some evict (shorter)
    grow = np.diff([[np.shape(lists)[-1] for lists in block] for block in r.kv_lists], axis=0)
    assert (grow == 1).all(axis=1).sum() >= 2 and (grow < 0).any(axis=1).sum() >= 1, grow.tolist()
    if case == "schedule":  # one decision for all layers: layer 0 (n = k_0 + 2, within its own slack) drops 2
        assert any(row[0] == -1 for row in grow), grow.tolist()  # rows when layers 2-3 pass budget + slack


def test_appending_blocks_keep_every_row_and_replay_equals_walking(tmp_path_factory: pytest.TempPathFactory,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block has the same instructions; a block that only appends has token_keep = 1 in every layer's
    cfg.prune, a block that evicts drops rows somewhere. Replayed step blocks (cfg.prune patched) are
    byte-identical to walking every step."""
    for case in ("layer", "schedule"):
        path = compiled(case, tmp_path_factory.getbasetemp())
        p = emit_model(path, PROMPT, gen_steps=12)
        keeps = np.array([i["token_keep"] for i in p.instrs if i.mnemonic == "cfg.prune"]).reshape(13, 4)
        evicts = (keeps < FIXED).any(axis=1).tolist()  # [block]: one eviction cfg.prune per layer
        if case == "layer":  # budget 4 + slack 2: lists 4 -> 5, 6, 7 (evicts) -> 5, ...
            assert evicts == [True] + [False, False, True] * 4
        assert True in evicts[1:] and False in evicts[1:]
        with monkeypatch.context() as mp:
            mp.setattr(Emitter, "replay", lambda *a: False)  # lower every step by walking the graph
            assert program.to_bytes(emit_model(path, PROMPT, gen_steps=12)) == program.to_bytes(p)


def test_kv_reads_grow_between_evictions_and_drop_after(tmp_path_factory: pytest.TempPathFactory,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing mode: K/V bytes fetched per step follow the block rule - budget 4 + slack 2, so the steps read
    5, 6, 7 rows (the third evicts back to 4), then again; the every-step form reads 5 rows at every step."""
    fetch, reads = timing.PLAN["fetch.kv"], {}

    def spy(ctx: timing.Ctx, ins) -> timing.Work:
        work = fetch(ctx, ins)
        if isinstance(work, timing.DramWork):
            reads[ctx.m.past] = reads.get(ctx.m.past, 0) + work.requested
        return work

    monkeypatch.setitem(timing.PLAN, "fetch.kv", spy)
    steps, tmp = 12, tmp_path_factory.getbasetemp()
    block = simulate(emit_model(compiled("layer", tmp), PROMPT, steps))
    got = [reads[PROMPT + s] for s in range(steps)]
    per_row = got[0] // 5
    assert got == [per_row * n for n in [5, 6, 7] * 4], got
    reads.clear()
    every = simulate(emit_model(compiled_pass("llama_dynamo", str(tmp), budget=4.0, sinks=1, recent=2), PROMPT, steps))
    assert [reads[PROMPT + s] for s in range(steps)] == [per_row * 5] * steps
    # the counters of K/V rows fetched: 8 (prompt) + 72 (steps) rows per fetch against 8 + 12 x 5
    for rows in ("rows_k_msb", "rows_v"):
        assert block.counters[rows] * 68 == every.counters[rows] * 80, (block.counters, every.counters)


@pytest.mark.real
def test_smollm2_block_eviction_equals_the_reference_runtime(tmp_path: Path) -> None:
    """SmolLM2-135M (30 layers, GQA 9/3), per-KV-head eviction (the decoder presets' rule) to 6 rows + 1 of
    slack: the prompt evicts, then the steps append, evict, append, evict - equal to the reference runtime."""
    src = MODELS / "cache" / "smollm2" / "model.onnx"
    if not src.exists():
        pytest.skip("python models/export.py --real smollm2")
    path = tmp_path / "smollm2.spatten.onnx"
    assert spattenc(["compile", str(src), "-o", str(path), "-q", "--value-keep", "0.5", "--kv-bits", "none",
                     "--kv-budget", "6", "--kv-sinks", "1", "--kv-recent", "2", "--kv-evict", "head",
                     "--kv-slack", "1"]) == 0
    feeds = feeds_for(path, 12, vocab=1000)
    r = run_functional(emit_model(path, 12, 4), feeds, model=path)
    assert_steps_equal_reference(path, r, feeds["input_ids"], 4)
    assert [np.shape(block[0])[-1] for block in r.kv_lists] == [6, 7, 6, 7, 6]
