"""torch.onnx.export's default form (dynamo, optimize=True) at opset 23: onnxscript fuses ONNX
RMSNormalization, RotaryEmbedding and (SDPA) Attention. normalize decomposes RotaryEmbedding-23
(hand-built graphs against onnx's reference implementation and onnxruntime); the committed 2-layer
Llama exports of that form (models/llama_op23_attention: SDPA -> Attention, and
llama_op23_eager: MatMul/Softmax attention) pass every coverage check: discovered, token / head
pruning exact at keep 1.0 against onnxruntime, K/V quantization, real pruning runs, the preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort, write_corpus
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize, rotary_to_ops

from spatten_compiler.modelio import load_model, save_model

FIXTURES = ["llama_op23_attention", "llama_op23_eager"]
N, H, S, P = 2, 8, 5, 16  # heads, head size, sequence, cache positions


def _rope_model(rank: int, positions: bool, rotary_dim: int = 0, interleaved: int = 0,
                cache_batch: int = 1) -> onnx.ModelProto:
    """RotaryEmbedding-23 on x [B, N, S, H] (rank 4) or [B, S, N*H] (rank 3). With ``positions``
    the caches are tables [P, rd/2] read at position_ids [B, S]; without, the angles [cache_batch, S, rd/2]
    (onnxscript's fusion writes batch 1)."""
    rd = rotary_dim or H
    rng = np.random.default_rng(0)
    rows = (P,) if positions else (cache_batch, S)
    angles = rng.uniform(0, 3, (*rows, rd // 2))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", N, S, H] if rank == 4 else ["B", S, N * H])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N, S, H] if rank == 4 else ["B", S, N * H])
    ins = [x, *([helper.make_tensor_value_info("pos", TensorProto.INT64, ["B", S])] if positions else [])]
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", *(["pos"] if positions else [])], ["y"],
                            interleaved=interleaved, **({"num_heads": N} if rank == 3 else {}),
                            **({"rotary_embedding_dim": rotary_dim} if rotary_dim else {}))
    inits = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    graph = helper.make_graph([node], "rope23", ins, [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _feeds(batch: int, positions: bool, rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    shape = (batch, N, S, H) if rank == 4 else (batch, S, N * H)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    if positions:
        feeds["pos"] = rng.integers(0, P, (batch, S)).astype(np.int64)
    return feeds


def _unfused(proto: onnx.ModelProto, tmp_path: Path) -> Path:
    onnx.save(proto, tmp_path / "in.onnx")
    model = load_model(tmp_path / "in.onnx")
    Normalize()(model)
    assert not [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    save_model(model, tmp_path / "out.onnx", external_data=False)
    return tmp_path / "out.onnx"


@pytest.mark.parametrize(("rank", "positions", "rotary_dim"),
                         [(4, False, 0), (4, True, 0), (3, False, 0), (3, True, 0), (4, False, 4), (3, True, 4)])
def test_rotary_embedding_23_decomposed(rank: int, positions: bool, rotary_dim: int, tmp_path: Path) -> None:
    """RotaryEmbedding-23 -> rotate-half RoPE ops, equal to onnx's reference implementation at batch 2
    (batch-1 angle caches broadcast, where onnxruntime's kernel refuses them) and to onnxruntime's kernel
    where it runs (caches of x's batch)."""
    proto = _rope_model(rank, positions, rotary_dim)
    out = _unfused(proto, tmp_path)
    feeds = _feeds(2, positions, rank)
    want = ReferenceEvaluator(proto).run(None, feeds)[0]
    np.testing.assert_allclose(run_ort(out, feeds)["y"], want, atol=1e-6)
    if not positions:  # onnxruntime's kernel: angle caches of x's batch only
        proto = _rope_model(rank, positions, rotary_dim, cache_batch=2)
        onnx.save(proto, tmp_path / "b2.onnx")
        out = _unfused(proto, tmp_path)
        np.testing.assert_allclose(run_ort(out, feeds)["y"], run_ort(tmp_path / "b2.onnx", feeds)["y"], atol=1e-6)
    else:
        onnx.save(proto, tmp_path / "ort.onnx")
        np.testing.assert_allclose(run_ort(out, feeds)["y"], run_ort(tmp_path / "ort.onnx", feeds)["y"], atol=1e-6)


def test_interleaved_rotary_stays(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Interleaved RoPE has no rotate-half form: the node stays, the reason is logged (zero rewrites)."""
    onnx.save(_rope_model(4, False, interleaved=1), tmp_path / "in.onnx")
    model = load_model(tmp_path / "in.onnx")
    assert rotary_to_ops(model) == 0
    assert "interleaved rotary is not decomposed" in caplog.text
    assert [n.op_type for n in model.graph] == ["RotaryEmbedding"]


def test_fixture_discovered_through_rope() -> None:
    """After normalize both layers are found with the config's 4 heads / 2 KV heads of 16 and RoPE
    (the fused op decomposed, the GQA repeat read through it)."""
    import onnx_ir as ir

    model = ir.load(MODELS / "llama_op23_eager.onnx")
    Normalize()(model)
    assert not [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    sites = find_attention(model).sites
    assert [(s.num_heads, s.num_kv_heads, s.head_dim, s.rope) for s in sites] == [(4, 2, 16, True)] * 2


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_form(name: str) -> None:
    """The fixtures are the form under test: RMSNormalization and RotaryEmbedding fused (and, with SDPA,
    the Attention op after the repeated KV heads: onnxscript's GQA fusion does not match transformers 5's
    export), a KV cache; onnxruntime reproduces torch's reference (batch 2, left padding, position_ids)."""
    model = onnx.load(MODELS / f"{name}.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert {"RMSNormalization", "RotaryEmbedding"} <= ops
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert (len(attention) == 2) == (name == "llama_op23_attention")
    assert (MODELS / f"{name}.onnx").stat().st_size < 400_000
    feeds, want = reference_io(load_meta(name))
    got = run_ort(MODELS / f"{name}.onnx", feeds)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), FIXTURES)


@pytest.mark.parametrize("name", FIXTURES)
def test_every_coverage_check(name: str, corpus: Path) -> None:
    """Discovered (2 sites, 4 heads / 2 KV heads of 16), evict-kv at budget 1.0 and a KV group sliced
    out exact against onnxruntime, K/V planes, budget / keep 0.5 and the default preset run."""
    from bench.coverage import CHECKS, corpus_records, evaluate

    rec = next(r for r in corpus_records(corpus) if r["name"] == name)
    row = evaluate(rec, corpus)
    assert all(row[c]["ok"] for c in CHECKS), {c: row[c] for c in CHECKS if not row[c]["ok"]}
