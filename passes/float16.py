"""float16 models: rewritten in float32, weights stored in float16 again.

spattenc's rewrites build float32 ops (masks, scores, scales, the ``spatten`` functions), so a
float16 model (``model_fp16.onnx``) is compiled in float32::

    upcast-fp16     float16 initializers, Constant values, ConstantOfShape fills -> float32 (exact);
                    Cast(to=float16) -> Cast(to=float32); float16 graph inputs/outputs -> float32,
                    remembered in the model's metadata (``spatten.float16_io``)
    ... the compile's passes ...
    downcast-fp16   W (float32, >= 16 elements) -> Cast(W_fp16, float32): the file stores float16
                    weights (the input's size); float16 graph inputs/outputs are float16 again, through
                    Casts at the boundary

The computation stays float32: on CPU that is onnxruntime's fast path (it has few float16 kernels),
and it is more accurate than the input's float16 arithmetic, so at keep 1.0 the output equals the
input model's up to float16 rounding (``tests/test_float16.py``). onnxruntime's float16 converter
(``onnxruntime.transformers.float16``) was tried for float16 arithmetic and is not used: it puts the
Casts of ops inside subgraphs (evict-kv's ``If`` branches hold ``TopK``) in the main graph, and leaves
values those subgraphs read from the outer scope in float16 against their float32 constants.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from spatten_compiler.editor import GraphEditor
from spatten_compiler.pipeline import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)
FP16 = ir.DataType.FLOAT16
FP32 = ir.DataType.FLOAT
META = "spatten.float16_io"


def is_float16(model: ir.Model) -> bool:
    """The model computes in float16: more float16 initializer elements than float32 ones, or
    float16 graph inputs/outputs."""
    counts = {FP16: 0, FP32: 0}
    for v in model.graph.initializers.values():
        if v.dtype in counts and v.shape is not None and all(isinstance(d, int) for d in v.shape.dims):
            counts[v.dtype] += int(np.prod(v.shape.dims))
    io = [v.dtype for v in (*model.graph.inputs, *model.graph.outputs)]
    return counts[FP16] > counts[FP32] or FP16 in io


def _upcast_tensor(t: ir.TensorProtocol) -> ir.Tensor:
    return ir.tensor(t.numpy().astype(np.float32), name=t.name)


@register_pass
@dataclasses.dataclass(frozen=True)
class UpcastFloat16(Pass):
    """float16 -> float32 everywhere (exact); the float16 graph inputs/outputs are remembered."""

    name = "upcast-fp16"

    def call(self, model: ir.Model) -> PassResult:
        if not is_float16(model):
            return PassResult(model, False)
        io = [v.name for v in (*model.graph.inputs, *model.graph.outputs) if v.dtype == FP16]
        for graph in model.graphs():  # the main graph and every subgraph
            for v in graph.initializers.values():
                if v.dtype == FP16 and v.const_value is not None:
                    v.const_value = _upcast_tensor(v.const_value)
                    v.dtype = FP32
            for node in graph:
                for attr_name in ("value", "to"):
                    attr = node.attributes.get(attr_name)
                    if attr is None:
                        continue
                    if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == FP16:
                        node.attributes[attr_name] = ir.AttrTensor(attr_name, _upcast_tensor(attr.value))
                    elif attr_name == "to" and node.op_type == "Cast" and attr.value == FP16.value:
                        node.attributes["to"] = ir.AttrInt64("to", FP32.value)
                for out in node.outputs:
                    if out.dtype == FP16:
                        out.dtype = FP32
            for v in (*graph.inputs, *graph.outputs):
                if v.dtype == FP16:
                    v.dtype = FP32
        model.metadata_props[META] = json.dumps(io)
        logger.info("upcast-fp16: float16 model, rewritten in float32 (%d float16 inputs/outputs)", len(io))
        return PassResult(model, True)


@register_pass
@dataclasses.dataclass(frozen=True)
class DowncastFloat16(Pass):
    """Weights stored in float16 again (each read through a Cast to float32), float16 graph inputs and
    outputs restored with Casts at the boundary; the computation stays float32."""

    name = "downcast-fp16"
    min_elements: int = 16  # smaller float32 constants (scales, masks' fill values) stay float32

    def call(self, model: ir.Model) -> PassResult:
        if META not in model.metadata_props:
            return PassResult(model, False)
        io = set(json.loads(model.metadata_props.pop(META)))
        e = GraphEditor(model, "spatten/fp16")
        stored = 0
        for v in list(model.graph.initializers.values()):
            t = v.const_value
            if t is None or v.dtype != FP32 or t.size < self.min_elements or not v.uses():
                continue
            half = e.const("fp16", t.numpy().astype(np.float16))
            e.replace_uses(v, e.op("Cast", [half], to=FP32.value))
            stored += t.size
        for v in [i for i in model.graph.inputs if i.name in io]:
            uses = list(v.uses())
            v.dtype = FP16
            cast = e.op("Cast", [v], to=FP32.value)
            for use in uses:
                use.node.replace_input_with(use.idx, cast)
        for i, v in enumerate(model.graph.outputs):
            if v.name in io:
                name, v.name = v.name, f"{v.name}_fp32"
                out = e.op("Cast", [v], to=FP16.value)
                out.name, out.dtype, out.shape = name, FP16, v.shape
                model.graph.outputs[i] = out
        RemoveUnusedNodesPass()(model)
        e.commit()
        logger.info("downcast-fp16: weights stored in float16 again (%d values), computed in float32; "
                    "%d float16 inputs/outputs kept", stored, len(io))
        return PassResult(model, True)
