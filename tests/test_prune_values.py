"""Local value pruning: keep 1.0 is the identity, the kept probabilities equal a NumPy top-k per
row, onnxruntime == reference runtime on every decomposed fixture (encoders and decoders with and
without KV cache), and fused attention is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from attention_graphs import build, feeds
from conftest import MODELS, fixture_names, load_meta, reference_io, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.prune_values import PruneValues
from spatten_compiler.runtime.reference import ReferenceRuntime

from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pipeline

DECOMPOSED = [n for n in fixture_names() if not load_meta(n)["fused_attention"]]
FUSED = [n for n in fixture_names() if load_meta(n)["fused_attention"]]


def compile_proto(proto: onnx.ModelProto, keep: float, taps: bool = False) -> onnx.ModelProto:
    """Compiled model; with ``taps`` each layer's probabilities and pruned probabilities are outputs."""
    model = ir.serde.deserialize_model(proto)
    Pipeline([Normalize(), PruneValues(keep=keep)])(model)
    if taps:
        for site in find_attention(model).sites:
            model.graph.outputs.extend([site.pv.inputs[0].producer().inputs[0], site.pv.inputs[0]])
    return ir.serde.serialize_model(model)


def save(proto: onnx.ModelProto, tmp: Path, name: str = "m.onnx") -> Path:
    onnx.save(proto, tmp / name)
    return tmp / name


def expected_prune(p: np.ndarray, keep: float) -> np.ndarray:
    """Per row: the ceil(n * keep) largest probabilities (n = non-zero entries, at least 1)."""
    out = np.zeros_like(p)
    rows = p.reshape(-1, p.shape[-1])
    for r, row in enumerate(rows):
        n = int((row > 0).sum())
        k = max(1, int(np.ceil(np.float32(n) * np.float32(keep))))  # float32, as the ONNX body
        top = np.argsort(-row, kind="stable")[:k]
        out.reshape(-1, p.shape[-1])[r, top] = row[top]
    return out


@pytest.mark.parametrize("kw", [{}, {"mask": "causal+additive"}, {"cache": True, "mask": "none"}, {"kv_heads": 1}],
                         ids=str)
def test_keep_one_is_identity(kw: dict, tmp_path: Path) -> None:
    proto = build(**kw)
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    assert not PruneValues(keep=1.0)(model).modified
    f = feeds(proto)
    after = run_ort(save(ir.serde.serialize_model(model), tmp_path), f)
    before = run_ort(save(proto, tmp_path, "in.onnx"), f)
    for k, v in before.items():
        np.testing.assert_allclose(after[k], v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"mask": "causal+additive"}, {"cache": True, "mask": "none"},
                                {"kv_heads": 1, "rope": True}, {"packed": True}], ids=str)
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
def test_kept_probabilities_are_the_row_top_k(kw: dict, keep: float, tmp_path: Path) -> None:
    proto = compile_proto(build(**kw), keep, taps=True)
    path = save(proto, tmp_path)
    f = feeds(proto, batch=2, seq=6)
    got = run_ort(path, f)
    ref = ReferenceRuntime(path).run(f).outputs
    names = [o.name for o in proto.graph.output]
    probs, pruned = got[names[-2]], got[names[-1]]
    np.testing.assert_allclose(pruned, expected_prune(probs, keep), atol=1e-7, rtol=0)
    for name in names:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", DECOMPOSED)
def test_fixture_runtimes_agree(name: str, tmp_path: Path) -> None:
    path = save(compile_proto(onnx.load(MODELS / f"{name}.onnx"), 0.5), tmp_path)
    f, dense = reference_io(load_meta(name))
    got = run_ort(path, f)
    ref = ReferenceRuntime(path).run(f).outputs
    for k in dense:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-4, rtol=0)
    assert any(not np.allclose(got[k], dense[k], atol=1e-4) for k in dense)  # it did prune


@pytest.mark.parametrize("name", FUSED)
def test_fused_fixtures_after_decomposition(name: str, tmp_path: Path) -> None:
    """The compile command decomposes fused attention first; then value pruning works there too
    (llama_attention_op23: a GQA decoder with a KV cache)."""
    from spatten_compiler.passes.decompose_attention import DecomposeAttention

    model = ir.serde.deserialize_model(onnx.load(MODELS / f"{name}.onnx"))
    Pipeline([Normalize(), DecomposeAttention(), PruneValues(keep=0.5)])(model)
    path = save(ir.serde.serialize_model(model), tmp_path)
    f, dense = reference_io(load_meta(name))
    got = run_ort(path, f)
    ref = ReferenceRuntime(path).run(f).outputs
    for k in dense:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-4, rtol=0)
    assert any(not np.allclose(got[k], dense[k], atol=1e-4) for k in dense)


@pytest.mark.parametrize("name", FUSED)
def test_fused_attention_refused(name: str) -> None:
    model = ir.load(MODELS / f"{name}.onnx")
    Normalize()(model)
    with pytest.raises(OptionError, match="fused"):
        PruneValues(keep=0.5)(model)


def test_bad_keep() -> None:
    with pytest.raises(OptionError, match="keep"):
        PruneValues(keep=0.0)(ir.serde.deserialize_model(build()))


@settings(max_examples=10, deadline=None)
@given(keep=st.floats(0.01, 0.99), seq=st.integers(1, 9), seed=st.integers(0, 3))
def test_random_keep(keep: float, seq: int, seed: int) -> None:
    proto = compile_proto(build(seed=seed), keep, taps=True)
    f = feeds(proto, batch=2, seq=seq, seed=seed)
    if seq <= 2:
        f["mask"][:] = 1
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in proto.graph.output]
    got = dict(zip(names, sess.run(names, f)))
    ref = ReferenceRuntime(proto).run(f).outputs
    probs, pruned = got[names[-2]], got[names[-1]]
    np.testing.assert_allclose(pruned, expected_prune(probs, keep), atol=1e-7, rtol=0)
    np.testing.assert_allclose(got["y"], ref["y"], atol=1e-4, rtol=0)
