"""Attention discovery: each exporter variant on tiny graphs (positive and negative), and the
exact sites on every committed fixture and the real models (ground truth from sidecar JSON)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from attention_graphs import DH, H, build, classifier_softmax, feeds
from conftest import MODELS, fixture_names, load_meta, run_ort
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize


def _find(proto: onnx.ModelProto):
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    return find_attention(model)


VARIANTS = [
    dict(scale="after"), dict(scale="after_div"), dict(scale="split"), dict(scale="before"), dict(scale="none"),
    dict(mask="where"), dict(mask="causal+additive"), dict(mask="none"), dict(packed=True),
    dict(rope=True), dict(kv_heads=1), dict(cache=True), dict(rope=True, kv_heads=1, cache=True),
    dict(packed=True, mask="causal+additive"),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_variant_found_with_its_properties(kw: dict) -> None:
    report = _find(build(**kw))
    assert len(report.sites) == 1 and not report.rejected, report.rejected
    site = report.sites[0]
    kv = kw.get("kv_heads", H)
    assert (site.num_heads, site.num_kv_heads, site.head_dim) == (H, kv, DH)
    if kw.get("scale", "after") != "none":
        assert site.scale == pytest.approx(1 / np.sqrt(DH), rel=1e-5)
    assert site.rope == kw.get("rope", False)
    assert site.rope_source == ("sequence length (computed)" if kw.get("rope") else None)
    assert site.kv_cache == kw.get("cache", False)
    if site.kv_cache:
        assert site.k.cache.past.name == "past_k" and site.v.cache.past.name == "past_v"
        assert site.k.cache.present.name == "present_k"
    expected_mask = {"additive": "padding", "where": "padding", "causal+additive": "causal+padding", "none": "none"}
    assert site.mask_kind == expected_mask[kw.get("mask", "additive")]
    if site.mask_kind != "none":
        assert site.mask_source == "mask"
    assert (site.q.packed is not None) == kw.get("packed", False)
    assert site.q.projection is not None and site.k.projection is not None and site.v.projection is not None
    assert site.out_proj is not None and site.out_proj.weight.name == "w_o"
    assert site.layer_input.name == "x" and site.residual is not None


@pytest.mark.parametrize("kw", VARIANTS[:6], ids=str)
def test_normalize_keeps_outputs(kw: dict, tmp_path: Path) -> None:
    proto = build(**kw)
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    ir.save(model, tmp_path / "n.onnx")
    onnx.save(proto, tmp_path / "o.onnx")
    f = feeds(proto)
    np.testing.assert_allclose(run_ort(tmp_path / "n.onnx", f)["y"], run_ort(tmp_path / "o.onnx", f)["y"], atol=1e-6)


def test_normalize_keeps_a_branch_passing_an_outer_value(tmp_path: Path) -> None:
    """An If branch whose output is Identity(a value of the outer graph) - DINOv3's TorchScript RoPE
    table - keeps its Identity (a branch output must be produced inside the branch); the others go."""
    from onnx import TensorProto, helper

    then = helper.make_graph([helper.make_node("Neg", ["x"], ["t0"]), helper.make_node("Identity", ["t0"], ["t"])],
                             "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    branches = {a.name: [n.op_type for n in a.g.node] for a in out.graph.node[-1].attribute}
    assert branches == {"then_branch": ["Neg"], "else_branch": ["Identity"]}
    onnx.save(out, tmp_path / "n.onnx")
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    for c in (True, False):
        f = {"c": np.array(c), "x": x}
        assert np.array_equal(run_ort(tmp_path / "n.onnx", f)["y"], -x if c else np.maximum(x, 0))


def test_classifier_softmax_is_not_attention() -> None:
    report = _find(classifier_softmax())
    assert report.sites == []
    assert len(report.rejected) == 1 and "constant" in report.rejected[0][1]


def test_softmax_on_wrong_axis_is_rejected_with_reason() -> None:
    report = _find(build(softmax_axis=2))
    assert report.sites == [] and "axis" in report.rejected[0][1]


@pytest.mark.parametrize("name", fixture_names())
def test_fixture_sites_match_ground_truth(name: str) -> None:
    meta = load_meta(name)
    report = _find(onnx.load(MODELS / f"{name}.onnx"))
    check_sites(report, meta)


def check_sites(report, meta: dict) -> None:
    assert len(report.sites) == meta["num_layers"], report.rejected
    assert len(report.rejected) == meta.get("extra_softmax", 0), report.rejected
    for i, site in enumerate(report.sites):
        assert site.layer == i
        assert (site.num_heads, site.num_kv_heads, site.head_dim) == (
            meta["num_heads"], meta["num_kv_heads"], meta["head_dim"])
        assert site.rope == meta["rope"]
        if meta["rope"] and not meta.get("fused_attention"):
            expected = "position_ids" if "position_ids" in meta["inputs"] else "sequence length (computed)"
            assert site.rope_source == expected
        assert site.kv_cache == meta["kv_cache"]
        if meta.get("fused_attention"):
            assert site.fused is not None and site.fused.op_type == meta["fused_attention"]
            continue
        assert site.hidden_size == meta["hidden_size"]
        # The sidecar's "where" names DistilBERT's form of a padding mask; the finder reports meaning.
        assert site.mask_kind == {"where": "padding"}.get(meta["mask"], meta["mask"])
        assert site.mask_source == "attention_mask"
        assert site.out_proj is not None and site.layer_input is not None and site.layer_output is not None
    # Layers chain: each layer's output is the next layer's input.
    for a, b in zip(report.sites, report.sites[1:]):
        assert a.layer_output is b.layer_input


REAL = {
    "minilm": MODELS / "cache" / "minilm" / "model.onnx",
    "minilm-dynamo": MODELS / "cache" / "minilm-dynamo" / "model.onnx",
    "smollm2": MODELS / "cache" / "smollm2" / "model.onnx",
    "smollm2-dynamo": MODELS / "cache" / "smollm2-dynamo" / "model.onnx",
}


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model_sites(name: str) -> None:
    path = REAL[name]
    if not path.exists():
        pytest.skip(f"{path} not exported (python models/export.py --real {name.split('-')[0]})")
    meta = json.loads(path.with_suffix(".json").read_text())
    expected = {"minilm": (6, 12, 12, 32), "smollm2": (30, 9, 3, 64)}[name.split("-")[0]]
    assert (meta["num_layers"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) == expected
    model = ir.load(path)
    Normalize()(model)
    check_sites(find_attention(model), meta)


def test_cli_no_attention_exit_2_with_reasons(tmp_path: Path) -> None:
    path = tmp_path / "cls.onnx"
    onnx.save(classifier_softmax(), path)
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", "inspect", str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "no attention found" in r.stderr and "constant" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_inspect_table_and_json(tmp_path: Path) -> None:
    path = tmp_path / "a.onnx"
    onnx.save(build(rope=True, kv_heads=1, cache=True), path)
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", "inspect", str(path), "--explain"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "layer" in r.stdout and "yes" in r.stdout and "every Softmax is an attention site" in r.stdout
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", "inspect", str(path), "--json"],
                       capture_output=True, text=True)
    data = json.loads(r.stdout)
    (site,) = data["sites"]
    assert site["num_kv_heads"] == 1 and site["rope"] and site["kv_cache"]["past_key"] == "past_k"
    assert site["kv_bytes_per_token"] == 2 * 1 * DH * 4


def test_attention_inside_an_if_is_named_with_what_to_do(tmp_path: Path, capsys) -> None:
    """A merged decoder (optimum's decoder_model_merged.onnx) holds its layers in If branches: not read,
    and the compile summary and inspect say where the attention is and which file to compile."""
    import attention_graphs
    from onnx import TensorProto, helper

    from spatten_compiler.cli import main

    body = attention_graphs.build()
    branch = lambda name: helper.make_graph(list(body.graph.node), name, [], list(body.graph.output),  # noqa: E731
                                            list(body.graph.initializer))
    merged = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["use_cache_branch"], ["y"], name="optimum::if",
                          then_branch=branch("with_past"), else_branch=branch("without_past"))],
        "merged", [*body.graph.input, helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])],
        list(body.graph.output)), opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "merged.onnx"
    onnx.save(merged, src)
    assert main([str(src), "-o", str(tmp_path / "out.onnx")]) == 0
    assert "If 'optimum::if' holds 2 Softmax ops in its subgraphs" in capsys.readouterr().err
    assert main(["inspect", str(src)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "decoder_with_past_model.onnx" in err
