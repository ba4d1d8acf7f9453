"""Attention as exporters write it, declared as data (see shared notes: attention-patterns.md).

The core is anchored on ``Softmax(axis=-1)``; each ``OneOf`` lists the variants real exporters
produce, and the tag records which one matched. Walking outwards from Q, K and V to their
projections is table-driven too: :data:`VIEW_OPS` are the ops a head split / GQA repeat / KV cache
is built from, each with the input that carries the data.
"""

from __future__ import annotations

import numpy as np

from spatten_compiler.match import Const, OneOf, Op, Var


def _scalar(a: np.ndarray) -> bool:
    return a.size == 1


def _last_axis(axis: int | None) -> bool:
    return axis in (None, -1, 3)


QK = Op("MatMul", Var("q"), Var("kt"), name="qk")

# Where the 1/sqrt(d) scale sits.
SCORES = OneOf(
    "scale_variant",
    (
        # x*s or x/s after the QK product (TorchScript eager; transformers 5 eager_attention_forward)
        ("after", Op(("Mul", "Div"), QK, Const("scale", _scalar), name="scale_node")),
        # SDPA decomposition (dynamo): sqrt(s) applied to both Q and K^T
        (
            "split",
            Op(
                "MatMul",
                Op("Mul", Var("q"), Const("q_scale", _scalar), name="q_scale_node"),
                Op("Mul", Var("kt"), Const("k_scale", _scalar), name="k_scale_node"),
                name="qk",
            ),
        ),
        # Q scaled before the product (DistilBERT: q / sqrt(d))
        (
            "before",
            Op("MatMul", Op(("Mul", "Div"), Var("q"), Const("q_scale", _scalar), name="q_scale_node"), Var("kt"),
               name="qk"),
        ),
        ("none", QK),
    ),
)

# How the mask is applied. Where(cond, a, b): scores can be either branch.
MASKED = OneOf(
    "mask_variant",
    (
        # GPT-2 (transformers 4.x): causal Where on the scores, then the additive padding mask
        (
            "causal+additive",
            Op("Add", Op("Where", Var("causal_cond"), SCORES, Var("causal_fill"), name="causal_node"), Var("mask"),
               name="mask_node"),
        ),
        ("additive", Op("Add", SCORES, Var("mask"), name="mask_node")),
        ("where", Op("Where", Var("mask"), Var("mask_fill"), SCORES, name="mask_node")),  # DistilBERT 4.x
        ("where_scores_true", Op("Where", Var("mask"), SCORES, Var("mask_fill"), name="mask_node")),
        ("none", SCORES),
    ),
)

CORE = Op("Softmax", MASKED, name="softmax", attrs={"axis": _last_axis})

# SDPA exports guard fully masked rows: Where(IsNaN(P), 0, P). The guarded value is what P@V reads.
NAN_GUARD = Op("Where", Op("IsNaN", Var("p")), Const("zero"), Var("p"), name="guard")

# rotate_half(x) = Concat(-x[..., d/2:], x[..., :d/2]); RoPE(x) = x*cos + rotate_half(x)*sin. The halves are
# two Slices, or the two outputs of one Split (onnxruntime's saved models fuse the Slices: GatherSliceToSplitFusion)
HALF = ("Slice", "Split")
ROTATE_HALF = Op("Concat", Op("Neg", Op(HALF, Var("x"))), Op(HALF, Var("x")), name="rotate")
ROPE = Op("Add", Op("Mul", Var("x"), Var("cos")), Op("Mul", ROTATE_HALF, Var("sin")), name="rope")

def _broadcast_head(value) -> bool:
    """``value`` is an ``Expand`` (through views) of a [B, 1, S, d] tensor: one head shared by all."""
    for _ in range(6):
        node = value.producer()
        if node is None or node.op_type not in ("Expand", "Reshape", "Unsqueeze", "Cast", "Identity"):
            return False
        src = node.inputs[0].shape
        if node.op_type == "Expand" and src is not None and src.rank() == 4 and src.dims[1] == 1:
            return True
        value = node.inputs[0]
    return False


def _per_head(value) -> bool:
    shape = value.shape
    return shape is not None and shape.rank() == 4 and shape.dims[1] != 1 and not _broadcast_head(value)


# Q/K assembled on the last axis, [B, H, S, d1 + d2] = Concat(per_head [B, H, S, d1], Expand(shared [B, 1, S, d2])):
# multi-head latent attention (DeepSeek-V2/V3, Kimi) puts the RoPE part of the key in one head shared by all.
# (torch's slice writes ``k[..., :d] = a; k[..., d:] = b`` become this Concat in normalize: slice_assign.py.)
# piece kind -> test, tried in order
ASSEMBLY = {"shared": _broadcast_head, "per_head": _per_head}

# Ops that only re-view the data on its way from a projection to Q/K/V: op -> data input index.
VIEW_OPS: dict[str, int] = {
    "Transpose": 0,
    "Reshape": 0,
    "Squeeze": 0,
    "Unsqueeze": 0,
    "Expand": 0,  # GQA: Unsqueeze -> Expand -> Reshape repeats each KV head
    "Cast": 0,
    "Identity": 0,
    "Contiguous": 0,
}

# Fused attention ops spattenc cannot read, with what to do instead (reported like any non-match).
UNREAD_FUSED_OPS: dict[tuple[str, str], str] = {
    **{("com.microsoft", op): "a fused attention op spattenc does not decompose: compile the exporter's model"
       for op in ("PackedAttention", "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention",
                  "DecoderMaskedSelfAttention", "SparseAttention", "LongformerAttention", "DecoderAttention",
                  "PagedAttention")},
}

# Already-fused attention ops: (domain, op) -> how to read them.
FUSED_OPS: dict[tuple[str, str], dict[str, object]] = {
    ("", "Attention"): {"heads": "q_num_heads", "kv_heads": "kv_num_heads", "q": 0, "k": 1, "v": 2,
                        "mask": 3, "past": (4, 5), "present": (1, 2)},
    ("com.microsoft", "Attention"): {"heads": "num_heads", "packed_input": 0, "mask": 3, "past": (4,)},
    # the optimizer's Attention after quantize_dynamic: int8 input (a DynamicQuantizeLinear's) and packed weight
    ("com.microsoft", "QAttention"): {"heads": "num_heads", "packed_input": 0, "mask": 5, "past": (8,)},
    ("com.microsoft", "MultiHeadAttention"): {"heads": "num_heads", "q": 0, "k": 1, "v": 2, "mask": 4,
                                              "past": (6, 7), "present": (1, 2)},
    ("com.microsoft", "GroupQueryAttention"): {"heads": "num_heads", "kv_heads": "kv_num_heads", "q": 0,
                                               "k": 1, "v": 2, "past": (3, 4), "present": (1, 2)},
}
