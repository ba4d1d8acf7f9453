"""Functional mode runs WHOLE emitted models (``sim.model_run``): on every fixture compiled with
spattenc's rewrites, the stream's own decisions - kept tokens, kept heads, rows that fetch K/V
LSBs - equal the reference runtime's (``runtime/``), and the outputs agree within 1e-4 (they are
bit-identical today). Real models (marker ``real``): MiniLM and SmolLM2 with short inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, fixture_names, load_meta
from spatten_compiler.runtime import quant_ops, spatten_ops
from spatten_compiler.runtime.reference import ReferenceRuntime

from spatten_compiler.backend.lower import emit_model
from spatten_compiler.cli import main as spattenc
from spatten_compiler.sim.model_run import FunctionalResult, run_functional

ENCODER_OPTS = ["--token-keep", "0.5", "--head-keep", "0.75", "--value-keep", "0.5", "--kv-bits", "6+4"]
DECODER_OPTS = ["--head-keep", "0.75", "--value-keep", "0.5", "--kv-bits", "6+4"]
ENCODER_LEN, DECODER_LEN = 128, 32  # encoders prune tokens from 64 tokens on
# the default run covers each family (encoder token+head+value+LSB, decoder with a packed cache and
# head pruning, GQA with a Q/K-scaling export); the other fixtures run with -m slow (~30 s each here)
QUICK = {"bert_torchscript", "distilbert_dynamo", "gpt2_kv_torchscript", "llama_sdpa_dynamo"}
FIXTURES = [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in fixture_names()]


def feeds_for(model_path: Path, n: int, seed: int = 0, vocab: int = 90) -> dict[str, np.ndarray]:
    """Batch 1, n real tokens, empty caches (a decoder's prompt block)."""
    import onnx

    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for i in onnx.load(str(model_path), load_external_data=False).graph.input:
        dims = [d.dim_value if d.dim_value else (1 if "batch" in d.dim_param else 0)
                for d in i.type.tensor_type.shape.dim]
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(5, vocab, (1, n)).astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, n), np.int64)
        elif i.name == "token_type_ids":
            feeds[i.name] = np.zeros((1, n), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(n, dtype=np.int64)[None]
        elif "past" in i.name:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            feeds[i.name] = np.zeros(dims, dtype)
    return feeds


def reference(model: Path, feeds: dict[str, np.ndarray]) -> dict:
    rep = ReferenceRuntime(model).run(feeds)
    need = [e["need"][0] for e in quant_ops.LOG if e["op"] == "ProgressiveContext"]
    return {"outputs": rep.outputs, "tokens": [s["sel"][0].tolist() for s in spatten_ops.CURRENT.selections],
            "heads": rep.head_keep, "lsb": [[np.flatnonzero(h).tolist() for h in n] for n in need]}


def lsb_by_layer(r: FunctionalResult) -> list[list[list[int]]]:
    """Per requantizing layer, the LSB rows of each live head in head order (the host's head order)."""
    layers: dict[int, list[list[int]]] = {}
    for layer, _h, rows in r.lsb_rows:
        layers.setdefault(layer, []).append(rows)
    return [layers[k] for k in sorted(layers)]


def assert_same(r: FunctionalResult, ref: dict, atol: float = 1e-4) -> None:
    assert r.kept_tokens == ref["tokens"]
    assert r.kept_heads == ref["heads"]
    assert lsb_by_layer(r) == ref["lsb"]
    for name, expect in ref["outputs"].items():
        if name.startswith("present"):  # the host's packed cache, not the accelerator's planes
            continue
        np.testing.assert_allclose(r.outputs[name], expect, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"dir": tmp_path_factory.mktemp("model_run")}


def _compile(name: str, out_dir: Path) -> tuple[Path, int, bool]:
    decoder = load_meta(name)["kind"] == "decoder"
    dst = out_dir / f"{name}.spatten.onnx"
    if not dst.exists():
        assert spattenc(["compile", str(MODELS / f"{name}.onnx"), "-o", str(dst), "-q",
                         *(DECODER_OPTS if decoder else ENCODER_OPTS)]) == 0
    return dst, DECODER_LEN if decoder else ENCODER_LEN, decoder


@pytest.mark.parametrize("name", FIXTURES)
def test_functional_whole_model_equals_the_reference_runtime(name: str, compiled: dict) -> None:
    model, n, decoder = _compile(name, compiled["dir"])
    feeds = feeds_for(model, n)
    r = run_functional(emit_model(model, n), feeds, model=model)
    assert_same(r, reference(model, feeds))
    # the comparison is not vacuous: the stream pruned and refetched
    assert sum(len(rows) for *_, rows in r.lsb_rows) > 0
    if not decoder:
        assert r.kept_tokens and len(r.kept_tokens[0]) < n
    assert r.timing is not None and r.timing.counters["rows_k_lsb"] > 0  # the data's LSB rows drove the timing


def test_cli_functional_embedded_model_outputs_and_refusals(compiled: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    model, n, _ = _compile("bert_torchscript", compiled["dir"])
    feeds = feeds_for(model, n, seed=3)
    np.savez(tmp_path / "feeds.npz", **feeds)
    binary, slim = tmp_path / "m.spbin", tmp_path / "slim.spbin"
    assert spattenc(["emit", str(model), "--seq-len", str(n), "-o", str(binary), "-q"]) == 0
    assert spattenc(["emit", str(model), "--seq-len", str(n), "-o", str(slim), "-q", "--no-weights"]) == 0
    assert slim.stat().st_size < binary.stat().st_size - model.stat().st_size // 2
    ref = reference(model, feeds)
    out = tmp_path / "out.npz"
    assert spattenc(["sim", str(binary), "--input", str(tmp_path / "feeds.npz"), "--mode", "functional",
                     "--outputs", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kept tokens" in text and "kept heads" in text and "LSBs" in text
    with np.load(out) as got:
        np.testing.assert_allclose(got["last_hidden_state"], ref["outputs"]["last_hidden_state"], atol=1e-4)
    # timing-only binary: needs the model; with it, the same numbers
    assert spattenc(["sim", str(slim), "--input", str(tmp_path / "feeds.npz"), "--mode", "functional"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--no-weights" in err and "\n" not in err and "Traceback" not in err
    assert spattenc(["sim", str(slim), "--input", str(tmp_path / "feeds.npz"), "--mode", "functional",
                     "--model", str(model), "--outputs", str(out), "--json"]) == 0
    with np.load(out) as got:
        np.testing.assert_allclose(got["last_hidden_state"], ref["outputs"]["last_hidden_state"], atol=1e-4)
    capsys.readouterr()
    # a model the binary was not lowered from, a wrong length, a corrupted binary: one line, exit 2
    other, _, _ = _compile("distilbert_torchscript", compiled["dir"])
    capsys.readouterr()  # its compile warnings
    short = tmp_path / "short.npz"
    np.savez(short, **feeds_for(model, 16))
    corrupt = tmp_path / "bad.spbin"
    data = bytearray(binary.read_bytes())
    data[-100] ^= 0xFF  # inside the MODEL section
    corrupt.write_bytes(bytes(data))
    for args in (["sim", str(slim), "--model", str(other)], ["sim", str(binary), "--input", str(short)],
                 ["sim", str(corrupt)], ["sim", str(binary), "--dense", str(binary)]):
        feeds_arg = [] if "--input" in args else ["--input", str(tmp_path / "feeds.npz")]
        assert spattenc([*args, *feeds_arg, "--mode", "functional"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err and "\n" not in err and "Traceback" not in err, err


REAL = MODELS / "cache"


@pytest.mark.real
@pytest.mark.parametrize("name,n,opts", [
    ("minilm", 128, ENCODER_OPTS),
    ("smollm2", 16, ["--value-keep", "0.5", "--kv-bits", "6+4"]),
    # SmolLM2 has 9 query heads in 3 K/V groups: the stream's head top-k ranks the groups (2 of 3 kept);
    # with a float cache and with the packed 6+4 cache
    ("smollm2", 16, ["--head-keep", "0.5", "--value-keep", "0.5", "--kv-bits", "none"]),
    ("smollm2", 16, ["--head-keep", "0.5", "--value-keep", "0.5", "--kv-bits", "6+4"]),
])
def test_real_models_functional_equals_the_reference_runtime(name: str, n: int, opts: list[str],
                                                             tmp_path: Path) -> None:
    src = REAL / name / "model.onnx"
    if not src.exists():
        pytest.skip(f"python models/export.py --real {name}")
    model = tmp_path / f"{name}.spatten.onnx"
    assert spattenc(["compile", str(src), "-o", str(model), "-q", *opts]) == 0
    feeds = feeds_for(model, n, vocab=1000)
    r = run_functional(emit_model(model, n), feeds, model=model)
    assert_same(r, reference(model, feeds))
    if name == "smollm2" and "--head-keep" in opts:
        assert r.kept_heads and all(len(h) < 3 for h in r.kept_heads)  # KV groups, as the graph ranks them
    if opts[opts.index("--kv-bits") + 1] != "none":
        assert sum(len(rows) for *_, rows in r.lsb_rows) > 0
