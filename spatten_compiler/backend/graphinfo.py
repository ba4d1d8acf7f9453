"""What the lowering needs to know about an ONNX graph, computed once.

- static shapes for a concrete length (``onnx.shape_inference`` with the symbolic input dims fixed:
  batch 1, sequence ``N``, past 0); token dims that pruning makes data dependent stay unknown and
  the lowering treats them as "live rows";
- which values are activations (derived from an embedding gather or a float hidden-state input),
  as opposed to shape and mask plumbing, which costs the accelerator nothing;
- weights: initializers (and ``Constant`` tensors) with their byte sizes; a weight reached through
  ``spatten.HeadSlice`` / ``Transpose`` / ``Cast`` is traced back to the initializer;
- attention groups: the ``Softmax`` nodes that share one query tensor (progressive quantization
  recomputes the scores, so a layer can have two), with their Q x K and P x V ``MatMul`` s, heads,
  head dim, and the SpAtten functions attached to them.
"""

from __future__ import annotations

import collections

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from spatten_compiler.backend.kvsource import KVSource, packing, trace
from spatten_compiler.errors import ModelLoadError
from spatten_compiler.lazyproto import read_model

logger = logging.getLogger(__name__)

SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "Range", "NonZero", "EyeLike"}
VIEW_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Identity", "Expand", "Split", "Slice",
            "Concat", "Gather", "Dropout", "Contiguous"}
SCORE_OPS = {"Add", "Div", "Mul", "Sub", "Where", "Cast", "Clip", "Tanh", "Softcap"}
WEIGHT_PATH = {"Transpose", "Cast", "Identity", "HeadSlice", "Reshape", "DequantizeLinear"}
# values that end an attention template's walk downstream (a decision another block reads), and why
TEMPLATE_ENDS = {
    "present_positions.": "evict-kv's kept positions of a layer: cascade eviction reads them in the next "
                          "layer, whose block they belong to (else one layer's template swallows the next's eviction)",
}
# values after which the template's nodes are K/V storage (store.kv's work; the host still runs them for
# the graph's outputs), and why
STORED_AFTER = {
    "present.": "evict-kv's kept cache rows: pack-kv-cache's general form quantizes and packs them into the "
                "next step's planes (store.kv writes the accelerator's; the graph's present.* come from them)",
}


@dataclasses.dataclass
class Group:
    """One attention block: its softmaxes (1, or 2 with progressive quantization)."""

    layer: int
    q: str  # the query value shared by the Q x K MatMuls
    qk: list[onnx.NodeProto]
    softmax: list[onnx.NodeProto]
    nodes: set[int]  # ids of nodes absorbed by the attention template
    heads: int
    kv_heads: int
    head_dim: int
    spatten: dict[str, list[onnx.NodeProto]] = dataclasses.field(default_factory=dict)
    k_src: KVSource | None = None  # how the stored K reaches Q x K (backend.kvsource)
    v_src: KVSource | None = None
    storage: set[int] = dataclasses.field(default_factory=set)  # ids of the (de)quantization / packing nodes


class GraphInfo:
    def __init__(self, model: onnx.ModelProto, seq_len: int) -> None:
        self.model = model
        self.seq_len = seq_len
        g = model.graph
        self.nodes = list(g.node)
        self.by_id = {id(n): n for n in self.nodes}
        self.position = {id(n): k for k, n in enumerate(self.nodes)}
        self.inits: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        for n in self.nodes:  # Constant nodes with real payloads are weights too
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.inits.setdefault(n.output[0], n.attribute[0].t)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.shapes = _infer_shapes(model, seq_len)
        self.causal = any(n.op_type in ("Trilu", "LessOrEqual", "CausalMask") for n in self.nodes) or any(
            "past" in i.name for i in g.input)
        self.act = self._activations()
        self.groups = self._groups()

    # ---- values -----------------------------------------------------------------------------
    def shape(self, name: str) -> list[int | None] | None:
        if name in self.inits:
            return list(self.inits[name].dims)
        return self.shapes.get(name)

    def last_dim(self, name: str) -> int | None:
        s = self.shape(name)
        return s[-1] if s else None

    def weight_source(self, name: str) -> str | None:
        """The initializer behind a weight operand (through HeadSlice / Transpose / Cast ...)."""
        seen = 0
        while name not in self.inits and seen < 8:
            n = self.producer.get(name)
            if n is None or n.op_type not in WEIGHT_PATH or not n.input:
                return None
            name, seen = n.input[0], seen + 1
        return name if name in self.inits else None

    def const_value(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)

    def _activations(self) -> set[str]:
        act: set[str] = set()
        for i in self.model.graph.input:
            tt = i.type.tensor_type
            dims = [d.dim_param for d in tt.shape.dim]
            if tt.elem_type in _FLOATS and len(dims) >= 2 and not any("past" in p.lower() for p in dims):
                act.add(i.name)
        for n in self.nodes:
            if n.op_type in SHAPE_OPS:
                continue
            gather_table = n.op_type == "Gather" and n.input and n.input[0] in self.inits and \
                len(self.inits[n.input[0]].dims) == 2
            if gather_table or any(i in act for i in n.input if i):
                act.update(o for o in n.output if o)
        return act

    # ---- attention groups --------------------------------------------------------------------
    def _qk_of(self, softmax: onnx.NodeProto) -> onnx.NodeProto | None:
        name = softmax.input[0]
        for _ in range(8):
            n = self.producer.get(name)
            if n is None:
                return None
            if n.op_type == "MatMul" and all(i not in self.inits for i in n.input):
                return n
            if n.op_type not in SCORE_OPS:
                return None
            name = next((i for i in n.input if i in self.act), n.input[0])
        return None

    def _groups(self) -> list[Group]:
        groups: dict[str, Group] = {}
        for n in self.nodes:
            if n.op_type == "Attention" and len(n.input) >= 3:  # opset-23 fused attention
                qshape = self.shape(n.input[0]) or [None] * 4
                h = _attr(n, "q_num_heads") or (qshape[1] if len(qshape) == 4 else None) or 1
                d = (qshape[-1] if len(qshape) == 4 else (qshape[-1] or 64) // h) or 64
                kshape = self.shape(n.input[1]) or []
                kvh = _attr(n, "kv_num_heads") or self._proj_width(n.input[1], d) or (
                    kshape[1] if len(kshape) == 4 and kshape[1] else h)
                kvh = kvh if kvh <= h and h % kvh == 0 else h
                groups[n.input[0]] = Group(len(groups), n.input[0], [n], [n], {id(n)}, h, kvh, d)
                continue
            if n.op_type != "Softmax" or n.input[0] not in self.act:
                continue
            qk = self._qk_of(n)
            shape = self.shape(n.input[0])
            if qk is None or shape is None or len(shape) != 4:
                continue
            q = qk.input[0]
            grp = groups.get(q)
            if grp is None:
                qshape = self.shape(q) or [None] * 4
                kshape = self.shape(qk.input[1]) or [None] * 4
                d = qshape[-1] or 64
                h = shape[1] or qshape[1] or self._heads_from_out_proj(n, d) or 1
                kvh = self._proj_width(qk.input[1], d) or (kshape[1] if len(kshape) == 4 and kshape[1] else h)
                kvh = kvh if kvh <= h and h % kvh == 0 else h  # packed QKV weights are wider than K alone
                grp = groups[q] = Group(len(groups), q, [], [], set(), h, kvh, d)
            grp.qk.append(qk)
            grp.softmax.append(n)
        ordered = sorted(groups.values(), key=lambda g: self.position[id(g.qk[0])])
        if ordered and any(n.domain == "spatten" and n.op_type == "HeadSelect" for n in self.nodes):
            # head pruning slices the projections: static shapes after it show the kept heads only, but
            # the stream numbers heads as the model does (the live-head list names them)
            full = max(g.heads for g in ordered)
            # K/V heads as the unpruned layers have them (GQA: a pruned layer's K/V width can equal its
            # kept query heads, e.g. SmolLM2 keeping 1 of 3 groups = 3 query heads next to 3 K/V heads)
            kv = collections.Counter(g.kv_heads for g in ordered if g.heads == full).most_common(1)[0][0]
            for g in ordered:
                if g.heads < full:
                    g.kv_heads = kv if g.kv_heads in (g.heads, kv) else g.kv_heads
                    g.heads = full
        for i, grp in enumerate(ordered):
            grp.layer = i
            if grp.qk[0].op_type != "Attention":
                self._absorb(grp)
                self._sources(grp)
        return ordered

    def _sources(self, grp: Group) -> None:
        """K and V sources (the codes, scales and quantizer behind the operands: MSB-only and full reads
        with progressive quantization); the storage nodes - quantizers, dequantizers, and the
        append-only cache's table lookups and packing - belong to the template (store.kv / fetch.kv)."""
        pc = grp.spatten.get("ProgressiveContext", [])
        pv = sorted((self.by_id[i] for i in grp.nodes if self.by_id[i].op_type == "MatMul"
                     and self.by_id[i] not in grp.qk), key=lambda n: self.position[id(n)])
        vs = list(pc[0].input[3:5]) if pc else [pv[0].input[1]] if pv else []
        for attr, operands, transposed in (("k_src", [q.input[1] for q in grp.qk], True), ("v_src", vs, False)):
            for operand in operands:
                src = trace(self, operand, transposed)
                if isinstance(src, str):
                    logger.debug("layer %d %s: no stored source (%s)", grp.layer, attr[0], src)
                    continue
                if getattr(grp, attr) is None:
                    setattr(grp, attr, src)
                    kvh = self._proj_width(src.quant.input[0], grp.head_dim) if src.quant is not None else None
                    if kvh and kvh < grp.kv_heads and grp.heads % kvh == 0:  # the cache stores K/V heads (GQA)
                        grp.kv_heads = kvh
                self._own(grp, src)
        grp.storage.update(id(n) for kind, ns in grp.spatten.items() if kind.startswith(("Quantize", "Dequantize"))
                           for n in ns)

    def _own(self, grp: Group, src: KVSource) -> None:
        nodes = list(src.nodes)
        if src.quant is not None:
            nodes.append(src.quant)
            if src.quant not in grp.spatten.get(src.quant.op_type, []):
                grp.spatten.setdefault(src.quant.op_type, []).append(src.quant)
            if src.form == "lookup":
                planes = {i for n in src.nodes if n.op_type == "Gather" for i in n.input[1:]}
                planes |= {self.producer[p].input[0] for p in planes
                           if p in self.producer and self.producer[p].op_type == "Cast"}
                nodes += packing(self, src.quant, planes)
        grp.nodes.update(id(n) for n in nodes)
        grp.storage.update(id(n) for n in nodes)

    def _proj_width(self, name: str, d: int) -> int | None:
        """Heads of the projection a Q/K/V operand comes from (before any GQA expansion)."""
        for _ in range(16):
            n = self.producer.get(name)
            if n is None:
                return None
            w = self.weight_source(n.input[1]) if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 else None
            if w is not None:
                dims = self.inits[w].dims
                width = self.last_dim(n.output[0]) or (
                    dims[0] if n.op_type == "Gemm" and _attr(n, "transB") else dims[-1])
                return width // d if width % d == 0 else None
            name = next((i for i in n.input if i in self.act), n.input[0] if n.input else "")
        return None

    def _heads_from_out_proj(self, softmax: onnx.NodeProto, d: int) -> int | None:
        frontier, seen = [softmax.output[0]], set()
        while frontier:
            v = frontier.pop(0)
            for c in self.consumers.get(v, []):
                if id(c) in seen:
                    continue
                seen.add(id(c))
                w = next((self.weight_source(i) for i in c.input[1:2] if self.weight_source(i)), None)
                if c.op_type in ("MatMul", "Gemm") and w is not None:
                    k = self.inits[w].dims[0]
                    return k // d if k % d == 0 else None
                frontier.extend(o for o in c.output if o)
        return None

    def _absorb(self, grp: Group) -> None:
        """Nodes between the Q x K MatMuls and the attention output (P x V) belong to the template."""
        start = [s.output[0] for s in grp.softmax] + [q.output[0] for q in grp.qk]
        grp.nodes.update(id(n) for n in grp.qk + grp.softmax)
        frontier = [(v, False) for v in start]
        while frontier:
            v, stored = frontier.pop()
            if v.startswith(tuple(TEMPLATE_ENDS)):
                continue
            stored = stored or v.startswith(tuple(STORED_AFTER))
            for c in self.consumers.get(v, []):
                if id(c) in grp.nodes:
                    continue
                if c.domain == "spatten":
                    grp.spatten.setdefault(c.op_type, []).append(c)
                pv = c.op_type == "MatMul" and all(i not in self.inits for i in c.input)
                grp.nodes.add(id(c))
                if stored:
                    grp.storage.add(id(c))
                if pv or c.op_type == "ProgressiveContext":  # the attention output: its head importance
                    for h in (h for o in c.output for h in self.consumers.get(o, [])):  # is the template's too
                        if h.domain == "spatten" and h.op_type.startswith("HeadImportance") and id(h) not in grp.nodes:
                            grp.spatten.setdefault(h.op_type, []).append(h)
                            grp.nodes.add(id(h))
                if pv or c.op_type in ("ProgressiveContext", "TokenSelect", "HeadImportance", "HeadImportanceAll",
                                       "HeadSelect"):
                    continue  # the attention output (or a decision) ends the template
                frontier.extend((o, stored) for o in c.output if o)
        # SpAtten functions feeding the template (the K/V planes), a few producers upstream
        frontier = [(i, 0) for n in grp.qk + grp.spatten.get("ProgressiveContext", []) for i in n.input]
        seen: set[str] = set()
        while frontier:
            v, depth = frontier.pop()
            n = self.producer.get(v)
            if n is None or v in seen or depth > 6 or n.op_type == "Softmax":
                continue
            seen.add(v)
            if n.domain == "spatten" and n.op_type.startswith(("Quantize", "Dequantize")):
                if id(n) not in grp.nodes:
                    grp.spatten.setdefault(n.op_type, []).append(n)
                    grp.nodes.add(id(n))
            frontier.extend((i, depth + 1) for i in n.input if i and i not in self.inits)

    def group_of_node(self) -> dict[int, Group]:
        return {nid: g for g in self.groups for nid in g.nodes}

    def storage_nodes(self) -> set[int]:
        """Ids of the template's K/V storage nodes: their numbers never reach the accelerator (store.kv
        writes its own planes), but the graph may read them outside the block (present.* outputs, shapes)."""
        return {nid for g in self.groups for nid in g.storage}

    def topo(self) -> Iterable[onnx.NodeProto]:
        return self.nodes  # ONNX graphs are stored in topological order (checked by onnx.checker)


def _attr(node: onnx.NodeProto, name: str) -> int | None:
    for a in node.attribute:
        if a.name == name:
            return int(onnx.helper.get_attribute_value(a))
    return None


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _infer_shapes(model: onnx.ModelProto, seq_len: int) -> dict[str, list[int | None]]:
    m = _skeleton(model)
    for i in m.graph.input:
        for d in i.type.tensor_type.shape.dim:
            if d.dim_param:
                p = d.dim_param.lower()
                d.dim_value = 1 if "batch" in p else 0 if "past" in p else seq_len
    try:
        m = shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:  # noqa: BLE001 - shape inference is best effort; unknown shapes are handled
        logger.warning("shape inference failed (%s); continuing with partial shapes", str(e).splitlines()[0])
    out: dict[str, list[int | None]] = {}
    for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return out


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the payload of large initializers (shape inference needs only their dims)."""
    m = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    g = model.graph
    m.graph.name = g.name
    m.graph.node.extend(g.node)
    m.graph.input.extend(g.input)
    m.graph.output.extend(g.output)
    m.graph.value_info.extend(g.value_info)
    for t in g.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) + 8 * len(t.int64_data) < 4096:
            m.graph.initializer.append(t)
        else:
            m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def load_onnx(path: Path) -> onnx.ModelProto:
    """The model proto with weights left on disk (only their shapes are needed; see lazyproto)."""
    if not Path(path).is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        return read_model(Path(path))
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for garbage input
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None


def tensor_bytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * _ITEMSIZE.get(t.data_type, 4)


_ITEMSIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.DOUBLE: 8,
    onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT16: 2, onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT8: 1, onnx.TensorProto.BOOL: 1, onnx.TensorProto.UINT16: 2, onnx.TensorProto.UINT32: 4,
    onnx.TensorProto.UINT64: 8,
}
