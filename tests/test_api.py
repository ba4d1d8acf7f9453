"""The Python API (spatten_compiler.compile / inspect) gives what the CLI gives, on every fixture."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, ROOT, fixture_names, tiny_model

import spatten_compiler as sc
from spatten_compiler import api
from spatten_compiler.cli import main
from spatten_compiler.commands.inspect import site_costs
from spatten_compiler.errors import ModelLoadError, OptionError, SpattencError


def options_for(name: str) -> dict[str, object]:
    """A rewriting option set the fixture supports: token pruning is for encoders, decoders get K/V quantization."""
    if name.startswith(("gpt2", "llama")):
        return {"kv_bits": "6+4"}
    return {"token_keep": 0.5, "head_keep": 0.75}


def as_flags(options: dict[str, object]) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.parametrize("name", fixture_names())
def test_api_compile_equals_cli(name: str, tmp_path: Path) -> None:
    src = MODELS / f"{name}.onnx"
    options = options_for(name)
    cli_out, cli_report = tmp_path / "cli.onnx", tmp_path / "cli.json"
    assert main([str(src), "-o", str(cli_out), "-q", "--report", str(cli_report), *as_flags(options)]) == 0
    result = sc.compile(src, **options)
    api_out = tmp_path / "api.onnx"
    result.save(api_out)
    assert api_out.read_bytes() == cli_out.read_bytes()
    assert result.report == json.loads(cli_report.read_text())


@pytest.mark.parametrize("name", fixture_names())
def test_api_inspect_equals_cli(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = MODELS / f"{name}.onnx"
    assert main(["inspect", str(src), "--json"]) == 0
    cli_sites = json.loads(capsys.readouterr().out)["sites"]
    sites = sc.inspect(src)
    assert [{**s.to_dict(), **site_costs(s)} for s in sites] == cli_sites
    assert len(sites) > 0


def test_proto_path_and_ir_inputs_give_the_same_model(tmp_path: Path) -> None:
    src = MODELS / "bert_torchscript.onnx"
    proto = onnx.load(src)
    before = proto.SerializeToString()
    outs = []
    for i, model in enumerate((src, proto, ir.load(src))):
        path = tmp_path / f"{i}.onnx"
        sc.compile(model, token_keep=0.5, report=False).save(path)
        outs.append(path.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    assert proto.SerializeToString() == before, "a ModelProto input must not be changed"


def test_inspect_leaves_an_ir_model_unchanged() -> None:
    model = ir.load(MODELS / "gpt2_torchscript.onnx")
    before = ir.to_proto(model).SerializeToString()
    assert len(sc.inspect(model)) == 4
    assert ir.to_proto(model).SerializeToString() == before


def test_config_and_options_combine() -> None:
    cfg = sc.CompileConfig(token_keep=0.5)
    a = sc.compile(MODELS / "bert_torchscript.onnx", config=cfg, token_keep_schedule=None)
    b = sc.compile(MODELS / "bert_torchscript.onnx", token_keep=0.5)
    assert a.report == b.report
    c = sc.compile(MODELS / "bert_torchscript.onnx", token_keep_schedule=[1, 1, 0.5, 0.5])
    assert c.report["token_schedule"] == [1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("name", ["bert_torchscript", "gpt2_torchscript"])
def test_no_option_compile_equals_cli(name: str, tmp_path: Path) -> None:
    """A compile without options (whatever the defaults do) is the same from the API and the CLI."""
    src = MODELS / f"{name}.onnx"
    cli_out, cli_report = tmp_path / "cli.onnx", tmp_path / "cli.json"
    assert main([str(src), "-o", str(cli_out), "-q", "--report", str(cli_report)]) == 0
    result = sc.compile(src)
    result.save(tmp_path / "api.onnx")
    assert (tmp_path / "api.onnx").read_bytes() == cli_out.read_bytes()
    assert result.report == json.loads(cli_report.read_text())


def test_progress_hooks_are_called() -> None:
    seen: list[str] = []
    sc.compile(MODELS / "bert_torchscript.onnx", token_keep=0.5, report=False,
               hooks={"on_pass": lambda p, seconds: seen.append(p.name)})
    assert seen == ["unfuse-ort", "normalize", "decompose-attention", "prune-tokens"]  # optimize: unfuse-ort first


def test_defaults_are_the_flags_defaults() -> None:
    """An option left out means what a flag left out means: the CLI builds its config from
    CompileConfig too, so the API's no-option compile is the CLI's no-option compile."""
    assert api.make_config() == sc.CompileConfig()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: sc.compile(MODELS / "bert_torchscript.onnx", token_keep=2.0), OptionError,
         "--token-keep must be in (0, 1], got 2.0"),
        (lambda: sc.compile(MODELS / "bert_torchscript.onnx", tokens=0.5), OptionError, "unknown option 'tokens'"),
        (lambda: sc.compile(MODELS / "bert_torchscript.onnx", token_keep_schedule="0.5,0.3"), OptionError,
         "token_keep_schedule must be a list of numbers, got '0.5,0.3'"),
        (lambda: sc.compile(MODELS / "bert_torchscript.onnx", kv_bits=4), OptionError,
         "kv_bits must be a string or null, got 4"),
        (lambda: sc.compile(MODELS / "nope.onnx"), ModelLoadError, "nope.onnx: no such file"),
        (lambda: sc.compile(42), OptionError, "expected a path, onnx.ModelProto or onnx_ir.Model, got int"),
        (lambda: sc.compile(MODELS / "bert_torchscript.onnx", token_keep=0.5, pipeline="normalize"), OptionError,
         "--pipeline replaces the option-built pipeline"),
        (lambda: sc.inspect(_invalid_proto()), ModelLoadError, "model: invalid ONNX graph"),
    ],
)
def test_errors_are_one_line_spattenc_errors(call, error: type[SpattencError], message: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)


def _invalid_proto() -> onnx.ModelProto:
    model = tiny_model()
    model.graph.node[0].input[1] = "no_such_tensor"
    return model


def test_docstring_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = doctest.testmod(api, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_options_take_numpy_numbers_and_paths(tmp_path) -> None:
    """Values of the field's kind are accepted whatever their Python type: numpy scalars, a list for a
    ratio schedule, a Path for a file name."""
    import numpy as np

    from spatten_compiler.config import check_types

    got = check_types({"token_keep": np.float32(0.5), "token_min_keep": np.int64(8),
                       "token_keep_schedule": [1, 0.5], "head_calibration": tmp_path / "c.npz"})
    assert got == {"token_keep": 0.5, "token_min_keep": 8, "token_keep_schedule": (1.0, 0.5),
                   "head_calibration": str(tmp_path / "c.npz")}
    assert type(got["token_min_keep"]) is int
