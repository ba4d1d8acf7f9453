"""decompose-attention: the fused ONNX Attention op becomes MatMul/Softmax/MatMul with equal outputs,
token pruning then works on it, and variants that cannot be expressed exactly are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, fixture_names, load_meta, reference_io, run_ort
from onnx import TensorProto, helper
from spatten_compiler.passes.decompose_attention import DecomposeAttention
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.runtime.reference import ReferenceRuntime

from spatten_compiler.errors import OptionError

FUSED = [n for n in fixture_names() if load_meta(n).get("fused_attention") == "Attention"]


def test_fused_fixtures_exist() -> None:
    assert {"bert_attention_op23", "llama_attention_op23"} <= set(FUSED)


@pytest.mark.parametrize("name", FUSED)
def test_decomposed_equals_fused(name: str, tmp_path: Path) -> None:
    model = ir.load(MODELS / f"{name}.onnx")
    Normalize()(model)
    assert DecomposeAttention()(model).modified
    assert not [n for n in model.graph if n.op_type == "Attention"]
    report = find_attention(model)
    meta = load_meta(name)
    assert len(report.sites) == meta["num_layers"] and all(s.fused is None for s in report.sites)
    ir.save(model, tmp_path / "d.onnx")
    feeds, _ = reference_io(meta)
    got, want = run_ort(tmp_path / "d.onnx", feeds), run_ort(MODELS / f"{name}.onnx", feeds)
    real = feeds["attention_mask"].astype(bool)
    for key in want:
        a, b = got[key], want[key]
        if a.ndim >= 2 and a.shape[:2] == real.shape:
            a, b = a[real], b[real]
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=key)


def test_token_pruning_on_fused_encoder(tmp_path: Path) -> None:
    from spatten_compiler.cli import main

    out = tmp_path / "p.onnx"
    assert main([str(MODELS / "bert_attention_op23.onnx"), "-o", str(out), "--token-keep", "0.5", "--emit-kept",
                 "--token-min-keep", "1", "-q"]) == 0
    feeds, _ = reference_io(load_meta("bert_attention_op23"))
    got = run_ort(out, feeds)
    assert got["spatten_kept_positions.0"].shape[1] < feeds["input_ids"].shape[1]
    report = ReferenceRuntime(out).run(feeds)
    for key, value in got.items():
        np.testing.assert_allclose(report.outputs[key], value, atol=1e-4, rtol=0, err_msg=key)


def _fused(**attrs: object) -> onnx.ModelProto:
    x = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 2, "S", 4]) for n in ("q", "k", "v")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2, "S", 4])
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], **attrs)
    return helper.make_model(helper.make_graph([node], "g", x, [y]), opset_imports=[helper.make_opsetid("", 23)])


def test_causal_without_mask(tmp_path: Path) -> None:
    proto = _fused(is_causal=1)
    onnx.save(proto, tmp_path / "f.onnx")
    model = ir.serde.deserialize_model(proto)
    DecomposeAttention()(model)
    ir.save(model, tmp_path / "d.onnx")
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 2, 5, 4)).astype(np.float32) for n in ("q", "k", "v")}
    np.testing.assert_allclose(run_ort(tmp_path / "d.onnx", feeds)["y"], run_ort(tmp_path / "f.onnx", feeds)["y"],
                               atol=1e-5)


def test_softcap_is_refused_with_reason() -> None:
    model = ir.serde.deserialize_model(_fused(softcap=30.0))
    with pytest.raises(OptionError, match="softcap"):
        DecomposeAttention()(model)
