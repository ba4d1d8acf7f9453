"""prune-tokens' ``causal`` importance (#20): the value rule with each column divided by the number of
valid rows that can read it under a causal mask (rows i >= j), not by all valid rows. The ONNX
function equals the formula and the reference runtime's op; on a no-cache decoder fixture the
compile runs in onnxruntime equal to the reference runtime, keeps the last token, and keeps later
tokens than the plain value rule (whose column sums favour early tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, run_ort
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.prune_tokens import PruneTokens
from spatten_compiler.passes.spatten_ops import DOMAIN, function_proto
from spatten_compiler.runtime.reference import ReferenceRuntime
from test_long_inputs import long_feeds


def _formula(probs: np.ndarray, qvalid: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Written out per column: sum over heads and valid rows of p * ||v_j||, over the valid rows i >= j."""
    b_size, heads, seq, _ = probs.shape
    out = np.zeros((b_size, seq))
    for b in range(b_size):
        for j in range(seq):
            total = sum(qvalid[b, i] * probs[b, h, i, j] * np.linalg.norm(v[b, h, j])
                        for h in range(heads) for i in range(seq))
            out[b, j] = total / max(1.0, qvalid[b, j:].sum())
    return out


def test_function_equals_formula_and_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    b_size, heads, seq, dh = 2, 3, 7, 4
    probs = rng.random((b_size, heads, seq, seq)).astype(np.float32)
    qvalid = np.ones((b_size, seq), np.float32)
    qvalid[1, 5:] = 0  # right padding
    v = rng.standard_normal((b_size, heads, seq, dh)).astype(np.float32)
    f32 = onnx.TensorProto.FLOAT
    node = onnx.helper.make_node("TokenImportanceCausal", ["probs", "qvalid", "v"], ["score"], domain=DOMAIN)
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info(n, f32, None) for n in ("probs", "qvalid", "v")],
        [onnx.helper.make_tensor_value_info("score", f32, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid(DOMAIN, 1)],
                                   functions=[function_proto("TokenImportanceCausal")])
    path = tmp_path / "op.onnx"
    onnx.save(model, path)
    feeds = {"probs": probs, "qvalid": qvalid, "v": v}
    want = _formula(probs, qvalid, v)
    np.testing.assert_allclose(run_ort(path, feeds)["score"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ReferenceRuntime(path).run(feeds).outputs["score"], want, rtol=1e-5, atol=1e-6)


def _compile(importance: str, tmp: Path) -> Path:
    model = ir.load(MODELS / "gpt2_torchscript.onnx")
    Normalize()(model)
    PruneTokens(keep=0.5, unpruned=0.15, shape="flat", min_keep=8, protect="first+last", restore="mean",
                importance=importance, prune_point="after-attention", emit_kept=True)(model)
    out = tmp / f"{importance}.onnx"
    ir.save(model, out)
    return out


@pytest.mark.parametrize("name", ["gpt2_torchscript"])
def test_causal_rule_on_a_nocache_decoder(name: str, tmp_path: Path) -> None:
    feeds = long_feeds(40, 90)
    real = feeds["attention_mask"].sum(axis=1)
    kept = {}
    for importance in ("value", "causal"):
        path = _compile(importance, tmp_path)
        got = run_ort(path, feeds)
        ref = ReferenceRuntime(path).run(feeds).outputs
        for key, value in got.items():
            np.testing.assert_allclose(ref[key], value, atol=1e-4, rtol=0, err_msg=key)
        mask = got["spatten_kept_mask"]
        np.testing.assert_array_equal(mask.sum(axis=1), np.ceil(real * 0.5))
        np.testing.assert_array_equal(mask[np.arange(2), real - 1], [1, 1])  # the last real token
        kept[importance] = mask
    position = np.arange(feeds["input_ids"].shape[1])
    mean_pos = {k: [position[m > 0].mean() for m in v] for k, v in kept.items()}
    assert all(c > p for c, p in zip(mean_pos["causal"], mean_pos["value"])), mean_pos  # later tokens kept
