"""Models written by onnxruntime's transformer optimizer compile, exactly at keep 1.0.

The optimized models are generated here from the committed encoder fixtures with every mask form
the optimizer writes: EmbedLayerNormalization's [batch] lengths (default), the raw [batch, key] mask,
ReduceSum lengths without the embedding fusion, no mask, and FastGelu (gelu approximation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, fixture_names, load_meta, reference_io, run_ort
from onnxruntime.transformers import optimizer
from onnxruntime.transformers.fusion_options import FusionOptions
from test_cli import spattenc

ENCODERS = [n for n in fixture_names() if n.startswith(("bert", "distilbert"))]


def _default(o: FusionOptions) -> None:
    pass


def _raw_mask(o: FusionOptions) -> None:
    o.use_raw_attention_mask(True)


def _lengths(o: FusionOptions) -> None:
    o.enable_embed_layer_norm = False
    o.use_raw_attention_mask(False)


def _no_mask(o: FusionOptions) -> None:
    o.disable_attention_mask()


def _fast_gelu(o: FusionOptions) -> None:
    o.enable_gelu_approximation = True


VARIANTS: dict[str, Callable[[FusionOptions], None]] = {
    "default": _default, "raw-mask": _raw_mask, "lengths": _lengths, "no-mask": _no_mask, "fast-gelu": _fast_gelu,
}


def ort_optimized(name: str, variant: str, out: Path) -> Path:
    """The fixture as onnxruntime's optimizer writes it (python fusions only, no onnxruntime session)."""
    options = FusionOptions("bert")
    VARIANTS[variant](options)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model = optimizer.optimize_model(str(MODELS / f"{name}.onnx"), model_type="bert", num_heads=4, hidden_size=64,
                                     optimization_options=options, opt_level=0)
    model.save_model_to_file(str(out))
    return out


def _max_diff(a: Path, b: Path, feeds: dict[str, np.ndarray]) -> float:
    x, y = run_ort(a, feeds), run_ort(b, feeds)
    return max(float(np.abs(x[k] - y[k]).max()) for k in x)


@pytest.mark.parametrize("name", ENCODERS)
def test_optimizer_written_model_compiles_exactly(name: str, tmp_path: Path) -> None:
    src = ort_optimized(name, "default", tmp_path / "opt.onnx")
    out = tmp_path / "out.onnx"
    assert spattenc(str(src), "-o", str(out), "--token-keep", "1.0").returncode == 0
    ops = {(n.domain, n.op_type) for n in onnx.load(out).graph.node}
    assert not {op for op in ops if op[0] == "com.microsoft"}, ops
    feeds, _ = reference_io(load_meta(name))
    assert _max_diff(src, out, feeds) <= 1e-4


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "default"])
def test_every_mask_form_compiles_exactly(variant: str, tmp_path: Path) -> None:
    src = ort_optimized("bert_torchscript", variant, tmp_path / "opt.onnx")
    written = {n.op_type for n in onnx.load(src).graph.node}
    assert "Attention" in written, written
    out = tmp_path / "out.onnx"
    assert spattenc(str(src), "-o", str(out), "--token-keep", "1.0").returncode == 0
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    assert _max_diff(src, out, feeds) <= 1e-4


@pytest.mark.parametrize("name", ENCODERS)
def test_inspect_reads_optimizer_written_models(name: str, tmp_path: Path) -> None:
    """inspect unfuses as compile does, and reads the fused Attention's head size from its packed QKV weight."""
    from spatten_compiler.api import inspect

    src = ort_optimized(name, "default", tmp_path / "opt.onnx")
    meta = load_meta(name)
    sites = inspect(src)
    assert [(s.num_heads, s.head_dim) for s in sites] == [(meta["num_heads"], meta["head_dim"])] * meta["num_layers"]


def test_optimizer_written_model_prunes(tmp_path: Path) -> None:
    src = ort_optimized("bert_torchscript", "default", tmp_path / "opt.onnx")
    out = tmp_path / "out.onnx"
    r = spattenc(str(src), "-o", str(out), "--token-keep", "0.5", "--token-min-keep", "2", "--emit-kept")
    assert r.returncode == 0, r.stderr
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    kept = run_ort(out, feeds)["spatten_kept_mask"]
    assert (kept.sum(axis=1) < feeds["attention_mask"].sum(axis=1)).all()


@pytest.mark.real
def test_real_minilm_optimizer_written_compiles_exactly(tmp_path: Path) -> None:
    real = MODELS / "cache" / "minilm" / "model.onnx"
    if not real.exists():
        pytest.skip("python models/export.py --real minilm")
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    src = tmp_path / "opt.onnx"
    optimizer.optimize_model(str(real), model_type="bert", num_heads=12, hidden_size=384,
                             opt_level=0).save_model_to_file(str(src))
    written = {n.op_type for n in onnx.load(src).graph.node}
    assert {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization"} <= written, written
    out = tmp_path / "out.onnx"
    assert spattenc(str(src), "-o", str(out), "--token-keep", "1.0").returncode == 0
    feeds, _ = reference_io(load_meta_path(real.with_suffix(".json")))
    mask = feeds["attention_mask"].astype(bool)  # padding rows are meaningless (see test_prune_tokens)
    a, b = run_ort(src, feeds)["last_hidden_state"], run_ort(out, feeds)["last_hidden_state"]
    assert float(np.abs(a[mask] - b[mask]).max()) <= 1e-4


def load_meta_path(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
