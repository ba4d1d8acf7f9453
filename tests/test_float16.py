"""float16 models (``model_fp16.onnx``): compiled in float32 (passes/float16.py), weights stored in
float16 again, float16 inputs/outputs kept. The fixtures are converted here with onnxruntime's float16
converter, as users make them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort
from onnxruntime.transformers.float16 import convert_float_to_float16
from spatten_compiler.passes.float16 import DowncastFloat16, UpcastFloat16, is_float16

from spatten_compiler.cli import main
from spatten_compiler.decoding import DecoderSession

ENCODERS = ["bert_torchscript", "distilbert_torchscript"]  # its float16 bert_dynamo does not load in onnxruntime
DECODERS = ["llama_torchscript", "gpt2_kv_torchscript"]


@pytest.fixture(scope="module")
def fp16(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fp16")
    out = {}
    for name in [*ENCODERS, *DECODERS]:
        out[name] = folder / f"{name}.fp16.onnx"
        onnx.save(convert_float_to_float16(onnx.load(MODELS / f"{name}.onnx")), out[name])
    return out


def _valid(feeds: dict, value: np.ndarray) -> np.ndarray:
    mask = feeds.get("attention_mask")
    return mask[..., None].astype(bool) if mask is not None and value.ndim == 3 else np.ones_like(value, bool)


@pytest.mark.parametrize("name", ENCODERS)
def test_keep_one_equals_the_float16_model_up_to_its_rounding(name: str, fp16: dict[str, Path], tmp_path: Path) -> None:
    """At keep 1.0 (every later layer selects all tokens) the float16 output is as far from the float32
    export's (PyTorch's) output as the float16 input model is, and within float16 rounding of it."""
    out = tmp_path / "k1.onnx"
    assert main([str(fp16[name]), "-o", str(out), "--token-keep-schedule", "1,0.999", "--kv-bits", "none"]) == 0
    feeds, exact = reference_io(load_meta(name))
    want, got = run_ort(fp16[name], feeds), run_ort(out, feeds)
    for key, value in want.items():
        assert got[key].dtype == np.float16
        rows = _valid(feeds, value)
        scale = float(np.abs(exact[key]).max())
        assert np.abs(np.where(rows, got[key] - value, 0)).max() <= 4e-3 * scale
        ours = np.abs(np.where(rows, got[key].astype(np.float32) - exact[key], 0)).max()
        theirs = np.abs(np.where(rows, value.astype(np.float32) - exact[key], 0)).max()
        assert ours <= 1.5 * theirs + 1e-6


@pytest.mark.parametrize("name", ENCODERS)
def test_default_preset_on_a_float16_encoder(name: str, fp16: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert main([str(fp16[name]), "-o", str(out)]) == 0
    assert out.stat().st_size < 1.3 * fp16[name].stat().st_size  # weights stored in float16 again
    feeds, _ = reference_io(load_meta(name))
    got = run_ort(out, feeds)
    assert all(v.dtype == np.float16 and np.isfinite(v).all() for v in got.values())


@pytest.mark.parametrize("name", DECODERS)
def test_float16_decoder_generates_like_its_input(name: str, fp16: dict[str, Path], tmp_path: Path) -> None:
    """The default preset (eviction, split-precision cache) on a float16 decoder: greedy tokens of a
    short prompt (nothing evicted) equal the float16 input's."""
    out = tmp_path / "out.onnx"
    assert main([str(fp16[name]), "-o", str(out)]) == 0
    tokens = []
    for path in (fp16[name], out):
        session = DecoderSession(path)
        logits, seq = session.step(np.array([[5, 9, 13, 2, 7, 11]], np.int64)), []
        for _ in range(5):
            seq.append(int(logits[0, -1].argmax()))
            logits = session.step(np.array([[seq[-1]]], np.int64))
        assert logits.dtype == np.float16
        tokens.append(seq)
    assert tokens[0] == tokens[1]


def test_upcast_is_exact_and_downcast_restores_the_interface(fp16: dict[str, Path]) -> None:
    proto = onnx.load(fp16["bert_torchscript"])
    model = ir.serde.deserialize_model(proto)
    assert is_float16(model) and not is_float16(ir.load(MODELS / "bert_torchscript.onnx"))
    before = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    UpcastFloat16()(model)
    for k, v in model.graph.initializers.items():
        assert v.const_value.numpy().dtype != np.float16
        np.testing.assert_array_equal(v.const_value.numpy(), before[k].astype(v.const_value.numpy().dtype))
    DowncastFloat16()(model)
    out = ir.serde.serialize_model(model)
    assert [(o.name, o.type.tensor_type.elem_type) for o in out.graph.output] == \
        [(o.name, o.type.tensor_type.elem_type) for o in proto.graph.output]
    big = [t for t in out.graph.initializer if np.prod(t.dims) >= 16 and t.data_type == onnx.TensorProto.FLOAT]
    assert not big


def test_spelled_pipeline_needs_the_casts_named(fp16: dict[str, Path], tmp_path: Path, capsys) -> None:
    """--pipeline runs exactly the passes it names; upcast-fp16 / downcast-fp16 are passes too."""
    out = tmp_path / "out.onnx"
    assert main([str(fp16["bert_torchscript"]), "-o", str(out), "--pipeline",
                 "upcast-fp16,normalize,prune-tokens{keep=0.5},downcast-fp16"]) == 0
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    assert run_ort(out, feeds)["last_hidden_state"].dtype == np.float16
