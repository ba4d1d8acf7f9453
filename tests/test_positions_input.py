"""positions-input (evict-kv on decoders that compute positions from the cache length): the Llama
fixture with its position_ids input replaced by transformers' ``cache_position`` (``Range(0, q) +
Shape(past)[2]``) - at budget 1.0 equal to the dense model over generation steps; evicting, equal to
the fixture evicted with true position_ids (the positions are the tokens so far, not the kept cache's
length); refusals with the reason; the corpus decoders without position_ids (``corpus`` marker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import spatten_compiler.passes  # noqa: F401  (registers the passes)
from conftest import MODELS
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.passes.positions_input import PositionsInput, why_not
from test_structural_discovery import CORPUS, _corpus

from spatten_compiler.decoding import DecoderSession
from spatten_compiler.pipeline import Pipeline, make_pass

PROMPTS = np.array([[5, 17, 33, 2, 9, 11, 40, 7, 21], [8, 3, 100, 42, 6, 12, 13, 50, 4]], np.int64)


def derived_positions(src: Path, out: Path) -> Path:
    """The fixture without a position_ids input: positions = Range(0, q) + past length, [1, q]."""
    proto = onnx.load(str(src))
    g = proto.graph
    g.input.remove(next(i for i in g.input if i.name == "position_ids"))
    N = helper.make_node
    g.initializer.extend([numpy_helper.from_array(np.int64(v), n) for n, v in (("dp_zero", 0), ("dp_one", 1))]
                         + [numpy_helper.from_array(np.array([0], np.int64), "dp_ax")])
    nodes = [N("Shape", ["input_ids"], ["dp_q1"], start=1, end=2), N("Squeeze", ["dp_q1"], ["dp_q"]),
             N("Range", ["dp_zero", "dp_q", "dp_one"], ["dp_r"]),
             N("Shape", ["past_key_values.0.key"], ["dp_p1"], start=2, end=3), N("Squeeze", ["dp_p1"], ["dp_p"]),
             N("Add", ["dp_r", "dp_p"], ["dp_pos"]), N("Unsqueeze", ["dp_pos", "dp_ax"], ["position_ids"])]
    for i, node in enumerate(nodes):
        g.node.insert(i, node)
    onnx.save(proto, str(out))
    return out


def evicted(src: Path, out: Path, **options: object) -> Path:
    model = ir.load(str(src))
    # the CLI's front passes: fused ops (onnxruntime-genai's GroupQueryAttention) are decomposed first
    front = [make_pass("unfuse-ort"), make_pass("normalize"), make_pass("decompose-attention")]
    Pipeline([*front, make_pass("evict-kv", **options)])(model)
    ir.save(model, str(out))
    return out


def lockstep(a: DecoderSession, b: DecoderSession, steps: int = 2) -> float:
    """Prefill PROMPTS (no padding: both position conventions agree), then greedy steps; max |diff|."""
    a.reset(2)
    b.reset(2)
    x, y = a.step(PROMPTS), b.step(PROMPTS)
    err = float(np.abs(x - y).max())
    for _ in range(steps):
        tok = x[:, -1].argmax(-1)[:, None]
        x, y = a.step(tok), b.step(tok)
        err = max(err, float(np.abs(x - y).max()))
    return err


@pytest.fixture(scope="module")
def derived(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return derived_positions(MODELS / "llama_torchscript.onnx", tmp_path_factory.mktemp("pos") / "derived.onnx")


def test_rewrite_adds_position_ids_and_keeps_the_model(derived: Path, tmp_path: Path) -> None:
    model = ir.load(str(derived))
    assert why_not(model.graph) is None
    assert PositionsInput()(model).modified
    assert [v.name for v in model.graph.inputs].count("position_ids") == 1
    assert not PositionsInput()(model).modified  # a position_ids input: nothing to do
    ir.save(model, str(tmp_path / "wired.onnx"))
    assert lockstep(DecoderSession(derived), DecoderSession(tmp_path / "wired.onnx"), steps=0) <= 1e-5


def test_full_budget_equals_dense_over_steps(derived: Path, tmp_path: Path) -> None:
    path = evicted(derived, tmp_path / "e.onnx", budget=1.0)
    session = DecoderSession(path)
    assert session.positions == "arange"
    assert lockstep(DecoderSession(derived), session) <= 1e-5


def test_evicting_uses_the_tokens_so_far_not_the_cache_length(derived: Path, tmp_path: Path) -> None:
    """At budget 0.5 the kept cache is shorter than the sequence: the derived model evicted must equal
    the fixture (true position_ids) evicted with the same options, token for token."""
    opts = dict(budget=0.5, sinks=2, recent=2)
    mine = DecoderSession(evicted(derived, tmp_path / "e.onnx", **opts))
    theirs = DecoderSession(evicted(MODELS / "llama_torchscript.onnx", tmp_path / "t.onnx", **opts))
    assert lockstep(theirs, mine) <= 1e-5
    assert mine.cache_lengths()[0] < PROMPTS.shape[1] + 2


def _cumsum_positions(table: bool = True) -> ir.Model:
    """OPT: positions = CumSum(attention_mask) index a learned table (``table``; else an output)."""
    N = helper.make_node
    inits = [numpy_helper.from_array(np.zeros((16, 4), np.float32), "table"), numpy_helper.from_array(np.int64(1), "axis")]
    nodes = [N("CumSum", ["attention_mask", "axis"], ["cs" if table else "emb"])]
    nodes += [N("Gather", ["table", "cs"], ["emb"], axis=0)] if table else []
    graph = helper.make_graph(nodes, "opt",
        [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["B", 2, "P", 4])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _opt_positions() -> ir.Model:
    """OPT: p = Slice(CumSum(mask) * mask - 1, Shape(past)[2]:, axis 1) + 2 index a learned table."""
    N = helper.make_node
    table = np.arange(64, dtype=np.float32).reshape(16, 4)
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.int64(1), "axis")]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("one", 1), ("two", 2), ("end", [np.iinfo(np.int64).max]), ("ax1", [1]))]
    nodes = [N("CumSum", ["attention_mask", "axis"], ["cs"]), N("Mul", ["cs", "attention_mask"], ["csm"]),
             N("Sub", ["csm", "one"], ["p_all"]),
             N("Shape", ["past_key_values.0.key"], ["past"], start=2, end=3),
             N("Slice", ["p_all", "past", "end", "ax1"], ["p"]), N("Add", ["p", "two"], ["idx"]),
             N("Gather", ["table", "idx"], ["emb"], axis=0)]
    graph = helper.make_graph(nodes, "opt",
        [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["B", 2, "P", 4])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_mask_cumsum_positions_become_the_input(tmp_path: Path) -> None:
    """OPT: the new tokens' cut of the mask's cumulative sum becomes position_ids (convention input);
    fed the tokens so far, a mask as short as an evicted cache gives the positions of the full mask."""
    import onnxruntime as ort
    from spatten_compiler.passes.positions_input import wire_positions

    ir.save(_opt_positions(), str(tmp_path / "opt.onnx"))
    model = _opt_positions()
    assert why_not(model.graph) is None
    assert wire_positions(model) == ("input", None)
    ir.save(model, str(tmp_path / "wired.onnx"))
    full = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], np.int64)  # left padding; 5 past + 3 new
    want = ort.InferenceSession(str(tmp_path / "opt.onnx")).run(None, {
        "attention_mask": full, "past_key_values.0.key": np.zeros((2, 2, 5, 4), np.float32)})[0]
    got = ort.InferenceSession(str(tmp_path / "wired.onnx")).run(None, {  # a 2-slot cache after eviction
        "attention_mask": np.ones((2, 5), np.int64), "past_key_values.0.key": np.zeros((2, 2, 2, 4), np.float32),
        "position_ids": (np.cumsum(full, axis=1) - 1)[:, -3:]})[0]
    np.testing.assert_array_equal(got, want)


def test_refusals_name_the_reason() -> None:
    model = _cumsum_positions()
    assert "cumulative sum of attention_mask" in why_not(model.graph)
    assert not PositionsInput()(model).modified
    assert all(v.name != "position_ids" for v in model.graph.inputs)
    assert "no positions start at the cache length" in why_not(_cumsum_positions(table=False).graph)


def _corpus_derived() -> list:
    return [r for r in _corpus() if r["kv_cache"] and r["family"] in
            {"llama", "qwen2", "gemma", "olmo", "granite", "starcoder2", "gpt_neox", "stablelm", "biogpt", "xglm",
             "opt"}]


@pytest.mark.corpus
@pytest.mark.parametrize("rec", _corpus_derived() or [None], ids=lambda r: r["name"] if r else "absent")
def test_corpus_full_budget_equals_dense_over_steps(rec: dict | None, tmp_path: Path) -> None:
    if rec is None:
        pytest.skip("no corpus: run python models/corpus.py")
    from bench.coverage import float_activations  # int4 builds: compare with float activations (see there)

    src = float_activations(CORPUS / rec["onnx"], tmp_path)
    assert lockstep(DecoderSession(src), DecoderSession(evicted(src, tmp_path / "e.onnx", budget=1.0)), 6) <= 1e-5
