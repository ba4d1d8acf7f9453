"""``spattenc sim`` end to end on a written .spbin: report, chart, trace, dense comparison, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from spatten_compiler.backend.program import write_program
from spatten_compiler.cli import main
from spatten_compiler.sim.api import run_binary
from spatten_compiler.sim.workload import Quant, Workload, to_program

W = Workload("t", 2, 4, 64, [256], [1], [[256, 128]], [[4, 2]], 0.5, Quant(6, 4, 6, 16, 0.1, True), 256)


@pytest.fixture(scope="module")
def binaries(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("spbin")
    write_program(to_program(W), d / "t.spbin")
    write_program(to_program(W.dense()), d / "t.dense.spbin")
    return d / "t.spbin", d / "t.dense.spbin"


def test_sim_cli_report_chart_trace(binaries, tmp_path, capsys) -> None:
    spbin, dense = binaries
    out = tmp_path / "r.json"
    rc = main(["sim", str(spbin), "--dense", str(dense), "--report", str(out), "--chart", str(tmp_path / "c.png"),
               "--trace", str(tmp_path / "t.trace")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "vs dense stream" in text and "cycles" in text
    rep = json.loads(out.read_text())
    assert rep["baseline"]["dram_reduction"] > 3  # 6-bit planes, half the tokens in layer 1, V pruning
    assert rep["dram_bytes"]["k_msb"] and rep["dram_bytes"]["v"]
    assert rep["dram_bytes_by_layer"]["1"]["k_msb"] < rep["dram_bytes_by_layer"]["0"]["k_msb"]
    assert (tmp_path / "c.png").stat().st_size > 1000
    lines = (tmp_path / "t.trace").read_text().splitlines()
    assert len(lines) * 32 == sum(rep["dram_bytes"].values())  # one line per transaction
    assert lines[0].startswith("0x") and lines[0].split()[1] in ("R", "W")


def test_tensor_kinds_tag_the_traffic(binaries) -> None:
    spbin, _ = binaries
    r = run_binary(spbin, lsb_fraction=1.0)
    assert r.dram_bytes["k_lsb"] > 0 and r.dram_bytes["q"] > 0 and r.dram_bytes["activations"] > 0


@pytest.mark.parametrize("args,msg", [
    (["--hw", "spatten-1/8"], "built for hardware 'spatten'"),
    (["--lsb-fraction", "2"], "between 0 and 1"),
    (["--mode", "functional"], "--mode functional needs --input"),  # whole models run since #15
])
def test_sim_cli_refuses_in_one_line(binaries, capsys, args: list[str], msg: str) -> None:
    spbin, _ = binaries
    assert main(["sim", str(spbin), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sim_cli_refuses_a_corrupt_binary(binaries, tmp_path, capsys) -> None:
    spbin, _ = binaries
    bad = tmp_path / "bad.spbin"
    data = bytearray(spbin.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert main(["sim", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def _emit(src: str, out: Path, *args: str) -> Path:
    assert main(["emit", src, "-o", str(out), *args]) == 0
    return out


def test_functional_feeds_and_prompt_only_eviction(tmp_path, capsys) -> None:
    """A decoder's prompt stream needs only input_ids (the session builds the empty cache); a missing feed
    and a prompt-only stream of an eviction model are refused in one line, exit 2, no traceback."""
    from conftest import MODELS, run_ort

    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12]], np.int64)
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    dense = _emit(str(MODELS / "llama_torchscript.onnx"), tmp_path / "d.spbin", "--prompt-len", "8")
    assert main(["sim", str(dense), "--mode", "functional", "--input", str(tmp_path / "ids.npz"),
                 "--outputs", str(tmp_path / "o.npz")]) == 0
    got = np.load(tmp_path / "o.npz")["logits"]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(8)[None]}
    for i in onnx.load(MODELS / "llama_torchscript.onnx", load_external_data=False).graph.input:
        if i.name.startswith("past_key_values."):  # [batch, kv heads, 0, head dim]
            dims = i.type.tensor_type.shape.dim
            feeds[i.name] = np.zeros((1, dims[1].dim_value, 0, dims[3].dim_value), np.float32)
    want = run_ort(MODELS / "llama_torchscript.onnx", feeds)
    np.testing.assert_allclose(got, want["logits"], atol=1e-4, rtol=0)
    capsys.readouterr()

    assert main([str(MODELS / "llama_torchscript.onnx"), "-o", str(tmp_path / "e.onnx")]) == 0  # default preset
    evict = _emit(str(tmp_path / "e.onnx"), tmp_path / "e.spbin", "--prompt-len", "8")
    bert = _emit(str(MODELS / "bert_torchscript.onnx"), tmp_path / "b.spbin", "--seq-len", "8")
    capsys.readouterr()
    for spbin, msg in ((evict, "prompt-only stream of a KV-cache eviction model"),
                       (bert, "the input file has no 'attention_mask'")):
        assert main(["sim", str(spbin), "--mode", "functional", "--input", str(tmp_path / "ids.npz")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flag", ["--report", "--chart", "--trace", "--outputs"])
def test_sim_cli_checks_output_folders_first(binaries, tmp_path, capsys, flag: str) -> None:
    """Every file sim writes is checked when the command line is read: a missing folder is a usage
    error (exit 2, one line) before the simulation runs."""
    spbin, _ = binaries
    with pytest.raises(SystemExit) as info:
        main(["sim", str(spbin), flag, str(tmp_path / "no" / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}: output folder" in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1
