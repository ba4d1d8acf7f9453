"""unfuse-ort: rewrite onnxruntime's transformer-optimizer ops back into standard ONNX ops.

A model written by ``onnxruntime.transformers.optimizer.optimize_model(..., model_type='bert')``
carries com.microsoft ops that onnx shape inference and spattenc's matchers do not understand. Each
is rewritten exactly into the ops it fused (so ``--optimize`` can fuse them again afterwards)::

    EmbedLayerNormalization(ids, seg, W, P, S, g, b, mask, pos)
        -> LayerNormalization(Gather(W, ids) + Gather(P, pos | Range(S)) + Gather(S, seg), g, b)
           mask_index = ReduceSum(mask, axis 1)       (int32 lengths, as the fused kernel computes)
    SkipLayerNormalization(x, skip, g, b, bias)   -> LayerNormalization(x + skip + bias, g, b)
    SkipSimplifiedLayerNormalization(x, skip, g, bias) -> RMS norm of (x + skip + bias), times g
    SimplifiedLayerNormalization(x, g)            -> x / sqrt(mean(x^2) + eps) * g
    BiasGelu(x, bias) -> Gelu(x + bias);  Gelu(x) -> 0.5 x (1 + erf(x / sqrt 2))   (exporters' form)
    FastGelu(x, bias) -> 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))           (x + bias first)
    FusedMatMul(a, b) -> alpha * MatMul(a or a^T, b or b^T)   (onnxruntime's saved extended-level models)
    QuickGelu(x)      -> x * Sigmoid(alpha x)

onnxruntime-genai's model builder writes ``GroupQueryAttention`` (packed QKV, rotary inside, past and
present buffers) and ``RotaryEmbedding``: see :mod:`passes.unfuse_gqa` for their rewrites and when
they are exact. ``MatMulNBits`` (int4 weights) is a weight format and stays.

The fused Attention op itself (every mask_index form the optimizer writes) is decompose-attention's
job. Fused ops whose extra outputs (mean, inverse std) are read are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pass, PassResult, register_pass
from spatten_compiler.shapes import infer_shapes

from .unfuse_gqa import group_query_attention, rotary_embedding

logger = logging.getLogger(__name__)
MS = "com.microsoft"


def _inputs(node: ir.Node, n: int) -> list[ir.Value | None]:
    return list(node.inputs) + [None] * (n - len(node.inputs))


def _used(node: ir.Node, index: int) -> bool:
    return len(node.outputs) > index and bool(node.outputs[index].uses())


def _sum(e: GraphEditor, terms: list[ir.Value | None]) -> ir.Value:
    total = terms[0]
    for t in terms[1:]:
        if t is not None:
            total = e.op("Add", [total, t])
    return total


def _layer_norm(e: GraphEditor, node: ir.Node, x: ir.Value, gamma: ir.Value, beta: ir.Value | None) -> ir.Value:
    eps = node.attributes.get_float("epsilon", 1e-12)
    return e.op("LayerNormalization", [x, gamma, beta] if beta is not None else [x, gamma], axis=-1, epsilon=eps)


def _rms_norm(e: GraphEditor, node: ir.Node, x: ir.Value, gamma: ir.Value) -> ir.Value:
    eps = node.attributes.get_float("epsilon", 1e-6)
    sq = e.op("Mul", [x, x])
    if e.model.opset_imports.get("", 0) >= 18:
        mean_sq = e.op("ReduceMean", [sq, e.const("axes", np.array([-1], np.int64))], keepdims=1)
    else:  # axes is an attribute before opset 18 (onnxruntime saves an opset-17 export's RMS norm fused)
        mean_sq = e.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    inv = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [mean_sq, e.const("eps", np.float32(eps))])])])
    return e.op("Mul", [e.op("Mul", [x, inv]), gamma])


def _erf_gelu(e: GraphEditor, x: ir.Value) -> ir.Value:
    erf = e.op("Erf", [e.op("Div", [x, e.const("sqrt2", np.float32(np.sqrt(2.0)))])])
    inner = e.op("Mul", [x, e.op("Add", [erf, e.const("one", np.float32(1.0))])])
    return e.op("Mul", [inner, e.const("half", np.float32(0.5))])


def _tanh_gelu(e: GraphEditor, x: ir.Value) -> ir.Value:
    cube = e.op("Pow", [x, e.const("three", np.float32(3.0))])
    inner = e.op("Add", [x, e.op("Mul", [cube, e.const("c", np.float32(0.044715))])])
    tanh = e.op("Tanh", [e.op("Mul", [inner, e.const("k", np.float32(np.sqrt(2.0 / np.pi)))])])
    half_x = e.op("Mul", [x, e.const("half", np.float32(0.5))])
    return e.op("Mul", [half_x, e.op("Add", [tanh, e.const("one", np.float32(1.0))])])


def trust_initializer_shapes(graph: ir.Graph) -> int:
    """The optimizer folds Transpose(W) into W but keeps W's old value_info: trust the tensor."""
    stale = [v for v in graph.initializers.values()
             if v.const_value is not None and v.shape is not None and v.shape.dims != v.const_value.shape.dims]
    for v in stale:
        v.shape = ir.Shape(v.const_value.shape.dims)
    return len(stale)


# Each rewrite returns the replacement for every output it supports (None: output must be unused).
Rewrite = Callable[[GraphEditor, ir.Node], list[ir.Value | None]]


def _embed_layer_norm(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    return _embed_sum_norm(e, node, *_inputs(node, 9))


def _q_embed_layer_norm(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    """QEmbedLayerNormalization (quantize_dynamic of an optimized model): its int8 tables, gamma and
    beta dequantized (``(q - zero point) * scale``, as the kernel reads them), then as above."""
    ins = _inputs(node, 18)
    tables = [None if q is None else e.op("DequantizeLinear", [q, scale, zp])
              for q, scale, zp in zip(ins[2:7], ins[8:13], ins[13:18])]
    word, pos_w, seg_w, gamma, beta = tables
    return _embed_sum_norm(e, node, ins[0], ins[1], word, pos_w, seg_w, gamma, beta, ins[7], None)[:2]


def _embed_sum_norm(e: GraphEditor, node: ir.Node, ids, seg, word, pos_w, seg_w, gamma, beta, mask,
                    pos_ids) -> list[ir.Value | None]:
    if pos_ids is None:
        length = e.op("Gather", [e.op("Shape", [ids]), e.const("one", np.int64(1))])
        pos_ids = e.op("Range", [e.const("zero", np.int64(0)), length, e.const("step", np.int64(1))])
    terms = [e.op("Gather", [word, ids]), e.op("Gather", [pos_w, pos_ids])]
    if seg is not None and seg_w is not None:
        terms.append(e.op("Gather", [seg_w, seg]))
    emb_sum = _sum(e, terms)
    mask_index = None
    if mask is not None:
        ones = e.op("Cast", [e.op("Cast", [mask], to=ir.DataType.BOOL)], to=ir.DataType.INT32)
        mask_index = e.op("ReduceSum", [ones, e.const("axes", np.array([1], np.int64))], keepdims=0)
    return [_layer_norm(e, node, emb_sum, gamma, beta), mask_index, emb_sum]


def _skip_layer_norm(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    x, skip, gamma, beta, bias = _inputs(node, 5)
    total = _sum(e, [x, skip, bias])
    return [_layer_norm(e, node, total, gamma, beta), None, None, total]


def _skip_simplified(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    x, skip, gamma, bias = _inputs(node, 4)
    total = _sum(e, [x, skip, bias])
    return [_rms_norm(e, node, total, gamma), None, None, total]


def _simplified(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    if node.attributes.get_int("axis", -1) != -1:
        return [None]
    x, gamma = _inputs(node, 2)
    return [_rms_norm(e, node, x, gamma), None]


def _bias_gelu(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    x, bias = _inputs(node, 2)
    return [_erf_gelu(e, _sum(e, [x, bias]))]


def _fast_gelu(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    x, bias = _inputs(node, 2)
    return [_tanh_gelu(e, _sum(e, [x, bias]))]


def _fused_matmul(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    """onnxruntime's MatMulScaleFusion / MatMulTransposeFusion (extended level, a saved optimized model):
    alpha * op(A) @ op(B), op a swap of the last two axes."""
    a = node.attributes
    if a.get_int("transBatchA", 0) or a.get_int("transBatchB", 0):
        raise OptionError(f"FusedMatMul '{node.name}': transBatchA/transBatchB are not decomposed")
    ins = []
    for x, flag in zip(node.inputs[:2], ("transA", "transB")):
        if a.get_int(flag, 0):
            rank = x.shape.rank() if x.shape is not None else None
            if rank is None or rank < 2:
                raise OptionError(f"FusedMatMul '{node.name}': {flag} on an input of unknown rank")
            x = e.op("Transpose", [x], perm=[*range(rank - 2), rank - 1, rank - 2])
        ins.append(x)
    y = e.op("MatMul", ins)
    alpha = a.get_float("alpha", 1.0)
    return [y if alpha == 1.0 else e.op("Mul", [y, e.const("alpha", np.float32(alpha))])]


def _quick_gelu(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    """QuickGelu (CLIP's activation fused): x * sigmoid(alpha x)."""
    x = node.inputs[0]
    alpha = node.attributes.get_float("alpha", 1.702)
    return [e.op("Mul", [x, e.op("Sigmoid", [e.op("Mul", [x, e.const("alpha", np.float32(alpha))])])])]


UNFUSE: dict[str, Rewrite] = {
    "EmbedLayerNormalization": _embed_layer_norm,
    "QEmbedLayerNormalization": _q_embed_layer_norm,
    "SkipLayerNormalization": _skip_layer_norm,
    "SkipSimplifiedLayerNormalization": _skip_simplified,
    "SimplifiedLayerNormalization": _simplified,
    "BiasGelu": _bias_gelu,
    "Gelu": lambda e, node: [_erf_gelu(e, node.inputs[0])],
    "FastGelu": _fast_gelu,
    "FusedMatMul": _fused_matmul,  # a saved model at onnxruntime's extended level
    "QuickGelu": _quick_gelu,
    "GroupQueryAttention": group_query_attention,  # onnxruntime-genai's model builder
    "RotaryEmbedding": rotary_embedding,
}
# onnxruntime also registers this one in the ONNX domain (the model builder writes it there).
ONNX_DOMAIN = frozenset({"SimplifiedLayerNormalization"})


@register_pass
@dataclasses.dataclass(frozen=True)
class UnfuseOrt(Pass):
    """onnxruntime transformer-optimizer ops -> the standard ONNX ops they fused."""

    name = "unfuse-ort"

    def call(self, model: ir.Model) -> PassResult:
        nodes = [n for n in model.graph if (n.domain == MS and n.op_type in UNFUSE)
                 or (n.domain in ("", "ai.onnx") and n.op_type in ONNX_DOMAIN)]
        stale = trust_initializer_shapes(model.graph)
        if not nodes:
            return PassResult(model, bool(stale))
        if model.opset_imports.get("", 0) < 17:
            raise OptionError(f"{nodes[0].op_type} '{nodes[0].name}': unfusing needs ONNX opset >= 17 "
                              f"(LayerNormalization); the model imports opset {model.opset_imports.get('', 0)}")
        e = GraphEditor(model, "spatten/unfuse")
        done: list[ir.Node] = []
        # FusedMatMul's transposes need its inputs' ranks: unfuse it last, with shapes inferred through
        # the standard ops the others became
        nodes.sort(key=lambda n: n.op_type == "FusedMatMul")
        inferred = False
        try:
            for node in nodes:
                if (node.op_type == "FusedMatMul" and not inferred
                        and any(x is None or x.shape is None for x in node.inputs[:2])):
                    e.commit()
                    infer_shapes(model)  # once: ranks downstream of a fused op still come from constant view targets
                    inferred = True
                replacements = UNFUSE[node.op_type](e, node)
                for i, out in enumerate(node.outputs):
                    new = replacements[i] if i < len(replacements) else None
                    if new is None and (out.uses() or out in model.graph.outputs):
                        raise OptionError(f"{node.op_type} '{node.name}': output {i} ({out.name}) is used and has "
                                          "no standard-op equivalent here")
                for i, out in enumerate(node.outputs):
                    if i < len(replacements) and replacements[i] is not None:
                        e.replace_uses(out, replacements[i])
                done.append(node)
        finally:
            # a refused op (the caller may go on without that rewrite) leaves the model valid: the ops
            # unfused so far are replaced, the refused one and the rest stay fused, and the order is sorted
            for node in done:
                model.graph.remove(node, safe=True)
            e.forget_shapes()  # the optimizer's value_info can be stale too; normalize infers shapes again
            e.commit()
        logger.info("unfused %d onnxruntime ops", len(nodes))
        return PassResult(model, True)
