"""decompose-attention: rewrite fused attention ops into the core pattern the finder matches.

    Attention(Q, K, V, mask; scale, is_causal)          Q, K, V: [B, H, S, Dh]   (ONNX, opset 23)
    com.microsoft.MultiHeadAttention(q, k, v, bias, key_padding_mask, attention_bias; num_heads)
      -> q, k, v [B, S, D] (+ their bias slices) -> Reshape [B, S, H, Dh] -> Transpose, then as below
    com.microsoft.Attention(input, weights[D, 3D], bias, mask_index; num_heads)
      -> MatMul(input, weights) + bias -> Split(3) -> q, k, v, then as MultiHeadAttention
      -> bias   = mask (float) | Where(mask, 0, -inf-ish) (bool)      [+ causal bias]
         scores = Add(Mul(MatMul(Q, Transpose(K, [0,1,3,2])), scale), bias)
         Y      = MatMul(Softmax(scores, axis=-1), V)

so the Softmax-centred finder and the pruning passes see the probabilities. Decomposing costs the
fused kernel; the pruning passes then remove more work than it saved. Variants spattenc cannot yet
express exactly are refused with the reason (never skipped): 3-D inputs, grouped KV heads inside
the op, past key/value inputs, softcap, a requested probability output, packed or 4-D MHA inputs,
per-sequence-length masks, and com.microsoft GroupQueryAttention.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array
from spatten_compiler.pipeline import Pass, PassResult, register_pass
from spatten_compiler.shapes import infer_shapes

from .attention_patterns import FUSED_OPS

logger = logging.getLogger(__name__)
MASKED = -3.4028234663852886e38  # float32 lowest: what transformers' own masks use


def _refusal(node: ir.Node) -> str | None:
    """Why ``node`` cannot be decomposed exactly, or None."""
    if (node.domain or "", node.op_type) == ("com.microsoft", "MultiHeadAttention"):
        return _mha_refusal(node)
    if (node.domain or "", node.op_type) == ("com.microsoft", "Attention"):
        return _packed_refusal(node)
    if (node.domain or "", node.op_type) == ("com.microsoft", "QAttention"):
        return _packed_refusal(node, mask_at=5, past_at=8)
    if node.domain not in ("", "ai.onnx"):
        return f"{node.domain}.{node.op_type} is not decomposed yet"
    q, k = node.inputs[0], node.inputs[1]
    if any(v is None or v.shape is None or v.shape.rank() != 4 for v in (q, k, node.inputs[2])):
        return "only 4-D Q/K/V inputs are decomposed (3-D inputs with q_num_heads are not yet)"
    if isinstance(q.shape.dims[1], int) and isinstance(k.shape.dims[1], int) and q.shape.dims[1] != k.shape.dims[1]:
        return "grouped KV heads inside the op are not decomposed yet"
    if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
        return "past key/value inputs are not decomposed yet"
    if node.attributes.get_float("softcap", 0.0) != 0.0:
        return "softcap is not decomposed yet"
    if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
        return "present/probability outputs are used"
    return None


def _mha_width(node: ir.Node) -> int | None:
    """Hidden width of an MHA's query: its shape, the packed bias (3 x width), or the Q projection."""
    q, bias = node.inputs[0], node.inputs[3] if len(node.inputs) > 3 else None
    if q.shape is not None and isinstance(q.shape.dims[-1], int):
        return q.shape.dims[-1]
    if bias is not None and (b := const_array(bias)) is not None:
        return b.size // 3
    producer = q.producer()
    if producer is not None and producer.op_type in ("MatMul", "Gemm"):
        w = producer.inputs[1].shape
        if w is not None and w.rank() == 2 and isinstance(w.dims[-1], int):
            return w.dims[-1]
    return None


def _packed_refusal(node: ir.Node, mask_at: int = 3, past_at: int = 4) -> str | None:
    """com.microsoft.Attention(input, weights[D, 3D], bias[3D], mask_index, past, attention_bias), or
    QAttention(input_q, weights_q[D, 3D], bias, input_scale, weight_scale, mask_index, input_zero_point,
    weight_zero_point, past): ``mask_at`` / ``past_at`` are its mask_index / past inputs."""
    ins = list(node.inputs) + [None] * 9
    w = ins[1].shape if ins[1] is not None else None
    if const_array(ins[1]) is None and (ins[1] is None or ins[1].const_value is None):
        return "non-constant packed weights are not decomposed yet"
    if w is None or w.rank() != 2 or not isinstance(w.dims[1], int) or w.dims[1] % 3:
        return "packed weights must be [hidden, 3 * hidden]"
    if node.attributes.get_ints("qkv_hidden_sizes", []) or node.attributes.get_int("do_rotary", 0):
        return "qkv_hidden_sizes / do_rotary are not decomposed yet"
    if ins[2] is not None and const_array(ins[2]) is None:
        return "a computed (non-constant) bias is not decomposed yet"
    if ins[mask_at] is not None and (reason := _mask_index_refusal(ins[mask_at], ins[0])):
        return reason
    if ins[past_at] is not None or (len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:])):
        return "past / present state is not decomposed yet"
    return None


def _is_lengths(mask: ir.Value, data: ir.Value) -> bool:
    """A 1-D mask_index is [batch] end positions (what the optimizer writes: ReduceSum over the key
    axis, or EmbedLayerNormalization's output) or [2 * batch] end and start positions: tell which."""
    producer = mask.producer()
    if producer is not None and producer.op_type == "ReduceSum" and not producer.attributes.get_int("keepdims", 1):
        axes = const_array(producer.inputs[1]) if len(producer.inputs) > 1 else None
        return axes is not None and axes.tolist() in ([1], [-1]) and producer.inputs[0].shape is not None \
            and producer.inputs[0].shape.rank() == 2
    dims = (mask.shape.dims[0], data.shape.dims[0]) if data is not None and data.shape is not None else (None, 0)
    return dims[0] is not None and dims[0] == dims[1]


def _mask_index_refusal(mask: ir.Value, data: ir.Value) -> str | None:
    rank = mask.shape.rank() if mask.shape is not None else None
    if rank in (2, 3):
        return None
    if rank == 1:
        return None if _is_lengths(mask, data) else (
            "a 1-D mask_index that is not [batch] lengths (ReduceSum over keys or of batch size) is not "
            "decomposed ([2 * batch] end and start positions are not yet)")
    return f"a mask_index of rank {rank} is not decomposed (only [batch] lengths, [batch, key], [batch, query, key])"


def _mha_refusal(node: ir.Node) -> str | None:
    ins = list(node.inputs) + [None] * 8
    q, k, v, bias, kpm = ins[0], ins[1], ins[2], ins[3], ins[4]
    if k is None or v is None:
        return "packed QKV input to MultiHeadAttention is not decomposed yet"
    if any(x.shape is not None and x.shape.rank() != 3 for x in (q, k, v)):
        return "only 3-D query/key/value MultiHeadAttention inputs are decomposed"
    if _mha_width(node) is None or not node.attributes.get_int("num_heads", 0):
        return "hidden size or num_heads unknown"
    if any(x is not None for x in ins[6:8]):
        return "past key/value inputs are not decomposed yet"
    if bias is not None and const_array(bias) is None:
        return "a computed (non-constant) bias is not decomposed yet"
    if kpm is not None and (kpm.shape is None or kpm.shape.rank() != 2):
        return "only a [batch, key] key_padding_mask is decomposed (not per-sequence lengths)"
    if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
        return "present/probability outputs are used"
    return None


@register_pass
@dataclasses.dataclass(frozen=True)
class DecomposeAttention(Pass):
    """Fused ONNX Attention -> MatMul/Softmax/MatMul, so pruning passes can see the probabilities."""

    name = "decompose-attention"

    def call(self, model: ir.Model) -> PassResult:
        fused = [n for n in model.graph if (n.domain or "", n.op_type) in FUSED_OPS]
        if not fused:
            return PassResult(model, False)
        for node in fused:
            reason = _refusal(node)
            if reason:
                raise OptionError(f"fused attention '{node.name}': {reason}")
        e = GraphEditor(model, "spatten/decompose")
        for node in fused:
            if (node.domain, node.op_type) == ("com.microsoft", "Attention"):
                self._decompose_packed(e, node)
            elif (node.domain, node.op_type) == ("com.microsoft", "QAttention"):
                self._decompose_quantized(e, node)
            elif node.domain == "com.microsoft":
                self._decompose_mha(e, node)
            else:
                self._decompose(e, node)
        e.forget_shapes()
        e.commit()
        # shapes inferred afresh (decomposing changes no dim): the matchers read head splits whose
        # Reshape target is computed (onnxscript's optimizer folds [B, S, H, Dh] into Concat(Shape, H, Dh))
        infer_shapes(model)
        logger.info("decomposed %d fused attention ops", len(fused))
        return PassResult(model, True)

    def _decompose(self, e: GraphEditor, node: ir.Node) -> None:
        q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        head_dim = q.shape.dims[3]
        if not isinstance(head_dim, int) and node.attributes.get("scale") is None:
            raise OptionError(f"fused attention '{node.name}': head size unknown and no scale attribute")
        scale = node.attributes.get_float("scale", 1.0 / np.sqrt(head_dim) if isinstance(head_dim, int) else 1.0)
        kt = e.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = e.op("Mul", [e.op("MatMul", [q, kt]), e.const("scale", np.float32(scale))])
        if mask is not None:
            bias = mask
            if mask.dtype == ir.DataType.BOOL:
                bias = e.op("Where", [mask, e.const("zero", np.float32(0)), e.const("masked", np.float32(MASKED))])
            scores = e.op("Add", [scores, bias])
        if node.attributes.get_int("is_causal", 0):
            scores = e.op("Add", [scores, self._causal_bias(e, scores)])
        probs = e.op("Softmax", [scores], axis=-1)
        out = e.op("MatMul", [probs, v])
        e.replace_uses(node.outputs[0], out)
        e.graph.remove(node, safe=True)

    def _decompose_packed(self, e: GraphEditor, node: ir.Node) -> None:
        """Packed projection inside the op -> MatMul (+ bias) -> Split(3), then the MHA core."""
        ins = list(node.inputs) + [None] * 6
        width = ins[1].shape.dims[1] // 3
        qkv = e.op("MatMul", [ins[0], ins[1]])
        if ins[2] is not None:
            qkv = e.op("Add", [qkv, ins[2]])
        q, k, v = e.op("Split", [qkv, e.const("split", np.array([width] * 3, np.int64))], axis=-1, outputs=3)
        self._mha_core(e, node, (q, k, v), width, None, ins[3], ins[5])

    def _decompose_quantized(self, e: GraphEditor, node: ir.Node) -> None:
        """The int8 packed projection as quantize_dynamic writes one outside the op (the form discovery
        reads: Mul(Cast(MatMulInteger(x_q, W_q, x_zp, W_zp)), x_scale * W_scale) + bias), Split(3),
        then the MHA core."""
        ins = list(node.inputs) + [None] * 9
        width = ins[1].shape.dims[1] // 3
        acc = e.op("Cast", [e.op("MatMulInteger", [ins[0], ins[1], ins[6], ins[7]])], to=ir.DataType.FLOAT)
        qkv = e.op("Mul", [acc, e.op("Mul", [ins[3], ins[4]])])
        if ins[2] is not None:
            qkv = e.op("Add", [qkv, ins[2]])
        q, k, v = e.op("Split", [qkv, e.const("split", np.array([width] * 3, np.int64))], axis=-1, outputs=3)
        self._mha_core(e, node, (q, k, v), width, None, ins[5], None)

    def _decompose_mha(self, e: GraphEditor, node: ir.Node) -> None:
        ins = list(node.inputs) + [None] * 8
        bias = const_array(ins[3]) if ins[3] is not None else None
        self._mha_core(e, node, (ins[0], ins[1], ins[2]), _mha_width(node), bias, ins[4], ins[5])

    def _mha_core(self, e: GraphEditor, node: ir.Node, qkv: tuple, width: int, bias: np.ndarray | None,
                  key_mask: ir.Value | None, attn_bias: ir.Value | None) -> None:
        heads = node.attributes.get_int("num_heads")
        head_dim = width // heads
        scale = node.attributes.get_float("scale", 0.0) or 1.0 / np.sqrt(head_dim)

        def split_heads(x: ir.Value, part: int) -> ir.Value:
            if bias is not None:
                x = e.op("Add", [x, e.const("bias", bias[part * width:(part + 1) * width].astype(np.float32))])
            x = e.op("Reshape", [x, e.const("heads", np.array([0, 0, heads, head_dim], np.int64))])
            return e.op("Transpose", [x], perm=[0, 2, 1, 3])

        q, k, v = (split_heads(qkv[i], i) for i in range(3))
        scores = e.op("Mul", [e.op("MatMul", [q, e.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                              e.const("scale", np.float32(scale))])
        terms = []
        if key_mask is not None:  # [B, L] or [B, S, L]: 1 keeps a key, 0 masks it; [B]: keys < length kept
            fill = node.attributes.get_float("mask_filter_value", -10000.0)
            rank = key_mask.shape.rank()
            if rank == 1:
                key_mask = self._lengths_mask(e, key_mask, k)
            keep = e.op("Cast", [key_mask], to=ir.DataType.FLOAT)
            masked = e.op("Mul", [e.op("Sub", [e.const("one", np.float32(1)), keep]),
                                  e.const("fill", np.float32(fill))])
            axes = [1] if rank == 3 else [1, 2]
            terms.append(e.op("Unsqueeze", [masked, e.const("axes", np.array(axes, np.int64))]))
        if attn_bias is not None:
            terms.append(attn_bias)
        if node.attributes.get_int("unidirectional", 0):
            terms.append(self._causal_bias(e, scores))
        if terms:
            total = terms[0]
            for t in terms[1:]:
                total = e.op("Add", [total, t])
            scores = e.op("Add", [scores, total])  # one additive mask: the form the pruning passes rewrite
        ctx = e.op("MatMul", [e.op("Softmax", [scores], axis=-1), v])
        out = e.op("Reshape", [e.op("Transpose", [ctx], perm=[0, 2, 1, 3]),
                               e.const("merge", np.array([0, 0, width], np.int64))])
        e.replace_uses(node.outputs[0], out)
        e.graph.remove(node, safe=True)

    @staticmethod
    def _lengths_mask(e: GraphEditor, lengths: ir.Value, k: ir.Value) -> ir.Value:
        """[B] end positions -> [B, L] with key j kept iff j < length_b (L = the key axis of K)."""
        n_keys = e.op("Gather", [e.op("Shape", [k]), e.const("key_axis", np.int64(2))])
        keys = e.op("Range", [e.const("zero", np.int64(0)), n_keys, e.const("step", np.int64(1))])
        ends = e.op("Unsqueeze", [e.op("Cast", [lengths], to=ir.DataType.INT64),
                                  e.const("axes", np.array([1], np.int64))])
        return e.op("Less", [e.op("Unsqueeze", [keys, e.const("axes", np.array([0], np.int64))]), ends])

    @staticmethod
    def _causal_bias(e: GraphEditor, scores: ir.Value) -> ir.Value:
        """0 on and below the diagonal (aligned to the end for a longer key axis), lowest above."""
        shape = e.op("Shape", [scores])
        ones = e.op("ConstantOfShape", [e.op("Slice", [shape, e.const("start", np.array([2], np.int64)),
                                                        e.const("end", np.array([4], np.int64))])],
                    value=ir.tensor(np.array([1.0], np.float32)))
        keep = e.op("Trilu", [ones], upper=0)
        return e.op("Mul", [e.op("Sub", [e.const("one", np.float32(1)), keep]), e.const("masked", np.float32(MASKED))])
