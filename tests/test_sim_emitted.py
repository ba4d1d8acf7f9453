"""The simulator runs what ``spattenc emit`` produces: compiled (SpAtten) and dense streams of real
fixture exports, encoders and decoders, in timing mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MODELS, load_meta

from spatten_compiler.backend.lower import emit_model
from spatten_compiler.cli import main as spattenc
from spatten_compiler.sim.api import run_binary

FIXTURES = ["bert_torchscript", "distilbert_dynamo", "gpt2_kv_torchscript", "llama_torchscript"]
ENCODER_OPTS = ["--token-keep", "0.5", "--head-keep", "0.75", "--value-keep", "0.5", "--kv-bits", "6+4"]
DECODER_OPTS = ["--head-keep", "0.75", "--value-keep", "0.5", "--kv-bits", "6+4"]
KV = ("k_msb", "k_lsb", "v")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out_dir = tmp_path_factory.mktemp("compiled")
    out = {}
    for name in FIXTURES:
        opts = DECODER_OPTS if load_meta(name)["kind"] == "decoder" else ENCODER_OPTS
        dst = out_dir / f"{name}.spatten.onnx"
        assert spattenc(["compile", str(MODELS / f"{name}.onnx"), "-o", str(dst), "-q", *opts]) == 0
        out[name] = dst
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_emitted_streams_simulate(name: str, compiled: dict[str, Path]) -> None:
    decoder = load_meta(name)["kind"] == "decoder"
    steps, rows = (4, 32) if decoder else (0, 128)  # encoders keep every token below 64
    spatten = emit_model(compiled[name], rows, gen_steps=steps)
    dense = emit_model(MODELS / f"{name}.onnx", rows, gen_steps=steps)
    r = run_binary(spatten, dense=dense, lsb_fraction=0.5)
    assert r.cycles > 0 and r.flops > 0 and r.instructions == len(spatten.instrs)
    assert r.dram_bytes["weights"] >= sum(t.size for t in spatten.tensors if t.kind == "weight") // 2
    assert r.counters.get("rows_k_lsb", 0) > 0  # the predicated LSB fetches ran
    # 6-bit planes and pruning ask for fewer K/V bytes than 16-bit activations; with these 16-dim
    # heads a 6-bit row is 12 bytes, still one 32-byte transaction, so compare the requested bytes
    dense_run = run_binary(dense)
    assert sum(r.dram_requested.get(c, 0) for c in KV) < sum(dense_run.dram_requested.get(c, 0) for c in KV)
    if not decoder:
        assert r.counters["tokens_kept"] < r.counters["tokens_in"]
        assert r.baseline["speedup"] > 1


REAL_MINILM = MODELS / "cache" / "minilm" / "model.onnx"


@pytest.mark.real
def test_real_minilm_emitted_and_simulated(tmp_path: Path) -> None:
    if not REAL_MINILM.exists():
        pytest.skip("python models/export.py --real minilm")
    dst = tmp_path / "minilm.spatten.onnx"
    assert spattenc(["compile", str(REAL_MINILM), "-o", str(dst), "-q", *ENCODER_OPTS]) == 0
    r = run_binary(emit_model(dst, 256), dense=emit_model(REAL_MINILM, 256))
    assert r.counters["tokens_kept"] < r.counters["tokens_in"] and r.counters["heads_kept"] < r.counters["heads_in"]
    assert r.baseline["speedup"] > 1.5  # half the tokens after the first layers: the GEMMs shrink too
    assert sum(r.dram_bytes[c] for c in KV) < sum(r.baseline["dram_bytes"][c] for c in KV)
