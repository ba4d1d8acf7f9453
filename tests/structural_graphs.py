"""Tiny hand-built attention layers for the structural discovery cases of issue #16: per-head
transforms of q/k (RMS norm, partial and interleaved rotary), additive position terms on the scores
(relative-position buckets, ALiBi), learned attention sinks (GPT-OSS: a per-head column concatenated to the
scores, the row max subtracted, the column sliced off the probabilities), a training-mode Dropout, and
negatives (a transform that mixes heads or projections, scores scaled by a tensor).

``build(...)`` returns a model of one layer on ``x`` [B, S, D] with padding ``mask`` [B, S] (int64)
and output ``y`` (the residual stream after the output projection).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D, H, DH = 8, 2, 4
N = helper.make_node


def build(qk: str = "plain", bias: str = "none", dropout: bool = False, negative: str = "",
          rope_table: bool = False, sink: str = "none") -> onnx.ModelProto:
    """qk: plain | norm | norm_full | partial_rope | interleaved_rope; bias: none | buckets | alibi |
    mpt | mpt_input (MPT's [H, 1, S] ALiBi: a fixed-width table's last S columns, the length read from the
    layer's K or from the graph input) | branched (a term computed from q and k, chosen by an ``If`` on the q and
    k lengths: Optimum's DeBERTa p2c);
    sink: none | after | before (the sink column's side of the scores);
    negative: "" | mix_heads | two_projections | tensor_scale | gather_tokens | token_prefix |
    activation_sink | shift_not_max | slice_keeps_sink."""
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def c(name: str, array) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    for t in "qkv":
        nodes.append(N("MatMul", ["x", c(f"w_{t}", rng.standard_normal((D, H * DH)).astype(np.float32) * 0.3)],
                       [f"{t}_mm"]))
        nodes.append(N("Add", [f"{t}_mm", c(f"b_{t}", rng.standard_normal(H * DH).astype(np.float32) * 0.1)],
                       [f"{t}_flat"]))
        flat = f"{t}_flat"
        if qk == "norm_full" and t in "qk":  # OLMo 2: RMSNorm over all heads, before the head split
            nodes += [N("Pow", [flat, c(f"{t}_f2", np.float32(2))], [f"{t}_fsq"]),
                      N("ReduceMean", [f"{t}_fsq", c(f"{t}_fax", [-1])], [f"{t}_fms"], keepdims=1),
                      N("Sqrt", [f"{t}_fms"], [f"{t}_frms"]),
                      N("Div", [flat, f"{t}_frms"], [f"{t}_fn"])]
            flat = f"{t}_fn"
        nodes.append(N("Reshape", [flat, c(f"shape_{t}", [0, 0, H, DH])], [f"{t}_4d"]))
        nodes.append(N("Transpose", [f"{t}_4d"], [f"{t}_h"], perm=[0, 2, 1, 3]))
    nodes.append(N("Shape", ["x"], ["seq"], start=1, end=2))
    nodes.append(N("Squeeze", ["seq"], ["seq0"]))
    nodes.append(N("Range", [c("r0", np.int64(0)), "seq0", c("r1", np.int64(1))], ["pos"]))
    nodes.append(N("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT))
    q, k = "q_h", "k_h"
    for t in "qk":
        src = f"{t}_h"
        if qk == "norm":  # RMSNorm over each head's Dh
            nodes += [N("Pow", [src, c(f"{t}_two", np.float32(2))], [f"{t}_sq"]),
                      N("ReduceMean", [f"{t}_sq", c(f"{t}_axes", [-1])], [f"{t}_ms"], keepdims=1),
                      N("Add", [f"{t}_ms", c(f"{t}_eps", np.float32(1e-6))], [f"{t}_mse"]),
                      N("Sqrt", [f"{t}_mse"], [f"{t}_rms"]),
                      N("Div", [src, f"{t}_rms"], [f"{t}_n"]),
                      N("Mul", [f"{t}_n", c(f"{t}_g", (1 + 0.1 * rng.standard_normal(DH)).astype(np.float32))],
                        [f"{t}_t"])]
        elif qk in ("partial_rope", "interleaved_rope"):
            rot = DH // 2 if qk == "partial_rope" else DH
            inv = (1.0 / 100 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
            if rope_table:  # RoFormer: sinusoidal tables gathered by position (quantize_dynamic quantizes them)
                ang = np.arange(64, dtype=np.float32)[:, None] * inv[None]
                nodes.append(N("Gather", [c(f"{t}_ctab", np.cos(ang).astype(np.float32)), "pos"], [f"{t}_cos"]))
                nodes.append(N("Gather", [c(f"{t}_stab", np.sin(ang).astype(np.float32)), "pos"], [f"{t}_sin"]))
            else:
                nodes.append(N("Unsqueeze", ["posf", c(f"{t}_ax1", [1])], [f"{t}_p2"]))
                nodes.append(N("Mul", [f"{t}_p2", c(f"{t}_inv", inv)], [f"{t}_ang"]))  # [S, rot/2]
                nodes.append(N("Cos", [f"{t}_ang"], [f"{t}_cos"]))
                nodes.append(N("Sin", [f"{t}_ang"], [f"{t}_sin"]))
            if qk == "partial_rope":  # rotate-half on the first half of the head, the rest passes through
                ends = [("a", 0, rot // 2), ("b", rot // 2, rot), ("pass", rot, DH)]
                for nm, s0, s1 in ends:
                    nodes.append(N("Slice", [src, c(f"{t}_{nm}0", [s0]), c(f"{t}_{nm}1", [s1]), c(f"{t}_{nm}x", [3])],
                                   [f"{t}_{nm}"]))
                nodes += [N("Concat", [f"{t}_cos", f"{t}_cos"], [f"{t}_cc"], axis=-1),
                          N("Concat", [f"{t}_sin", f"{t}_sin"], [f"{t}_ss"], axis=-1),
                          N("Concat", [f"{t}_a", f"{t}_b"], [f"{t}_rotin"], axis=-1),
                          N("Neg", [f"{t}_b"], [f"{t}_nb"]),
                          N("Concat", [f"{t}_nb", f"{t}_a"], [f"{t}_half"], axis=-1),
                          N("Mul", [f"{t}_rotin", f"{t}_cc"], [f"{t}_x1"]),
                          N("Mul", [f"{t}_half", f"{t}_ss"], [f"{t}_x2"]),
                          N("Add", [f"{t}_x1", f"{t}_x2"], [f"{t}_roped"]),
                          N("Concat", [f"{t}_roped", f"{t}_pass"], [f"{t}_t"], axis=-1)]
            else:  # GPT-J: pairs (x0, x1) rotate; rotate_every_two = stack(-x1, x0).flatten
                for nm, s0 in (("ev", 0), ("od", 1)):
                    nodes.append(N("Slice", [src, c(f"{t}_{nm}0", [s0]), c(f"{t}_{nm}1", [DH]), c(f"{t}_{nm}x", [3]),
                                             c(f"{t}_{nm}s", [2])], [f"{t}_{nm}"]))
                    nodes.append(N("Unsqueeze", [f"{t}_{nm}", c(f"{t}_{nm}u", [-1])], [f"{t}_{nm}5"]))
                nodes += [N("Neg", [f"{t}_od5"], [f"{t}_nod5"]),
                          N("Concat", [f"{t}_nod5", f"{t}_ev5"], [f"{t}_st"], axis=-1),
                          N("Reshape", [f"{t}_st", c(f"{t}_flat2", [0, 0, 0, DH])], [f"{t}_rot"]),
                          N("Unsqueeze", [f"{t}_cos", c(f"{t}_cu", [-1])], [f"{t}_c5"]),
                          N("Concat", [f"{t}_c5", f"{t}_c5"], [f"{t}_c6"], axis=-1),
                          N("Reshape", [f"{t}_c6", c(f"{t}_cr", [0, DH])], [f"{t}_cos2"]),
                          N("Unsqueeze", [f"{t}_sin", c(f"{t}_su", [-1])], [f"{t}_s5"]),
                          N("Concat", [f"{t}_s5", f"{t}_s5"], [f"{t}_s6"], axis=-1),
                          N("Reshape", [f"{t}_s6", c(f"{t}_sr", [0, DH])], [f"{t}_sin2"]),
                          N("Mul", [src, f"{t}_cos2"], [f"{t}_x1"]),
                          N("Mul", [f"{t}_rot", f"{t}_sin2"], [f"{t}_x2"]),
                          N("Add", [f"{t}_x1", f"{t}_x2"], [f"{t}_t"])]
        if qk not in ("plain", "norm_full"):
            q, k = ("q_t", k) if t == "q" else (q, "k_t")
    if negative == "mix_heads":  # q mixed across heads by an activation product: not per-head
        nodes.append(N("MatMul", [q, "k_h"], ["qk_mix"]))
        nodes.append(N("MatMul", ["qk_mix", q], ["q_mixed"]))
        q = "q_mixed"
    if negative == "gather_tokens":  # q rows re-ordered over tokens: not a per-head transform
        nodes.append(N("Gather", [q, c("token_order", np.array([0], np.int64))], ["q_gathered"], axis=2))
        nodes.append(N("Add", ["q_gathered", c("zero_q", np.float32(0))], ["q_g"]))
        q = "q_g"
    if negative == "token_prefix":  # DINOv3: a transform on the tokens after the first only, the prefix apart
        nodes += [N("Slice", [q, c("tp_s0", [0]), c("tp_e0", [1]), c("tp_a0", [2])], ["q_prefix"]),
                  N("Slice", [q, c("tp_s1", [1]), c("tp_e1", [2**62]), c("tp_a1", [2])], ["q_rest"]),
                  N("Mul", ["q_rest", c("tp_w", np.float32(0.5))], ["q_rest2"]),
                  N("Concat", ["q_prefix", "q_rest2"], ["q_tp"], axis=2)]
        q = "q_tp"
    if negative == "two_projections":
        nodes.append(N("Add", [q, "v_h"], ["q_plus_v"]))
        q = "q_plus_v"
    nodes.append(N("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]))
    nodes.append(N("MatMul", [q, "kt"], ["qk"]))
    if negative == "tensor_scale":
        nodes.append(N("Mul", ["qk", c("scale_t", rng.standard_normal((1, H, 1, 1)).astype(np.float32))], ["scores"]))
    else:
        nodes.append(N("Mul", ["qk", c("scale", np.float32(DH ** -0.5))], ["scores"]))
    scores = "scores"
    if bias == "buckets":  # T5: a learned per-head bias indexed by a bucket of (key - query) position
        nodes += [N("Unsqueeze", ["pos", c("bu0", [0])], ["pk"]), N("Unsqueeze", ["pos", c("bu1", [1])], ["pq"]),
                  N("Sub", ["pk", "pq"], ["rel"]),
                  N("Clip", ["rel", c("lo", np.int64(-3)), c("hi", np.int64(3))], ["relc"]),
                  N("Add", ["relc", c("off", np.int64(3))], ["bucket"]),
                  N("Gather", [c("rel_table", rng.standard_normal((7, H)).astype(np.float32)), "bucket"], ["rb"]),
                  N("Transpose", ["rb"], ["rbh"], perm=[2, 0, 1]),
                  N("Unsqueeze", ["rbh", c("bu2", [0])], ["pos_bias"])]
    elif bias == "alibi":  # slopes[h] * key position
        nodes += [N("Mul", [c("slopes", np.array([0.5, 0.25], np.float32).reshape(1, H, 1, 1)), "posf"], ["pos_bias"])]
    elif bias in ("mpt", "mpt_input"):  # MPT: the last S columns of a fixed [H, 1, W] table, slopes[h] * (j - W + 1)
        width = 16
        table = np.array([0.5, 0.25], np.float32).reshape(H, 1, 1) * np.arange(1 - width, 1, dtype=np.float32)
        # TorchScript reads the length from the layer's own K (key_states.shape[-2]); dynamo from the graph input
        length = ([N("Shape", ["k_h"], ["mpt_kshape"]),
                   N("Gather", ["mpt_kshape", c("mpt_i2", np.int64(2))], ["mpt_len"])]
                  if bias == "mpt" else [N("Shape", ["x"], ["mpt_xs"], start=1, end=2),
                                         N("Squeeze", ["mpt_xs", c("mpt_a0", [0])], ["mpt_len"])])
        nodes += length + [N("Sub", [c("mpt_w", np.int64(width)), "mpt_len"], ["mpt_start0"]),
                           N("Unsqueeze", ["mpt_start0", c("mpt_u0", [0])], ["mpt_start"]),
                           N("Slice", [c("mpt_table", table), "mpt_start", c("mpt_end", [np.iinfo(np.int64).max]),
                                       c("mpt_axis", [2]), c("mpt_step", [1])], ["pos_bias"])]
    elif bias == "branched":  # the term's shape is lost at the If: its rank is known from the branches only
        # c2p: q times relative-position keys [1, H, Dh, 7], gathered at clip(k - q, -3, 3) + 3
        nodes += [N("MatMul", ["q_h", c("rel_kt", rng.standard_normal((1, H, DH, 7)).astype(np.float32))], ["c2p_all"]),
                  N("Unsqueeze", ["pos", c("du0", [0])], ["dk"]), N("Unsqueeze", ["pos", c("du1", [1])], ["dq"]),
                  N("Sub", ["dk", "dq"], ["drel"]),
                  N("Clip", ["drel", c("dlo", np.int64(-3)), c("dhi", np.int64(3))], ["drelc"]),
                  N("Add", ["drelc", c("doff", np.int64(3))], ["didx"]),
                  N("Shape", ["q_h"], ["d_bhs"], end=3), N("Shape", ["x"], ["d_s"], start=1, end=2),
                  N("Concat", ["d_bhs", "d_s"], ["d_shape"], axis=0),
                  N("Expand", ["didx", "d_shape"], ["didx4"]),
                  N("GatherElements", ["c2p_all", "didx4"], ["term"], axis=-1),
                  N("Shape", ["q_h"], ["q_len"], start=2, end=3), N("Shape", ["k_h"], ["k_len"], start=2, end=3),
                  N("Equal", ["q_len", "k_len"], ["same_len"]), N("Not", ["same_len"], ["diff_len"]),
                  N("Squeeze", ["diff_len", c("sq0", [0])], ["cond"]),
                  N("If", ["cond"], ["p2c"], then_branch=_branch("then", [
                      # an index of a computed length (the export's rank-changing If before it): no static rank
                      N("Shape", ["term"], ["t_shape"]), N("Shape", ["x"], ["t_b"], end=1),
                      N("Abs", ["t_b"], ["t_end"]),
                      N("Slice", ["t_shape", c("t0", [0]), "t_end"], ["t_sl"]),
                      N("Expand", [c("t_zero", np.zeros((1, 1, 1, 1), np.int64)), "t_sl"], ["t_idx"]),
                      N("GatherElements", ["term", "t_idx"], ["t_out"], axis=-1)], "t_out"),
                    else_branch=_branch("else", [N("Identity", ["term"], ["e_out"])], "e_out")),
                  N("Add", ["term", "p2c"], ["pos_bias"])]  # c2p + p2c
    if bias != "none":
        nodes.append(N("Add", [scores, "pos_bias"], ["biased"]))
        scores = "biased"
    nodes += [N("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
              N("Sub", [c("one", np.float32(1)), "maskf"], ["inv"]),
              N("Mul", ["inv", c("neg", np.float32(-1e4))], ["add2d"]),
              N("Unsqueeze", ["add2d", c("mu", [1, 2])], ["add4d"]),
              N("Add", [scores, "add4d"], ["masked"])]
    nodes.append(N("Softmax", ["masked"], ["probs"], axis=-1))
    probs = "probs"
    if dropout:
        nodes.append(N("Dropout", ["probs", c("ratio", np.float32(0.1)), c("training", np.bool_(True))], ["dropped"]))
        probs = "dropped"
    nodes += [N("MatMul", [probs, "v_h"], ["ctx"]),
              N("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              N("Reshape", ["ctx_t", c("merge", [0, 0, H * DH])], ["ctx_flat"]),
              N("MatMul", ["ctx_flat", c("w_o", rng.standard_normal((H * DH, D)).astype(np.float32) * 0.3)], ["o"]),
              N("Add", ["o", c("b_o", np.zeros(D, np.float32))], ["ob"]),
              N("Add", ["x", "ob"], ["y"])]
    for node in nodes:
        node.name = node.name or node.output[0]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", D]),
                                               helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model if sink == "none" else with_sink(model, before=sink == "before", negative=negative)


def _branch(name: str, nodes: list, out: str) -> onnx.GraphProto:
    """An ``If`` branch; its output's shape left to inference (the term reads the outer scope)."""
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def with_sink(proto: onnx.ModelProto, heads: int = H, before: bool = False, negative: str = "") -> onnx.ModelProto:
    """GPT-OSS eager attention in place of ``Softmax(s) -> probs``: a learned per-head logit broadcast
    to ``[B, H, S, 1]`` (its shape read from the graph input ``x``, as dynamo reads
    ``attention_mask``'s), concatenated to the scores, the row max subtracted, softmax, the sink column
    sliced off: ``probs`` rows sum to less than 1."""
    g = proto.graph
    softmax = next(n for n in g.node if n.op_type == "Softmax" and n.output[0] == "probs")
    at, scores = list(g.node).index(softmax), softmax.input[0]
    g.node.remove(softmax)

    def c(name: str, array) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    column = "sink_cols"
    sinks = np.random.default_rng(7).standard_normal((1, heads, 1, 1)).astype(np.float32)
    nodes = [N("Shape", ["x"], ["sk_b"], start=0, end=1), N("Shape", ["x"], ["sk_s"], start=1, end=2),
             N("Concat", ["sk_b", c("sk_h", [heads]), "sk_s", c("sk_1", [1])], ["sk_shape"], axis=0),
             N("Expand", [c("sinks", sinks), "sk_shape"], [column])]
    if negative == "activation_sink":  # a column computed from the scores' rows: not a parameter
        nodes.append(N("ReduceMean", [scores, c("sk_ax", [-1])], ["v_col"], keepdims=1))
        nodes.append(N("Cos", ["v_col"], ["v_cos"]))
        column = "v_cos"
    pieces = [column, scores] if before else [scores, column]
    reduce = "ReduceMean" if negative == "shift_not_max" else "ReduceMax"
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    nodes += [N("Concat", pieces, ["combined"], axis=-1),
              N(reduce, ["combined", c("mx_ax", [-1])], ["row_max"], keepdims=1) if opset >= 18 else
              N(reduce, ["combined"], ["row_max"], keepdims=1, axes=[-1]),  # axes an attribute before opset 18
              N("Sub", ["combined", "row_max"], ["shifted"]),
              N("Softmax", ["shifted"], ["probs_all"], axis=-1)]
    start, end = ([1], [2**62]) if before else ([0], [-1])
    if negative == "slice_keeps_sink":
        start, end = [0], [2**62]
    nodes.append(N("Slice", ["probs_all", c("sl_0", start), c("sl_1", end), c("sl_ax", [-1])], ["probs"]))
    for i, node in enumerate(nodes):
        node.name = node.output[0]
        g.node.insert(at + i, node)
    return proto


def feeds(batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones((batch, seq), np.int64)
    mask[-1, -2:] = 0
    return {"x": rng.standard_normal((batch, seq, D)).astype(np.float32), "mask": mask}


def _initializers(inits: list[onnx.TensorProto]):
    """``c(name, array) -> name``, appending the initializer to ``inits``."""
    def c(name: str, array) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name
    return c


def seq_first(head_size: str = "div", gated: bool = True) -> onnx.ModelProto:
    """torch's ``multi_head_attention_forward`` as WavLM runs it: the layer input transposed to
    sequence-first ``[S, B, D]``, each projection viewed straight into the batch axis as ``[S, B*H, Dh]``
    (no 4-D view) and transposed to ``[B*H, S, Dh]``; 3-D scores. ``head_size``: ``div`` (TorchScript:
    the target's last entry is the width read from the shape divided by H) or ``const`` (dynamo: Dh).
    ``gated``: WavLM's gated relative position bias ``[B*H, S, S]`` added to the scores: a per-head,
    per-query gate computed from the layer input times a bias looked up by relative position."""
    rng, inits = np.random.default_rng(3), []
    c = _initializers(inits)
    nodes = [N("Transpose", ["x"], ["xt"], perm=[1, 0, 2])]
    for t in "qkv":
        nodes += [N("MatMul", ["xt", c(f"w_{t}", rng.standard_normal((D, H * DH)).astype(np.float32) * 0.3)],
                    [f"{t}_mm"]),
                  N("Add", [f"{t}_mm", c(f"b_{t}", rng.standard_normal(H * DH).astype(np.float32) * 0.1)], [f"{t}_p"]),
                  N("Shape", [f"{t}_p"], [f"{t}_shape"]),
                  N("Gather", [f"{t}_shape", c(f"{t}_i0", np.int64(0))], [f"{t}_s"]),
                  N("Gather", [f"{t}_shape", c(f"{t}_i1", np.int64(1))], [f"{t}_b"]),
                  N("Mul", [f"{t}_b", c(f"{t}_h", np.int64(H))], [f"{t}_bh"])]
        if head_size == "div":
            nodes += [N("Gather", [f"{t}_shape", c(f"{t}_i2", np.int64(2))], [f"{t}_w"]),
                      N("Div", [f"{t}_w", c(f"{t}_hd", np.int64(H))], [f"{t}_dh"])]
            last = [f"{t}_dh"]
        else:
            last = []
        for piece in (f"{t}_s", f"{t}_bh", *last):
            nodes.append(N("Unsqueeze", [piece, c(f"{piece}_ax", [0])], [f"{piece}_1"]))
        pieces = [f"{t}_s_1", f"{t}_bh_1", f"{t}_dh_1" if last else c(f"{t}_dhc", [DH])]
        nodes += [N("Concat", pieces, [f"{t}_target"], axis=0),
                  N("Reshape", [f"{t}_p", f"{t}_target"], [f"{t}_fold"]),
                  N("Transpose", [f"{t}_fold"], [f"{t}_h3"], perm=[1, 0, 2])]
    nodes += [N("Mul", ["q_h3", c("scale", np.float32(DH ** -0.5))], ["qs"]),
              N("Transpose", ["k_h3"], ["kt"], perm=[0, 2, 1]),
              N("MatMul", ["qs", "kt"], ["scores"])]
    scores = "scores"
    if gated:
        nodes += [N("Shape", ["x"], ["g_s"], start=1, end=2), N("Squeeze", ["g_s"], ["g_s0"]),
                  N("Range", [c("g_r0", np.int64(0)), "g_s0", c("g_r1", np.int64(1))], ["pos"]),
                  N("Unsqueeze", ["pos", c("g_u0", [0])], ["pk"]), N("Unsqueeze", ["pos", c("g_u1", [1])], ["pq"]),
                  N("Sub", ["pk", "pq"], ["rel"]),
                  N("Clip", ["rel", c("g_lo", np.int64(-3)), c("g_hi", np.int64(3))], ["relc"]),
                  N("Add", ["relc", c("g_off", np.int64(3))], ["bucket"]),
                  N("Gather", [c("rel_table", rng.standard_normal((7, H)).astype(np.float32)), "bucket"], ["rb"]),
                  N("Transpose", ["rb"], ["rbh"], perm=[2, 0, 1]),
                  N("Unsqueeze", ["rbh", c("g_u2", [0])], ["pos_bias"]),  # [1, H, S, S]
                  # gate: the layer input split per head, a per-head linear, a sigmoid: [B, H, S, 1]
                  N("Reshape", ["x", c("g_view", [0, 0, H, DH])], ["g_x4"]),
                  N("Transpose", ["g_x4"], ["g_xh"], perm=[0, 2, 1, 3]),
                  N("MatMul", ["g_xh", c("g_w", rng.standard_normal((DH, 1)).astype(np.float32))], ["g_lin"]),
                  N("Sigmoid", ["g_lin"], ["gate"]),
                  N("Mul", ["gate", "pos_bias"], ["gated4"]),
                  N("Shape", ["gated4"], ["g_ss"], start=2),
                  N("Concat", [c("g_fold", [-1]), "g_ss"], ["g_target"], axis=0),
                  N("Reshape", ["gated4", "g_target"], ["gated"]),  # [B*H, S, S]
                  N("Add", ["scores", "gated"], ["biased"])]
        scores = "biased"
    nodes += [N("Softmax", [scores], ["probs"], axis=-1),
              N("MatMul", ["probs", "v_h3"], ["ctx"]),
              N("Transpose", ["ctx"], ["ctx_t"], perm=[1, 0, 2]),
              N("Shape", ["xt"], ["m_sb"], end=2),
              N("Concat", ["m_sb", c("m_d", [H * DH])], ["m_target"], axis=0),
              N("Reshape", ["ctx_t", "m_target"], ["ctx_flat"]),
              N("MatMul", ["ctx_flat", c("w_o", rng.standard_normal((H * DH, D)).astype(np.float32) * 0.3)], ["o"]),
              N("Add", ["o", c("b_o", np.zeros(D, np.float32))], ["ob"]),
              N("Transpose", ["ob"], ["obt"], perm=[1, 0, 2]),
              N("Add", ["x", "obt"], ["y"])]
    for node in nodes:
        node.name = node.name or node.output[0]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model
