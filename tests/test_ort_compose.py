"""--optimize / --weights compose with the SpAtten rewrites.

At keep 1.0 each composition equals the same onnxruntime composition applied to the dense model
(<= 1e-4); with pruning on, the fusions leave the pruned model's outputs unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort
from test_cli import spattenc

COMPOSITIONS = {
    "optimize": ["--optimize"],
    "int8": ["--weights", "int8"],
    "optimize+int8": ["--optimize", "--weights", "int8"],
}
DENSE = ["--no-token-pruning", "--kv-bits", "none"]  # --optimize/--weights alone still apply the preset


def _compile(src: Path, out: Path, *args: str) -> Path:
    r = spattenc(str(src), "-o", str(out), *args)
    assert r.returncode == 0, r.stderr
    return out


def _max_diff(a: Path, b: Path, feeds: dict[str, np.ndarray]) -> float:
    x, y = run_ort(a, feeds), run_ort(b, feeds)
    return max(float(np.abs(x[k] - y[k]).max()) for k in x)


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


CASES = [("bert_torchscript", c) for c in COMPOSITIONS] + [("distilbert_dynamo", "optimize+int8")]


@pytest.mark.parametrize(("name", "composition"), CASES)
def test_composition_equals_dense_composition_at_keep_1(name: str, composition: str, tmp_path: Path) -> None:
    src, flags = MODELS / f"{name}.onnx", COMPOSITIONS[composition]
    dense = _compile(src, tmp_path / "dense.onnx", *DENSE, *flags)
    sparse = _compile(src, tmp_path / "sparse.onnx", "--token-keep", "1.0", *flags)
    feeds, _ = reference_io(load_meta(name))
    assert _max_diff(dense, sparse, feeds) <= 1e-4
    ops = _ops(sparse)
    if "int8" in composition:
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops
    if composition.startswith("optimize") and name.endswith("torchscript"):  # dynamo: ORT's shape inference fails
        # Add + LayerNormalization stays unfused: onnxruntime's CPU SkipLayerNormalization is slower
        assert "BiasGelu" in ops and "LayerNormalization" in ops and "SkipLayerNormalization" not in ops, ops
        assert {"Attention", "QAttention"} & _ops(dense)


def test_fusions_keep_pruned_outputs(tmp_path: Path) -> None:
    src = MODELS / "bert_torchscript.onnx"
    args = ["--token-keep", "0.5", "--token-min-keep", "2", "--emit-kept"]
    plain = _compile(src, tmp_path / "plain.onnx", *args)
    fused = _compile(src, tmp_path / "fused.onnx", *args, "--optimize")
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    assert _max_diff(plain, fused, feeds) <= 1e-4
    model = onnx.load(fused)
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    # layer 0 decides which tokens stay (its probabilities feed the importance); layers 1-3 need none
    assert len(attention) == 3 and "BiasGelu" in _ops(fused)
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 1


def test_skip_layer_norm_fusion_on_request(tmp_path: Path) -> None:
    """ort-fusions{skip_layer_norm=true} restores onnxruntime's SkipLayerNormalization fusion (off by
    default: its CPU kernel is slower than the ops it replaces); outputs stay equal."""
    src = MODELS / "bert_torchscript.onnx"
    head = "unfuse-ort,normalize,decompose-attention,prune-tokens{keep=0.5;min_keep=2;prune_point=after-attention}"
    plain = _compile(src, tmp_path / "plain.onnx", "--pipeline", head + ",ort-fusions")
    fused = _compile(src, tmp_path / "fused.onnx", "--pipeline", head + ",ort-fusions{skip_layer_norm=true}")
    assert "SkipLayerNormalization" not in _ops(plain) and "SkipLayerNormalization" in _ops(fused)
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    assert _max_diff(plain, fused, feeds) <= 1e-4


@pytest.mark.parametrize("point", ["layer-input", "after-attention"])
def test_layers_feeding_the_importance_stay_unfused(point: str, tmp_path: Path) -> None:
    """Two pruning decisions: layers 0 and 1 feed the token importance. fold-key-mask puts their key
    masks into the score MatMul, so onnxruntime's attention fusion - which does not check the
    probabilities for other readers - leaves them alone and fuses only layers 2 and 3; the outputs
    equal the unfused model's."""
    src = MODELS / "bert_torchscript.onnx"
    args = ["--token-keep-schedule", "1,0.75,0.5,0.5", "--token-min-keep", "2", "--token-prune-point", point]
    plain = _compile(src, tmp_path / "plain.onnx", *args)
    out = tmp_path / "fused.onnx"
    r = spattenc(str(src), "-o", str(out), *args, "--optimize")
    assert r.returncode == 0, r.stderr
    assert "fold-key-mask: key mask of layers 0, 1 folded" in r.stderr
    assert "ort-fusions: {'Attention': 2," in r.stderr and "warning" not in r.stderr
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    assert _max_diff(plain, out, feeds) <= 1e-4


def test_fusions_fall_back_when_an_importance_layer_fuses(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without the fold (a score chain it refuses), onnxruntime's fusion takes a layer whose
    probabilities feed the importance and the graph has a cycle: the pass fuses without attention,
    says so, and the outputs equal the unfused model's."""
    from spatten_compiler.passes import key_mask_fold

    from spatten_compiler.cli import main
    from spatten_compiler.match import NoMatch

    monkeypatch.setattr(key_mask_fold, "foldable", lambda site: NoMatch("off for the test"))
    src = MODELS / "bert_torchscript.onnx"
    args = [str(src), "--token-keep-schedule", "1,0.75,0.5,0.5", "--token-min-keep", "2",
            "--token-prune-point", "layer-input"]
    assert main([*args, "-o", str(tmp_path / "plain.onnx")]) == 0
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "fused.onnx"), "--optimize"]) == 0
    err = capsys.readouterr().err
    assert "fused without attention" in err and "shape inference" not in err
    assert "BiasGelu" in _ops(tmp_path / "fused.onnx")
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    assert _max_diff(tmp_path / "plain.onnx", tmp_path / "fused.onnx", feeds) <= 1e-4


def test_int4_weights_on_a_decoder(tmp_path: Path) -> None:
    src = MODELS / "gpt2_torchscript.onnx"
    dense = _compile(src, tmp_path / "dense.onnx", *DENSE, "--weights", "int4")
    sparse = _compile(src, tmp_path / "sparse.onnx", "--head-keep", "1.0", "--weights", "int4")
    assert "MatMulNBits" in _ops(sparse)
    feeds, _ = reference_io(load_meta("gpt2_torchscript"))
    assert _max_diff(dense, sparse, feeds) <= 1e-4


def test_int4_keeps_spattens_kv_planes(tmp_path: Path) -> None:
    src = MODELS / "gpt2_torchscript.onnx"
    out = _compile(src, tmp_path / "kv.onnx", "--kv-bits", "8", "--weights", "int4")
    model = onnx.load(out)
    assert "MatMulNBits" in {n.op_type for n in model.graph.node}
    assert any(n.domain == "spatten" for n in model.graph.node)
    feeds, _ = reference_io(load_meta("gpt2_torchscript"))
    assert all(np.isfinite(v).all() for v in run_ort(out, feeds).values())


@pytest.mark.parametrize(("args", "expected"), [
    (["--weights", "int3"], "invalid choice"),
])
def test_bad_values(args: list[str], expected: str, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    r = spattenc(str(MODELS / "bert_torchscript.onnx"), "-o", str(out), *args)
    assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_bad_weights_in_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"weights": "fp16"}))
    out = tmp_path / "out.onnx"
    r = spattenc(str(MODELS / "bert_torchscript.onnx"), "-o", str(out), "--config", str(cfg))
    assert r.returncode == 2 and "--weights must be one of int8, int4" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


GATE = ["--token-min-keep", "2", "--prune-min-length", "8"]


@pytest.mark.parametrize(("name", "composition"), [("bert_torchscript", "optimize+int8"), ("gpt2_torchscript", "int4")])
def test_length_gate_composes(name: str, composition: str, tmp_path: Path) -> None:
    """--optimize / --weights apply to both branches of the length gate: at keep 1.0 the gated model
    equals the same composition on the dense model on both sides of the gate."""
    from test_length_gate import feeds

    flags = COMPOSITIONS.get(composition, ["--weights", composition])
    keep = ["--head-keep", "1.0"] if name.startswith("gpt2") else ["--token-keep", "1.0"]
    src = MODELS / f"{name}.onnx"
    dense = _compile(src, tmp_path / "dense.onnx", *DENSE, *flags)
    gated = _compile(src, tmp_path / "gated.onnx", *keep, *GATE, *flags)
    model = onnx.load(gated)
    assert [n.op_type for n in model.graph.node][-1] == "If"
    branches = {a.name: {n.op_type for n in a.g.node} for a in model.graph.node[-1].attribute}
    for ops in branches.values():  # the post-passes ran on each branch
        if "int8" in composition:
            assert "MatMulInteger" in ops, ops
        if composition.startswith("optimize"):
            assert "BiasGelu" in ops, ops
        if composition == "int4":
            assert "MatMulNBits" in ops, ops
    for seq in (5, 16):  # short (unpruned branch) and long (pruned branch)
        f = feeds(seq)
        if name.startswith("gpt2"):
            f = {k: v for k, v in f.items() if k != "token_type_ids"}
        got, want = run_ort(gated, f), run_ort(dense, f)
        assert got.keys() == want.keys()
        assert max(float(np.abs(got[k] - want[k]).max()) for k in want) <= 1e-4, seq


def _session_ops(path: Path) -> set[str]:
    """Op types after onnxruntime's own session-level graph optimizations (default level)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path.with_suffix(".session.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _ops(path.with_suffix(".session.onnx"))


@pytest.mark.parametrize("flags", [["--weights", "int8"], ["--optimize", "--weights", "int8"]])
def test_int8_leaves_no_quantizer_shapes(flags: list[str], tmp_path: Path) -> None:
    """quantize_dynamic's shape inference writes symbolic value_info for every tensor, with which
    onnxruntime's session fuses SkipLayerNormalization (slower on CPU, left unfused by ort-fusions);
    the pass keeps only the model's own value_info, so a stock session leaves Add + LayerNorm alone."""
    src = MODELS / "bert_torchscript.onnx"
    out = _compile(src, tmp_path / "q.onnx", "--token-keep", "0.5", "--token-min-keep", "2", *flags)
    assert not any(d.dim_param.startswith("unk__") for v in onnx.load(out).graph.value_info
                   for d in v.type.tensor_type.shape.dim)
    ops = _session_ops(out)
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops, ops
