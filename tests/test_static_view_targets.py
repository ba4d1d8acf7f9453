"""View targets that keep the exported token count on exports whose inputs are dynamic (session 18).

onnxscript's optimizer folds ``Concat(Shape(x)[:1], [H, S, Dh])`` to the constant ``[-1, H, S, Dh]`` when
the model fixes the token count (Whisper's frames), so the batch stays free but the target says ``S``.
prune-tokens rebinds the entry the data flow proves is the token axis (``passes/static_targets.py``,
``token_axis.view_entry``) and refuses in one line where it cannot; the models here are built by hand the
way Whisper's ``dynamo_op23_sdpa`` export writes them, with the head size equal to the token count (16)
so a value match could not tell the two apart."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array
from spatten_compiler.passes.static_targets import rebind_token_entry
from spatten_compiler.passes.token_axis import view_axes, view_entry, view_groups
from spatten_compiler.runtime.reference import ReferenceRuntime
from spatten_compiler.shapes import infer_shapes

import spatten_compiler as sc
from spatten_compiler.editor import GraphEditor

S, H, DH = 16, 4, 16  # the head size equals the token count
D = H * DH


def _encoder(layers: int = 3, merge: list[int] | None = None, mask: bool = False, fold: bool = False,
             seed: int = 0) -> onnx.ModelProto:
    """``layers`` pre-norm encoder layers on x [B, 16, 64]: head split ``[-1, S, H, Dh]``, the SDPA
    output's view ``merge`` (default ``[-1, H, S, Dh]``, the brief's folded target), head merge
    ``[-1, S, D]``, all constants; an FFN and two residuals per layer. ``mask``: a dynamic length and an
    additive padding mask from ``attention_mask`` whose K/V head splits read the length from the mask's
    shape through one Gather and one Concat every layer shares (onnxruntime's common-subexpression merge,
    GPT-BigCode at the extended level); no attention output view. ``fold``: fixed input shapes (batch 2) and
    BLOOM / XGLM's heads folded into the batch around the products - Q, K, V viewed ``[8, 16, 16]``, the
    scores back to ``[2, 4, 16, 16]`` for the Softmax and its output to ``[8, 16, 16]`` - every target a
    constant in which the head size, the query and the key length are all 16."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    N = helper.make_node

    def c(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def w(name, *shape):
        return c(name, (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))

    seq = "sequence" if mask else S  # the mask variant: a dynamic length, every other target length-free
    batch = 2 if fold else -1
    c("split", np.array([0, -1, H, DH] if mask else [batch, S, H, DH], np.int64))
    c("merge", np.array(merge or [batch, H, S, DH], np.int64))
    c("flat", np.array([0, -1, D] if mask else [batch, S, D], np.int64))
    c("folded", np.array([2 * H, S, S], np.int64))
    c("unfolded", np.array([2, H, S, S], np.int64))
    if mask:
        nodes += [N("Shape", ["attention_mask"], ["mshape"]), N("Gather", ["mshape", c("one_i", np.array([1]))], ["mlen"]),
                  N("Shape", ["x"], ["xshape"]), N("Slice", ["xshape", c("z", [0]), c("o", [1])], ["xb"]),
                  N("Concat", ["xb", "mlen", c("hd", np.array([H, DH]))], ["kv_split"], axis=0),
                  N("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
                  N("Unsqueeze", ["mf", c("ax12", np.array([1, 2]))], ["m4"]),
                  N("Sub", [c("onef", np.float32(1)), "m4"], ["inv"]),
                  N("Mul", ["inv", c("neg", np.float32(-1e9))], ["mbias"])]
    h = "x"
    for i in range(layers):
        p = f"l{i}_"
        nodes.append(N("LayerNormalization", [h, c(p + "g", np.ones(D, np.float32)), c(p + "be", np.zeros(D, np.float32))],
                       [p + "ln"], axis=-1))
        for t in "qkv":
            nodes += [N("MatMul", [p + "ln", w(p + "w" + t, D, D)], [p + t + "m"]),
                      N("Add", [p + t + "m", w(p + "b" + t, D)], [p + t]),
                      N("Reshape", [p + t, "kv_split" if mask and t != "q" else "split"], [p + t + "4"]),
                      N("Transpose", [p + t + "4"], [p + t + "t"], perm=[0, 2, 1, 3])]
        nodes.append(N("Transpose", [p + "kt"], [p + "ktt"], perm=[0, 1, 3, 2]))
        q, k, v = p + "qt", p + "ktt", p + "vt"
        if fold:
            nodes += [N("Reshape", [t, "folded"], [t + "f"]) for t in (q, k, v)]
            q, k, v = q + "f", k + "f", v + "f"
        nodes += [N("MatMul", [q, k], [p + "qk"]),
                  N("Mul", [p + "qk", c(p + "scale", np.float32(DH ** -0.5))], [p + "s"])]
        scores = p + "s"
        if fold:
            nodes.append(N("Reshape", [scores, "unfolded"], [p + "s4"]))
            scores = p + "s4"
        if mask:
            nodes.append(N("Add", [scores, "mbias"], [p + "sm"]))
            scores = p + "sm"
        nodes.append(N("Softmax", [scores], [p + "p"], axis=-1))
        if fold:
            nodes.append(N("Reshape", [p + "p", "folded"], [p + "pf"]))
        nodes += [N("MatMul", [p + "pf" if fold else p + "p", v], [p + "ctx"]),
                  N("Identity" if mask else "Reshape", [p + "ctx", *([] if mask else ["merge"])], [p + "ctxv"]),
                  N("Transpose", [p + "ctxv"], [p + "ctxt"], perm=[0, 2, 1, 3]),
                  N("Reshape", [p + "ctxt", "flat"], [p + "ctxm"]),
                  N("MatMul", [p + "ctxm", w(p + "wo", D, D)], [p + "o"]),
                  N("Add", [h, p + "o"], [p + "r1"]),
                  N("LayerNormalization", [p + "r1", p + "g", p + "be"], [p + "ln2"], axis=-1),
                  N("MatMul", [p + "ln2", w(p + "w1", D, 2 * D)], [p + "f1"]), N("Relu", [p + "f1"], [p + "f1r"]),
                  N("MatMul", [p + "f1r", w(p + "w2", 2 * D, D)], [p + "f2"]),
                  N("Add", [p + "r1", p + "f2"], [p + "out"])]
        h = p + "out"
    nodes.append(N("Identity", [h], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2 if fold else "batch", seq, D])]
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]))
    graph = helper.make_graph(nodes, "encoder", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                       [inputs[0].type.tensor_type.shape.dim[0].dim_param or 2, seq, D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    feeds = {"x": np.random.default_rng(1).standard_normal((batch, S, D)).astype(np.float32)}
    if any(i.name == "attention_mask" for i in model.graph.input):
        feeds["attention_mask"] = np.ones((batch, S), np.int64)
    return feeds


def _ort(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("point", ["layer-input", "after-attention"])
def test_folded_sdpa_view_target_is_rebound_on_its_token_axis(point, tmp_path) -> None:
    """``[-1, 4, 16, 16]`` on the attention output: entry 2 (tokens), not 3 (the head size, also 16), is
    rebound; the pruned model runs in onnxruntime, equals the reference runtime, and keep 1.0 is exact.
    Before, the target stayed at 16 tokens and onnxruntime failed (Whisper: an Add of 8 by 16)."""
    from bench.coverage import tokens

    model = _encoder()
    src = tmp_path / "enc.onnx"
    onnx.save(model, str(src))
    feeds = _feeds(model)
    out = tmp_path / "pruned.onnx"
    sc.compile(str(src), token_keep_schedule=(1.0, 0.5, 0.5), token_prune_point=point, token_min_keep=1,
               kv_bits="none").save(str(out))
    got = _ort(out, feeds)
    assert got.shape == (2, S, D) and np.isfinite(got).all()
    reference = ReferenceRuntime(out).run(feeds).outputs
    np.testing.assert_allclose(next(iter(reference.values())), got, atol=1e-4, rtol=0)
    ok, why = tokens(src, feeds, tmp_path, {"kv_cache": False, "num_layers": 3})
    assert ok, why


def test_view_entries_that_index_one_data_axis() -> None:
    """view_axes: an entry indexes one data axis exactly when both hold the same size and the same number of
    elements after them; split / merged axes map nothing; view_entry picks the token axis's entry."""
    assert view_axes(np.array([-1, H, S, DH]), ["b", H, S, DH]) == {1: 1, 2: 2, 3: 3}
    assert view_axes(np.array([-1, S, H, DH]), ["b", S, D]) == {1: 1}  # the head split: 4 x 16 split 64
    assert view_axes(np.array([-1, S, D]), ["b", S, H, DH]) == {1: 1}  # the head merge
    assert view_axes(np.array([2, 4, 7, 7]), [8, 7, 7]) == {2: 1, 3: 2}  # folded scores: both token axes
    assert view_axes(np.array([2, 4, 7, -1]), [8, 7, 16]) == {2: 1}  # a -1 resolved on static data
    assert view_axes(np.array([-1, H, S * DH]), ["b", H, S, DH]) == {1: 1}  # tokens merged with the features
    assert view_groups(np.array([-1, S, H, DH]), ["b", S, D]) == [(range(2, 4), range(2, 3)),
                                                                   (range(1, 2), range(1, 2)), (range(0, 1), range(0, 1))]
    assert view_entry(np.array([-1, H, S, DH]), ["b", H, S, DH], 2) == 2
    assert view_entry(np.array([-1, S, H, DH]), ["b", H, S, DH], 2) is None  # no entry indexes axis 2
    assert view_entry(np.array([-1, H, S, DH]), ["b", H, S, DH], None) is None


def test_unproven_token_entry_is_refused_in_one_line(tmp_path) -> None:
    """A constant target holding the count at an entry that does not index the data's token axis (here the
    tokens flow to axis 2 and the target reads ``[-1, 16, 4, 16]``): refused at compile time, nothing
    written; a target whose data has no derived token axis is refused too."""
    model = _encoder(merge=[-1, S, H, DH])  # the attention output viewed token-major: no entry fits
    src = tmp_path / "enc.onnx"
    onnx.save(model, str(src))
    with pytest.raises(OptionError, match=r"\[-1, 16, 4, 16\]\) and entry 1 is not its data's token axis 2 alone"):
        sc.compile(str(src), token_keep_schedule=(1.0, 0.5, 0.5), token_prune_point="layer-input", token_min_keep=1,
                   kv_bits="none")
    # without a data flow: entries that index one data axis are still rebound (exact), a 16 inside the
    # head split's group cannot be told from tokens there: refused
    m = ir.serde.deserialize_model(_encoder(layers=1))
    infer_shapes(m)
    e = GraphEditor(m, "t")
    view = next(n for n in m.graph if n.op_type == "Reshape" and n.inputs[1].name == "merge")
    split = next(n for n in m.graph if n.op_type == "Reshape" and n.inputs[1].name == "split")
    assert rebind_token_entry(e, view, None, lambda v: 2) is None  # no fixed token count: not this rule
    new = rebind_token_entry(e, view, S, lambda v: None)
    assert [p.producer().op_type if p.producer() else "const" for p in new.producer().inputs] == [
        "const", "Shape", "Shape"]  # [-1, 4], then the tokens and the head size (both 16) read from the data
    with pytest.raises(OptionError, match="not derived"):
        rebind_token_entry(e, split, S, lambda v: None)
    assert rebind_token_entry(e, split, S, lambda v: 1).producer().op_type == "Concat"


def test_shared_mask_length_piece(tmp_path) -> None:
    """K/V head splits read the length from ``Shape(attention_mask)[1]`` through one Gather and one target
    Concat shared by every layer (onnxruntime merges the identical chains at the extended level): each
    pruned layer gets its own target reading its own data, the unpruned layer keeps the shared one.
    GPT-BigCode dynamo at the extended level wrote a failing model before session 16's data-flow axis."""
    from bench.coverage import tokens

    model = _encoder(mask=True)
    src = tmp_path / "enc_mask.onnx"
    onnx.save(model, str(src))
    feeds = _feeds(model)
    feeds["attention_mask"][1, -3:] = 0
    out = tmp_path / "pruned.onnx"
    result = sc.compile(str(src), token_keep_schedule=(1.0, 0.5, 0.25), token_prune_point="layer-input",
                        token_min_keep=1, kv_bits="none")
    result.save(str(out))
    splits = [n for n in result.model.graph if n.op_type == "Reshape" and n.outputs[0].name.endswith(("k4", "v4"))]
    assert len({id(n.inputs[1]) for n in splits}) >= 3  # layer 0's shared target, one per pruned layer
    got = _ort(out, feeds)
    reference = ReferenceRuntime(out).run(feeds).outputs
    np.testing.assert_allclose(next(iter(reference.values())), got, atol=1e-4, rtol=0)
    ok, why = tokens(src, {**feeds, "attention_mask": np.ones_like(feeds["attention_mask"])}, tmp_path,
                     {"kv_cache": False, "num_layers": 3})
    assert ok, why


def test_row_view_of_a_flattened_projection_splits_no_heads() -> None:
    """onnx-simplifier at fixed shapes writes GPT-BigCode's ``unsqueeze(1)`` of the fused QKV as a Reshape of
    the Gemm's flattened rows, ``[14, 96] -> [2, 1, 7, 96]``: the rows regrouped, the features whole. It is no
    head split: Q has 4 heads of 16 and the multi-query K one (layer 1 was read with 7 heads, the length);
    its token entry is freed for token pruning (its keep-0.5 compile was refused by the load check)."""
    from spatten_compiler.passes.attention_trace import trace_branch

    N = helper.make_node
    nodes = [N("Reshape", ["x", "flat"], ["rows"]), N("Gemm", ["rows", "w", "b"], ["qkv"]),
             N("Reshape", ["qkv", "unflat"], ["qkv4"]), N("Split", ["qkv4", "sizes"], ["q", "k", "v"], axis=3),
             N("Reshape", ["q", "qsplit"], ["q4"]), N("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
             N("Unsqueeze", ["k", "ax2"], ["k5"]), N("Expand", ["k5", "rep"], ["ke"]),
             N("Reshape", ["ke", "kview"], ["kr"])]
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("flat", np.array([-1, 64], np.int64)), ("w", np.zeros((64, 96), np.float32)), ("b", np.zeros(96, np.float32)),
        ("unflat", np.array([2, 1, 7, 96], np.int64)), ("sizes", np.array([64, 16, 16], np.int64)),
        ("qsplit", np.array([2, 7, -1, 16], np.int64)), ("ax2", np.array([2], np.int64)),
        ("rep", np.array([2, 1, 4, 7, 16], np.int64)), ("kview", np.array([2, 4, 7, 16], np.int64)))]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("qt", "kr")]
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, 64])], outs,
                              inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    infer_shapes(model)
    q, k = (trace_branch(v, model.graph) for v in model.graph.outputs)
    assert (q.heads, q.head_dim, k.heads, k.head_dim) == (4, 16, 1, 16)
    assert q.projection.node.op_type == "Gemm" and k.projection.node is q.projection.node
    # token pruning at these fixed shapes: the rows' 7 is merged with the batch (no single axis holds it),
    # the only such entry and no -1 beside it: it becomes -1, which takes B*k rows / B (the batch is fixed)
    unflat = next(n for n in model.graph if n.op_type == "Reshape" and n.inputs[1].name == "unflat")
    new = rebind_token_entry(GraphEditor(model, "t"), unflat, 7, lambda v: None)
    assert const_array(new.producer().inputs[0]).tolist() == [2, 1, -1, 96]


def test_fixed_shape_folded_views_read_their_axes(tmp_path) -> None:
    """Fixed input shapes with heads folded into the batch (BLOOM / XGLM / Falcon at fixed shapes were refused as
    "ambiguous"): ``[8, 16, 16] -> [2, 4, 16, 16]`` holds the tokens twice (queries and keys) and the head size
    is 16 too; each 16 that indexes one data axis reads it, so keep 1.0 is exact and keep 0.5 runs (the
    load check in onnxruntime passes), equal to the reference runtime."""
    from bench.coverage import tokens, tokens_half

    model = _encoder(fold=True)
    src = tmp_path / "enc_fold.onnx"
    onnx.save(model, str(src))
    feeds = _feeds(model)
    ok, why = tokens(src, feeds, tmp_path, {"kv_cache": False, "num_layers": 3})
    assert ok, why
    ok, why = tokens_half(src, feeds, tmp_path, {"kv_cache": False})
    assert ok, why
    out = tmp_path / "pruned.onnx"
    sc.compile(str(src), token_keep_schedule=(1.0, 0.5, 0.5), token_prune_point="layer-input", token_min_keep=1,
               kv_bits="none").save(str(out))
    reference = ReferenceRuntime(out).run(feeds).outputs
    np.testing.assert_allclose(next(iter(reference.values())), _ort(out, feeds), atol=1e-4, rtol=0)


def test_head_pruning_follows_the_head_axis_through_the_folded_sdpa_view(tmp_path) -> None:
    """The same folded view ``[-1, 4, 16, 16]`` sits between ``P @ V`` and the head merge: prune-heads took it
    for the merge and left the real merge ``[-1, 16, 64]`` at the full width (Whisper dynamo_op23_sdpa heads-0.5
    was refused by the pipeline's check). It keeps the head axis whole, so the merge is found after it: the kept
    heads run at keep 0.5, and the last layer's group 0 sliced out equals its output rows zeroed."""
    from bench.coverage import heads, heads_half

    src = tmp_path / "enc.onnx"
    onnx.save(_encoder(), str(src))
    feeds = _feeds(_encoder())
    for check in (heads_half, heads):
        ok, why = check(src, feeds, tmp_path)
        assert ok, (check.__name__, why)
