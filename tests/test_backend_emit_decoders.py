"""`spattenc emit` on decoders compiled with KV-cache eviction (evict-kv, optionally + the packed 4+4
cache): the stream evicts with the hardware's own accum/topk, later fetches read only kept rows."""

from __future__ import annotations

import math
from pathlib import Path

import onnx_ir as ir
import pytest
from conftest import MODELS, fixture_names, load_meta
from spatten_compiler.passes.evict_kv import budget_tokens

from spatten_compiler.backend import program
from spatten_compiler.backend.deps import check_deps
from spatten_compiler.backend.emitter import Emitter, LoweringError
from spatten_compiler.backend.lower import emit_model
from spatten_compiler.cli import main as spattenc
from spatten_compiler.pipeline import Pipeline, make_pass
from spatten_compiler.sim.api import run_binary
from spatten_compiler.sim.machine import Machine

DECODERS = [n for n in fixture_names() if load_meta(n)["kind"] == "decoder" and load_meta(n).get("kv_cache")]
SINKS = 4
_cache: dict[tuple[str, str, str], Path] = {}


def compiled(tmp: Path, name: str, budget: str = "0.5", bits: str = "none", *extra: str) -> Path:
    key = (name, budget, bits, *extra)
    if key not in _cache:
        dst = tmp / f"{name}-{budget}-{bits.replace('+', '_')}{'-'.join(extra)}.onnx"
        assert spattenc(["compile", str(MODELS / f"{name}.onnx"), "-o", str(dst), "-q", "--kv-budget", budget,
                         "--kv-bits", bits, *extra]) == 0
        _cache[key] = dst
    return _cache[key]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evict")


def kv_fetch_rows(p: program.Program) -> list[dict[int, int]]:
    """Decode the stream: per token block, layer -> K rows one (non-predicated) fetch.kv reads.
    Index slots are tracked as lengths; topk keeps min(n, max(ceil(ratio * n), protected))."""
    m, slots, blocks, layer = Machine(), {}, [], 0
    for ins in p.instrs:
        f, mn = ins.fields, ins.mnemonic
        if mn == "cfg.attn":
            layer = f["layer"]
        elif mn == "cfg.prune":
            m.configure_prune(f)
        elif mn == "ilist":
            op = ins.symbol("op")
            slots[f["dst"]] = {"iota": f["value"], "append": slots.get(f["dst"], 0) + 1,
                               "copy": slots.get(f["src"], 0)}[op]
            if op == "iota" and f["dst"] == 0:
                blocks.append({})
        elif mn == "topk" and ins.symbol("kind") == "tokens":
            n = slots.get(f["idx_in"], 0)
            slots[f["idx_out"]] = min(n, max(m.keep_count(n, m.token_keep), m.protect_first + m.protect_recent))
        elif mn == "fetch.kv" and ins.symbol("kv") == "k" and not f["pred"] and f["head"] == 0:
            blocks[-1][layer] = slots.get(f["idx"], 0)
    return blocks


def expected_rows(prompt: int, steps: int, budget: float, layers: int) -> list[int]:
    """K rows a layer reads per block under evict-kv's rule (layer mode, one sequence, no padding)."""
    out, kept = [prompt], budget_tokens(budget, prompt, SINKS, 0, prompt)
    for t in range(steps):
        out.append(kept + 1)
        kept = budget_tokens(budget, prompt + t + 1, SINKS, 0, kept + 1)
    return out


@pytest.mark.parametrize("bits", ["none", "4+4"])
@pytest.mark.parametrize("name", DECODERS)
def test_emit_evicting_decoder(name: str, bits: str, tmp: Path) -> None:
    path = compiled(tmp, name, "0.5", bits)
    prompt, steps = 16, 7
    p = emit_model(path, prompt, gen_steps=steps)
    check_deps(p.instrs)  # dependency tokens balance, no deadlock
    data = program.to_bytes(p)  # validates
    assert program.to_bytes(program.from_bytes(data, p.hw)) == data
    layers = load_meta(name)["num_layers"]
    mix = p.mix()
    assert mix["topk"] == layers * (steps + 1)  # one eviction per layer and block, the prompt included
    assert mix["accum"] >= load_meta(name)["num_heads"] * layers * (steps + 1)
    if bits != "none":
        assert any(t.kind == "k_lsb" for t in p.tensors)
    rows = kv_fetch_rows(p)
    assert len(rows) == steps + 1
    want = expected_rows(prompt, steps, 0.5, layers)
    for block, n in zip(rows, want):
        assert block == dict.fromkeys(range(layers), n)
    for t, block in enumerate(rows[1:]):
        assert max(block.values()) <= max(math.ceil(0.5 * (prompt + t)), SINKS) + 1  # within the budget


def test_replayed_steps_equal_lowered_steps_with_eviction(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, bits in (("llama_dynamo", "none"), ("gpt2_kv_torchscript", "4+4")):
        path = compiled(tmp, name, "0.5", bits)
        fast = program.to_bytes(emit_model(path, 8, gen_steps=9))
        with monkeypatch.context() as mp:
            mp.setattr(Emitter, "replay", lambda *a: False)  # lower every step by walking the graph
            assert program.to_bytes(emit_model(path, 8, gen_steps=9)) == fast


def test_kv_traffic_follows_the_budget(tmp: Path) -> None:
    prompt, steps = 32, 64
    rows = {b: kv_fetch_rows(emit_model(compiled(tmp, "llama_dynamo", b), prompt, gen_steps=steps))
            for b in ("0.25", "0.5", "1.0")}
    dense = kv_fetch_rows(emit_model(MODELS / "llama_dynamo.onnx", prompt, gen_steps=steps))
    assert rows["1.0"] == dense  # a full budget evicts nothing
    gen = {b: sum(blk[0] for blk in r[1:]) for b, r in rows.items()}
    assert gen["0.25"] < gen["0.5"] < gen["1.0"]
    ratio = gen["0.5"] / gen["0.25"]
    assert 1.7 < ratio < 2.1, ratio  # halving the budget roughly halves the K/V rows read per step
    kv = {}
    for b in ("0.25", "1.0"):
        rep = run_binary(emit_model(compiled(tmp, "llama_dynamo", b), prompt, gen_steps=steps))
        kv[b] = sum(rep.dram_bytes.get(c, 0) for c in ("k_msb", "k_lsb", "v"))
    assert kv["0.25"] < 0.6 * kv["1.0"], kv  # simulator, timing mode: K/V DRAM bytes (stores included)


def test_cascade_takes_the_layer_above_as_candidates(tmp: Path) -> None:
    p = emit_model(compiled(tmp, "llama_dynamo", "0.5", "none", "--kv-evict", "cascade"), 16, gen_steps=3)
    tops = [i for i in p.instrs if i.mnemonic == "topk"]
    assert [(i["idx_in"], i["idx_out"]) for i in tops[:4]] == [(16, 16), (16, 17), (17, 18), (18, 19)]
    assert kv_fetch_rows(p)[1:] == [dict.fromkeys(range(4), n) for n in expected_rows(16, 3, 0.5, 4)[1:]]


def test_per_kv_head_eviction_keeps_one_list_per_kv_head(tmp: Path) -> None:
    """--kv-evict head (the decoder presets' rule): each K/V head has its own list, accumulator and top-k;
    every list follows the budget, and timing mode charges the K/V bytes of the kept rows only."""
    prompt, steps = 16, 8
    p = emit_model(compiled(tmp, "llama_dynamo", "0.5", "none", "--kv-evict", "head"), prompt, gen_steps=steps)
    check_deps(p.instrs)
    tops = [i for i in p.instrs if i.mnemonic == "topk" and i.symbol("kind") == "tokens"]
    assert [(i["idx_in"], i["idx_out"]) for i in tops[:4]] == [(16, 16), (17, 17), (18, 18), (19, 19)]  # 2 per layer
    assert len({i["src"] for i in tops}) == 8  # an accumulator per (layer, K/V head)
    fetched = {(i["head"], i["idx"]) for i in p.instrs if i.mnemonic == "fetch.kv" and i.symbol("kv") == "k"}
    assert {(0, 16), (1, 17)} <= fetched  # K/V head j of layer 0 reads list 16 + j
    kv = {}
    for mode, path in (("head", compiled(tmp, "llama_dynamo", "0.25", "none", "--kv-evict", "head")),
                       ("layer", compiled(tmp, "llama_dynamo", "0.25")),
                       ("cascade", compiled(tmp, "llama_dynamo", "0.25", "none", "--kv-evict", "cascade")),
                       ("dense", MODELS / "llama_dynamo.onnx")):
        rep = run_binary(emit_model(path, 32, gen_steps=32))
        kv[mode] = sum(rep.dram_bytes.get(c, 0) for c in ("k_msb", "k_lsb", "v"))
    assert kv["head"] == kv["layer"] == kv["cascade"] < 0.7 * kv["dense"], kv  # same kept counts per list


def test_eviction_of_the_packed_cache_reads_fewer_planes(tmp: Path) -> None:
    """--kv-budget with the packed 6+4 cache: the K MSB/LSB and V planes read follow the budget too."""
    kv = {}
    for b in ("0.25", "1.0"):
        rep = run_binary(emit_model(compiled(tmp, "llama_dynamo", b, "6+4"), 32, gen_steps=32))
        kv[b] = {c: rep.dram_bytes.get(c, 0) for c in ("k_msb", "k_lsb", "v")}
    assert all(kv["0.25"][c] < 0.7 * kv["1.0"][c] for c in ("k_msb", "v")), kv
    assert kv["0.25"]["k_lsb"] <= kv["1.0"]["k_lsb"], kv


def test_cascade_with_a_schedule_is_refused(tmp: Path) -> None:
    model = ir.load(str(MODELS / "llama_torchscript.onnx"))
    Pipeline([make_pass("normalize"), make_pass("decompose-attention"),
              make_pass("evict-kv", budget=0.5, mode="cascade", schedule=(1.0, 0.5))])(model)
    ir.save(model, str(tmp / "sched.onnx"))
    with pytest.raises(LoweringError, match="schedule"):
        emit_model(tmp / "sched.onnx", 16, gen_steps=2)


def test_a_score_other_than_accumulated_is_refused_for_generated_steps(tmp: Path) -> None:
    """The stream's top-k ranks by the accumulator (evict-kv's ``accumulated``); --kv-score mean ranks by
    accumulated / queries that saw the token: refused in one line (the prompt alone changes no output)."""
    path = compiled(tmp, "llama_dynamo", "0.5", "none", "--kv-score", "mean")
    with pytest.raises(LoweringError, match="--kv-score mean") as e:
        emit_model(path, 16, gen_steps=2)
    assert "\n" not in str(e.value)
    emit_model(path, 16)


def test_token_budget_and_recent_share(tmp: Path) -> None:
    """--kv-budget 12 --kv-recent 50%: 12 rows kept (4 sinks, a window of half the other 8), 13 read per step."""
    p = emit_model(compiled(tmp, "gpt2_kv_dynamo", "12", "none", "--kv-recent", "50%"), 8, gen_steps=10)
    rows = kv_fetch_rows(p)
    assert [blk[0] for blk in rows] == [8, 9, 10, 11, 12, 13, 13, 13, 13, 13, 13]
    prunes = [i for i in p.instrs if i.mnemonic == "cfg.prune"]
    assert {(i["protect_first"], i["protect_recent"]) for i in prunes[-4:]} == {(SINKS, 4)}


@pytest.mark.real
def test_smollm2_with_eviction(tmp: Path) -> None:
    """The real SmolLM2 (30 layers, GQA 9/3): every layer's list is bounded by the budget at every step."""
    path = MODELS / "cache" / "smollm2" / "model.onnx"
    if not path.exists():
        pytest.skip(f"{path} not exported (python models/export.py --real smollm2)")
    dst = tmp / "smol.kv.onnx"
    assert spattenc(["compile", str(path), "-o", str(dst), "-q", "--kv-budget", "0.25", "--kv-bits", "none"]) == 0
    p = emit_model(dst, 64, gen_steps=6)
    check_deps(p.instrs)
    rows = kv_fetch_rows(p)
    assert rows[1:] == [dict.fromkeys(range(30), n) for n in expected_rows(64, 6, 0.25, 30)[1:]]
    assert max(rows[-1].values()) <= math.ceil(0.25 * 69) + 1


def test_accumulators_that_do_not_fit_are_refused_in_one_line(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, out = compiled(tmp, "llama_dynamo"), tmp / "big.spbin"
    assert spattenc(["emit", str(path), "--prompt-len", "2040", "--gen-steps", "8", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "score buffer" in err and len(err.splitlines()) == 1 and not out.exists()
