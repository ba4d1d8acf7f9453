"""evict-gqa (passes/evict_gqa.py): evict-kv on the model builder's fused GroupQueryAttention, against
the decomposed eviction (unfuse-ort, normalize, decompose-attention, evict-kv) on the committed tiny
builder Llamas (models/builder/): the same kept slots at every step and the same logits, and at a full
budget the builder model's own logits; the kernel stays fused; refusals name the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS

from spatten_compiler.decoding import DecoderSession
from spatten_compiler.errors import NoAttentionError, OptionError
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline, make_pass

BUILDER = MODELS / "builder"
IDS = np.random.default_rng(4).integers(3, 48, 14).astype(np.int64)
PROMPT = 8


def _compile(src: Path, out: Path, passes: list) -> Path:
    model = load_model(src)
    Pipeline(passes, check=True)(model)
    save_model(model, out, external_data=False)
    return out


def _decode(path: Path) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Logits and (for an eviction model) each layer's kept positions after every step."""
    d = DecoderSession(path)
    logits, kept = [d.step(IDS[None, :PROMPT])], [d.kept_positions()]
    for j in range(PROMPT, len(IDS)):
        logits.append(d.step(IDS[None, j:j + 1]))
        kept.append(d.kept_positions())
    return logits, kept



def _same_eviction(fused: Path, decomposed: Path) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Assert the two models keep the same slots at every step with logits within 1e-4; the fused one's
    (logits, kept positions)."""
    (got, got_kept), (want, want_kept) = _decode(fused), _decode(decomposed)
    for step, (a, b) in enumerate(zip(got_kept, want_kept, strict=True)):
        for layer, (x, y) in enumerate(zip(a, b, strict=True)):
            np.testing.assert_array_equal(x, y, err_msg=f"step {step} layer {layer}")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    return got, got_kept

@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("options", [{"budget": 0.5}, {"budget": 0.5, "mode": "head"},
                                     {"budget": 0.5, "mode": "head", "slack": 3}, {"budget": 1.0}])
def test_fused_equals_decomposed_eviction(tmp_path, precision, options) -> None:
    from bench.coverage import float_activations  # int4: the builder's own int8 activations differ by 1e-2

    src = float_activations(BUILDER / f"llama_{precision}.onnx", tmp_path)
    fused = _compile(src, tmp_path / "fused.onnx", [make_pass("evict-gqa", **options)])
    decomposed = _compile(src, tmp_path / "decomposed.onnx", [
        make_pass("unfuse-ort"), make_pass("normalize"), make_pass("decompose-attention"),
        make_pass("evict-kv", **options)])
    got, got_kept = _same_eviction(fused, decomposed)
    if options["budget"] == 1.0:  # nothing evicted: the builder model's own logits
        for a, b in zip(got, _decode(src)[0], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    else:
        assert got_kept[-1][0].shape[-1] < len(IDS)


def test_kernel_stays_fused(tmp_path) -> None:
    out = _compile(BUILDER / "llama_fp32.onnx", tmp_path / "fused.onnx", [make_pass("evict-gqa", budget=0.5)])
    graph = onnx.load(str(out)).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and not [n for n in graph.node if n.op_type == "Softmax"]
    for n in gqa:
        assert n.input[9] == "position_ids" and n.input[10] and len(n.output) == 4
        assert onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "qk_output")) == 2


def _with_attribute(tmp_path: Path, name: str, value: int) -> Path:
    model = onnx.load(str(BUILDER / "llama_fp32.onnx"))
    for n in model.graph.node:
        if n.op_type == "GroupQueryAttention":
            kept = [a for a in n.attribute if a.name != name]
            del n.attribute[:]
            n.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])
    onnx.save(model, str(tmp_path / "edited.onnx"))
    return tmp_path / "edited.onnx"


@pytest.mark.parametrize("edit, options, why", [
    (None, {"schedule": (1.0, 0.5)}, "per-layer schedule"),
    (("local_window_size", 4), {}, "a local window counts slots"),
    (("qk_output", 1), {}, "qk output already taken"),
])
def test_refusals_name_the_reason(tmp_path, edit, options, why) -> None:
    src = BUILDER / "llama_fp32.onnx" if edit is None else _with_attribute(tmp_path, *edit)
    with pytest.raises(OptionError, match=why):
        Pipeline([make_pass("evict-gqa", budget=0.5, **options)])(load_model(src))


def test_no_fused_attention_is_refused() -> None:
    model = load_model(BUILDER / "llama_fp32.onnx")
    Pipeline([make_pass("unfuse-ort")])(model)
    with pytest.raises(NoAttentionError, match="no com.microsoft GroupQueryAttention"):
        Pipeline([make_pass("evict-gqa", budget=0.5)])(model)


def test_cli_pipeline_reports_the_eviction(tmp_path, capsys) -> None:
    from spatten_compiler.cli import main

    out = tmp_path / "out.onnx"
    assert main([str(BUILDER / "llama_int4.onnx"), "-o", str(out), "--pipeline", "evict-gqa{budget=0.5;slack=16}"]) == 0
    err = capsys.readouterr().err
    assert "KV cache per layer kept within 50%" in err and "no rewrite applied" not in err
    assert main([str(BUILDER / "llama_int4.onnx"), "-o", str(out), "--pipeline",
                 "evict-gqa{budget=0.5;schedule=1:0.5}"]) == 2
    assert "per-layer schedule needs the decomposed form" in capsys.readouterr().err
