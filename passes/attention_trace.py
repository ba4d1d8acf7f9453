"""Walk from Q, K or V back to its projection, recording what lies between.

Between a projection (``MatMul``/``Gemm`` with a constant weight, optional bias ``Add``) and the
attention core, exporters put: head-split views (Reshape/Transpose), RoPE, a KV-cache ``Concat``
with a past input, a GQA repeat (Unsqueeze/Expand/Reshape), a pre-scale, and for packed QKV a
``Split``/``Slice``. :func:`trace_branch` walks that chain one op at a time, dispatching on the op
type through :data:`STEPS`, and returns a :class:`Branch` or a NoMatch with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from spatten_compiler.match import NoMatch, const_array, match

from .attention_patterns import ASSEMBLY, ROPE, VIEW_OPS
from .nbits_blocks import is_nbits, out_width


@dataclasses.dataclass
class Projection:
    node: ir.Node  # MatMul or Gemm (MatMulInteger: int8, com.microsoft MatMulNBits: int4 blocks [N, ., .])
    input: ir.Value  # the hidden state it reads (Reshape to [B*S, D] stripped)
    weight: ir.Value
    bias: ir.Value | None = None
    transposed_weight: bool = False  # Gemm transB=1 or MatMul(X, Transpose(W))


@dataclasses.dataclass
class KVCache:
    past: ir.Value  # graph input
    concat: ir.Node
    axis: int
    present: ir.Value | None  # graph output carrying the concatenation, if any


@dataclasses.dataclass
class Assembly:
    """Q or K concatenated on the last axis from a per-head piece and pieces shared by all heads
    (:data:`.attention_patterns.ASSEMBLY`): multi-head latent attention's ``cat(k_nope, k_pe)``."""

    concat: ir.Node
    per_head: int  # the Concat input traced on to the projection
    shared: list[ir.Value]  # [B, 1, S, d] pieces broadcast to every head (k_pe), kept whole by head pruning


@dataclasses.dataclass
class Branch:
    value: ir.Value  # what the attention core consumes (Q, K^T or V)
    projection: Projection | None = None
    views: list[ir.Node] = dataclasses.field(default_factory=list)
    rope: ir.Node | None = None
    rope_cos: ir.Value | None = None
    cache: KVCache | None = None
    packed: int | None = None  # index in a packed QKV projection (Split output / Slice)
    pre_scale: float | None = None
    heads: int | None = None
    head_dim: int | None = None
    repeated: bool = False  # GQA repeat of KV heads
    flat_width: int | None = None  # heads * head_dim before the head split, when known
    transform: list[ir.Node] = dataclasses.field(default_factory=list)  # per-head ops (transform_region)
    cross_head: ir.Node | None = None  # a normalization over all heads before the head split (OLMo 2)
    head_slice: tuple[int, int] | None = None  # (start, end) of a Slice on the head axis after the split
    pack_ways: int | None = None  # 3: a [B, S, 3, H, Dh] / [B, S, H, 3, Dh] view of a packed QKV projection
    assembly: Assembly | None = None  # per-head piece + shared pieces concatenated (MLA)

    def finish(self) -> Branch:
        """Heads from the flat width when the head-split Reshape used -1 for them (or when the only
        rank-4 reshape seen is the GQA/multi-query repeat, which shows the repeated count)."""
        if self.repeated and self.flat_width and self.head_dim and self.flat_width % self.head_dim == 0:
            self.heads = self.flat_width // self.head_dim
        if self.heads is None and self.head_dim:
            width = self.flat_width
            if width is None and self.projection is not None and (self.packed is None or self.pack_ways):
                # (a packed QKV viewed [B, S, 3, -1, Dh], its shapes forgotten by an earlier pass: a third)
                dims = self.projection.weight.shape
                width = dims[0 if self.projection.transposed_weight else -1] if dims is not None else None
                width = out_width(self.projection.node) or width
                width = width // self.pack_ways if isinstance(width, int) and self.pack_ways else width
            if isinstance(width, int):
                self.heads = width // self.head_dim
        return self


def _reshape_target(node: ir.Node) -> list[int | None]:
    """Target shape of a Reshape: the inferred output shape, with the dims it leaves symbolic taken
    from the target when that is constant or a Concat of pieces some of which are constant."""
    out = node.outputs[0].shape
    inferred = [d if isinstance(d, int) else None for d in out.dims] if out is not None else []
    shape = node.inputs[1]
    array = const_array(shape)
    target: list[int | None] = []
    if array is not None:
        target = [int(x) if x > 0 else None for x in array.tolist()]
    elif (concat := shape.producer() if shape is not None else None) is not None and concat.op_type == "Concat":
        for piece in concat.inputs:
            a = const_array(piece)
            target.extend([int(x) if x > 0 else None for x in a.tolist()] if a is not None else [None])
    if not inferred or len(target) != len(inferred):
        return inferred if inferred and any(isinstance(d, int) for d in inferred[2:]) else target
    return [a if a is not None else b for a, b in zip(inferred, target)]


def _graph_input(value: ir.Value, graph: ir.Graph) -> ir.Value | None:
    """The graph input that ``value`` is a view of (past KV), if any."""
    for _ in range(8):
        if value in graph.inputs:
            return value
        node = value.producer()
        if node is None or node.op_type not in (*VIEW_OPS, "Gather", "Slice"):  # Slice: a sliding-window cache
            return None
        value = node.inputs[0]
    return None


REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "LayerNormalization",
                        "SimplifiedLayerNormalization", "RMSNormalization"})

Step = Callable[[ir.Node, ir.Value, Branch, ir.Graph], "ir.Value | NoMatch | None"]


def _row_view(dims: list[int | None], src: ir.Shape | None, width: int | None) -> bool:
    """A view that keeps every row's features whole and regroups only the rows: a Gemm's flattened
    ``[B*S, W]`` (or ``[B, S, W]``) -> ``[B, 1, S, W]`` (GPT-BigCode's unsqueezed projection, written as a
    Reshape once onnx-simplifier fixed the shapes). It splits no heads: its ``S`` is not a head count. The
    entry before the last must be a known size > 1: ``[B, S, -1, Dh]`` of a one-head-wide ``[B, S, Dh]`` (a
    layer head-pruned to one head) is a head split."""
    return (src is not None and src.rank() in (2, 3) and width is not None and len(dims) >= 3
            and dims[-1] == width and isinstance(dims[-2], int) and dims[-2] > 1)


def _view(node, value, branch, graph):
    branch.views.append(node)
    if node.op_type == "Reshape":
        dims = _reshape_target(node)
        src = node.inputs[0].shape
        width = src.dims[-1] if src is not None and isinstance(src.dims[-1], int) else None
        if _row_view(dims, src, width):
            return node.inputs[0]
        if len(dims) == 5 and 3 in dims[2:4] and dims[-1] is not None:
            # packed [B, S, 3, H, Dh] (ModernBERT) or [B, S, H, 3, Dh] (BLOOM); -1 heads from the width
            h = dims[3] if dims[2] == 3 else dims[2]
            branch.heads = h or (width // (3 * dims[4]) if width and width % (3 * dims[4]) == 0 else None)
            branch.head_dim, branch.pack_ways = dims[4], 3
        if len(dims) == 4 and src is not None and src.rank() == 3 and dims[2] and dims[3] is None and width:
            dims[3] = width // dims[2] if width % dims[2] == 0 else None  # [B, S, H, -1]
        if len(dims) == 4 and dims[-1] is not None:
            # Walking backwards: the last rank-4 reshape seen is the one next to the projection,
            # [B, S, H*Dh] -> [B, S, H, Dh] (heads from the widths when the target leaves them
            # symbolic); a GQA repeat reshapes [B, G, n, S, Dh] -> [B, H, S, Dh] closer to the core.
            width = width if src is not None and src.rank() == 3 else None
            if src is not None and src.rank() == 3:
                heads = dims[2] or (width // dims[3] if isinstance(width, int) and width % dims[3] == 0 else None)
            else:
                heads = dims[2] if dims[1] is None or dims[2] is not None else dims[1]
            if branch.head_slice is not None and isinstance(heads, int):
                heads = len(range(heads)[slice(*branch.head_slice)])
            per_head_packed = branch.head_dim is not None and dims[3] != branch.head_dim and branch.packed is not None
            branch.heads, branch.head_dim = heads, branch.head_dim if per_head_packed else dims[3]
            branch.flat_width = width if isinstance(width, int) else None
            if branch.head_slice is not None and isinstance(heads, int) and branch.head_dim:
                branch.flat_width = heads * branch.head_dim  # this branch's share of the fused width
        if len(dims) == 3 and src is not None and src.rank() == 3 and branch.heads is None and width:
            _folded_split(node, dims, width, branch)
        if len(dims) == 4 and dims[-1] is None and dims[1] and dims[2] and branch.heads is None:
            # channels-first [B, H*Dh, S] -> [B, H, Dh, S] (pointwise convolutions: SqueezeBERT)
            branch.heads, branch.head_dim, branch.flat_width = dims[1], dims[2], dims[1] * dims[2]
    if node.op_type == "Expand":
        branch.repeated = True
    return node.inputs[VIEW_OPS[node.op_type]]


def _shape_scalar(value: ir.Value | None, depth: int = 6) -> int | None:
    """A one-element shape piece's value: a constant, a static dim read by ``Gather(Shape(x), i)``, or
    ``Mul`` / ``Div`` of such (through Unsqueeze / Squeeze / Reshape / Cast); None when symbolic."""
    a = const_array(value, max_elements=1) if value is not None else None
    if a is not None:
        return int(a.reshape(-1)[0]) if a.size == 1 else None
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return None
    if node.op_type in ("Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity"):
        return _shape_scalar(node.inputs[0], depth - 1)
    if node.op_type == "Gather" and (shape := node.inputs[0].producer()) is not None and shape.op_type == "Shape":
        x, i = shape.inputs[0], _shape_scalar(node.inputs[1], depth - 1)
        start = shape.attributes.get_int("start", 0)
        if x.shape is None or i is None or start < 0:
            return None
        dim = x.shape.dims[start + i] if -x.shape.rank() <= start + i < x.shape.rank() else None
        return dim if isinstance(dim, int) else None
    if node.op_type in ("Mul", "Div"):
        a, b = (_shape_scalar(v, depth - 1) for v in node.inputs)
        return None if a is None or b is None or (node.op_type == "Div" and (b == 0 or a % b)) else (
            a * b if node.op_type == "Mul" else a // b)
    return None


def _fold_factor(value: ir.Value | None, depth: int = 4) -> int | None:
    """``c`` of a shape piece ``Mul(n, c)`` (a batch-like size times a constant), through views."""
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return None
    if node.op_type in ("Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity"):
        return _fold_factor(node.inputs[0], depth - 1)
    if node.op_type != "Mul":
        return None
    factors = [_shape_scalar(v) for v in node.inputs]
    return next((f for f in factors if f is not None), None) if factors.count(None) == 1 else None


def _folded_split(node: ir.Node, dims: list[int | None], width: int, branch: Branch) -> None:
    """A head split straight into the batch axis, ``[X, Y, H*Dh] -> [X, Y*H, Dh]`` (or ``[Y*H, X, Dh]``):
    torch's ``multi_head_attention_forward`` (WavLM) views the sequence-first projection so, with no
    4-D view. Heads when the target's last entry is the head size (a constant, or the width read from a
    shape divided by a constant) and another entry is a size times the same head count."""
    concat = node.inputs[1].producer()
    pieces = list(concat.inputs) if concat is not None and concat.op_type == "Concat" else []
    dh = dims[2] or (_shape_scalar(pieces[2]) if len(pieces) == 3 else None)
    if not dh or width % dh or width // dh < 2:
        return
    heads = width // dh
    if not any(_fold_factor(p) == heads for p in pieces[:2]):
        return
    branch.heads, branch.head_dim, branch.flat_width = heads, dh, width


def _add(node, value, branch, graph):
    found = match(ROPE, value)
    if found:
        branch.rope, branch.rope_cos = node, found["cos"]
        return found["x"]
    a, b = node.inputs[0], node.inputs[1]
    if is_weight(b) or is_weight(a):
        bias, data = (b, a) if is_weight(b) else (a, b)
        producer = data.producer()
        quantized = quantized_projection(data)
        if quantized is None and (producer is None or producer.op_type not in ("MatMul", "Gemm")) and not is_nbits(
                producer):
            return NoMatch(f"bias Add '{node.name}' does not follow a projection")
        branch.projection = quantized or _projection(producer)
        if isinstance(branch.projection, NoMatch):
            return branch.projection
        branch.projection.bias = bias
        return None
    return NoMatch(f"Add '{node.name}' between projection and attention is neither RoPE nor a bias")


def cache_concat(node: ir.Node | None, graph: ir.Graph) -> KVCache | None:
    """``node`` as a KV-cache step: a two-piece ``Concat`` one of whose pieces is a view of a graph input
    (the past); the present is the graph output that is a view of its result, if any."""
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        return None
    past = next((p for piece in node.inputs if piece is not None and (p := _graph_input(piece, graph)) is not None),
                None)
    if past is None:
        return None
    present = next((o for o in graph.outputs if _is_view_of(o, node.outputs[0])), None)
    return KVCache(past=past, concat=node, axis=node.attributes["axis"].value, present=present)


def _concat(node, value, branch, graph):
    cache = cache_concat(node, graph)
    if cache is not None:
        branch.cache = cache
        i = next(j for j, p in enumerate(node.inputs) if p is not None and _graph_input(p, graph) is cache.past)
        return node.inputs[1 - i]
    kinds = _assembly_pieces(node)
    if isinstance(kinds, NoMatch):
        return NoMatch(f"Concat '{node.name}' is not a KV-cache concat with a past input, nor {kinds.reason}")
    branch.assembly = Assembly(node, kinds.index("per_head"),
                               [p for p, kind in zip(node.inputs, kinds, strict=True) if kind == "shared"])
    return node.inputs[branch.assembly.per_head]


def _assembly_pieces(node: ir.Node) -> list[str] | NoMatch:
    """Each Concat input's kind in a key/query assembly (:data:`ASSEMBLY`), or why it is none."""
    out = node.outputs[0].shape
    rank = out.rank() if out is not None else None
    axis = node.attributes.get_int("axis", 0)
    if rank != 4 or axis not in (-1, 3):
        return NoMatch("a last-axis per-head + shared assembly (not the last axis of a rank-4 tensor)")
    kinds = [next((kind for kind, test in ASSEMBLY.items() if test(p)), "?") for p in node.inputs]
    if kinds.count("per_head") != 1 or "shared" not in kinds or "?" in kinds:
        return NoMatch(f"a per-head + shared assembly (pieces: {', '.join(kinds)}; need one per-head piece and "
                       "pieces broadcast from one head)")
    return kinds


def _is_view_of(out: ir.Value, value: ir.Value) -> bool:
    for _ in range(4):
        if out is value:
            return True
        node = out.producer()
        if node is None or node.op_type not in VIEW_OPS:
            return False
        out = node.inputs[0]
    return out is value


def _scale(node, value, branch, graph):
    quantized = quantized_projection(value)
    if quantized is not None:
        branch.projection = quantized
        return None
    for data, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        s = const_array(other)
        if s is not None and s.size == 1 and (node.op_type == "Mul" or other is node.inputs[1]):
            branch.pre_scale = float(s.reshape(())) if node.op_type == "Mul" else 1.0 / float(s.reshape(()))
            return data
    return NoMatch(f"{node.op_type} '{node.name}' with no scalar constant")


def _split(node, value, branch, graph):
    if node.op_type == "Split":
        branch.packed = list(node.outputs).index(value)
        sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        axis = node.attributes.get_int("axis", 0)
        rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
        if sizes is not None and sizes.size == len(node.outputs):
            sizes = [int(x) for x in sizes.reshape(-1)]
            if (axis == -1 or rank is not None and axis == rank - 1) and branch.flat_width is None:
                branch.flat_width = sizes[branch.packed]  # multi-query: K/V narrower than Q
            elif rank == 4 and axis in (2, -2):  # [B, S, H + 2*G, Dh] split on the head axis (Falcon)
                start = sum(sizes[:branch.packed])
                branch.head_slice = (start, start + sizes[branch.packed])
    else:  # Slice: the start offset along the last axis identifies q/k/v in a packed projection
        starts = const_array(node.inputs[1])
        branch.packed = int(starts.reshape(-1)[0]) if starts is not None else -1
    axes = const_array(node.inputs[3]) if node.op_type == "Slice" and len(node.inputs) > 3 else None
    ends = const_array(node.inputs[2]) if node.op_type == "Slice" else None
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    if axes is not None and axes.size == 1 and ends is not None and rank == 4 and int(axes.reshape(())) in (2, -2):
        # [B, S, H + 2*G, Dh] sliced on the head axis (Falcon multi-query): heads = the slice's length
        branch.head_slice = (int(const_array(node.inputs[1]).reshape(())), int(ends.reshape(())))
    last = value.shape.dims[-1] if value.shape is not None and value.shape.rank() == 4 else None
    if branch.head_dim is None and isinstance(last, int):
        branch.head_dim = last  # per-head packing [B, S, H, 3*Dh] split after the head split
    branch.views.append(node)
    return node.inputs[0]


def is_weight(value: ir.Value | None) -> bool:
    """A constant, a slice of one taken by a SpAtten op (head pruning gathers kept heads' weights), or a
    dequantized one (``DequantizeLinear`` of constant int8/int4 weights: QDQ-format quantization)."""
    if value is None:
        return False
    if const_array(value) is not None or value.const_value is not None:
        return True
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        return all(i is None or i.const_value is not None or const_array(i) is not None for i in producer.inputs)
    return producer is not None and producer.domain == "spatten" and const_array(producer.inputs[0]) is not None


def _projection(node: ir.Node) -> Projection | NoMatch:
    weight = node.inputs[1]
    transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
    producer = weight.producer()
    if not is_weight(weight) and producer is not None and producer.op_type == "Transpose":
        weight, transposed = producer.inputs[0], True
    if not is_weight(weight):
        return NoMatch(f"{node.op_type} '{node.name}' weight is not a constant")
    dq = weight.producer()
    if weight.shape is None and dq is not None and dq.op_type == "DequantizeLinear":
        weight.shape = dq.inputs[0].shape  # the dequantized weight has its constant's shape (passes forget it)
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    return Projection(node=node, input=_strip_reshapes(node.inputs[0]), weight=weight, bias=bias,
                      transposed_weight=transposed)


# Ops that compute each token's row from that token's row alone: a norm (RMSNorm decomposed or fused), a
# split of the features, a cast; op -> the inputs that carry the data (None: every non-constant input).
PER_TOKEN: dict[str, tuple[int, ...] | None] = {
    **{op: None for op in ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Cast", "Identity")},
    **{op: (0,) for op in ("Split", "Reshape", "SimplifiedLayerNormalization", "LayerNormalization",
                           "RMSNormalization", "ReduceMean")},
}


def token_source(value: ir.Value, limit: int = 40) -> ir.Value:
    """The hidden state ``value`` is computed from token by token through one down-projection with a
    constant weight (and norms, feature splits): multi-head latent attention's Q and K/V projections read
    ``norm(q_a_proj(x))`` and ``norm(kv_a_proj(x)[..., :r])``, both per-token functions of ``x``. ``value``
    itself when it is not such a chain (a graph input, anything mixing tokens: SegFormer's strided Conv)."""
    sources, todo, seen = set(), [value], {id(value)}
    found: ir.Value | None = None
    while todo and len(seen) < limit:
        node = todo.pop().producer()
        if node is None:
            return value
        if node.op_type in ("MatMul", "Gemm") and not isinstance(_projection(node), NoMatch):
            found = _strip_reshapes(node.inputs[0])
            sources.add(id(found))
            continue
        if node.op_type not in PER_TOKEN or node.op_type == "ReduceMean" and not _last_axis_reduce(node):
            return value
        slots = PER_TOKEN[node.op_type]
        ins = [node.inputs[i] for i in slots] if slots is not None else list(node.inputs)
        for i in ins:
            if i is not None and id(i) not in seen and not is_weight(i) and const_array(i) is None:
                seen.add(id(i))
                todo.append(i)
    return found if len(sources) == 1 and not todo else value


def latent_caches(k: Branch | None, graph: ir.Graph) -> list[KVCache]:
    """The caches a layer keeps ahead of K/V instead of K/V (multi-head latent attention, transformers 5's
    DeepSeek): ``kv_b_proj(Concat(past_latent, latent))`` - a cache of K's projection input, shared by K and
    V - and ``Expand(Concat(past_k_pe, k_pe))`` - the RoPE key piece shared by every head of K's assembly.
    Each is a :func:`cache_concat` reached through views; empty for a K/V cache read at the core."""
    if k is None or k.cache is not None:
        return []
    sources = ([k.projection.input] if k.projection is not None else []) + (k.assembly.shared if k.assembly else [])
    found = []
    for value in sources:
        for _ in range(8):  # through views to the concat
            node = value.producer()
            if node is None or node.op_type not in VIEW_OPS:
                break
            value = node.inputs[VIEW_OPS[node.op_type]]
        if (cache := cache_concat(value.producer(), graph)) is not None:
            found.append(cache)
    return found


def _last_axis_reduce(node: ir.Node) -> bool:
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    axes = axes if axes is not None else node.attributes.get_ints("axes", None)
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    return axes is not None and len(list(np.asarray(axes).reshape(-1))) == 1 and int(
        np.asarray(axes).reshape(-1)[0]) in (-1, (rank or 0) - 1)


def _strip_reshapes(value: ir.Value) -> ir.Value:
    while value.producer() is not None and value.producer().op_type == "Reshape":
        value = value.producer().inputs[0]
    return value


def quantized_projection(value: ir.Value | None) -> Projection | None:
    """onnxruntime's dynamic int8 quantization (``quantize_dynamic``) writes a projection as::

        x_q, x_scale, x_zp = DynamicQuantizeLinear(x)
        value = Mul(Cast(MatMulInteger(x_q, W_q, x_zp, W_zp), float), Mul(x_scale, W_scale))

    ``value`` is the float projection output; the Projection's node is the MatMulInteger (its weight
    input is ``W_q``) and its input the float ``x``. Passes that slice projection weights check the
    node's op type and refuse. An activation quantized already (the int8 embedding table's Gather)
    has no DynamicQuantizeLinear; ``x`` is then its DequantizeLinear."""
    mul = value.producer() if value is not None else None
    if mul is None or mul.op_type != "Mul":
        return None
    for data in mul.inputs:
        cast = data.producer() if data is not None else None
        mmi = cast.inputs[0].producer() if cast is not None and cast.op_type == "Cast" else None
        if mmi is None or mmi.op_type != "MatMulInteger" or not is_weight(mmi.inputs[1]):
            continue
        dql = mmi.inputs[0].producer()
        if dql is not None and dql.op_type == "DynamicQuantizeLinear":
            return Projection(node=mmi, input=_strip_reshapes(dql.inputs[0]), weight=mmi.inputs[1])
        # an input quantized already (a Gather of the int8 embedding table): its float form is the
        # DequantizeLinear the rest of the model reads (OLMo 2's layer 0 reads the embeddings directly)
        dq = next((u.node for u in mmi.inputs[0].uses() if u.node.op_type == "DequantizeLinear"), None)
        if dq is not None:
            return Projection(node=mmi, input=_strip_reshapes(dq.outputs[0]), weight=mmi.inputs[1])
    return None


def column_constants(mmi: ir.Node) -> list[tuple[ir.Node, int]] | None:
    """The input slots holding an int8 projection's per-output-column constants (quantize_dynamic
    with ``per_channel=True``: ``W_zp`` [N] on the MatMulInteger, ``W_scale`` [N] in the scale
    ``Mul(x_scale, W_scale)``), which slicing the weight's columns must slice too; [] when every
    zero point and scale is one per tensor (or ``mmi`` is no MatMulInteger), None when one is neither a
    constant nor the activation's scalar scale."""
    def scalar(v: ir.Value) -> bool:  # DynamicQuantizeLinear's scale is a scalar by definition
        p = v.producer()
        return (p is not None and p.op_type == "DynamicQuantizeLinear") or (
            v.shape is not None and all(d == 1 for d in v.shape.dims))

    def column_slots(node: ir.Node, indices: list[int]) -> list[tuple[ir.Node, int]] | None:
        slots = []
        for i in indices:
            a = const_array(node.inputs[i])
            if a is None and not scalar(node.inputs[i]):
                return None
            if a is not None and a.size > 1:
                slots.append((node, i))
        return slots

    if mmi.op_type != "MatMulInteger":
        return []
    zero_point = column_slots(mmi, [3]) if len(mmi.inputs) > 3 and mmi.inputs[3] is not None else []
    cast = next((u.node for u in mmi.outputs[0].uses() if u.node.op_type == "Cast"), None)
    mul = next((u.node for u in cast.outputs[0].uses() if u.node.op_type == "Mul"), None) if cast else None
    if mul is None or zero_point is None:
        return None
    i = next(i for i, v in enumerate(mul.inputs) if v is not cast.outputs[0])
    scale, combine = mul.inputs[i], mul.inputs[i].producer()
    if const_array(scale) is None and combine is not None and combine.op_type == "Mul":
        scales = column_slots(combine, [0, 1])  # Mul(x_scale, W_scale)
    else:
        scales = column_slots(mul, [i])
    return None if scales is None else [*zero_point, *scales]


def _matmul(node, value, branch, graph):
    proj = _projection(node)
    if isinstance(proj, NoMatch):
        return proj
    branch.projection = proj
    return None


STEPS: dict[str, Step] = {
    **{op: _view for op in VIEW_OPS},
    "Add": _add,
    "Concat": _concat,
    "Mul": _scale,
    "Div": _scale,
    "Split": _split,
    "Slice": _split,
    "MatMul": _matmul,
    "Gemm": _matmul,
}


# int4/int8 weights (onnxruntime-genai's model builder): a projection whose weight is packed blocks
# [N, k_blocks, blob]; passes that read projection weights check ``node.op_type`` (prune-heads slices
# them whole blocks at a time, :mod:`.nbits_blocks`).
MS_STEPS: dict[tuple[str, str], Step] = {("com.microsoft", "MatMulNBits"): _matmul}


def trace_branch(value: ir.Value, graph: ir.Graph, max_steps: int = 32) -> Branch | NoMatch:
    """Follow ``value`` back to its projection (or a graph input, for cross-attention)."""
    branch = Branch(value=value)
    for _ in range(max_steps):
        node = value.producer()
        if node is None:
            return branch.finish()  # a graph input: no projection in this graph
        step = STEPS.get(node.op_type) if node.domain in ("", "ai.onnx") else MS_STEPS.get((node.domain, node.op_type))
        nxt = step(node, value, branch, graph) if step is not None else NoMatch(
            f"unexpected {node.op_type} '{node.name}' between projection and attention")
        if isinstance(nxt, NoMatch):
            return _structural(value, branch, graph, nxt)
        if nxt is None:
            return branch.finish()
        value = nxt
    return NoMatch("no projection within 32 ops")


def _structural(value: ir.Value, branch: Branch, graph: ir.Graph, why: NoMatch) -> Branch | NoMatch:
    """The table could not explain ``value``: find its projection through a per-head transform."""
    from .transform_region import transform_region

    found = transform_region(value, graph)
    if isinstance(found, NoMatch):
        return NoMatch(f"{why.reason}; {found.reason}")
    node, region = found
    proj = quantized_projection(node.outputs[0]) or _projection(node)
    if isinstance(proj, NoMatch):
        return proj
    first = next((u.node for u in node.outputs[0].uses()), None)
    if first is not None and first.op_type == "Add" and first in region and len(node.outputs[0].uses()) == 1:
        bias = next((i for i in first.inputs if is_weight(i)), None)
        if bias is not None:  # the projection's bias, sliced with its weight by head pruning
            proj.bias = bias
            region.remove(first)
    inside = {id(n) for n in region}
    for n in region:
        if n.op_type == "Concat" and any(i is not None and _graph_input(i, graph) is not None for i in n.inputs):
            return NoMatch(f"{why.reason}; KV-cache Concat '{n.name}' inside a per-head transform")
    branch.projection, branch.transform = proj, region
    split = next((i for i, n in enumerate(region) if n.op_type == "Reshape"), len(region))
    branch.cross_head = next((n for n in region[:split] if n.op_type in REDUCTIONS), None)
    for n in reversed(region):  # from the core outwards, as the table walks
        if n.op_type in VIEW_OPS:
            _view(n, n.outputs[0], branch, graph)
        elif (piece := _head_axis_piece(n, inside)) is not None:
            _split(n, piece, branch, graph)  # this branch's heads of a [B, S, H + 2G, Dh] packing (Falcon)
    packed = _per_head_slice(node, region)
    if packed is not None and branch.head_dim and 3 * packed[1] == branch.head_dim:
        branch.packed, branch.head_dim = packed  # [B, S, H, 3*Dh] sliced into q, k, v per head
    outside = [i for n in region for i in n.inputs if i is not None and const_array(i) is None
               and i.producer() is not node and id(i.producer()) not in inside and i is not proj.bias]
    if branch.rope is None and any(_positional(i, graph) for i in outside):
        branch.rope = region[-1]  # reads positions: a rotary/positional transform
    return branch.finish()


def _head_axis_piece(node: ir.Node, inside: set[int]) -> ir.Value | None:
    """The output of a ``Split`` / ``Slice`` on the head axis of a head-split view ``[B, S, H', Dh]`` that
    the region goes on from (its other pieces are the other branches' heads), else None. A rotary's
    half-splits read the per-head tensor after its transpose, not the view."""
    view = node.inputs[0].producer() if node.op_type in ("Split", "Slice") and node.inputs else None
    if view is None or view.op_type != "Reshape" or node.inputs[0].shape is None or node.inputs[0].shape.rank() != 4:
        return None
    if node.op_type == "Split":
        axes = [node.attributes.get_int("axis", 0)]
    else:
        a = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        axes = a.reshape(-1).tolist() if a is not None else []
    if axes not in ([2], [-2]):
        return None
    pieces = [o for o in node.outputs if any(id(u.node) in inside for u in o.uses())]
    return pieces[0] if len(pieces) == 1 else None


def _positional(value: ir.Value, graph: ir.Graph, limit: int = 60) -> bool:
    """Computed from positions: a Range, Cos/Sin, or a graph input (position_ids) - not a shape-derived scale."""
    todo, seen = [value], 0
    while todo and seen < limit:
        v = todo.pop()
        seen += 1
        if v in graph.inputs:
            return True
        p = v.producer()
        if p is None or p.op_type in ("Shape", "Size"):
            continue
        if p.op_type in ("Range", "Cos", "Sin"):
            return True
        todo.extend(i for i in p.inputs if i is not None)
    return False


def _per_head_slice(proj: ir.Node, region: list[ir.Node]) -> tuple[int, int] | None:
    """(start, width) of the first last-axis Slice after the projection's head split, if any."""
    for n in region:
        if n.op_type == "Slice":
            starts, ends = const_array(n.inputs[1]), const_array(n.inputs[2])
            axes = const_array(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] is not None else None
            rank = n.inputs[0].shape.rank() if n.inputs[0].shape is not None else None
            if starts is None or ends is None or starts.size != 1 or axes is None or axes.size != 1:
                return None
            if int(axes.reshape(())) not in (-1, (rank or 0) - 1):
                return None
            return int(starts.reshape(())), int(ends.reshape(())) - int(starts.reshape(()))
    return None
