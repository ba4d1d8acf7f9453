"""`spattenc emit` on every fixture (compiled with SpAtten passes, and dense), decoders, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODELS, fixture_names, load_meta

from spatten_compiler.backend import asm, hw, program
from spatten_compiler.backend.deps import DeadlockError, check_deps
from spatten_compiler.backend.graphinfo import GraphInfo, load_onnx, tensor_bytes
from spatten_compiler.backend.lower import emit_model
from spatten_compiler.cli import main as spattenc
from spatten_compiler.errors import SpattencError

ENCODER_OPTS = ["--token-keep", "0.5", "--head-keep", "0.75", "--value-keep", "0.5", "--kv-bits", "6+4"]
DECODER_OPTS = ["--head-keep", "0.75", "--value-keep", "0.5", "--kv-bits", "6+4"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out_dir = tmp_path_factory.mktemp("compiled")
    out = {}
    for name in fixture_names():
        opts = DECODER_OPTS if load_meta(name)["kind"] == "decoder" else ENCODER_OPTS
        dst = out_dir / f"{name}.spatten.onnx"
        assert spattenc(["compile", str(MODELS / f"{name}.onnx"), "-o", str(dst), "-q", *opts]) == 0
        out[name] = dst
    return out


def _check(path: Path, p: program.Program) -> None:
    check_deps(p.instrs)  # tokens balance, no deadlock
    gi = GraphInfo(load_onnx(path), 16)
    weights = [t for t in p.tensors if t.kind == "weight"]
    assert {t.source for t in weights} == {name for name, t in gi.inits.items() if tensor_bytes(t)}
    assert sum(t.size for t in weights) == sum(tensor_bytes(t) for t in gi.inits.values())
    data = program.to_bytes(p)
    back = program.from_bytes(data, p.hw)
    assert program.to_bytes(back) == data
    text = asm.disassemble(back)
    assert asm.disassemble(asm.assemble(text)) == text


@pytest.mark.parametrize("name", fixture_names())
def test_emit_every_fixture_compiled(name: str, compiled: dict[str, Path]) -> None:
    decoder = load_meta(name)["kind"] == "decoder"
    p = emit_model(compiled[name], 24, gen_steps=2 if decoder else 0)
    _check(compiled[name], p)
    mix = p.mix()
    assert mix["qk"] >= 2 * mix["cfg.attn"]  # MSB pass + predicated recompute
    assert mix["requant"] and mix["topk"] and mix["fetch.kv"]
    assert any(t.kind == "k_lsb" for t in p.tensors)


@pytest.mark.parametrize("name", fixture_names())
def test_emit_every_fixture_dense(name: str) -> None:
    path = MODELS / f"{name}.onnx"
    p = emit_model(path, 24)
    _check(path, p)
    mix = p.mix()
    assert mix["qk"] == mix["softmax"] == mix["pv"] > 0 and not mix["requant"] and not mix["topk"]


def test_token_pruning_is_decided_by_the_hardware(compiled: dict[str, Path]) -> None:
    p = emit_model(compiled["bert_torchscript"], 128)  # >= 64 tokens are always kept; 128 positions
    cfg = [i for i in p.instrs if i.mnemonic == "cfg.prune" and i["token_keep"] < 32768]
    assert cfg, "the layer that prunes tokens configures a keep ratio"
    topk = [i for i in p.instrs if i.mnemonic == "topk" and i.symbol("kind") == "tokens"]
    assert topk and any(i.mnemonic == "compact" for i in p.instrs)
    # row counts are bounds: every GEMM runs on the live rows only (the restore at the end is full length)
    assert all(i["live"] for i in p.instrs if i.mnemonic == "gemm")
    assert [i.symbol("op") for i in p.instrs if i.mnemonic == "elt" and not i["live"]] == ["copy"]


def test_same_stream_for_any_input_length(compiled: dict[str, Path]) -> None:
    a = emit_model(compiled["bert_torchscript"], 48)
    b = emit_model(compiled["bert_torchscript"], 48)
    assert program.to_bytes(a) == program.to_bytes(b)


def test_decoder_blocks_grow_the_key_lists() -> None:
    p = emit_model(MODELS / "gpt2_kv_torchscript.onnx", 8, gen_steps=3)
    appends = [i for i in p.instrs if i.mnemonic == "ilist" and i.symbol("op") == "append"]
    assert len(appends) >= 3 * 4  # one per layer and step (plus the position ids)
    past = sorted({i["past"] for i in p.instrs if i.mnemonic == "cfg.attn"})
    assert past == [0, 8, 9, 10]
    assert all(i["causal"] for i in p.instrs if i.mnemonic == "cfg.attn")


@pytest.mark.parametrize("name", ["gpt2_kv_torchscript", "llama_dynamo"])
def test_replayed_decoder_steps_equal_lowered_steps(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from spatten_compiler.backend.emitter import Emitter

    fast = program.to_bytes(emit_model(MODELS / f"{name}.onnx", 8, gen_steps=5))
    monkeypatch.setattr(Emitter, "replay", lambda *a: False)  # lower every step by walking the graph
    assert program.to_bytes(emit_model(MODELS / f"{name}.onnx", 8, gen_steps=5)) == fast


def test_emit_for_the_small_hardware() -> None:
    p = emit_model(MODELS / "bert_dynamo.onnx", 32, hw=hw.SPATTEN_1_8)
    assert p.hw.name == "spatten-1/8"
    with pytest.raises(SpattencError, match="built for hardware 'spatten-1/8'"):
        program.from_bytes(program.to_bytes(p), hw.SPATTEN)


def test_deadlocking_emitted_stream_is_refused_before_writing(tmp_path: Path) -> None:
    p = emit_model(MODELS / "bert_dynamo.onnx", 16)
    first_pop = next(k for k, i in enumerate(p.instrs) if i.dep("pop_prev"))
    p.instrs[first_pop] = p.instrs[first_pop].with_deps(p.instrs[first_pop].deps | 2)  # also wait for a store
    with pytest.raises(DeadlockError):
        check_deps(p.instrs)
    with pytest.raises(SpattencError, match="deadlock|balance"):
        program.write_program(p, tmp_path / "x.spbin")
    assert not list(tmp_path.iterdir())


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in-process (a subprocess costs seconds of imports on the shared machine); a usage
    error (argparse's exit) gives its exit code like the process would."""
    try:
        rc = spattenc(list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_emit_disasm_asm_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.spbin"
    rc, stdout, err = _cli(capsys, "emit", str(MODELS / "llama_dynamo.onnx"), "--prompt-len", "8", "--gen-steps", "2",
                           "-o", str(out), "--stats")
    assert rc == 0, err
    assert "instruction mix:" in stdout and "weight" in stdout
    rc, stdout, _ = _cli(capsys, "disasm", str(out))
    assert rc == 0 and "; node " in stdout and stdout.startswith(".hw spatten\n")
    (tmp_path / "m.s").write_text(stdout)
    assert _cli(capsys, "asm", str(tmp_path / "m.s"), "-o", str(tmp_path / "again.spbin"))[0] == 0
    # the text holds the stream, not the embedded model (MODEL section): asm gives the --no-weights binary
    embedded = program.from_bytes(out.read_bytes())
    assert embedded.model == (MODELS / "llama_dynamo.onnx").read_bytes()
    embedded.model = None
    assert (tmp_path / "again.spbin").read_bytes() == program.to_bytes(embedded)
    slim = tmp_path / "slim.spbin"
    assert _cli(capsys, "emit", str(MODELS / "llama_dynamo.onnx"), "--prompt-len", "8", "--gen-steps", "2",
                "-o", str(slim), "--no-weights")[0] == 0
    assert (tmp_path / "again.spbin").read_bytes() == slim.read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seq-len", "8", "--prompt-len", "8"], "exactly one of --seq-len"),
        (["--seq-len", "8", "--gen-steps", "2"], "--gen-steps needs --prompt-len"),
        (["--seq-len", "0"], "must be in 1..4096"),
        (["--seq-len", "8", "--hw", "nope.toml"], "neither a built-in"),
        (["--seq-len", "8", "-o", "no/such/dir/x.spbin"], "output folder 'no/such/dir' does not exist"),
    ],
)
def test_cli_emit_bad_options(args: list[str], message: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _cli(capsys, "emit", str(MODELS / "bert_dynamo.onnx"), "-o", str(tmp_path / "x.spbin"), *args)
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.spbin").exists()


def test_cli_emit_not_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", "emit", str(bad), "--seq-len", "8", "-o",
                        str(tmp_path / "x.spbin")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_length_gated_model_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gated = tmp_path / "gated.onnx"
    assert spattenc(["compile", str(MODELS / "bert_dynamo.onnx"), "-o", str(gated), "-q", "--token-keep", "0.5",
                     "--prune-min-length", "64"]) == 0
    capsys.readouterr()
    rc, _, err = _cli(capsys, "emit", str(gated), "--seq-len", "32", "-o", str(tmp_path / "g.spbin"))
    assert rc == 2 and "length-gated" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", fixture_names())
def test_attention_blocks_match_the_fixture_metadata(name: str) -> None:
    meta = load_meta(name)
    gi = GraphInfo(load_onnx(MODELS / f"{name}.onnx"), 16)
    assert len(gi.groups) == meta["num_layers"]
    assert {(g.heads, g.kv_heads, g.head_dim) for g in gi.groups} == {
        (meta["num_heads"], meta["num_kv_heads"], meta["head_dim"])}


def test_activations_that_do_not_fit_go_through_dram() -> None:
    import dataclasses

    small = dataclasses.replace(hw.SPATTEN, name="small-act", act_sram_kb=8)  # 4 KB per resident activation
    p = emit_model(MODELS / "bert_dynamo.onnx", 64, hw=small)
    scratch = {k for k, t in enumerate(p.tensors) if t.kind == "scratch"}
    assert scratch, "64 x 64 x 2-byte activations exceed half of 8 KB"
    by_tensor = {r.instr: r.tensor for r in p.relocs}
    stores = [k for k, i in enumerate(p.instrs) if i.mnemonic == "store" and by_tensor[k] in scratch]
    loads = [k for k, i in enumerate(p.instrs) if i.mnemonic == "load" and by_tensor[k] in scratch]
    assert stores and loads and min(stores) < min(loads)
    assert program.from_bytes(program.to_bytes(p)).mix() == p.mix()  # validated: tokens balance
    resident = emit_model(MODELS / "bert_dynamo.onnx", 64)
    assert not any(t.kind == "scratch" for t in resident.tensors)
