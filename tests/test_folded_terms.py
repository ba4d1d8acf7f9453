"""Encoders handled wrong or not at all before session 16: Optimum's DeBERTa / DeBERTa-v2 (a score term
whose shape is lost at an ``If``), WavLM (heads viewed straight into the batch axis of a sequence-first
projection, a gated position bias) and onnxruntime's saved DeBERTa (``SplitToSequence`` on a symbolic
axis). Tiny hand-built graphs (tests/structural_graphs.py) and the committed Optimum fixtures
(``models/optimum/``, made with ``models/_optimum.py --fixture``). No torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import structural_graphs
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.score_chain import static_rank
from structural_graphs import DH, H

OPTIMUM = Path(__file__).resolve().parent.parent / "models" / "optimum"


def _sites(proto: onnx.ModelProto):
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    report = find_attention(model)
    assert len(report.sites) == 1, report.rejected
    return report.sites


def test_term_behind_an_if_is_head_pruned(tmp_path: Path) -> None:
    """Optimum's DeBERTa p2c: ``If(q_len != k_len, GatherElements(t, idx), t)``; shape inference leaves
    the term without a shape, its rank (4) follows from the branches, and prune-heads gathers its kept
    heads on axis rank - 3 (it refused "no static head axis" before)."""
    from bench.coverage import heads

    proto = structural_graphs.build(bias="branched")
    (site,) = _sites(proto)
    (term,) = site.bias_terms
    assert term.shape is None and static_rank(term) == 4
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    ok, why = heads(path, structural_graphs.feeds(), tmp_path)
    assert ok, why


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("head_size", ["div", "const"])
def test_heads_viewed_into_the_batch_of_a_sequence_first_projection(head_size: str, gated: bool,
                                                                    tmp_path: Path) -> None:
    """WavLM (torch's multi_head_attention_forward): ``[S, B, H*Dh] -> [S, B*H, Dh]``, no 4-D view. Heads and
    head size from the fold (a size times H, the width over H); the gated position bias is a per-head term
    on the folded scores; head 0 sliced out == the input with head 0's output rows zeroed."""
    from bench.coverage import heads

    proto = structural_graphs.seq_first(head_size, gated)
    (site,) = _sites(proto)
    assert (site.num_heads, site.num_kv_heads, site.head_dim) == (H, H, DH)
    assert site.q.projection.weight.name == "w_q" and site.out_proj.weight.name == "w_o"
    assert [t.name for t in site.bias_terms] == (["gated"] if gated else [])
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    ok, why = heads(path, structural_graphs.feeds(), tmp_path)
    assert ok, why


def test_a_plain_three_d_reshape_is_not_a_head_split() -> None:
    """The fold needs a size times the head count in the target: ``[S, B, W] -> [S, B, W]`` (a view that
    only restates the shape, last entry W) gives no heads."""
    from spatten_compiler.passes.attention_trace import Branch, _folded_split

    graph = ir.Graph([], [], nodes=[])
    x = ir.Value(name="x", shape=ir.Shape([5, 2, 8]))
    target = ir.Value(name="t", const_value=ir.tensor(np.array([5, 2, 4], np.int64)))
    node = ir.Node("", "Reshape", [x, target], num_outputs=1)
    graph.append(node)
    branch = Branch(value=node.outputs[0])
    _folded_split(node, [5, 2, 4], 8, branch)  # width 8 over a last entry of 4: but no fold factor of 2
    assert branch.heads is None


def _sequence_model() -> onnx.ModelProto:
    """``x`` [B, S, W] (W symbolic) chunked on its last axis: sizes [2, 3, 3], a scalar 3 (last chunk
    shorter) and one chunk read with a negative position (kept: its start needs the chunk count)."""
    N = helper.make_node
    inits = [numpy_helper.from_array(np.array([2, 3, 3], np.int64), "sizes"),
             numpy_helper.from_array(np.array(3, np.int64), "three")]
    inits += [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in (-1, 0, 1, 2)]
    nodes = [N("SplitToSequence", ["x", "sizes"], ["seq"], axis=-1),
             N("SplitToSequence", ["x", "three"], ["seq3"], axis=2),
             *[N("SequenceAt", ["seq", f"i{i}"], [f"a{i}"]) for i in (0, 1, 2)],
             N("SequenceAt", ["seq3", "i2"], ["last"]), N("SequenceAt", ["seq3", "i-1"], ["neg"]),
             N("Concat", ["a2", "a0", "a1"], ["y"], axis=-1)]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "last", "neg")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", "W"])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_sequence_chunks_become_slices() -> None:
    """``SequenceAt(SplitToSequence(x, sizes), i)`` on a symbolic axis -> ``Split(x, sizes)`` outputs (a list
    of sizes) or ``Slice`` (a scalar size), exact; a negative position of a scalar-size chunk is left alone
    (its start needs the chunk count)."""
    proto = _sequence_model()
    model = ir.serde.deserialize_model(proto)
    from spatten_compiler.passes.normalize import sequences_to_slices

    assert sequences_to_slices(model) == 4
    ops = [n.op_type for n in model.graph]
    assert ops.count("SequenceAt") == 1 and ops.count("Slice") == 1 and ops.count("Split") == 1
    Normalize()(model)
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    got = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(w, g)


FIXTURES = {"deberta_optimum": (4, 4, 16), "deberta_v2_optimum": (4, 4, 16), "wavlm_optimum": (4, 4, 16)}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_optimum_fixture_found_and_head_pruned_exactly(name: str, tmp_path: Path) -> None:
    """Optimum's exports (2 layers): every layer found with the config's heads; prune-heads at keep 1.0
    and with the last layer's head 0 sliced out are exact."""
    from bench.coverage import _read, heads

    path = OPTIMUM / f"{name}.onnx"
    sites = find_attention(_read(path)).sites
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites] == [FIXTURES[name]] * 2
    ok, why = heads(path, dict(np.load(path.with_suffix(".npz"))), tmp_path)
    assert ok, why


def test_chunks_of_a_sequence_get_their_own_shapes() -> None:
    """onnx infers one element shape for a sequence (the 4 query and 1 + 1 K/V heads of Falcon's fused
    ``[B, S, H + 2, Dh]`` split on the head axis read as one symbolic size): after the rewrite each Split
    output and what it feeds has its own head count, or onnxruntime's buffer planner fails on the saved
    model (``Shape mismatch attempting to re-use buffer``)."""
    N = helper.make_node
    # the view hides the split input's shape from onnxscript's folder (it would make the Split itself)
    nodes = [N("Reshape", ["x", "view"], ["xv"]), N("SplitToSequence", ["xv", "sizes"], ["seq"], axis=-2),
             *[N("SequenceAt", ["seq", f"i{i}"], [f"a{i}"]) for i in (0, 1)],
             *[N("Transpose", [f"a{i}"], [f"t{i}"], perm=[0, 2, 1, 3]) for i in (0, 1)],
             N("MatMul", ["t0", "k"], ["s"]), N("MatMul", ["s", "t1"], ["y"])]
    inits = [numpy_helper.from_array(np.array([4, 1, 1], np.int64), "sizes"),
             numpy_helper.from_array(np.array([0, 0, -1, 16], np.int64), "view"),
             *[numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in (0, 1)],
             numpy_helper.from_array(np.ones((1, 1, 16, 3), np.float32), "k")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", "P", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    assert "Split" in [n.op_type for n in model.graph]
    t = {v.name: v for n in model.graph for v in n.outputs}
    assert t["t0"].shape.dims[1] != t["t1"].shape.dims[1]
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 16)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gpt2_dynamo_saved_by_onnxruntime_extended(tmp_path: Path) -> None:
    """onnxruntime's saved model (extended level) of the dynamo GPT-2 fixture keeps the fused QKV split as
    ``SplitToSequence`` / ``SequenceAt`` on a symbolic axis (the ``MatMul + Add -> Gemm`` fusion leaves its
    shape unknown): found (it was not), and head pruning is exact."""
    from conftest import MODELS, load_meta, reference_io

    from bench.coverage import _read, heads, to_ortopt

    saved = to_ortopt(MODELS / "gpt2_dynamo.onnx", tmp_path, extended=True)
    assert "SequenceAt" in {n.op_type for n in onnx.load(saved).graph.node}
    sites = find_attention(_read(saved)).sites
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites] == [(4, 4, 16)] * 4
    ok, why = heads(saved, reference_io(load_meta("gpt2_dynamo"))[0], tmp_path)
    assert ok, why


def _unfolded_scores(units: int = 1, pv4: bool = True) -> onnx.ModelProto:
    """tf2onnx's T5: the core folds heads into the batch (3-D bmm ``[B*H, S, S]``), the scores are viewed
    ``[B, H, S, S, 1]`` (``units`` trailing unit axes: its Einsum lowering keeps one) and squeezed, a
    per-head relative-position term ``[1, H, S, S]`` is added, the Softmax runs on ``[B, H, S, S]`` and
    P @ V on 4-D tensors (V unfolded to ``[B, H, S, Dh]``); not ``pv4``: P folded back to 3-D for P @ V."""
    import packed_graphs

    proto = packed_graphs.build("folded")
    g = proto.graph
    heads = packed_graphs.H
    N = helper.make_node
    table = np.random.default_rng(7).standard_normal((7, heads)).astype(np.float32)
    g.initializer.extend([numpy_helper.from_array(table, "rel_table"),
                          numpy_helper.from_array(np.array([heads], np.int64), "uf_h"),
                          numpy_helper.from_array(np.ones(units, np.int64), "uf_ones"),
                          numpy_helper.from_array(np.arange(4, 4 + units, dtype=np.int64), "uf_sq"),
                          numpy_helper.from_array(np.array([-1], np.int64), "uf_m1"),
                          numpy_helper.from_array(np.int64(0), "uf_0"), numpy_helper.from_array(np.int64(1), "uf_1"),
                          numpy_helper.from_array(np.array([0], np.int64), "uf_a0"),
                          numpy_helper.from_array(np.array([1], np.int64), "uf_a1"),
                          numpy_helper.from_array(np.int64(-3), "uf_lo"),
                          numpy_helper.from_array(np.int64(3), "uf_hi")])
    soft = next(n for n in g.node if n.op_type == "Softmax")
    pv = next(n for n in g.node if n.op_type == "MatMul" and n.input[0] == "probs")
    at = list(g.node).index(soft)
    new = [N("Shape", ["x"], ["uf_b"], start=0, end=1),
           N("Concat", ["uf_b", "uf_h", "seq1", "seq1", *(["uf_ones"] if units else [])], ["uf_target"], axis=0),
           N("Reshape", [soft.input[0], "uf_target"], ["uf_s5"])]
    new += [N("Squeeze", ["uf_s5", "uf_sq"], ["uf_s4"])] if units else [N("Identity", ["uf_s5"], ["uf_s4"])]
    new += [N("Range", ["uf_0", "seq", "uf_1"], ["uf_pos"]),
            N("Unsqueeze", ["uf_pos", "uf_a0"], ["uf_pk"]), N("Unsqueeze", ["uf_pos", "uf_a1"], ["uf_pq"]),
            N("Sub", ["uf_pk", "uf_pq"], ["uf_rel"]), N("Clip", ["uf_rel", "uf_lo", "uf_hi"], ["uf_relc"]),
            N("Sub", ["uf_relc", "uf_lo"], ["uf_bucket"]),
            N("Gather", ["rel_table", "uf_bucket"], ["uf_rb"]),  # [S, S, H]
            N("Transpose", ["uf_rb"], ["uf_rbh"], perm=[2, 0, 1]),
            N("Unsqueeze", ["uf_rbh", "uf_a0"], ["uf_term"]),  # [1, H, S, S]
            N("Add", ["uf_s4", "uf_term"], ["uf_biased"])]
    for i, n in enumerate(new):
        g.node.insert(at + i, n)
    soft.input[0] = "uf_biased"
    at = list(g.node).index(pv)
    if pv4:
        g.initializer.append(numpy_helper.from_array(np.array([packed_graphs.DH], np.int64), "uf_dh"))
        g.node.insert(at, N("Concat", ["uf_b", "uf_h", "seq1", "uf_dh"], ["uf_v4"], axis=0))
        g.node.insert(at + 1, N("Reshape", ["v_h", "uf_v4"], ["uf_v"]))
        pv.input[1] = "uf_v"
    else:
        g.node.insert(at, N("Concat", ["uf_m1", "seq1", "seq1"], ["uf_fold"], axis=0))
        g.node.insert(at + 1, N("Reshape", ["probs", "uf_fold"], ["uf_probs3"]))
        pv.input[0] = "uf_probs3"
    onnx.checker.check_model(proto)
    return proto


def _chained(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Two copies of a one-layer graph, ``a_`` feeding ``b_``; positions and shapes from the graph input, as
    exporters compute them once."""
    two = onnx.compose.merge_models(proto, proto, io_map=[("y", "x")], prefix1="a_", prefix2="b_")
    for node in two.graph.node:
        if node.op_type == "Shape" and node.input[0] == "a_y":
            node.input[0] = "a_x"
    return two


def _paper_rule_is_exact(proto: onnx.ModelProto, tmp_path: Path) -> None:
    """The paper rule (run time) at keep 0.5 on two chained copies of a packed_graphs layer: layer 1 keeps the
    H / 2 heads with the largest |P @ V| of layer 0 (no padding: every query row votes), so its output is the
    input model's with the other heads' output-projection rows of layer 1 zeroed (onnxruntime), and
    onnxruntime == the reference runtime on the pruned model."""
    import packed_graphs
    from spatten_compiler.passes.prune_heads import PruneHeads
    from spatten_compiler.runtime.reference import ReferenceRuntime

    two = _chained(proto)
    feeds = {"a_x": packed_graphs.feeds()["x"]}
    batch, seq = feeds["a_x"].shape[:2]
    probe = onnx.ModelProto.FromString(two.SerializeToString())
    probe.graph.output.append(helper.make_tensor_value_info("a_ctx", TensorProto.FLOAT, None))
    ctx = ort.InferenceSession(probe.SerializeToString()).run(["a_ctx"], feeds)[0]
    score = np.abs(ctx.reshape(batch, packed_graphs.H, seq, packed_graphs.DH)).sum(axis=(0, 2, 3))
    kept = np.sort(np.argsort(-score)[: packed_graphs.H // 2])
    zeroed = onnx.ModelProto.FromString(two.SerializeToString())
    w_o = next(t for t in zeroed.graph.initializer if t.name == "b_w_o")
    w = numpy_helper.to_array(w_o).copy()
    for h in sorted(set(range(packed_graphs.H)) - set(kept.tolist())):
        w[h * packed_graphs.DH:(h + 1) * packed_graphs.DH] = 0
    w_o.CopyFrom(numpy_helper.from_array(w, "b_w_o"))
    want = ort.InferenceSession(zeroed.SerializeToString()).run(["b_y"], feeds)[0]
    model = ir.serde.deserialize_model(two)
    Normalize()(model)
    PruneHeads(keep=0.5)(model)
    assert "HeadSelect" in {n.op_type for n in model.graph}
    out = tmp_path / "half.onnx"
    ir.save(model, str(out))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    ref = ReferenceRuntime(str(out)).run(feeds).outputs["b_y"]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("units", "pv4"), [(1, True), (0, True), (1, False)])
def test_term_on_a_4d_view_of_folded_scores_is_head_pruned(units: int, pv4: bool, tmp_path: Path) -> None:
    """TF T5 / mT5 (tf2onnx): a 4-D term on ``[B, H, S, S]`` scores of a folded core has its head axis at
    rank - 3, as on an unfolded site (refused "no static head axis" before), and the ``[B, H, S, S, 1]``
    unfold of the scores gets the kept head count: head 0 sliced out == head 0's output rows zeroed.
    The paper rule (run time) reads 4-D probabilities and P @ V, or (session 20) P folded back to 3-D for
    P @ V, unfolded for the head scores (refused before): the kept heads are the ones |P @ V| ranks first."""
    import packed_graphs

    from bench.coverage import heads

    proto = _unfolded_scores(units, pv4)
    (site,) = _sites(proto)
    assert site.variant.get("layout") == "folded" and site.num_heads == packed_graphs.H
    (term,) = site.bias_terms
    assert term.shape.rank() == 4 and site.probs.shape.rank() == 4
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    ok, why = heads(path, packed_graphs.feeds(), tmp_path)
    assert ok, why
    _paper_rule_is_exact(proto, tmp_path)


def test_paper_rule_on_a_folded_core_with_3d_products(tmp_path: Path) -> None:
    """tf2onnx's BART family (BART, Pegasus, Marian, mBART, Blenderbot, Whisper, OPT, XGLM): both bmm's are
    3-D (``[B*H, S, S]`` probabilities, ``[B*H, S, Dh]`` P @ V); the paper rule's head scores read them
    unfolded to ``[B, H, ., .]`` with the layer's head count (refused "run-time head scores need [B, H, S, S]
    probabilities" before): exact against the input with the pruned heads' output rows zeroed."""
    import packed_graphs

    proto = packed_graphs.build("folded")
    (site,) = _sites(proto)
    assert site.probs.shape.rank() == 3 and site.pv.outputs[0].shape.rank() == 3
    _paper_rule_is_exact(proto, tmp_path)


def _guarded_probs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """P @ V reads ``Where(S == 0, 0, P)`` (an empty-sequence guard): the probabilities are its input 2, which
    quantize-kv does not clone (it follows input 0 from P @ V to the probabilities)."""
    g = proto.graph
    pv = next(n for n in g.node if n.op_type == "MatMul" and n.input[0] == "probs")
    g.initializer.extend([numpy_helper.from_array(np.int64(0), "g_zero"),
                          numpy_helper.from_array(np.float32(0), "g_fzero")])
    at = list(g.node).index(pv)
    g.node.insert(at, helper.make_node("Equal", ["seq", "g_zero"], ["g_empty"]))
    g.node.insert(at + 1, helper.make_node("Where", ["g_empty", "g_fzero", "probs"], ["g_probs"]))
    pv.input[0] = "g_probs"
    onnx.checker.check_model(proto)
    return proto


def test_preset_leaves_out_kv_planes_a_layer_refuses(tmp_path: Path, capsys) -> None:
    """The encoder preset tries its K/V planes on the probe after its token pruning (in pipeline order): a
    layer quantize-kv refuses gets the rest of the preset, the summary names the part and the reason in
    its headline, exit 0 (the compile failed before); an explicit --kv-bits still exits 2 with the line."""
    import packed_graphs

    from spatten_compiler.cli import main

    src = tmp_path / "guarded.onnx"
    onnx.save(_chained(_guarded_probs(packed_graphs.build("folded"))), src)
    assert main([str(src), "-o", str(tmp_path / "p.onnx")]) == 0
    err = capsys.readouterr().err
    why = "does not read the probabilities a_probs through input 0 of its ops"
    assert f"(K/V quantization skipped: MatMul(P, V) {why}):" in err
    ops = {n.op_type for n in onnx.load(tmp_path / "p.onnx").graph.node}
    assert "TokenSelect" in ops and "QuantizeSplit" not in ops  # the token part still applied
    assert main([str(src), "-o", str(tmp_path / "e.onnx"), "--kv-bits", "4+1"]) == 2
    assert why in capsys.readouterr().err


def test_kv_planes_on_a_4d_view_of_folded_scores_after_token_pruning(tmp_path: Path) -> None:
    """TF T5's default preset: prune-tokens (which drops the inferred shapes; its importance reads the
    probabilities) then quantize-kv. K^T is folded ``[B*H, Dh, S]``, P @ V is not: K's planes are taken on
    the folded view, the probabilities and V on ``[B, H, ., .]``, and the probabilities' other reader sees
    the rewritten ones (refused before as "readers besides P @ V"); onnxruntime == the reference runtime."""
    import packed_graphs
    from spatten_compiler.passes.prune_tokens import PruneTokens
    from spatten_compiler.passes.quantize_kv import QuantizeKV
    from spatten_compiler.runtime.reference import ReferenceRuntime

    model = ir.serde.deserialize_model(_chained(_unfolded_scores(1, True)))
    Normalize()(model)
    PruneTokens(schedule=(1.0, 0.5), min_keep=1)(model)
    QuantizeKV(bits="8+4")(model)
    out = tmp_path / "kv.onnx"
    ir.save(model, str(out))
    feeds = {"a_x": packed_graphs.feeds(seq=6)["x"]}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    want = ReferenceRuntime(str(out)).run(feeds).outputs["b_y"]
    assert got.shape == (2, 6, packed_graphs.D) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("bits", "threshold"), [("8+8", 1.0), ("4+4", 0.5)])
def test_kv_planes_on_folded_3d_probabilities_read_by_token_importance(bits: str, threshold: float,
                                                                        tmp_path: Path) -> None:
    """tf2onnx's BART family under the default preset: prune-tokens' importance reads the 3-D ``[B*H, S, S]``
    probabilities, which P @ V reads too; quantize-kv gives the importance ``Where(low, P_f, P_m)`` with the
    per-row decision (taken on P @ V's rows, ``[1, B*H, S, 1]``) viewed as the probabilities' rows (refused
    before: "readers besides P @ V"). 8+8 bits at threshold 1.0 (every row MSB + LSB: 16-bit K/V) reproduce
    the fp32 token-pruned model; 4+4 at 0.5 (rows of both planes) runs the same in onnxruntime and the
    reference runtime."""
    import packed_graphs
    from spatten_compiler.passes.prune_tokens import PruneTokens
    from spatten_compiler.passes.quantize_kv import QuantizeKV
    from spatten_compiler.runtime.reference import ReferenceRuntime

    two = _chained(packed_graphs.build("folded"))
    feeds = {"a_x": packed_graphs.feeds(seq=6)["x"]}
    outs = {}
    for name, kv in (("tokens", False), ("kv", True)):
        model = ir.serde.deserialize_model(two)
        Normalize()(model)
        PruneTokens(schedule=(1.0, 0.5), min_keep=1)(model)
        if kv:
            QuantizeKV(bits=bits, rule="fixed", threshold=threshold)(model)
            # the importance reads the probabilities unfolded to [B, H, S, S]: a Reshape of the Where
            reads = [n.inputs[0].producer() for n in model.graph if n.op_type.startswith("TokenImportance")]
            assert reads and all(r.op_type == "Reshape" and r.inputs[0].producer().op_type == "Where" for r in reads)
        outs[name] = tmp_path / f"{name}.onnx"
        ir.save(model, str(outs[name]))
    got = ort.InferenceSession(str(outs["kv"]), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ref = ReferenceRuntime(str(outs["kv"])).run(feeds).outputs["b_y"]
    assert got.shape == (2, 6, packed_graphs.D) and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    if bits == "8+8":
        fp32 = ort.InferenceSession(str(outs["tokens"]), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(got, fp32, atol=1e-3, rtol=0)
