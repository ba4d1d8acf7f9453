"""Attention whose keys are not the layer's own tokens (SegFormer's spatial reduction: K/V from a
strided sequence, S_k != S_q): found, marked ``own_keys=False``; token pruning is refused in one line
(the default preset skips it and says why), head pruning and K/V quantization run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from attention_graphs import build, feeds
from conftest import run_ort
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize

from spatten_compiler.cli import main


def _sites(proto: onnx.ModelProto):
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    return find_attention(model).sites


def test_own_keys_tells_reduced_keys_from_self_attention() -> None:
    assert [s.own_keys for s in _sites(build(mask="none"))] == [True]
    assert [s.own_keys for s in _sites(build(mask="none", reduced_kv=True))] == [False]
    assert [s.own_keys for s in _sites(build(mask="none", packed=True))] == [True]


@pytest.fixture
def reduced(tmp_path: Path) -> Path:
    path = tmp_path / "reduced.onnx"
    onnx.save(build(mask="none", reduced_kv=True), path)
    return path


@pytest.mark.parametrize("args", [[], ["--head-keep", "0.5", "--no-token-pruning", "--kv-bits", "none"],
                                  ["--kv-bits", "4+1", "--kv-stats"]], ids=["default preset", "heads", "kv"])
def test_reduced_keys_compile_and_run(reduced: Path, tmp_path: Path, capsys, args: list[str]) -> None:
    out = tmp_path / "out.onnx"
    assert main([str(reduced), "-o", str(out), *args]) == 0
    err = capsys.readouterr().err
    if not args:
        assert "token pruning skipped: a layer's keys are computed from other tokens than its queries" in err
    f = feeds(onnx.load(reduced), seq=6)
    got, want = run_ort(out, f), run_ort(reduced, f)
    assert got["y"].shape == want["y"].shape and np.isfinite(got["y"]).all()
    if "--kv-stats" in args:
        assert got["spatten_lsb_rows.0"].shape == (2, 2, 6)  # every query row, not the 3 keys


def test_token_pruning_refuses_reduced_keys() -> None:
    """(The one-layer graph has no second layer to prune, so the site check is called directly; the
    CLI prints its message in one line like every refusal.)"""
    from spatten_compiler.passes.prune_tokens import _check_sites

    from spatten_compiler.errors import OptionError

    with pytest.raises(OptionError, match="its keys are computed from other tokens than its queries"):
        _check_sites(_sites(build(mask="none", reduced_kv=True)))
