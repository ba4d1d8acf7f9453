"""Tiny hand-built attention graphs, one knob per exporter variant.

``build(...)`` returns an ONNX model computing one attention layer on ``x`` [B, S, D] with a
padding mask input ``mask`` [B, S] (int64) - written the way the named exporter variant writes it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D, H, DH = 8, 2, 4


def _const(nodes: list, inits: list, name: str, array: np.ndarray) -> str:
    inits.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def build(
    scale: str = "after",  # after | after_div | split | before | none
    mask: str = "additive",  # additive | where | causal+additive | none
    packed: bool = False,
    rope: bool = False,
    kv_heads: int = H,
    cache: bool = False,
    softmax_axis: int = -1,
    seed: int = 0,
    reduced_kv: bool = False,  # K/V from every second token (SegFormer-like spatial reduction)
    bias: str = "none",  # none | table: a learned [1, H, S, S] position bias sliced from a table (Swin)
    literal_seq: int = 0,  # > 0: head-split targets spell the length out, [0, S, H, Dh] (Swin's windows)
    cache_window: int = 0,  # > 0: present keeps the last W positions, the core reads all (sliding window)
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    N = helper.make_node

    def c(name: str, array) -> str:
        return _const(nodes, inits, name, np.asarray(array))

    def heads_split(src: str, n_heads: int, tag: str) -> str:
        nodes.append(N("Reshape", [src, c(f"shape_{tag}", [0, literal_seq, n_heads, DH])], [f"{tag}_4d"]))
        nodes.append(N("Transpose", [f"{tag}_4d"], [f"{tag}_bhsd"], perm=[0, 2, 1, 3]))
        return f"{tag}_bhsd"

    widths = {"q": H * DH, "k": kv_heads * DH, "v": kv_heads * DH}
    if packed:
        w = rng.standard_normal((D, sum(widths.values()))).astype(np.float32) * 0.3
        nodes.append(N("MatMul", ["x", c("w_qkv", w)], ["qkv_mm"]))
        nodes.append(N("Add", ["qkv_mm", c("b_qkv", np.zeros(w.shape[1], np.float32))], ["qkv"]))
        nodes.append(N("Split", ["qkv", c("split", list(widths.values()))], ["q_flat", "k_flat", "v_flat"], axis=2))
    else:
        if reduced_kv:
            nodes.append(N("Slice", ["x", c("r_start", [0]), c("r_end", [2**62]), c("r_axis", [1]), c("r_step", [2])],
                           ["x_reduced"]))
        for t, width in widths.items():
            w = rng.standard_normal((D, width)).astype(np.float32) * 0.3
            src = "x_reduced" if reduced_kv and t != "q" else "x"
            nodes.append(N("MatMul", [src, c(f"w_{t}", w)], [f"{t}_mm"]))
            nodes.append(N("Add", [c(f"b_{t}", rng.standard_normal(width).astype(np.float32) * 0.1), f"{t}_mm"],
                           [f"{t}_flat"]))
    q = heads_split("q_flat", H, "q")
    k = heads_split("k_flat", kv_heads, "k")
    v = heads_split("v_flat", kv_heads, "v")
    if rope:
        pos = np.arange(16)[:, None] * (1.0 / 10000 ** (np.arange(0, DH, 2) / DH))[None]
        cos = np.concatenate([np.cos(pos)] * 2, -1).astype(np.float32)
        sin = np.concatenate([np.sin(pos)] * 2, -1).astype(np.float32)
        nodes.append(N("Shape", ["x"], ["seq_len"], start=1, end=2))
        for name, table in (("cos", cos), ("sin", sin)):
            nodes.append(N("Slice", [c(f"{name}_table", table), c(f"{name}_zero", [0]), "seq_len", c(f"{name}_ax0", [0])],
                           [f"{name}_s"]))
        for t in ("q", "k"):
            src = q if t == "q" else k
            nodes.append(N("Slice", [src, c(f"{t}_h0", [DH // 2]), c(f"{t}_h1", [DH]), c(f"{t}_ax", [3])], [f"{t}_hi"]))
            nodes.append(N("Slice", [src, c(f"{t}_l0", [0]), c(f"{t}_l1", [DH // 2]), c(f"{t}_lax", [3])], [f"{t}_lo"]))
            nodes.append(N("Neg", [f"{t}_hi"], [f"{t}_neg"]))
            nodes.append(N("Concat", [f"{t}_neg", f"{t}_lo"], [f"{t}_rot"], axis=-1))
            nodes.append(N("Mul", [src, "cos_s"], [f"{t}_c"]))
            nodes.append(N("Mul", [f"{t}_rot", "sin_s"], [f"{t}_s"]))
            nodes.append(N("Add", [f"{t}_c", f"{t}_s"], [f"{t}_rope"]))
        q, k = "q_rope", "k_rope"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", literal_seq or "S", D]),
              helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"])]
    outputs = []
    if cache:
        for t in ("k", "v"):
            inputs.append(helper.make_tensor_value_info(f"past_{t}", TensorProto.FLOAT, ["B", kv_heads, "P", DH]))
            src = k if t == "k" else v
            full = f"all_{t}" if cache_window else f"present_{t}"
            nodes.append(N("Concat", [f"past_{t}", src], [full], axis=2))
            if cache_window:
                nodes.append(N("Slice", [full, c(f"{t}_w0", [-cache_window]), c(f"{t}_w1", [2**62]),
                                         c(f"{t}_wax", [2])], [f"present_{t}"]))
            outputs.append(helper.make_tensor_value_info(f"present_{t}", TensorProto.FLOAT, ["B", kv_heads, "T", DH]))
        k, v = ("all_k", "all_v") if cache_window else ("present_k", "present_v")
    if kv_heads != H:  # GQA repeat: [B,Hk,S,Dh] -> [B,Hk,1,S,Dh] -> expand -> [B,H,S,Dh]
        for t in ("k", "v"):
            src = k if t == "k" else v
            nodes.append(N("Unsqueeze", [src, c(f"{t}_ax2", [2])], [f"{t}_u"]))
            nodes.append(N("Shape", [src], [f"{t}_shp"]))
            nodes.append(N("Slice", [f"{t}_shp", c(f"{t}_s2", [2]), c(f"{t}_s4", [4])], [f"{t}_tail"]))
            nodes.append(N("Concat", [c(f"{t}_pre", [1, kv_heads, H // kv_heads]), f"{t}_tail"], [f"{t}_eshape"], axis=0))
            nodes.append(N("Expand", [f"{t}_u", f"{t}_eshape"], [f"{t}_e"]))
            nodes.append(N("Reshape", [f"{t}_e", c(f"{t}_rshape", [0, H, -1, DH])], [f"{t}_rep"]))
        k, v = "k_rep", "v_rep"
    nodes.append(N("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]))
    s = 1.0 / np.sqrt(DH)
    if scale == "split":
        nodes.append(N("Mul", [q, c("sq", np.float32(np.sqrt(s)))], ["q_s"]))
        nodes.append(N("Mul", ["kt", c("sk", np.float32(np.sqrt(s)))], ["kt_s"]))
        nodes.append(N("MatMul", ["q_s", "kt_s"], ["scores"]))
    elif scale == "before":
        nodes.append(N("Div", [q, c("sq", np.float32(np.sqrt(DH)))], ["q_s"]))
        nodes.append(N("MatMul", ["q_s", "kt"], ["scores"]))
    else:
        nodes.append(N("MatMul", [q, "kt"], ["qk"]))
        if scale == "after":
            nodes.append(N("Mul", [c("s", np.float32(s)), "qk"], ["scores"]))  # constant first: commutative
        elif scale == "after_div":
            nodes.append(N("Div", ["qk", c("s", np.float32(np.sqrt(DH)))], ["scores"]))
        else:
            nodes.append(N("Identity", ["qk"], ["scores"]))
    if bias == "table":  # a learned per-head bias on the scores, sliced to the length (Swin's position table)
        next(n for n in nodes if "scores" in n.output).output[:] = ["scores_raw"]
        table = rng.standard_normal((1, H, 16, 16)).astype(np.float32)
        nodes.append(N("Shape", ["scores_raw"], ["tlen"], start=2, end=3))
        nodes.append(N("Concat", ["tlen", "tlen"], ["tend"], axis=0))
        nodes.append(N("Slice", [c("table", table), c("t0", [0, 0]), "tend", c("tax", [2, 3])], ["pos_bias"]))
        nodes.append(N("Add", ["scores_raw", "pos_bias"], ["scores"]))
    nodes.append(N("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT))
    nodes.append(N("Unsqueeze", ["mask_f", c("ax12", [1, 2])], ["mask4"]))
    if mask == "additive":
        nodes.append(N("Sub", [c("one", np.float32(1)), "mask4"], ["inv"]))
        nodes.append(N("Mul", ["inv", c("neg", np.float32(-1e9))], ["bias"]))
        nodes.append(N("Add", ["bias", "scores"], ["masked"]))
    elif mask == "expand_heads":  # XLM under dynamo: the mask expanded to the scores' literal [B, H, S, S]
        nodes.append(N("Equal", ["mask4", c("zf", np.float32(0))], ["pad"]))
        nodes.append(N("Shape", ["x"], ["xb"], start=0, end=1))
        nodes.append(N("Shape", ["x"], ["xs"], start=1, end=2))
        nodes.append(N("Concat", ["xb", c("eh", [H]), "xs", "xs"], ["etarget"], axis=0))
        nodes.append(N("Expand", ["pad", "etarget"], ["pad_e"]))
        nodes.append(N("Where", ["pad_e", c("fill", np.float32(-1e9)), "scores"], ["masked"]))
    elif mask == "where":
        nodes.append(N("Equal", ["mask4", c("zf", np.float32(0))], ["pad"]))
        nodes.append(N("Where", ["pad", c("fill", np.float32(-1e9)), "scores"], ["masked"]))
    elif mask == "causal+additive":
        nodes.append(N("Shape", ["scores"], ["sshape"], start=2, end=3))
        nodes.append(N("Squeeze", ["sshape"], ["slen"]))
        nodes.append(N("Range", [c("r0", np.int64(0)), "slen", c("r1", np.int64(1))], ["pos"]))
        nodes.append(N("Unsqueeze", ["pos", c("axr", [1])], ["rows"]))
        nodes.append(N("LessOrEqual", ["pos", "rows"], ["causal"]))
        nodes.append(N("Where", ["causal", "scores", c("cfill", np.float32(-1e9))], ["cscores"]))
        nodes.append(N("Sub", [c("one", np.float32(1)), "mask4"], ["inv"]))
        nodes.append(N("Mul", ["inv", c("neg", np.float32(-1e9))], ["bias"]))
        nodes.append(N("Add", ["cscores", "bias"], ["masked"]))
    else:
        nodes.append(N("Identity", ["scores"], ["masked"]))
    nodes.append(N("Softmax", ["masked"], ["probs"], axis=softmax_axis))
    nodes.append(N("MatMul", ["probs", v], ["ctx"]))
    nodes.append(N("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]))
    nodes.append(N("Reshape", ["ctx_t", c("merge", [0, 0, H * DH])], ["ctx_m"]))
    nodes.append(N("MatMul", ["ctx_m", c("w_o", rng.standard_normal((H * DH, D)).astype(np.float32) * 0.3)], ["o"]))
    nodes.append(N("Add", ["o", c("b_o", np.zeros(D, np.float32))], ["o_b"]))
    nodes.append(N("Add", ["x", "o_b"], ["y"]))
    outputs.insert(0, helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", literal_seq or "S", D]))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def classifier_softmax() -> onnx.ModelProto:
    """Linear layer + Softmax over classes: a Softmax that is not attention."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((D, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", D])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["B", 3])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds(model: onnx.ModelProto, batch: int = 2, seq: int = 5, past: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name == "x":
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            out["x"] = rng.standard_normal((batch, seq, D) if len(dims) == 3 else (batch, D)).astype(np.float32)
        elif inp.name == "mask":
            m = np.ones((batch, seq), np.int64)
            m[-1, seq - 2:] = 0
            out["mask"] = m
        else:
            heads = inp.type.tensor_type.shape.dim[1].dim_value
            out[inp.name] = rng.standard_normal((batch, heads, past, DH)).astype(np.float32)
    return out
