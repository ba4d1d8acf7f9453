"""spattenc generate: greedy generation through a full-budget evict-kv model reproduces the dense
model's tokens; the tokenizer path (a tiny tokenizers-built tokenizer.json); bad input exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODELS
from test_evict_kv import DECODERS, compiled

from spatten_compiler.decoding import DecoderSession
from spatten_compiler.generate import generate, generate_ids


def spattenc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spatten_compiler", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_full_budget_reproduces_dense(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled(name, str(tmp_path_factory.getbasetemp()), budget=1.0, sinks=2, recent=2, mode="layer")
    prompt = [5, 17, 33, 2, 9, 11, 40]
    dense = list(generate_ids(DecoderSession(MODELS / f"{name}.onnx"), prompt, 20))
    ours = list(generate_ids(DecoderSession(path), prompt, 20))
    assert len(dense) == 20 and ours == dense


def make_tokenizer(folder: Path, size: int = 40) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|im_end|>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return folder


def test_generate_with_tokenizer_streams_and_matches_cli(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tok")
    model = MODELS / "gpt2_kv_torchscript.onnx"
    pieces: list[str] = []
    text = generate(model, tok, "w3 w5 w7", 8, stream=pieces.append)
    assert "".join(pieces) == text
    r = spattenc("generate", str(model), "--tokenizer", str(tok), "--prompt", "w3 w5 w7", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == text
    sampled = [generate(model, tok, "w3 w5", 6, temperature=0.8, top_p=0.9, seed=s) for s in (1, 1)]
    assert sampled[0] == sampled[1]  # seeded sampling is reproducible


def test_generate_stops_at_eos(tmp_path: Path) -> None:
    model = MODELS / "gpt2_kv_torchscript.onnx"
    prompt = [3, 5, 7]
    first = next(generate_ids(DecoderSession(model), prompt, 1))
    out = list(generate_ids(DecoderSession(model), prompt, 5, eos_ids={first}))
    assert out == []


def test_bad_inputs_exit_2(tmp_path: Path) -> None:
    big = make_tokenizer(tmp_path / "big", size=600)  # the fixtures' vocabulary has 512 entries
    r = spattenc("generate", str(MODELS / "gpt2_kv_torchscript.onnx"), "--tokenizer", str(big), "--prompt", "w1")
    assert r.returncode == 2 and "does not belong" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    small = make_tokenizer(tmp_path / "small")
    r = spattenc("generate", str(MODELS / "bert_dynamo.onnx"), "--tokenizer", str(small), "--prompt", "w1")
    assert r.returncode == 2 and "KV cache" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = spattenc("generate", str(MODELS / "gpt2_kv_torchscript.onnx"), "--tokenizer", str(tmp_path), "--prompt", "w1")
    assert r.returncode == 2 and "tokenizer.json" in r.stderr
    out = tmp_path / "x.onnx"
    r = spattenc(str(MODELS / "llama_dynamo.onnx"), "-o", str(out), "--kv-budget", "5", "--kv-sinks", "4",
                 "--kv-recent", "4")
    assert r.returncode == 2 and "below" in r.stderr and not out.exists()
    r = spattenc(str(MODELS / "bert_dynamo.onnx"), "-o", str(out), "--kv-budget", "0.5")
    assert r.returncode == 2 and "no KV cache" in r.stderr and not out.exists()


def test_preset_block_eviction_generates_alike_in_both_runtimes(tmp_path: Path) -> None:
    """The decoder preset evicts in blocks (--kv-slack); with a low floor and slack so that a 12-token
    generation both appends and evicts, greedy generation over onnxruntime and the reference runtime
    gives the same tokens and the same per-layer cache lengths."""
    from spatten_compiler.cli import main

    out = tmp_path / "p.onnx"
    assert main([str(MODELS / "llama_torchscript.onnx"), "-o", str(out), "--kv-min-keep", "4", "--kv-slack", "3"]) == 0
    prompt = [5, 17, 33, 2, 9, 11, 40, 3, 8, 21]
    runs = {}
    for rt in ("ort", "reference"):
        s = DecoderSession(out, runtime=rt)
        tokens, lengths = [], []
        for tok in generate_ids(s, prompt, 12):
            tokens.append(tok)
            lengths.append(s.cache_lengths()[0])
        runs[rt] = (tokens, lengths)
    assert runs["ort"] == runs["reference"]
    lengths = runs["ort"][1]
    assert any(b < a for a, b in zip(lengths, lengths[1:])) and any(b > a for a, b in zip(lengths, lengths[1:]))


def test_tokenizer_defaults_to_the_models_folder(tmp_path: Path) -> None:
    import shutil

    folder = make_tokenizer(tmp_path / "export")
    model = shutil.copy(MODELS / "gpt2_kv_torchscript.onnx", folder / "model.onnx")
    r = spattenc("generate", str(model), "--prompt", "w3 w5 w7", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == generate(model, folder, "w3 w5 w7", 4)
    r = spattenc("generate", str(MODELS / "gpt2_kv_torchscript.onnx"), "--prompt", "w1")
    assert r.returncode == 2 and "pass --tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
