"""The eviction's form (spatten_compiler/eviction_form.py) on the committed tiny builder Llamas: the decoder
preset and --kv-budget keep the fused GroupQueryAttention (evict-gqa) when every layer is one evict-gqa
takes, with the same kept slots and logits within 1e-4 of the decomposed eviction (unfuse-ort + evict-kv,
the old path, still reached with kv_cache="decomposed"); a model evict-gqa refuses and eviction beside
another rewrite stay decomposed, the summary saying why; ``--kv-cache shared`` compiles the shared-buffer
form that ``spattenc generate`` evicts, and refuses in one line (exit 2) where the fused form is not taken."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from test_evict_gqa import _decode, _same_eviction, _with_attribute

from spatten_compiler import api
from spatten_compiler.cli import main
from spatten_compiler.decoding import DecoderSession
from spatten_compiler.errors import OptionError

BUILDER = MODELS / "builder"
# the preset with a floor and block size the 14-token test sequence reaches (budget 0.5, 4 sinks, recent 50%, head)
PRESET_ARGS = ["--kv-min-keep", "0", "--kv-slack", "3"]
PRESET_OPTIONS = {"kv_budget": 0.5, "kv_sinks": 4, "kv_recent": "50%", "kv_evict": "head", "kv_min_keep": 0,
                  "kv_slack": 3}


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _old_path(src: Path, out: Path, **options) -> Path:
    """The decomposed eviction as every compile ran it before session 20."""
    result = api.compile(src, kv_cache="decomposed", **options)
    passes = [p.split("{")[0] for p in result.report["passes"]]
    assert passes[0] == "unfuse-ort" and "evict-kv" in passes and "evict-gqa" not in passes
    result.save(out, external_data=False)
    return out


def _evicts_alike(fused: Path, decomposed: Path) -> None:
    kept = _same_eviction(fused, decomposed)[1]
    assert kept[-1][0].shape[-1] < 14  # something was evicted


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_preset_keeps_the_fused_attention(tmp_path, precision, capsys) -> None:
    from bench.coverage import float_activations  # int4: the builder's own int8 activations differ by 1e-2

    src = float_activations(BUILDER / f"llama_{precision}.onnx", tmp_path)
    out = tmp_path / "preset.onnx"
    assert main([str(src), "-o", str(out), *PRESET_ARGS]) == 0
    err = capsys.readouterr().err
    assert "preset default for a decoder (KV cache)" in err and "around the fused GroupQueryAttention" in err
    ops = _ops(out)
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops  # nothing decomposed
    _evicts_alike(out, _old_path(src, tmp_path / "old.onnx", **PRESET_OPTIONS))


def test_kv_budget_keeps_the_fused_attention(tmp_path, capsys) -> None:
    src = BUILDER / "llama_fp32.onnx"
    out = tmp_path / "budget.onnx"
    assert main([str(src), "-o", str(out), "--kv-budget", "0.5", "--report", str(tmp_path / "r.json")]) == 0
    assert "around the fused GroupQueryAttention" in capsys.readouterr().err
    import json

    assert [p.split("{")[0] for p in json.loads((tmp_path / "r.json").read_text())["passes"]] == ["evict-gqa"]
    ops = _ops(out)
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    _evicts_alike(out, _old_path(src, tmp_path / "old.onnx", kv_budget=0.5))


def test_ort_saved_model_keeps_the_fused_attention(tmp_path, capsys) -> None:
    """onnxruntime's saved optimized model declares a folded [1] constant as a scalar (stale value_info):
    evict-gqa trusts the tensor, as unfuse-ort does, and the fused eviction applies there too."""
    from bench.coverage import to_ortopt

    src = to_ortopt(BUILDER / "llama_fp32.onnx", tmp_path)
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "--kv-budget", "0.5"]) == 0
    assert "around the fused GroupQueryAttention" in capsys.readouterr().err
    _evicts_alike(out, _old_path(src, tmp_path / "old.onnx", kv_budget=0.5))


def test_refused_model_keeps_the_decomposed_path(tmp_path, capsys) -> None:
    """Rotary outside the kernel (do_rotary=0): evict-gqa refuses, so the eviction is evict-kv's as before."""
    src = _with_attribute(tmp_path, "do_rotary", 0)
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "--kv-budget", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "eviction on the decomposed attention (unfuse-ort): GroupQueryAttention" in err
    assert "rotary outside the kernel" in err
    ops = _ops(out)
    assert "GroupQueryAttention" not in ops and "Softmax" in ops
    got, want = _decode(out)[0], _decode(_old_path(src, tmp_path / "old.onnx", kv_budget=0.5))[0]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def _layer0_unfused(tmp_path: Path) -> Path:
    """The builder Llama with only layer 0's GroupQueryAttention decomposed (unfuse-ort's rewrite of one node)."""
    from spatten_compiler.passes.unfuse_gqa import group_query_attention

    from spatten_compiler.editor import GraphEditor
    from spatten_compiler.modelio import load_model, save_model

    model = load_model(BUILDER / "llama_fp32.onnx")
    node = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    e = GraphEditor(model, "test/unfuse-one")
    for out, new in zip(node.outputs, group_query_attention(e, node)):
        if new is not None:
            e.replace_uses(out, new)
    model.graph.remove(node, safe=True)
    e.commit()
    save_model(model, tmp_path / "mixed.onnx", external_data=False)
    return tmp_path / "mixed.onnx"


def test_mixed_layers_keep_the_decomposed_path(tmp_path, capsys) -> None:
    """One layer decomposed, one fused: evict-gqa would leave a layer unevicted, so the old path runs."""
    src = _layer0_unfused(tmp_path)
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "--kv-budget", "0.5"]) == 0
    assert "1 of 2 attention layers are not a fused GroupQueryAttention" in capsys.readouterr().err
    assert "GroupQueryAttention" not in _ops(out)
    assert main([str(src), "-o", str(out), "--kv-budget", "0.5", "--kv-cache", "shared"]) == 2


def test_other_rewrite_keeps_the_decomposed_path(tmp_path, capsys) -> None:
    out = tmp_path / "out.onnx"
    assert main([str(BUILDER / "llama_fp32.onnx"), "-o", str(out), "--kv-budget", "0.5", "--kv-bits", "8"]) == 0
    assert "decomposed attention (unfuse-ort): --kv-bits planes needs the decomposed attention" in \
        capsys.readouterr().err
    assert "GroupQueryAttention" not in _ops(out)


def test_kv_cache_shared_generates_what_the_graph_form_does(tmp_path, capsys) -> None:
    from spatten_compiler.generate import generate_ids, open_session

    args = ["--kv-budget", "0.5", "--kv-evict", "head", "--kv-slack", "2"]
    shared, graph = tmp_path / "shared.onnx", tmp_path / "graph.onnx"
    assert main([str(BUILDER / "llama_fp32.onnx"), "-o", str(shared), "--kv-cache", "shared", *args]) == 0
    err = capsys.readouterr().err
    assert "evicted in place by spattenc's runtime (spattenc generate" in err
    assert "a plain onnxruntime loop runs it unevicted" in err
    assert main([str(BUILDER / "llama_fp32.onnx"), "-o", str(graph), *args]) == 0
    ops = _ops(shared)
    assert ops.count("GroupQueryAttention") == 2 and "TopK" not in ops
    prompt = [5, 17, 33, 2, 9, 11, 40, 3, 8, 21]
    ours = list(generate_ids(open_session(shared), prompt, 16))
    assert len(ours) == 16 and ours == list(generate_ids(open_session(graph), prompt, 16))
    with pytest.raises(OptionError, match="shared-buffer eviction model .*open_session"):
        DecoderSession(shared)


@pytest.mark.parametrize("model, args, why", [
    ("gpt2_kv_torchscript.onnx", [], "the model has no com.microsoft GroupQueryAttention"),
    ("builder/llama_fp32.onnx", ["--kv-budget", "0.5", "--kv-bits", "8"], "--kv-bits planes needs the decomposed"),
    ("builder/llama_fp32.onnx", ["--kv-budget", "0.5", "--kv-score", "mean"], "accumulated rule"),
])
def test_kv_cache_shared_refusals_are_one_line(tmp_path, capsys, model, args, why) -> None:
    out = tmp_path / "out.onnx"
    assert main([str(MODELS / model), "-o", str(out), "--kv-cache", "shared", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and len(err.splitlines()) == 1 and not out.exists()


def test_kv_cache_decomposed_keeps_the_old_path_for_the_accelerator(tmp_path, capsys) -> None:
    """spattenc emit lowers Softmax attention, not the fused kernel: --kv-cache decomposed is the old path (which
    emits), and emit names it when given the fused form."""
    fused, old = tmp_path / "fused.onnx", tmp_path / "old.onnx"
    src = str(BUILDER / "llama_fp32.onnx")
    assert main([src, "-o", str(fused), "--kv-budget", "0.5", "-q"]) == 0
    assert main([src, "-o", str(old), "--kv-budget", "0.5", "--kv-cache", "decomposed", "-q"]) == 0
    assert "GroupQueryAttention" not in _ops(old) and "Softmax" in _ops(old)
    capsys.readouterr()
    assert main(["emit", str(old), "-o", str(tmp_path / "old.spbin"), "--prompt-len", "8", "--gen-steps", "2"]) == 0
    assert main(["emit", str(fused), "-o", str(tmp_path / "f.spbin"), "--prompt-len", "8", "--gen-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv-cache decomposed" in err[0]
    with pytest.raises(OptionError, match="not in the reference runtime.*--kv-cache decomposed"):
        DecoderSession(fused, runtime="reference")  # the numpy runtime runs standard ops only
    assert DecoderSession(old, runtime="reference").step(np.array([[5, 6, 7]])).shape == (1, 3, 48)
