"""Where an attention block's K and V come from: the codes and scales the dequantization reads,
their bit widths, and the quantizer that wrote them - found by what the nodes compute, not by one
node layout.

From the K operand of Q x K (the V operand of P x V) the walk goes up through data movement (GQA
repeat, head split / merge, K^T) and constant factors (exporters that scale K by sqrt(scale)) to a
dequantization, which is one of :data:`FORMS`::

    spatten   spatten.DequantizeMSB / DequantizeSplit / Dequantize(codes, scale[, step])
              (quantize-kv; the codes are the outputs of its QuantizeSplit / Quantize)
    lookup    Mul(Add(T_m[Cast(msb plane)], mid), scale)              MSB only
              Mul(Add(T_m[Cast(msb plane)], T_l[Cast(lsb plane)]), scale)   MSB + LSB
              Mul(T_m[Cast(plane)], scale)                            static bits
              (pack-kv-cache's append-only form: ``T[b]`` is a 256-entry table Gather, reshaped
              when a byte holds two codes; planes = Concat(past plane, Pack(quantizer(new tokens))))

Bits: spatten form from the quantizer's ``step`` / ``qmax`` constants; lookup form from the table,
which holds ``(code - 2^(m-1)) * 2^l`` (so ``2^l`` is the step between neighbouring codes and the
offset gives ``m``). The quantizer is the spatten Quantize / QuantizeSplit upstream of the codes.
``transposed``: the quantizer's input is laid out ``[B, H, D, T]`` (quantize-kv quantizes K^T as
the core reads it; pack-kv-cache's append form quantizes the new tokens ``[B, Hkv, T, D]``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    from spatten_compiler.backend.graphinfo import GraphInfo

# data movement between a dequantized cache and the attention's operand (values unchanged)
MOVES = frozenset({"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity", "Cast", "Slice", "Flatten"})
QUANTIZERS = ("QuantizeSplit", "Quantize")


@dataclasses.dataclass
class KVSource:
    """How one of K / V reaches its attention operand."""

    form: str  # key of FORMS
    dequant: str  # "msb" | "full" | "static": which dequantization the operand reads
    msb_bits: int
    lsb_bits: int
    scale: str  # the stored scales the dequantization multiplies by
    quant: onnx.NodeProto | None  # the quantizer writing the stored codes
    transposed: bool  # quant.input[0] is [B, H, D, T]
    factor: float  # constant factors between the dequantization and the operand
    nodes: list[onnx.NodeProto]  # the dequantization (and, lookup form, the packing) nodes


Match = Callable[["GraphInfo", onnx.NodeProto], "tuple[dict, list[onnx.NodeProto]] | str"]


def trace(gi: GraphInfo, operand: str, transposed: bool) -> KVSource | str:
    """The source of ``operand`` (``transposed``: the operand is K^T), or why none was found."""
    factor, swaps, value = 1.0, 0, operand
    for _ in range(24):
        n = gi.producer.get(value)
        if n is None:
            return f"'{value}' is a graph input, not a dequantized cache"
        reasons = []
        for name, match in FORMS.items():
            got = match(gi, n)
            if isinstance(got, str):
                reasons.append(f"{name}: {got}")
                continue
            info, nodes = got
            quant = info.pop("quant", None) or _quantizer(gi, info.pop("codes"))
            return KVSource(name, info["dequant"], info["msb"], info["lsb"], info["scale"], quant,
                            transposed ^ bool(swaps % 2), factor, nodes)
        c = next((_scalar(gi, i) for i in n.input[1:] if _scalar(gi, i) is not None), None)
        if n.op_type in ("Mul", "Div") and c is not None:
            factor = factor / c if n.op_type == "Div" else factor * c
        elif n.op_type == "Transpose":
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
            rank = len(perm) if perm else 0
            if perm and perm[-2:] == [rank - 1, rank - 2]:
                swaps += 1
            elif not perm or perm[-2:] != [rank - 2, rank - 1]:
                return f"Transpose {perm} moves the token or channel axis"
        elif n.op_type not in MOVES:
            return f"{n.op_type} '{n.name}' between the cache and the attention ({'; '.join(reasons)})"
        value = n.input[0]
    return "no dequantization within 24 nodes of the attention"


# ---- the forms ----------------------------------------------------------------------------------
def _spatten(gi: GraphInfo, n: onnx.NodeProto) -> tuple[dict, list[onnx.NodeProto]] | str:
    """quantize-kv's dequantizer of its quantizer's codes (bits from the quantizer's constants)."""
    kinds = {"DequantizeMSB": "msb", "DequantizeSplit": "full", "Dequantize": "static"}
    if n.domain != "spatten" or n.op_type not in kinds:
        return "not a spatten dequantizer"
    quant = gi.producer.get(n.input[0])
    if quant is None or quant.domain != "spatten" or quant.op_type not in QUANTIZERS:
        return "codes not written by a spatten quantizer"
    if quant.op_type == "QuantizeSplit":
        step, qmax = (gi.const_value(i) for i in quant.input[2:4])
        if step is None or qmax is None:
            return "quantizer constants are not constant"
        lsb = int(round(math.log2(float(step))))
        msb = int(round(math.log2(float(qmax) + 1))) + 1 - lsb
    else:
        qmax = gi.const_value(quant.input[2])
        if qmax is None:
            return "quantizer constant is not constant"
        msb, lsb = int(round(math.log2(float(qmax) + 1))) + 1, 0
    scale = n.input[2 if n.op_type == "DequantizeSplit" else 1]  # (msb, lsb, scale, step) / (codes, scale[, step])
    return {"dequant": kinds[n.op_type], "msb": msb, "lsb": lsb, "scale": scale, "quant": quant}, [n]


def _lookup(gi: GraphInfo, value: str) -> tuple[np.ndarray, str, list[onnx.NodeProto]] | None:
    """``[Reshape](Gather(table, [Cast](plane)))``: (table, plane, nodes) or None."""
    nodes = []
    n = gi.producer.get(value)
    if n is not None and n.op_type == "Reshape":
        nodes.append(n)
        n = gi.producer.get(n.input[0])
    if n is None or n.op_type != "Gather" or len(n.input) < 2:
        return None
    table = gi.const_value(n.input[0])
    if table is None or table.shape not in ((256,), (256, 2)):
        return None
    nodes.append(n)
    plane = n.input[1]
    cast = gi.producer.get(plane)
    if cast is not None and cast.op_type == "Cast":
        nodes.append(cast)
        plane = cast.input[0]
    return np.asarray(table, np.float64), plane, nodes


def _table_bits(table: np.ndarray) -> tuple[int, int] | None:
    """(m, l) of a table holding (code - 2^(m-1)) * 2^l: the low code of each byte runs 0, 1, 2 ..."""
    low = table[:, -1] if table.ndim == 2 else table
    step = low[1] - low[0]
    if step <= 0:
        return None
    offset = -low[0] / step
    if offset < 1:
        return None
    return int(round(math.log2(offset))) + 1, int(round(math.log2(step)))


def _lookup_mul(gi: GraphInfo, n: onnx.NodeProto) -> tuple[dict, list[onnx.NodeProto]] | str:
    """pack-kv-cache's table-lookup dequantization of the stored planes, times the stored scale."""
    if n.op_type != "Mul" or len(n.input) != 2:
        return "not a Mul"
    for x, scale in (n.input, n.input[::-1]):
        found = _lookup(gi, x)
        if found is not None:  # static bits: one table, no LSB plane
            table, plane, nodes = found
            bits = _table_bits(table)
            if bits is None or bits[1] != 0:
                return "the table does not hold shifted codes"
            return {"dequant": "static", "msb": bits[0], "lsb": 0, "codes": plane, "scale": scale}, [n, *nodes]
        add = gi.producer.get(x)
        if add is None or add.op_type != "Add":
            continue
        for hi_v, lo_v in (add.input, add.input[::-1]):
            hi = _lookup(gi, hi_v)
            if hi is None:
                continue
            bits = _table_bits(hi[0])
            if bits is None:
                return "the MSB table does not hold shifted codes"
            lo = _lookup(gi, lo_v)
            mid = _scalar(gi, lo_v)
            if lo is not None:
                return ({"dequant": "full", "msb": bits[0], "lsb": bits[1], "codes": hi[1], "scale": scale},
                        [n, add, *hi[2], *lo[2]])
            if mid is not None and abs(mid - (2 ** bits[1] - 1) / 2) < 1e-6:
                return ({"dequant": "msb", "msb": bits[0], "lsb": bits[1], "codes": hi[1], "scale": scale},
                        [n, add, *hi[2]])
            return "the MSB lookup is added to neither an LSB lookup nor the bin middle"
    return "no table lookup among the Mul's inputs"


FORMS: dict[str, Match] = {"spatten": _spatten, "lookup": _lookup_mul}


# ---- helpers --------------------------------------------------------------------------------------
def _scalar(gi: GraphInfo, name: str) -> float | None:
    v = gi.const_value(name) if name else None
    return None if v is None or v.size != 1 else float(v.reshape(-1)[0])


def _quantizer(gi: GraphInfo, plane: str) -> onnx.NodeProto | None:
    """The spatten quantizer upstream of a stored plane (through the packing ops and the cache Concat)."""
    frontier, seen = [(plane, 0)], set()
    while frontier:
        v, depth = frontier.pop(0)
        n = gi.producer.get(v)
        if n is None or v in seen or depth > 12:
            continue
        seen.add(v)
        if n.domain == "spatten" and n.op_type in QUANTIZERS:
            return n
        frontier.extend((i, depth + 1) for i in n.input if i and i not in gi.inits)
    return None


def packing(gi: GraphInfo, quant: onnx.NodeProto, planes: set[str]) -> list[onnx.NodeProto]:
    """Nodes from the quantizer's outputs to the stored planes (store.kv's packing of new tokens)."""
    out, frontier, seen = [], [o for o in quant.output if o], set()
    while frontier:
        v = frontier.pop()
        for c in gi.consumers.get(v, []):
            if id(c) in seen:
                continue
            seen.add(id(c))
            if any(o in planes for o in c.output) or c.op_type in MOVES | {"Add", "Mul", "Split"}:
                out.append(c)
                if not any(o in planes for o in c.output):
                    frontier.extend(o for o in c.output if o)
    return out
