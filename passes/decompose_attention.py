"""decompose-attention: rewrite the fused ONNX ``Attention`` op (opset 23) into its core pattern.

    Attention(Q, K, V, mask; scale, is_causal)          Q, K, V: [B, H, S, Dh]
      -> bias   = mask (float) | Where(mask, 0, -inf-ish) (bool)      [+ causal bias]
         scores = Add(Mul(MatMul(Q, Transpose(K, [0,1,3,2])), scale), bias)
         Y      = MatMul(Softmax(scores, axis=-1), V)

so the Softmax-centred finder and the pruning passes see the probabilities. Decomposing costs the
fused kernel; the pruning passes then remove more work than it saved. Variants spattenc cannot yet
express exactly are refused with the reason (never skipped): 3-D inputs, grouped KV heads inside
the op, past key/value inputs, softcap, a requested probability output, and com.microsoft ops.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)
MASKED = -3.4028234663852886e38  # float32 lowest: what transformers' own masks use


def _refusal(node: ir.Node) -> str | None:
    """Why ``node`` cannot be decomposed exactly, or None."""
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


@register_pass
@dataclasses.dataclass(frozen=True)
class DecomposeAttention(Pass):
    """Fused ONNX Attention -> MatMul/Softmax/MatMul, so pruning passes can see the probabilities."""

    name = "decompose-attention"

    def call(self, model: ir.Model) -> PassResult:
        fused = [n for n in model.graph if n.op_type == "Attention"]
        if not fused:
            return PassResult(model, False)
        for node in fused:
            reason = _refusal(node)
            if reason:
                raise OptionError(f"fused attention '{node.name}': {reason}")
        e = GraphEditor(model, "spatten/decompose")
        for node in fused:
            self._decompose(e, node)
        e.forget_shapes()
        e.commit()
        logger.info("decomposed %d Attention ops", len(fused))
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

    @staticmethod
    def _causal_bias(e: GraphEditor, scores: ir.Value) -> ir.Value:
        """0 on and below the diagonal (aligned to the end for a longer key axis), lowest above."""
        shape = e.op("Shape", [scores])
        ones = e.op("ConstantOfShape", [e.op("Slice", [shape, e.const("start", np.array([2], np.int64)),
                                                        e.const("end", np.array([4], np.int64))])],
                    value=ir.tensor(np.array([1.0], np.float32)))
        keep = e.op("Trilu", [ones], upper=0)
        return e.op("Mul", [e.op("Sub", [e.const("one", np.float32(1)), keep]), e.const("masked", np.float32(MASKED))])
