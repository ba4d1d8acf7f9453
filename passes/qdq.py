"""Static activation quantization (QDQ format) as annotations on float tensors.

``onnxruntime.quantization.quantize_static`` (QDQ format: what Olive and the NPU / TensorRT / QNN
toolchains produce) writes every activation as ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)``
with a constant per-tensor scale and zero point: an elementwise function of ``x``, so a gather of token
rows or a slice of heads commutes with it exactly. spattenc compiles such a model in float::

    strip-qdq     x -> Q(s, z) -> DQ(s, z) -> uses   =>   x -> uses   (remembered: x -> s, z, dtype,
                  in the model's metadata ``spatten.qdq``); weights (DequantizeLinear of a constant)
                  stay as they are: the matchers read them as constants and prune-heads slices them
    ... the compile's passes ...
    restore-qdq   every remembered tensor that still exists gets its Q -> DQ back, after its producer
                  (all uses and the graph output redirected); a tensor spattenc made by moving the
                  data of a remembered one (the Gather of kept rows, a Reshape: :data:`DATA_MOVEMENT`)
                  gets the same pair, exact because ``Q(T(DQ(q))) = T(q)``, so onnxruntime fuses the
                  pruned layers' ``DQ -> MatMul -> Q`` into its int8 kernels as in the input model

Quantized scalars (``DQ(q)`` of a constant: the score scale) are read as their float value and put
back the same way. A pair whose tensor a pass bypassed (an Identity, a no-op Cast) goes on its
readers' inputs when they read the bypassed op's input. At keep 1.0 the output computes what the
input does. Not pairs, left as they are: a Q whose quantized output another op reads, DQ and Q with
different scales. Per-axis activation quantization is refused. When spattenc rebuilt a key mask
quantized with a ~1e36 step (a float-min fill in its calibration range: every causal decoder), the
activations with that step stay float: restored, they would round the rebuilt mask to 0.
The QOperator format (``QLinearMatMul``...) is rewritten into this form first
(:mod:`passes.unfuse_qop`).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array
from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .qdq_constants import RANGE

logger = logging.getLogger(__name__)
META = "spatten.qdq"
QOPERATOR = {("", "QLinearMatMul"), ("", "QLinearConv"), ("com.microsoft", "QLinearAdd"), ("com.microsoft", "QGemm")}
# one-input no-ops normalize may remove (a Cast only to its input's type)
BYPASSED = {"Identity", "Cast", "Dropout", "Concat"}
HUGE_SCALE = 1e20
ONNX = ("", "ai.onnx")
# op -> its data input: ops that only move elements, so Q(T(DQ(q))) = T(q) with the same scale and zero point
DATA_MOVEMENT = {"Reshape": 0, "Transpose": 0, "Squeeze": 0, "Unsqueeze": 0, "Flatten": 0, "Gather": 0,
                 "GatherElements": 0, "GatherND": 0, "Slice": 0, "Expand": 0, "Identity": 0, "Tile": 0}

# spattenc's own token gathers (passes/spatten_ops.py): the kept rows of the hidden states, of the probabilities
SPATTEN_MOVEMENT = {("spatten", "GatherTokens"): 0, ("spatten", "GatherRows"): 0}


def _params(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(scale, zero point) of a Q or DQ node when both are constants, else None."""
    scale = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zp = const_array(zp_value)
    if scale is None or (zp_value is not None and zp is None):
        return None
    return scale, zp


def _same(a: tuple[np.ndarray, np.ndarray | None], b: tuple[np.ndarray, np.ndarray | None]) -> bool:
    """The same scale and zero point (an absent zero point is uint8 0)."""
    (sa, za), (sb, zb) = a, b
    za, zb = (np.zeros(1, np.uint8) if z is None else z for z in (za, zb))
    return sa.dtype == sb.dtype and np.array_equal(sa.reshape(-1), sb.reshape(-1)) and za.dtype == zb.dtype and \
        np.array_equal(za.reshape(-1), zb.reshape(-1))


def _is_op(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ONNX


def has_qdq(model: ir.Model) -> bool:
    """The main graph quantizes a computed activation (QuantizeLinear of a non-constant)."""
    return any((n.domain, n.op_type) in QOPERATOR for n in model.graph) or any(
        _is_op(n, "QuantizeLinear") and n.inputs[0] is not None and n.inputs[0].const_value is None
        and const_array(n.inputs[0]) is None for n in model.graph)


def _qtype(q: ir.Node, zp: np.ndarray | None) -> ir.DataType:
    """The quantized type: the zero point's, else ``output_dtype`` (opset 21), else uint8 (the default)."""
    if zp is not None:
        return ir.DataType.from_numpy(zp.dtype)
    return ir.DataType(q.attributes.get_int("output_dtype", 0) or ir.DataType.UINT8)


def _pair(q: ir.Node) -> tuple[list[ir.Node], dict] | str:
    """The DequantizeLinears that undo ``q`` and the annotation, or why ``q`` is no activation pair."""
    x, out = q.inputs[0], q.outputs[0]
    if x is None or x.const_value is not None or const_array(x) is not None:
        return "quantizes a constant (fold-qdq-constants folds those it can evaluate)"
    params = _params(q)
    if params is None:
        return "scale or zero point is computed"
    if params[0].size != 1:
        raise OptionError(f"QuantizeLinear '{q.name}': per-axis quantization of the activation {x.name} "
                          f"(scale shape {list(params[0].shape)}); spattenc reads per-tensor activation scales only")
    uses = [u.node for u in out.uses()]
    if not uses or out.is_graph_output() or any(not _is_op(d, "DequantizeLinear") or d.inputs[0] is not out
                                                 for d in uses):
        return "its quantized output is read by other ops"
    if any(_params(d) is None or not _same(params, _params(d)) for d in uses):
        return "DequantizeLinear with another scale or zero point"
    scale, zp = params
    attrs = {k: a.value for k, a in q.attributes.items() if isinstance(a.value, int)}
    return uses, {"scale": float(scale.reshape(-1)[0]), "scale_dtype": int(ir.DataType.from_numpy(scale.dtype)),
                  "zero_point": None if zp is None else int(zp.reshape(-1)[0]),
                  "dtype": int(_qtype(q, zp)), "attrs": attrs,
                  "names": [v.name if v is not None else "" for v in q.inputs[1:]]}


def _scalar(dq: ir.Node) -> dict | None:
    """The note of ``DQ(q)`` with a constant scalar ``q`` and per-tensor parameters (the matchers read the
    score scale as a float constant), else None."""
    q = const_array(dq.inputs[0], max_elements=1)
    params = _params(dq)
    if q is None or q.size != 1 or params is None or params[0].size != 1 or dq.outputs[0].is_graph_output() or \
            ir.DataType.from_numpy(q.dtype) not in RANGE:
        return None
    scale, zp = params
    return {"quantized": [int(q.reshape(-1)[0])], "shape": list(q.shape), "scale": float(scale.reshape(-1)[0]),
            "scale_dtype": int(ir.DataType.from_numpy(scale.dtype)),
            "zero_point": None if zp is None else int(zp.reshape(-1)[0]), "dtype": int(ir.DataType.from_numpy(q.dtype)),
            "attrs": {}, "names": [v.name if v is not None else "" for v in dq.inputs[1:]]}


@register_pass
@dataclasses.dataclass(frozen=True)
class StripQdq(Pass):
    """Q -> DQ pairs on activations -> the float tensor, the pair remembered in the metadata."""

    name = "strip-qdq"

    def call(self, model: ir.Model) -> PassResult:
        notes: dict[str, dict] = json.loads(model.metadata_props.get(META, "{}"))
        e = GraphEditor(model, "spatten/qdq")
        kept: dict[str, int] = {}
        for q in [n for n in model.graph if _is_op(n, "QuantizeLinear")]:
            found = _pair(q)
            if isinstance(found, str):
                kept[found] = kept.get(found, 0) + 1
                continue
            dqs, note = found
            x = q.inputs[0]
            # the readers too: a no-op a later pass bypasses (an Identity, a Cast to the same type) takes
            # the name with it, and its readers get the pair on their input instead, if that is the no-op's
            note["uses"] = [[u.node.name, u.idx] for dq in dqs for u in dq.outputs[0].uses() if u.node.name]
            note["through"] = _through(x)
            for dq in dqs:
                e.replace_uses(dq.outputs[0], x)  # a graph output keeps its name: x takes it
            for dq in dqs:
                model.graph.remove(dq, safe=True)
            model.graph.remove(q, safe=True)
            notes[x.name] = note
        for dq in [n for n in model.graph if _is_op(n, "DequantizeLinear")]:
            note = _scalar(dq)
            if note is not None:  # a quantized scalar (the score scale): its value, (q - z) * s in float32
                value = (np.float32(note["quantized"][0]) - np.float32(note["zero_point"] or 0)) * \
                    np.float32(note["scale"])
                x = e.const("quantized_const", np.array(value, np.float32).reshape(note["shape"]))
                e.replace_uses(dq.outputs[0], x)
                model.graph.remove(dq, safe=True)
                notes[x.name] = {**note, "uses": [], "through": []}
        if not notes:
            return PassResult(model, False)
        huge = [name for name, note in notes.items() if abs(note["scale"]) > HUGE_SCALE]
        if huge:  # the calibration data had padding: the additive mask's fill value set the range
            logger.warning("strip-qdq: %d activations are quantized with a step above %g (%s): their calibration "
                           "range holds a mask's fill value, so the quantized scores lose every unmasked "
                           "difference; spattenc's own key masks (-1e9) round to 0 there", len(huge), HUGE_SCALE,
                           huge[0])
        model.metadata_props[META] = json.dumps(notes)
        logger.info("strip-qdq: %d quantized activations read as float; left: %s", len(notes), kept or "none")
        return PassResult(model, True)


def _through(x: ir.Value, limit: int = 4) -> list[str]:
    """The tensors ``x`` equals through no-ops a later pass may bypass (a Cast chain, a one-input Concat)."""
    names = []
    for _ in range(limit):
        producer = x.producer()
        if producer is None or producer.op_type not in BYPASSED or len(producer.inputs) != 1 or \
                producer.inputs[0] is None:
            break
        x = producer.inputs[0]
        names.append(x.name)
    return names


def _restore_one(e: GraphEditor, value: ir.Value, note: dict, slot: tuple[ir.Node, int] | None = None) -> ir.Value:
    graph = e.graph

    def const(name: str, array: np.ndarray) -> ir.Value:
        v = graph.initializers.get(name)
        if v is not None and v.const_value is not None and np.array_equal(v.const_value.numpy(), array) and \
                v.const_value.dtype == ir.DataType.from_numpy(array.dtype):
            return v
        if name and name not in graph.initializers:
            value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(
                array.dtype)), const_value=ir.tensor(array, name=name))
            graph.register_initializer(value)
            return value
        return e.const("scale", array)

    names, dtype = note["names"] + ["", ""], ir.DataType(note["dtype"]).numpy()
    scale = const(names[0], np.array(note["scale"], ir.DataType(note["scale_dtype"]).numpy()))
    params = [scale]
    if note["zero_point"] is not None:
        params.append(const(names[1], np.array(note["zero_point"], dtype)))
    if "quantized" in note:  # a folded constant: its quantized value again
        q = e.const("quantized", np.array(note["quantized"], dtype).reshape(note["shape"]))
    else:
        q = e.op("QuantizeLinear", [value, *params], **note["attrs"])
        q.dtype = ir.DataType(note["dtype"])
    axis = {"axis": note["attrs"]["axis"]} if "axis" in note["attrs"] else {}
    dq = e.op("DequantizeLinear", [q, *params], **axis)
    dq.dtype, dq.shape = ir.DataType(note["scale_dtype"]), value.shape  # DequantizeLinear returns the scale's type
    if slot is not None:
        slot[0].replace_input_with(slot[1], dq)
    else:
        e.replace_uses(value, dq, keep=[q.producer()] if q.producer() is not None else [])
    return dq


def _key(note: dict) -> tuple:
    return note["scale"], note["zero_point"], note["dtype"], note.get("quantized") is not None


def _data_input(node: ir.Node) -> int | None:
    """The input whose elements ``node`` only moves (:data:`DATA_MOVEMENT`, spattenc's gathers), else None."""
    return DATA_MOVEMENT.get(node.op_type) if node.domain in ONNX else SPATTEN_MOVEMENT.get((node.domain, node.op_type))


def _moved_from(value: ir.Value, names: set[str], limit: int = 4) -> bool:
    """``value`` is one of ``names`` or their elements moved (a pass's gather of kept rows)."""
    for _ in range(limit):
        if value.name in names:
            return True
        producer = value.producer()
        data = _data_input(producer) if producer is not None else None
        if data is None or data >= len(producer.inputs) or producer.inputs[data] is None:
            return False
        value = producer.inputs[data]
    return value.name in names


def _bypassed(graph: ir.Graph, notes: dict[str, dict], lost: list[str]) -> dict[str, list[tuple[ir.Node, int]]]:
    """The readers' inputs (by node name) of tensors whose no-op producer a pass bypassed: the reader
    now reads the no-op's input. Other readers of a lost tensor read something a pass rewrote."""
    nodes: dict[str, ir.Node | None] = {}
    for node in graph:
        nodes[node.name] = None if node.name in nodes else node  # a name used twice is no address
    slots = {}
    for name in lost:
        through = notes[name].get("through", [])
        found = [(nodes.get(n), i) for n, i in notes[name]["uses"]] if through else []
        slots[name] = [(n, i) for n, i in found if n is not None and i < len(n.inputs) and n.inputs[i] is not None
                       and _moved_from(n.inputs[i], set(through))]
    return slots


def _restore_readers(e: GraphEditor, notes: dict[str, dict], slots: dict[str, list[tuple[ir.Node, int]]],
                     done: dict[int, tuple]) -> list[str]:
    """The pairs of bypassed tensors on their readers' inputs; the names of those with no reader left.
    ``done``: id of a DequantizeLinear output put back -> its pair."""
    for name, readers in slots.items():
        for node, i in readers:
            if done.get(id(node.inputs[i])) != _key(notes[name]):  # the same pair twice is one pair
                done[id(_restore_one(e, node.inputs[i], notes[name], (node, i)))] = _key(notes[name])
    return [name for name, readers in slots.items() if not readers]


@register_pass
@dataclasses.dataclass(frozen=True)
class RestoreQdq(Pass):
    """The remembered Q -> DQ pairs again, on every remembered tensor that still exists and on the
    tensors spattenc's passes moved their data into."""

    name = "restore-qdq"

    def call(self, model: ir.Model) -> PassResult:
        if META not in model.metadata_props:
            return PassResult(model, False)
        notes: dict[str, dict] = json.loads(model.metadata_props.pop(META))
        values = {v.name: v for v in model.graph.inputs}
        values.update({o.name: o for n in model.graph for o in n.outputs})
        values.update({v.name: v for name, v in model.graph.initializers.items()
                       if name in notes and "quantized" in notes[name] and v.uses()})
        found = {name: values[name] for name in notes if name in values}
        for node in model.graph:  # in order: a Reshape of a Gather of a remembered tensor is found too
            data = _data_input(node)
            src = node.inputs[data] if data is not None and len(node.inputs) > data else None
            out = node.outputs[0] if node.outputs else None
            if src is not None and src.name in found and out.name not in found and out.dtype in (None, src.dtype):
                notes[out.name] = notes[src.name]
                found[out.name] = out
        e = GraphEditor(model, "spatten/qdq")
        slots = _bypassed(model.graph, notes, [n for n in notes if n not in found])  # before any edit
        if any(abs(notes[n]["scale"]) > HUGE_SCALE and not slots[n] for n in slots):
            # a mask quantized with a ~1e36 step was rebuilt by spattenc (its fill is -1e9, not -3.4e38): the
            # scores' pairs, with the same step, would round its masked keys to 0 and unmask them; they stay float
            huge = [n for n in found if abs(notes[n]["scale"]) > HUGE_SCALE]
            logger.warning("restore-qdq: the key mask was rebuilt and %d activations hold a mask's range (step > "
                           "%g): they stay float, so masked keys stay masked", len(huge), HUGE_SCALE)
            found = {n: v for n, v in found.items() if n not in huge}
        done = {id(_restore_one(e, value, notes[name])): _key(notes[name]) for name, value in found.items()}
        lost = sorted(_restore_readers(e, notes, slots, done))
        for name, value in found.items():  # a folded scalar read through its DequantizeLinear again
            if "quantized" in notes[name] and not value.uses() and name in model.graph.initializers:
                del model.graph.initializers[name]
        e.commit()
        logger.info("restore-qdq: %d quantized activations (Q -> DQ) again; %d rewritten by spattenc stay float%s",
                    len(found), len(lost), f" ({', '.join(lost[:5])}{'...' if len(lost) > 5 else ''})" if lost else "")
        return PassResult(model, True)


def dequantized_weight(value: ir.Value | None) -> ir.Node | None:
    """The ``DequantizeLinear`` of a constant that makes ``value`` (a QDQ-format weight), else None."""
    node = value.producer() if value is not None else None
    if not _is_op(node, "DequantizeLinear") or const_array(node.inputs[0]) is None or _params(node) is None:
        return None
    return node


def unsliceable_weight(value: ir.Value) -> str | None:
    """Why prune-heads cannot slice this dequantized weight (None: it can)."""
    node = dequantized_weight(value)
    if node is None:
        return "DequantizeLinear of a computed tensor"
    if node.attributes.get_int("block_size", 0):
        return "QDQ blocks of DequantizeLinear"
    return None


def slice_dequantized(e: GraphEditor, value: ir.Value, take) -> ir.Value:
    """``DQ(q, s, z)`` with ``take`` (a reshape / take / reshape of the weight's elements) applied: the
    quantized constant is sliced, and a per-axis scale and zero point with it (exact). ``take`` is run on
    the element indices to find which original row or column each kept one comes from."""
    node = dequantized_weight(value)
    q = const_array(node.inputs[0])
    scale, zp = _params(node)
    params = [node.inputs[1], *node.inputs[2:3]]
    if scale.size > 1:  # per axis: the kept positions along that axis, the same across the other axes
        axis = node.attributes.get_int("axis", 1) % q.ndim
        coords = np.unravel_index(take(np.arange(q.size).reshape(q.shape)), q.shape)[axis]
        if coords.ndim != q.ndim:
            raise OptionError(f"{node.name}: a per-axis quantized weight sliced into another rank")
        first = coords
        for other in (i for i in range(q.ndim) if i != axis):
            first = np.take(first, [0], axis=other)
        if not np.all(coords == first):
            raise OptionError(f"{node.name}: head slicing mixes the per-axis scales of a quantized weight")
        kept = first.reshape(-1)
        params = [e.const("dq_scale", scale.reshape(-1)[kept])]
        if zp is not None:
            params.append(e.const("dq_zero_point", zp.reshape(-1)[kept]))
    out = e.op("DequantizeLinear", [e.const("head_slice_q", take(q).astype(q.dtype)), *params],
               **{k: a.value for k, a in node.attributes.items()})
    out.type = value.type
    return out
