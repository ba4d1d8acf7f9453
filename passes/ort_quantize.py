"""ort-quantize: onnxruntime's weight quantization of the projections, after the SpAtten rewrites.

    weights=int8: MatMul(x, W) -> DynamicQuantizeLinear(x) + MatMulInteger(x_q, W_q) (+ scales)
                  (onnxruntime.quantization.quantize_dynamic; com.microsoft Attention -> its int8 form)
    weights=int4: MatMul(x, W) -> MatMulNBits(x, W_4bit, scales)   (block-wise, weight-only; decoders)

Only MatMuls whose B is a constant weight are quantized (``MatMulConstBOnly``): the attention cores'
Q K^T and P V, which spattenc rewrites, stay float, and spattenc's K/V quantization planes (inside
its own functions) are never touched. The same call on the dense model gives the dense counterpart,
so a comparison isolates what the SpAtten rewrites add.

The quantizers' shape inference writes ``value_info`` with symbolic dims (``unk__N``) for every
tensor; the pass drops what it added and keeps the model's own. With those shapes onnxruntime's
session-level SkipLayerNormFusion fuses every residual Add + LayerNormalization, which ort-fusions
leaves unfused on purpose (the CPU kernel is slower): a pruned int8 MiniLM ran 12.2 ms instead of
10.7 ms at 512 tokens (docs/optimize.md 4h).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .ort_fusions import quiet, replace_model, to_proto

logger = logging.getLogger(__name__)
WEIGHTS = ("int8", "int4")
INT8_OPS = ["MatMul", "Attention"]  # what quantize_dynamic may rewrite (not Gather: embedding lookups stay fp32)


def quantize_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(proto, out, op_types_to_quantize=INT8_OPS, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True,  # after contrib ops, types are unknown:
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(out)


def quantize_int4(proto: onnx.ModelProto, block_size: int = 32) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=block_size, is_symmetric=True,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


def restore_value_info(proto: onnx.ModelProto, own: list[onnx.ValueInfoProto]) -> None:
    """The quantized graph's value_info = the input graph's entries for tensors that still exist."""
    produced = {o for n in proto.graph.node for o in n.output}
    kept = [v for v in own if v.name in produced]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)


@register_pass
@dataclasses.dataclass(frozen=True)
class OrtQuantize(Pass):
    """Projection weights -> int8 (dynamic) or int4 (MatMulNBits) with onnxruntime's quantizers."""

    name = "ort-quantize"
    weights: str = "int8"

    def call(self, model: ir.Model) -> PassResult:
        if self.weights not in WEIGHTS:
            raise OptionError(f"--weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        proto = to_proto(model)
        own = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in proto.graph.value_info]
        with quiet():  # "consider pre-processing" warnings on every call
            proto = QUANTIZERS[self.weights](proto)
        restore_value_info(proto, own)
        replace_model(model, proto)
        logger.info("ort-quantize: %s weights", self.weights)
        return PassResult(model, True)
