"""Tiny hand-built attention layers with the Q/K/V packings real exporters write (issue #16, head
pruning): one projection's output split into heads in each family's way.

``build(layout)`` returns one layer on ``x`` [B, S, D] with output ``y`` (residual after the output
projection); ``columns(layout)`` the projection columns that head h of Q, K, V reads (the row map a
test checks :mod:`spatten_compiler.passes.head_rows` against).

* ``neox``: ``[B, S, H, 3*Dh]`` sliced on the last axis per head (GPT-NeoX, CodeGen, Persimmon).
* ``falcon``: ``[B, S, H+2G, Dh]`` sliced on the head axis, K/V repeated to H heads (Falcon GQA).
* ``stacked``: ``[B, S, 3, H, Dh]`` transposed and gathered (ModernBERT).
* ``split_gqa``: ``[Q | K | V]`` split on the last axis with fewer KV heads (GPT-BigCode, Phi-3).
* ``folded``: ``[B, S, H, 3, Dh]`` sliced, heads folded into the batch ``[B*H, S, Dh]`` with ``B*H``
  computed from the input's shape (BLOOM), 3-D scores.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D, H, G, DH = 8, 4, 2, 4
N = helper.make_node
LAYOUTS = ("neox", "falcon", "stacked", "split_gqa", "folded")


def kv_heads(layout: str) -> int:
    return G if layout in ("falcon", "split_gqa") else H


def columns(layout: str) -> dict[str, list[list[int]]]:
    """Per branch, per head at the core (K/V: after the repeat), the projection columns it reads."""
    r = range(DH)
    if layout == "neox":
        return {t: [[h * 3 * DH + i * DH + d for d in r] for h in range(H)] for i, t in enumerate("qkv")}
    if layout == "falcon":
        g = H // G
        return {"q": [[h * DH + d for d in r] for h in range(H)],
                "k": [[(H + h // g) * DH + d for d in r] for h in range(H)],
                "v": [[(H + G + h // g) * DH + d for d in r] for h in range(H)]}
    if layout == "stacked":
        return {t: [[(i * H + h) * DH + d for d in r] for h in range(H)] for i, t in enumerate("qkv")}
    if layout == "split_gqa":
        g = H // G
        return {"q": [[h * DH + d for d in r] for h in range(H)],
                "k": [[H * DH + (h // g) * DH + d for d in r] for h in range(H)],
                "v": [[(H + G) * DH + (h // g) * DH + d for d in r] for h in range(H)]}
    return {t: [[h * 3 * DH + i * DH + d for d in r] for h in range(H)] for i, t in enumerate("qkv")}


def build(layout: str, escape: bool = False) -> onnx.ModelProto:
    """``escape``: the head-split QKV is also a graph output (as a KV cache's ``present`` is): the
    projection must then stay whole."""
    rng = np.random.default_rng(1)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def c(name: str, array) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    kv = kv_heads(layout)
    width = (H + 2 * kv) * DH
    nodes.append(N("MatMul", ["x", c("w_qkv", rng.standard_normal((D, width)).astype(np.float32) * 0.3)], ["qkv_mm"]))
    nodes.append(N("Add", ["qkv_mm", c("b_qkv", rng.standard_normal(width).astype(np.float32) * 0.1)], ["qkv"]))
    g = H // kv

    def repeat(src: str, out: str) -> None:  # [B, G, S, Dh] -> [B, H, S, Dh]
        nodes.extend([N("Unsqueeze", [src, c(f"{out}_ax", [2])], [f"{out}_5"]),
                      N("Expand", [f"{out}_5", c(f"{out}_rep", [1, 1, g, 1, 1])], [f"{out}_e"]),
                      N("Reshape", [f"{out}_e", c(f"{out}_shape", [0, H, -1, DH])], [out])])

    if layout == "neox":
        nodes += [N("Reshape", ["qkv", c("s4", [0, 0, H, 3 * DH])], ["qkv4"]),
                  N("Transpose", ["qkv4"], ["qkvt"], perm=[0, 2, 1, 3])]
        for i, t in enumerate("qkv"):
            nodes.append(N("Slice", ["qkvt", c(f"{t}0", [i * DH]), c(f"{t}1", [(i + 1) * DH]), c(f"{t}a", [3])],
                           [f"{t}_h"]))
    elif layout == "falcon":
        nodes += [N("Reshape", ["qkv", c("s4", [0, 0, H + 2 * G, DH])], ["qkv4"])]
        for t, (a, b) in zip("qkv", ((0, H), (H, H + G), (H + G, H + 2 * G))):
            nodes += [N("Slice", ["qkv4", c(f"{t}0", [a]), c(f"{t}1", [b]), c(f"{t}a", [2])], [f"{t}_s"]),
                      N("Transpose", [f"{t}_s"], [f"{t}_t"], perm=[0, 2, 1, 3])]
        nodes.append(N("Identity", ["q_t"], ["q_h"]))
        repeat("k_t", "k_h")
        repeat("v_t", "v_h")
    elif layout == "stacked":
        nodes += [N("Reshape", ["qkv", c("s5", [0, 0, 3, H, DH])], ["qkv5"]),
                  N("Transpose", ["qkv5"], ["qkvt"], perm=[2, 0, 3, 1, 4])]
        for i, t in enumerate("qkv"):
            nodes.append(N("Gather", ["qkvt", c(f"{t}i", np.int64(i))], [f"{t}_h"], axis=0))
    elif layout == "split_gqa":
        nodes.append(N("Split", ["qkv", c("sizes", [H * DH, G * DH, G * DH])], ["q_f", "k_f", "v_f"], axis=-1))
        for t, n in (("q", H), ("k", G), ("v", G)):
            nodes += [N("Reshape", [f"{t}_f", c(f"{t}_s4", [0, 0, n, DH])], [f"{t}_4"]),
                      N("Transpose", [f"{t}_4"], [f"{t}_t"], perm=[0, 2, 1, 3])]
        nodes.append(N("Identity", ["q_t"], ["q_h"]))
        repeat("k_t", "k_h")
        repeat("v_t", "v_h")
    else:  # folded: B*H computed from the input's shape, as TorchScript writes it
        nodes += [N("Reshape", ["qkv", c("s5", [0, 0, H, 3, DH])], ["qkv5"]),
                  N("Shape", ["x"], ["xs"]),
                  N("Gather", ["xs", c("i0", np.int64(0))], ["bsz"], axis=0),
                  N("Gather", ["xs", c("i1", np.int64(1))], ["seq"], axis=0),
                  N("Mul", ["bsz", c("heads", np.int64(H))], ["bh"]),
                  N("Unsqueeze", ["bh", c("u0", [0])], ["bh1"]),
                  N("Unsqueeze", ["seq", c("u1", [0])], ["seq1"]),
                  N("Concat", ["bh1", "seq1", c("dh", [DH])], ["fold"], axis=0)]
        for i, t in enumerate("qkv"):
            nodes += [N("Gather", ["qkv5", c(f"{t}i", np.int64(i))], [f"{t}_4"], axis=3),
                      N("Transpose", [f"{t}_4"], [f"{t}_t"], perm=[0, 2, 1, 3]),
                      N("Reshape", [f"{t}_t", "fold"], [f"{t}_h"])]
    perm = [0, 2, 1] if layout == "folded" else [0, 1, 3, 2]
    nodes += [N("Transpose", ["k_h"], ["k_t_core"], perm=perm),
              N("MatMul", ["q_h", "k_t_core"], ["scores"]),
              N("Mul", ["scores", c("scale", np.float32(DH ** -0.5))], ["scaled"]),
              N("Softmax", ["scaled"], ["probs"], axis=-1),
              N("MatMul", ["probs", "v_h"], ["ctx"])]
    if layout == "folded":
        nodes += [N("Concat", [c("m1", [-1]), c("hh", [H]), "seq1", c("dh2", [DH])], ["unfold"], axis=0),
                  N("Reshape", ["ctx", "unfold"], ["ctx4"])]
    else:
        nodes.append(N("Identity", ["ctx"], ["ctx4"]))
    nodes += [N("Transpose", ["ctx4"], ["ctx_t"], perm=[0, 2, 1, 3]),
              N("Reshape", ["ctx_t", c("merge", [0, 0, H * DH])], ["ctx_m"]),
              N("MatMul", ["ctx_m", c("w_o", rng.standard_normal((H * DH, D)).astype(np.float32) * 0.3)], ["o"]),
              N("Add", ["o", "x"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", D])]
    if escape:
        nodes.append(N("Identity", ["qkv4"], ["qkv_out"]))
        dims = ["B", "S", "P", DH * 3 if layout == "neox" else DH]
        outputs.append(helper.make_tensor_value_info("qkv_out", TensorProto.FLOAT, dims))
    graph = helper.make_graph(nodes, f"packed_{layout}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", D])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).standard_normal((batch, seq, D)).astype(np.float32)}
