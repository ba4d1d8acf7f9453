"""pack-kv-cache: a decoder's cache crosses the graph boundary as packed MSB/LSB planes + scales.

Rewrite, per layer and tensor (``key``/``value``, layout ``[B, Hkv, T, Dh]``), with ``m+l`` bits::

    present.<l>.key (float)  ->  s          = max(ReduceMax(|x|, channels), 1e-12) / (2^(m+l-1) - 1)
                                 msb, lsb   = spatten.QuantizeSplit(x, s, 2^l, 2^(m+l-1) - 1)
                                 present.<l>.key.msb   = Pack(msb + 2^(m-1))   uint8 [B, Hkv, T, Dh/2]
                                 present.<l>.key.lsb   = Pack(lsb)             uint8 [B, Hkv, T, Dh/2]
                                 present.<l>.key.scale = s                     float [B, Hkv, T, 1]
    past_key_values.<l>.key  <-  spatten.DequantizeSplit(Unpack(msb) - 2^(m-1), Unpack(lsb), s, 2^l)

With block eviction (evict-kv ``slack``) the eviction sits in an ``If``: the pass inlines it
(evict_block.inline_block), rewrites the row Gathers into Gathers of the planes, and defers them
again with the planes' (evicted, appended) pairs, so between evictions the planes are only appended.

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
from onnx_ir.passes.common import RemoveUnusedNodesPass

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.match import whole_slice
from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .evict_block import defer_eviction, inline_block
from .quant_functions import FUNCTIONS
from .quantize_kv import parse_bits, qmax_for
from .spatten_ops import DOMAIN, ensure_functions

logger = logging.getLogger(__name__)
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# ops that only move the cache's values (GQA repeat, head split/merge, K^T) between the cache Concat
# and quantize-kv's quantizer: per-token codes commute with them
VIEWS = frozenset({"Unsqueeze", "Expand", "Reshape", "Transpose", "Identity", "Squeeze"})
# quantize-kv's quantizer -> {its dequantizer: the cache-level dequantized tensor that replaces it}
DEQUANT = {"QuantizeSplit": {"DequantizeMSB": "msb", "DequantizeSplit": "full"},
           "Quantize": {"Dequantize": "static"}}


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
        block = inline_block(ed, graph)  # block eviction: rewritten in its slack = 0 form, deferred again below
        outputs = {v.name: v for v in graph.outputs}
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
            why = packer.append(graph, past, present, dh)
            if why and block is not None:
                raise OptionError(f"--kv-slack with --kv-bits needs the packed cache's append-only form, which "
                                  f"{past.name} cannot take ({why}); use --kv-slack 0")
            if why:  # the general form: dequantize the whole past, re-quantize the whole present
                logger.info("pack-kv-cache: %s: general form (%s)", past.name, why)
                packer.input(graph, past, dh)
                packer.output(graph, present, dh)
        if block is not None:
            RemoveUnusedNodesPass()(model)  # the float row Gathers, which would otherwise keep the eviction outside
            cond, pairs = block
            defer_eviction(ed, graph, cond, [p for e, f in pairs for p in packer.pairs.get(id(e), [(e, f)])])
        ed.commit()
        RemoveUnusedNodesPass()(model)  # the float cache Concat, quantize-kv's QuantizeSplit of it
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
    # id(float evicted present) -> [(evicted plane, appended plane)]: what a block eviction defers
    pairs: dict[int, list[tuple[ir.Value, ir.Value]]] = dataclasses.field(default_factory=dict)

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
        values = self._encode(present, dh)
        i = graph.outputs.index(present)
        new = []
        for plane, spec in self._planes(present.name, present.shape or ir.Shape(["batch", None, "kept", dh]), dh):
            v = values[plane]
            v.name, v.type, v.shape = spec.name, spec.type, spec.shape
            new.append(v)
        graph.outputs[i:i + 1] = new

    # ---- append-only form: only the new tokens are quantized and packed -------------------------

    def _table(self, bits: int, offset: int, scale: int) -> np.ndarray:
        """byte -> the float code(s) it holds, (code - offset) * scale: [256, 2] for two codes per byte
        (high nibble first), [256] for one. Small integers: exact in float32, so a lookup computes
        bit for bit what quantize-kv's Cast + Mul on the unpacked codes compute."""
        b = np.arange(256)
        codes = np.stack([b // 16, b % 16], axis=-1) if bits <= 4 else b
        return ((codes - offset) * scale).astype(np.float32)

    def _lookup(self, plane: ir.Value, bits: int, offset: int, scale: int, dh: int) -> ir.Value:
        """uint8 plane [B, H, T, w] -> float codes [B, H, T, Dh] with one Gather (a 256-entry table)."""
        ed = self.ed
        index = ed.op("Cast", [plane], to=ir.DataType.INT32)  # Gather takes int32/int64 indices
        codes = ed.op("Gather", [ed.const("table", self._table(bits, offset, scale)), index], axis=0)
        if bits > 4:
            return codes
        return ed.op("Reshape", [codes, ed.const("s", np.array([0, 0, 0, dh], np.int64))])

    def _dequantized(self, planes: dict[str, ir.Value], dh: int) -> dict[str, ir.Value]:
        """The whole cache, dequantized as quantize-kv's functions compute it (same operands, same
        order): MSB only ``(msb * 2^l + (2^l - 1) / 2) * s``, full ``(msb * 2^l + lsb) * s``, static
        ``q * s``."""
        ed = self.ed
        off = 2 ** (self.m - 1)
        if not self.lo:
            return {"static": ed.op("Mul", [self._lookup(planes["msb"], self.m, off, 1, dh), planes["scale"]])}
        hi = self._lookup(planes["msb"], self.m, off, 2**self.lo, dh)  # msb * 2^l
        lo = self._lookup(planes["lsb"], self.lo, 0, 1, dh)
        mid = ed.const("mid", np.float32((2**self.lo - 1) / 2))
        return {"msb": ed.op("Mul", [ed.op("Add", [hi, mid]), planes["scale"]]),
                "full": ed.op("Mul", [ed.op("Add", [hi, lo]), planes["scale"]])}

    def _encode(self, x: ir.Value, dh: int) -> dict[str, ir.Value]:
        """Float tokens [B, H, q, Dh] -> their planes and scale (what ``output`` stores per token)."""
        ed = self.ed
        a = ed.op("Abs", [x])
        if self.opset >= 18:
            amax = ed.op("ReduceMax", [a, ed.const("axes", np.array([-1], np.int64))], keepdims=1)
        else:
            amax = ed.op("ReduceMax", [a], axes=[-1], keepdims=1)
        s = ed.op("Div", [ed.op("Max", [amax, ed.const("tiny", np.float32(1e-12))]), self.qmax])
        if self.lo:
            msb, lsb = ed.op("QuantizeSplit", [x, s, self.step, self.qmax], domain=DOMAIN, outputs=2)
        else:
            msb, lsb = ed.op("Quantize", [x, s, self.qmax], domain=DOMAIN), None
        shifted = ed.op("Add", [ed.op("Cast", [msb], to=ir.DataType.INT32),
                                ed.const("off", np.array(2 ** (self.m - 1), np.int32))])
        out = {"msb": self._pack(shifted, self.m, dh), "scale": s}
        if lsb is not None:
            out["lsb"] = self._pack(lsb, self.lo, dh)
        return out

    def append(self, graph: ir.Graph, past: ir.Value, present: ir.Value, dh: int) -> str | None:
        """The fast form, or the reason it does not apply. ``present = Concat(past, new)`` (or
        evict-kv's row Gather of it) and quantize-kv reads the Concat through view ops only: then

            planes  = Concat(past planes, pack(quantize(new)))      only the q new tokens are quantized
            K_msb, K_full = table-lookup dequantization of planes   (replaces quantize-kv's
                            QuantizeSplit + DequantizeMSB/DequantizeSplit of the same values)
            present planes = planes, or evict-kv's row Gather of them (bytes, never re-quantized)

        Per-token scales make this exactly quantize-kv over a float cache: the stored scale is the one
        the float path recomputes, the codes are the ones it re-derives."""
        cat = next((u.node for u in past.uses() if u.node.op_type == "Concat" and len(u.node.inputs) == 2
                    and u.node.inputs[0] is past), None)
        if cat is None:
            return "the past is not Concat(past, new)"
        axis = cat.attributes["axis"].value
        if axis not in (2, -2):
            return f"the cache Concat is along axis {axis}, not the sequence axis"
        full = cat.outputs[0]
        rows = None
        if present is not full:
            gather = present.producer()
            flat = gather.inputs[0].producer() if gather is not None and gather.op_type == "Gather" else None
            if flat is None or flat.op_type != "Reshape" or flat.inputs[0] is not full:
                return "present is neither the cache Concat nor evict-kv's row Gather of it"
            rows = gather.inputs[1]
        readers, why = self._readers(full)
        if why:
            return why
        if any(u.node.op_type != "Shape" for u in past.uses() if u.node is not cat):
            return "the past is read by more than the cache Concat and Shape"
        ed = self.ed
        planes = dict(self._planes(past.name, past.shape, dh))
        new = self._encode(cat.inputs[1], dh)
        cache = {k: ed.op("Concat", [planes[k], new[k]], axis=2) for k in planes}
        deq = self._dequantized(cache, dh)
        for dequant, kind, views in readers:
            x = deq[kind]
            for node in views:  # the same data movement, applied to the dequantized cache
                attrs = {a.name: a.value for a in node.attributes.values()}
                x = ed.op(node.op_type, [x, *node.inputs[1:]], **attrs)
                for use in list(node.outputs[0].uses()):  # shapes of the float views: the same
                    if use.node.op_type == "Shape":
                        use.node.replace_input_with(use.idx, x)
            ed.replace_uses(dequant.outputs[0], x)
        any_deq = next(iter(deq.values()))  # same shape as the float cache, for Shape readers
        for use in list(full.uses()):
            if use.node.op_type == "Shape":
                use.node.replace_input_with(use.idx, any_deq)
        shape = ed.op("Concat", [ed.op("Shape", [planes["scale"]], start=0, end=3),
                                 ed.const("dh", np.array([dh], np.int64))], axis=0)
        for use in list(past.uses()):
            if use.node is not cat:  # Shape(past): the past's shape from its scale plane
                node = use.node
                start = node.attributes["start"].value if "start" in node.attributes else 0
                end = node.attributes["end"].value if "end" in node.attributes else 4
                sliced = ed.op("Slice", [shape, ed.const("st", np.array([start], np.int64)),
                                         ed.const("en", np.array([end], np.int64))])
                ed.replace_uses(node.outputs[0], sliced)
        i = graph.inputs.index(past)
        graph.inputs[i:i + 1] = list(planes.values())
        out = []
        for plane, spec in self._planes(present.name, present.shape or ir.Shape(["batch", None, "kept", dh]), dh):
            v = cache[plane] if rows is None else self._gather(cache[plane], rows)
            if rows is not None:
                self.pairs.setdefault(id(present), []).append((v, cache[plane]))
            v.name, v.type, v.shape = spec.name, spec.type, spec.shape
            out.append(v)
        i = graph.outputs.index(present)
        graph.outputs[i:i + 1] = out
        return None

    def _gather(self, x: ir.Value, rows: ir.Value) -> ir.Value:
        ed = self.ed
        flat = ed.op("Reshape", [x, ed.op("Concat", [ed.const("m1", np.array([-1], np.int64)),
                                                     ed.op("Shape", [x], start=3, end=4)], axis=0)])
        return ed.op("Gather", [flat, rows], axis=0)

    def _readers(self, full: ir.Value) -> tuple[list[tuple[ir.Node, str, list[ir.Node]]], str | None]:
        """quantize-kv's dequantizers of the cache: (dequantizer node, which dequantization, the view
        ops from the cache to the quantizer's input), or why the cache is read otherwise."""
        found: list[tuple[ir.Node, str, list[ir.Node]]] = []
        todo: list[tuple[ir.Value, list[ir.Node]]] = [(full, [])]
        quant = "QuantizeSplit" if self.lo else "Quantize"
        while todo:
            value, views = todo.pop()
            for use in value.uses():
                node = use.node
                if node.op_type == "Shape" or (views and use.idx > 0):
                    continue  # shapes only
                if node.op_type == "Reshape" and not views and node.outputs[0].uses() and all(
                        u.node.op_type == "Gather" for u in node.outputs[0].uses()):
                    continue  # evict-kv's row gather of the float cache (replaced by the planes' one)
                if node.op_type == "Abs":
                    continue  # quantize-kv's scale (abs-max) of the values it quantizes: dead with it
                if (node.op_type in VIEWS or whole_slice(node)) and use.idx == 0:
                    todo.append((node.outputs[0], [*views, node]))
                elif node.domain == DOMAIN and node.op_type == quant and use.idx == 0:
                    for out in node.outputs:
                        for u in out.uses():
                            kind = DEQUANT[quant].get(u.node.op_type) if u.node.domain == DOMAIN else None
                            if kind is None:
                                return [], f"quantize-kv's {quant} is read by {u.node.op_type}"
                            if all(u.node is not f[0] for f in found):
                                found.append((u.node, kind, views))
                else:
                    return [], f"the float cache is read by {node.op_type} (not through quantize-kv)"
        if not found:
            return [], "quantize-kv does not read this cache"
        return found, None
