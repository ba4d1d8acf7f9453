"""pack-kv-cache: a decoder's cache crosses the graph boundary as packed MSB/LSB planes + scales.

Rewrite, per layer and tensor (``key``/``value``, layout ``[B, Hkv, T, Dh]``), with ``m+l`` bits::

    present.<l>.key (float)  ->  s          = max(ReduceMax(|x|, channels), 1e-12) / (2^(m+l-1) - 1)
                                 msb, lsb   = spatten.QuantizeSplit(x, s, 2^l, 2^(m+l-1) - 1)
                                 present.<l>.key.msb   = Pack(msb + 2^(m-1))   uint8 [B, Hkv, T, Dh/2]
                                 present.<l>.key.lsb   = Pack(lsb)             uint8 [B, Hkv, T, Dh/2]
                                 present.<l>.key.scale = s                     float [B, Hkv, T, 1]
    past_key_values.<l>.key  <-  spatten.DequantizeSplit(Unpack(msb) - 2^(m-1), Unpack(lsb), s, 2^l)

``Pack`` puts two 4-bit codes in a byte (``hi * 16 + lo`` over channel pairs) when the plane has at
most 4 bits, else one code per byte. The scale is quantize-kv's ``token`` scale (one per batch
element, KV head and token), so re-quantizing a dequantized token inside the attention gives the
same codes: the attention (quantize-kv's MSB-first rule, applied at every step) computes exactly
what it computes over a float cache, while the bytes held between steps are the planes. Static
bits (``bits=8``, no LSB plane) store the MSB plane only. Run after evict-kv and quantize-kv.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .quant_functions import FUNCTIONS
from .quantize_kv import parse_bits, qmax_for
from .spatten_ops import DOMAIN, ensure_functions

logger = logging.getLogger(__name__)
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@register_pass
@dataclasses.dataclass(frozen=True)
class PackKVCache(Pass):
    name = "pack-kv-cache"
    bits: str = "4+4"
    granularity: str = "token"  # quantize-kv's; only per-token scales can be stored exactly

    def call(self, model: ir.Model) -> PassResult:
        m, lo = parse_bits(self.bits)
        graph = model.graph
        outputs = {v.name: v for v in graph.outputs}
        pasts = [v for v in graph.inputs if PAST.match(v.name or "")]
        if not pasts:  # an encoder: quantize-kv alone applies
            return PassResult(model, False)
        if self.granularity != "token":
            raise OptionError(f"--kv-bits on a decoder stores the cache with per-token scales; --kv-granularity "
                              f"{self.granularity} scales change as tokens arrive and cannot be stored")
        ensure_functions(model, list(FUNCTIONS))
        ed = GraphEditor(model, "spatten/packkv")
        packer = _Packer(ed, m, lo, ed.const("qmax", np.float32(qmax_for(m + lo))), ed.const("step", np.float32(2**lo)),
                         model.opset_imports.get("", 17))
        for past in pasts:
            layer, kind = PAST.match(past.name).groups()
            present = outputs.get(f"present.{layer}.{kind}")
            if present is None or past.shape is None or past.shape.rank() != 4 or not isinstance(past.shape[3], int):
                raise OptionError(f"{past.name}: no matching present.{layer}.{kind} output with a static head size")
            dh = past.shape[3]
            if (m <= 4 or lo <= 4) and dh % 2:
                raise OptionError(f"{past.name}: packing two codes per byte needs an even head size, got {dh}")
            packer.input(graph, past, dh)
            packer.output(graph, present, dh)
        ed.commit()
        model.metadata_props["spatten.kv_cache_bits"] = self.bits
        logger.info("pack-kv-cache: %d cache tensors stored as %s-bit planes", len(pasts), self.bits)
        return PassResult(model, True)



@dataclasses.dataclass
class _Packer:
    ed: GraphEditor
    m: int
    lo: int
    qmax: ir.Value
    step: ir.Value
    opset: int

    def _width(self, bits: int, dh: int) -> int:
        return dh // 2 if bits <= 4 else dh

    def _pack(self, codes: ir.Value, bits: int, dh: int) -> ir.Value:
        """int codes in [0, 2^bits) -> uint8 bytes (two per byte for <= 4 bits; arithmetic in int32)."""
        ed = self.ed
        codes = ed.op("Cast", [codes], to=ir.DataType.INT32)
        if bits <= 4:
            pairs = ed.op("Reshape", [codes, ed.const("s", np.array([0, 0, 0, dh // 2, 2], np.int64))])
            hi, low = ed.op("Split", [pairs, ed.const("sp", np.array([1, 1], np.int64))], outputs=2, axis=-1)
            codes = ed.op("Add", [ed.op("Mul", [hi, ed.const("16", np.array(16, np.int32))]), low])
            codes = ed.op("Squeeze", [codes, ed.const("ax", np.array([-1], np.int64))])
        return ed.op("Cast", [codes], to=ir.DataType.UINT8)

    def _unpack(self, plane: ir.Value, bits: int, dh: int) -> ir.Value:
        """uint8 bytes -> int32 codes [B, H, T, Dh]."""
        ed = self.ed
        wide = ed.op("Cast", [plane], to=ir.DataType.INT32)
        if bits > 4:
            return wide
        sixteen = ed.const("16", np.array(16, np.int32))
        hi, low = ed.op("Div", [wide, sixteen]), ed.op("Mod", [wide, sixteen])
        both = ed.op("Concat", [ed.op("Unsqueeze", [hi, ed.const("ax", np.array([-1], np.int64))]),
                                ed.op("Unsqueeze", [low, ed.const("ax", np.array([-1], np.int64))])], axis=-1)
        return ed.op("Reshape", [both, ed.const("s", np.array([0, 0, 0, dh], np.int64))])

    def _planes(self, name: str, shape: ir.Shape, dh: int) -> list[tuple[str, ir.Value]]:
        dims = list(shape.dims)
        specs = [("msb", self.m, ir.DataType.UINT8)] + ([("lsb", self.lo, ir.DataType.UINT8)] if self.lo else [])
        out = [(p, ir.Value(name=f"{name}.{p}", shape=ir.Shape([*dims[:3], self._width(b, dh)]),
                            type=ir.TensorType(t))) for p, b, t in specs]
        out.append(("scale", ir.Value(name=f"{name}.scale", shape=ir.Shape([*dims[:3], 1]),
                                      type=ir.TensorType(ir.DataType.FLOAT))))
        return out

    def input(self, graph: ir.Graph, past: ir.Value, dh: int) -> None:
        ed = self.ed
        planes = dict(self._planes(past.name, past.shape, dh))
        offset = ed.const("off", np.array(2 ** (self.m - 1), np.int32))
        msb = ed.op("Sub", [self._unpack(planes["msb"], self.m, dh), offset])
        msb = ed.op("Cast", [msb], to=ir.DataType.INT8)
        if self.lo:
            lsb = ed.op("Cast", [self._unpack(planes["lsb"], self.lo, dh)], to=ir.DataType.UINT8)
            x = ed.op("DequantizeSplit", [msb, lsb, planes["scale"], self.step], domain=DOMAIN)
        else:
            x = ed.op("Dequantize", [msb, planes["scale"]], domain=DOMAIN)
        for use in list(past.uses()):
            use.node.replace_input_with(use.idx, x)
        i = graph.inputs.index(past)
        graph.inputs[i:i + 1] = list(planes.values())

    def output(self, graph: ir.Graph, present: ir.Value, dh: int) -> None:
        ed = self.ed
        a = ed.op("Abs", [present])
        if self.opset >= 18:
            amax = ed.op("ReduceMax", [a, ed.const("axes", np.array([-1], np.int64))], keepdims=1)
        else:
            amax = ed.op("ReduceMax", [a], axes=[-1], keepdims=1)
        s = ed.op("Div", [ed.op("Max", [amax, ed.const("tiny", np.float32(1e-12))]), self.qmax])
        if self.lo:
            msb, lsb = ed.op("QuantizeSplit", [present, s, self.step, self.qmax], domain=DOMAIN, outputs=2)
        else:
            msb, lsb = ed.op("Quantize", [present, s, self.qmax], domain=DOMAIN), None
        shifted = ed.op("Add", [ed.op("Cast", [msb], to=ir.DataType.INT32),
                                ed.const("off", np.array(2 ** (self.m - 1), np.int32))])
        values = {"msb": self._pack(shifted, self.m, dh), "scale": s}
        if lsb is not None:
            values["lsb"] = self._pack(lsb, self.lo, dh)
        i = graph.outputs.index(present)
        new = []
        for plane, spec in self._planes(present.name, present.shape or ir.Shape(["batch", None, "kept", dh]), dh):
            v = values[plane]
            v.name, v.type, v.shape = spec.name, spec.type, spec.shape
            new.append(v)
        graph.outputs[i:i + 1] = new
