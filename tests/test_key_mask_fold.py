"""passes/key_mask_fold.py on tiny hand-built score chains: folded equals the Add it replaces, and
every chain it leaves alone says why."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.passes.key_mask_fold import fold_key_mask

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import NoMatch

B, H, S, D = 2, 3, 5, 4


def _chain(between: list[onnx.NodeProto], scores_rank: int = 4) -> onnx.ModelProto:
    """q [B,H,S,D], kt [B,H,D,S], bias [B,1,1,S] -> Softmax(between(MatMul(q, kt)) + bias)."""
    shape_q, shape_k = ([B, H, S, D], [B, H, D, S]) if scores_rank == 4 else ([B * H, S, D], [B * H, D, S])
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s0"]), *between,
             helper.make_node("Add", [f"s{len(between)}", "bias"], ["z"], name="mask_add"),
             helper.make_node("Softmax", ["z"], ["p"], axis=-1)]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
             (("scale", 0.5), ("neg", -0.5), ("cap", 30.0))]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, shape_q),
         helper.make_tensor_value_info("kt", TensorProto.FLOAT, shape_k),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, [B, 1, 1, S])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _fold(proto: onnx.ModelProto) -> tuple[ir.Model, NoMatch | None]:
    model = ir.serde.deserialize_model(proto)
    add = next(n for n in model.graph if n.name == "mask_add")
    e = GraphEditor(model, "test")
    why = fold_key_mask(e, add, add.inputs[1])
    e.commit()
    return model, why


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    bias = np.zeros((B, 1, 1, S), np.float32)
    bias[1, ..., 3:] = -1e9  # sample 1: its last two keys are padding
    return {"q": rng.standard_normal((B, H, S, D), dtype=np.float32),
            "kt": rng.standard_normal((B, H, D, S), dtype=np.float32), "bias": bias}


@pytest.mark.parametrize("between", [
    [],
    [helper.make_node("Mul", ["s0", "scale"], ["s1"])],
    [helper.make_node("Div", ["s0", "scale"], ["s1"]), helper.make_node("Mul", ["scale", "s1"], ["s2"])],
], ids=["no scale", "scale", "two scales"])
def test_folded_equals_the_add(between: list[onnx.NodeProto]) -> None:
    proto = _chain(between)
    model, why = _fold(proto)
    assert why is None
    folded = ir.serde.serialize_model(model)
    softmax = next(n for n in folded.graph.node if n.op_type == "Softmax")
    assert softmax.input[0] != "z"  # the Add is left unread (the pipeline's cleanup drops it)
    assert [n.op_type for n in folded.graph.node].count("Concat") >= 2
    feeds = _feeds()
    want, got = _run(proto, feeds), _run(folded, feeds)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert (got[1, ..., 3:] == 0).all()  # masked keys: probability exactly 0


@pytest.mark.parametrize(("between", "rank", "reason"), [
    ([helper.make_node("Div", ["s0", "cap"], ["s1"]), helper.make_node("Tanh", ["s1"], ["s2"]),
      helper.make_node("Mul", ["s2", "cap"], ["s3"])], 4, "Tanh"),
    ([helper.make_node("Mul", ["s0", "neg"], ["s1"])], 4, "not a positive scalar scale"),
    ([helper.make_node("Div", ["scale", "s0"], ["s1"])], 4, "not a positive scalar scale"),
    ([], 3, "scores of rank 3"),
], ids=["soft-cap", "negative scale", "scalar over scores", "heads folded into the batch"])
def test_chains_left_alone_say_why(between: list[onnx.NodeProto], rank: int, reason: str) -> None:
    proto = _chain(between, rank)
    if rank == 3:  # shapes known, as an exporter writes them
        proto = onnx.shape_inference.infer_shapes(proto)
    model, why = _fold(proto)
    assert isinstance(why, NoMatch) and reason in why.reason, why
    assert [n.op_type for n in ir.serde.serialize_model(model).graph.node] == [n.op_type for n in proto.graph.node]


# (bert_attention_op23: the decomposed opset-23 Attention's mask is not provably one row per query, so
# prune-tokens keeps it and there is nothing to fold - tests/test_compact_mask.py)
ENCODERS = ["bert_dynamo", "bert_sdpa_dynamo", "bert_torchscript", "distilbert_dynamo", "distilbert_torchscript",
            "bert_cls_softmax_torchscript"]


def _score_matmuls_folded(proto: onnx.ModelProto) -> list[bool]:
    """Per Softmax in graph order: is its score MatMul fed by two Concats (a folded key mask)?"""
    producer = {o: n for n in proto.graph.node for o in n.output}
    found = []
    for node in proto.graph.node:
        if node.op_type != "Softmax":
            continue
        value = node.input[0]
        while (p := producer.get(value)) is not None and p.op_type not in ("MatMul", "FusedMatMul"):
            value = p.input[0]
        found.append(p is not None and all(producer.get(i) is not None and producer[i].op_type == "Concat"
                                           for i in p.input))
    return found


@pytest.mark.parametrize("name", ENCODERS)
def test_optimize_folds_the_deciding_layers_mask(name: str, monkeypatch, tmp_path) -> None:
    """On real-exporter encoders with --optimize, the layer that decides (layer 0 at a flat keep 0.5:
    prune-tokens gave it the compact key mask) has that mask folded into its score MatMul, and is the
    only unfused attention left. Outputs equal the same compile without the fold, on a batch where one
    sample is padded; without --optimize nothing is folded. (The SDPA export's attention is not one
    onnxruntime's fusion knows: its later layers stay unfused and keep their Add.)"""
    from conftest import MODELS, load_meta, reference_io, run_ort
    from spatten_compiler.passes import key_mask_fold

    import spatten_compiler as sc

    options = dict(token_keep=0.5, token_min_keep=2, kv_bits="none", no_head_pruning=True)
    sc.compile(MODELS / f"{name}.onnx", **options).save(tmp_path / "plain.onnx")
    assert not any(_score_matmuls_folded(onnx.load(tmp_path / "plain.onnx")))
    sc.compile(MODELS / f"{name}.onnx", optimize=True, **options).save(tmp_path / "folded.onnx")
    found = _score_matmuls_folded(onnx.load(tmp_path / "folded.onnx"))
    assert found[0] and not any(found[1:])  # (layers onnxruntime did not fuse, a classifier's Softmax)
    monkeypatch.setattr(key_mask_fold, "foldable", lambda site: NoMatch("off for the test"))
    sc.compile(MODELS / f"{name}.onnx", optimize=True, **options).save(tmp_path / "unfolded.onnx")
    assert not any(_score_matmuls_folded(onnx.load(tmp_path / "unfolded.onnx")))
    feeds, _ = reference_io(load_meta(name))
    feeds = {k: np.concatenate([v, v]) for k, v in feeds.items()}  # batch 2, the second one padded
    if "attention_mask" in feeds:
        feeds["attention_mask"][1, -3:] = 0
    got, want = (run_ort(tmp_path / f"{m}.onnx", feeds) for m in ("folded", "unfolded"))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0)
