"""unmerge-decoder: merged decoders (optimum's decoder_model_merged.onnx) compile and generate.

The merged model here is built from the committed GPT-2 KV-cache fixture the way optimum merges
its two decoders: one ``If`` on a ``use_cache_branch`` graph input, whose then-branch is the
with-past decoder and whose else-branch is the same decoder fed an empty past it makes itself
(so it reads no cache input). Real optimum exports: tests/test_fixtures.py (``*_optimum_merged``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from spatten_compiler import compile as spatten_compile
from spatten_compiler import inspect
from spatten_compiler.cli import main
from spatten_compiler.decoding import DecoderSession

MODELS = Path(__file__).resolve().parent.parent / "models"
KV = MODELS / "gpt2_kv_torchscript.onnx"


def merge(kv: onnx.ModelProto, *, cache_reads_past: bool = True, then_first: bool = True) -> onnx.ModelProto:
    """kv's graph as both branches of one If on use_cache_branch; the no-cache branch builds empty
    past tensors [B, H, 0, D] from input_ids' batch instead of reading the past inputs."""
    g = kv.graph
    past = [i for i in g.input if i.name.startswith("past_")]
    with_past = helper.make_graph(list(g.node), "with_past", [], list(g.output))
    nodes = list(copy.deepcopy(g.node))
    rename = {p.name: f"empty/{p.name}" for p in past}
    for n in nodes:
        n.input[:] = [rename.get(x, x) for x in n.input]
    dims = [d.dim_value for d in past[0].type.tensor_type.shape.dim]
    empty = [helper.make_node("Shape", ["input_ids"], ["empty/batch"], start=0, end=1),
             helper.make_node("Constant", [], ["empty/rest"],
                              value=helper.make_tensor("rest", TensorProto.INT64, [3], [dims[1], 0, dims[3]])),
             helper.make_node("Concat", ["empty/batch", "empty/rest"], ["empty/shape"], axis=0),
             *[helper.make_node("ConstantOfShape", ["empty/shape"], [rename[p.name]]) for p in past]]
    if not cache_reads_past:  # both branches read the cache: no way to tell them apart
        empty, nodes = [], list(g.node)
    without_past = helper.make_graph([*empty, *nodes], "without_past", [], list(g.output))
    branches = (with_past, without_past) if then_first else (without_past, with_past)
    cond = "use_cache_branch" if then_first else "no_cache"
    node = helper.make_node("If", [cond], [o.name for o in g.output], name="optimum::if",
                            then_branch=branches[0], else_branch=branches[1])
    graph = helper.make_graph([node], "merged", [*g.input, helper.make_tensor_value_info(cond, TensorProto.BOOL, [1])],
                              list(g.output), list(g.initializer))
    return helper.make_model(graph, opset_imports=list(kv.opset_import), ir_version=kv.ir_version)


def steps() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.integers(3, 100, (2, 6)), np.ones((2, 6), np.int64)), (rng.integers(3, 100, (2, 1)), None)]


def generate(path: Path) -> list[np.ndarray]:
    s = DecoderSession(path)
    s.reset(2)
    return [s.step(ids, mask) for ids, mask in steps()]


@pytest.fixture(scope="module")
def merged_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("merged") / "decoder_model_merged.onnx"
    onnx.save(merge(onnx.load(str(KV))), path)
    return path


def test_the_hand_merged_model_is_what_optimum_writes(merged_path: Path) -> None:
    """Both branches of the merged model compute the KV model's logits (the fixture is sound)."""
    for a, b in zip(generate(merged_path), generate(KV)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_compiles_to_the_with_past_decoder(merged_path: Path, tmp_path: Path) -> None:
    """Compiling the merged model equals compiling the KV model: same inputs (no use_cache_branch),
    same logits over a prompt and a cached step."""
    out, ref = tmp_path / "merged.spatten.onnx", tmp_path / "kv.spatten.onnx"
    result = spatten_compile(str(merged_path), kv_bits="4+1")
    result.save(out)
    assert result.report["passes"][0] == "unmerge-decoder"
    assert main([str(KV), "-o", str(ref), "--kv-bits", "4+1", "-q"]) == 0
    names = lambda p: [i.name for i in onnx.load(str(p)).graph.input]  # noqa: E731
    assert names(out) == names(ref) and "use_cache_branch" not in names(out)
    for a, b in zip(generate(out), generate(ref)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_default_preset_and_inspect(merged_path: Path, tmp_path: Path, capsys) -> None:
    """`spattenc merged.onnx -o out` runs the decoder preset; inspect lists every layer."""
    out = tmp_path / "out.onnx"
    assert main([str(merged_path), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "unmerge-decoder" in err and "use_cache_branch" in err
    assert "no attention" not in err
    ort.InferenceSession(str(out))
    logits = generate(out)
    assert all(np.isfinite(x).all() for x in logits)
    assert [s.layer for s in inspect(str(merged_path))] == [0, 1, 2, 3]


def test_either_branch_may_hold_the_cache(tmp_path: Path) -> None:
    """The cache branch is the one reading more graph inputs, not the then-branch by position."""
    src = tmp_path / "m.onnx"
    onnx.save(merge(onnx.load(str(KV)), then_first=False), src)
    empty = np.zeros((1, 4, 0, 16), np.float32)
    feeds = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64),
             **{f"past_key_values.{i}.{t}": empty for i in range(4) for t in ("key", "value")}}
    want = ort.InferenceSession(str(KV)).run(["logits"], feeds)[0]
    out = tmp_path / "o.onnx"
    assert main([str(src), "-o", str(out), "--pipeline", "unmerge-decoder,normalize", "-q"]) == 0
    got = ort.InferenceSession(str(out)).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_branches_that_read_the_same_inputs_are_named(tmp_path: Path, capsys) -> None:
    """No branch reads a cache the other does not: left as it is, and the summary says why."""
    src = tmp_path / "m.onnx"
    onnx.save(merge(onnx.load(str(KV)), cache_reads_past=False), src)
    assert main([str(src), "-o", str(tmp_path / "o.onnx")]) == 0
    err = capsys.readouterr().err
    assert "neither branch reads graph inputs the other does not" in err


def test_an_if_with_attention_in_one_branch_is_not_unmerged() -> None:
    """An If whose other branch computes no attention is not a merged decoder: left as it is, with
    the reason."""
    import onnx_ir as ir

    from spatten_compiler.match import NoMatch
    from spatten_compiler.passes.unmerge_decoder import match_merged

    proto = merge(onnx.load(str(KV)))
    for n in proto.graph.node[0].attribute[1].g.node:  # else_branch: its Softmax ops become Relu
        if n.op_type == "Softmax":
            n.op_type = "Relu"
            del n.attribute[:]
    found = match_merged(ir.serde.deserialize_model(proto))
    assert isinstance(found, NoMatch) and "attention in one branch only" in found.reason
