"""--prune-min-length: one If on the input length; inputs of at most N tokens run the model without
token and head pruning, longer ones the pruned model, each exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, run_ort, tiny_model
from spatten_compiler.passes.length_gate import length_input
from spatten_compiler.runtime.reference import ReferenceRuntime
from test_cli import spattenc

from spatten_compiler.cli import main
from spatten_compiler.errors import OptionError

PRUNE = ["--token-keep", "0.5", "--token-min-keep", "2", "--head-keep", "0.5"]


def feeds(seq: int, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(5, 90, (batch, seq))
    mask = np.ones_like(ids)
    mask[1, seq - seq // 4:] = 0  # one padded sample
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def compile_to(src: Path, out: Path, *flags: str) -> Path:
    assert main([str(src), "-o", str(out), "-q", *flags]) == 0
    return out


@pytest.mark.parametrize("name, flags", [
    ("bert_torchscript", PRUNE),
    ("bert_dynamo", PRUNE),
    ("distilbert_torchscript", ["--token-keep", "0.5", "--token-min-keep", "2", "--kv-bits", "6+2", "--kv-rule",
                                "fixed", "--lsb-threshold", "0.5", "--kv-granularity", "head"]),  # no rounding ties
    ("gpt2_torchscript", ["--head-keep", "0.5"]),  # packed QKV, heads only
    ("bert_attention_op23", PRUNE),  # fused ONNX Attention: decomposed in the pruned branch only
])
def test_gate_runs_each_branch_exactly(name: str, flags: list[str], tmp_path: Path) -> None:
    src = MODELS / f"{name}.onnx"
    gated = compile_to(src, tmp_path / "gated.onnx", *flags, "--prune-min-length", "8")
    pruned = compile_to(src, tmp_path / "pruned.onnx", *flags)
    short_ref = src
    if "--kv-bits" in flags:  # the short branch keeps the length-independent options
        short_ref = compile_to(src, tmp_path / "short.onnx", *flags[flags.index("--kv-bits"):])
    proto = onnx.load(gated)
    assert [n.op_type for n in proto.graph.node] == ["Shape", "Greater", "If"]
    assert {m.key: m.value for m in proto.metadata_props}["spatten.prune_min_length"] == "8"
    reference = ReferenceRuntime(gated)
    for seq, expected in ((5, short_ref), (8, short_ref), (9, pruned), (16, pruned)):
        f = feeds(seq)
        got = run_ort(gated, f)
        want = run_ort(expected, f)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=f"{key} at {seq} tokens")
        report = reference.run(f)
        for key in want:
            np.testing.assert_allclose(report.outputs[key], got[key], atol=1e-4, err_msg=f"reference, {seq} tokens")
        pruned_run = seq > 8
        assert bool(report.token_keep or report.head_keep) == pruned_run


def test_unchanged_weights_are_stored_once(tmp_path: Path) -> None:
    src = MODELS / "bert_torchscript.onnx"
    flags = ["--token-keep", "0.5", "--token-min-keep", "2"]
    gated = onnx.load(compile_to(src, tmp_path / "gated.onnx", *flags, "--prune-min-length", "8"))
    pruned = onnx.load(compile_to(src, tmp_path / "pruned.onnx", *flags))

    def weight_bytes(model: onnx.ModelProto) -> int:
        return sum(len(t.raw_data) for t in model.graph.initializer)

    assert weight_bytes(gated) <= 1.02 * weight_bytes(pruned)
    then_branch = gated.graph.node[-1].attribute[0].g
    assert not then_branch.initializer and not then_branch.input


def test_gate_keeps_model_inputs_and_outputs(tmp_path: Path) -> None:
    src = MODELS / "bert_torchscript.onnx"
    gated = onnx.load(compile_to(src, tmp_path / "gated.onnx", *PRUNE, "--prune-min-length", "4"))
    orig = onnx.load(src)
    assert [i.name for i in gated.graph.input] == [i.name for i in orig.graph.input]
    assert [o.name for o in gated.graph.output] == [o.name for o in orig.graph.output]


@pytest.mark.parametrize("flags, message", [
    (["--token-keep", "0.5", "--prune-min-length", "0"], "--prune-min-length must be a whole number"),
    (["--prune-min-length", "8", "--no-token-pruning"], "give --token-keep or --head-keep too"),
    (["--token-keep", "0.5", "--emit-kept", "--prune-min-length", "8"], "cannot be combined with --emit-kept"),
])
def test_bad_gate_options(flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.onnx"
    assert main([str(MODELS / "bert_torchscript.onnx"), "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_gate_refuses_kv_cache_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.onnx"
    assert main([str(MODELS / "gpt2_kv_torchscript.onnx"), "-o", str(out), "--head-keep", "0.5",
                 "--prune-min-length", "8"]) == 2
    assert "without a KV cache" in capsys.readouterr().err
    assert not out.exists()


def test_gate_needs_a_length_input() -> None:
    with pytest.raises(OptionError, match="integer input"):
        length_input(ir.serde.deserialize_model(tiny_model()).graph)


def test_gated_model_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gated = compile_to(MODELS / "bert_torchscript.onnx", tmp_path / "gated.onnx", *PRUNE, "--prune-min-length", "8")
    assert main(["inspect", str(gated)]) == 2
    assert "already compiled by spattenc with --prune-min-length 8" in capsys.readouterr().err
    assert main([str(gated), "-o", str(tmp_path / "again.onnx"), "--token-keep", "0.5"]) == 2
    assert "use the model it was compiled from" in capsys.readouterr().err
    assert not (tmp_path / "again.onnx").exists()


def test_compile_help_lists_the_gate() -> None:
    r = spattenc("compile", "--help")
    assert r.returncode == 0 and "--prune-min-length N" in r.stdout


def test_report_counts_gated_lengths_as_unpruned(tmp_path: Path) -> None:
    src, report = MODELS / "bert_torchscript.onnx", tmp_path / "r.json"
    compile_to(src, tmp_path / "plain.onnx", "--token-keep", "0.5", "--report", str(report))
    plain = json.loads(report.read_text())
    compile_to(src, tmp_path / "gated.onnx", "--token-keep", "0.5", "--prune-min-length", "256",
               "--report", str(report))
    gated = json.loads(report.read_text())
    assert gated["prune_min_length"] == 256
    assert gated["flop_ratio"]["128"] == gated["flop_ratio"]["256"] == 1.0
    assert gated["flop_ratio"]["512"] == plain["flop_ratio"]["512"] > 1.0


def test_gate_from_a_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "spatten.json"
    cfg.write_text(json.dumps({"token_keep": 0.5, "token_min_keep": 2, "prune_min_length": 8}))
    gated = compile_to(MODELS / "bert_torchscript.onnx", tmp_path / "gated.onnx", "--config", str(cfg))
    assert {m.key: m.value for m in onnx.load(gated).metadata_props}["spatten.prune_min_length"] == "8"
