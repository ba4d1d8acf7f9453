"""unfuse-ort's rewrites for the ops of onnxruntime-genai's model builder (issue #16): the
com.microsoft ``GroupQueryAttention`` and ``RotaryEmbedding`` contrib ops -> standard ONNX ops in the
shape the attention finder and the rewrites know (HF's rotate-half RoPE, past/present Concat, GQA
repeat by Unsqueeze/Expand/Reshape, an additive causal bias before the Softmax)::

    GroupQueryAttention(qkv | q,k,v, past_k, past_v, seqlens_k, total_len, cos, sin; N, kvN, scale)
        q, k, v  = Split(qkv, [N*H, kvN*H, kvN*H]) -> Reshape [B, S, n, H] -> Transpose [B, n, S, H]
        q, k     = RoPE(q, k; Concat(cos, cos)[position_ids], Concat(sin, sin)[position_ids])   (do_rotary)
        present  = Concat(past, k | v, axis 2)                        T = past + S
        scores   = MatMul(q, Transpose(repeat(present_k))) * scale   [softcap: c * tanh(scores / c)]
        Y        = MatMul(Softmax(scores + causal(T - S), -1), repeat(present_v)) -> [B, S, N*H]
        [head_sink / smooth_softmax: P = Softmax(Concat(s, sink) - rowmax)[..., :-1], sink 0 for smooth]
    RotaryEmbedding(x, position_ids, cos, sin; interleaved=0) -> the same RoPE on [B, S, n, H] or [B, n, S, H]
    ONNX RotaryEmbedding-23(x, cos, sin[, position_ids]; interleaved=0) -> the same RoPE (onnxscript's fusion
        in torch's default opset-23 export; without position_ids the caches are the angles [B|1, S, rd/2])

Positions: GQA computes them inside (``seqlens_k + 1 - S + s``, seqlens_k = the mask's sum - 1); the
decomposition reads a ``position_ids`` input [B, S] instead (added when the graph has none), so a
rewrite that shortens the cache (evict-kv) keeps every token's true position. With the positions GQA
would compute and the cache layout it reads, it is exact: the past buffer holds exactly the past
tokens of every row (``attention_mask`` all ones: seqlens_k = total_sequence_length - 1), which is how
spattenc feeds a cache. genai's shared past/present buffer (``past_present_share_buffer``, a buffer of
max_length with the length in seqlens_k) and right-padded batches are GQA layouts this form does not
express: run the decomposed model with ``past_present_share_buffer: false``. Refused with the reason:
interleaved rotary, a local window with a past buffer (not exact after eviction either),
attention_bias, a head_sink that is not a constant, qk output, and packed batching.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array

MIN = float(np.finfo(np.float32).min)
I64 = ir.DataType.INT64


def _in(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _refuse(node: ir.Node, why: str) -> OptionError:
    return OptionError(f"{node.op_type} '{node.name}': {why}; not decomposed (refused, not rewritten)")


def _i64(e: GraphEditor, hint: str, values: list[int] | int) -> ir.Value:
    return e.const(hint, np.array(values, np.int64))


def position_ids(e: GraphEditor) -> ir.Value:
    """The graph's ``position_ids`` input [batch, sequence_length] int64 (added if missing)."""
    for v in e.graph.inputs:
        if v.name == "position_ids":
            return v
    v = ir.Value(name="position_ids", shape=ir.Shape(["batch_size", "sequence_length"]), type=ir.TensorType(I64))
    e.graph.inputs.append(v)
    return v


def _dim_int(v: ir.Value | None, axis: int) -> int | None:
    if v is None:
        return None
    if v.const_value is not None:
        return int(v.const_value.shape[axis])
    d = v.shape.dims[axis] if v.shape is not None and v.shape.rank() > abs(axis) else None
    return d if isinstance(d, int) else None


def _angles(e: GraphEditor, cos: ir.Value, sin: ir.Value, pos: ir.Value, axis: int) -> tuple[ir.Value, ir.Value]:
    """cos/sin caches [P, rd/2] at ``pos`` [B, S] -> [B, 1, S, rd] (axis 1) or [B, S, 1, rd] (axis 2)."""
    out = []
    for table in (cos, sin):
        half = e.op("Gather", [table, pos])  # [B, S, rd/2]
        full = e.op("Concat", [half, half], axis=-1)  # HF's cat(freqs, freqs)
        out.append(e.op("Unsqueeze", [full, _i64(e, "axis", [axis])]))
    return out[0], out[1]


def _rope(e: GraphEditor, x: ir.Value, cos: ir.Value, sin: ir.Value, rd: int, head: int) -> ir.Value:
    """x * cos + rotate_half(x) * sin on the first ``rd`` features of the last axis; the rest passes."""
    part = x if rd == head else e.op("Slice", [x, _i64(e, "s0", [0]), _i64(e, "rd", [rd]), _i64(e, "ax", [-1])])
    lo = e.op("Slice", [part, _i64(e, "s0", [0]), _i64(e, "h", [rd // 2]), _i64(e, "ax", [-1])])
    hi = e.op("Slice", [part, _i64(e, "h", [rd // 2]), _i64(e, "rd", [rd]), _i64(e, "ax", [-1])])
    rotated = e.op("Concat", [e.op("Neg", [hi]), lo], axis=-1)
    out = e.op("Add", [e.op("Mul", [part, cos]), e.op("Mul", [rotated, sin])])
    if rd == head:
        return out
    rest = e.op("Slice", [x, _i64(e, "rd", [rd]), _i64(e, "end", [head]), _i64(e, "ax", [-1])])
    return e.op("Concat", [out, rest], axis=-1)


def _heads(e: GraphEditor, x: ir.Value, n: int, h: int) -> ir.Value:
    """[B, S, n*h] -> [B, n, S, h]."""
    return e.op("Transpose", [e.op("Reshape", [x, _i64(e, "bsnh", [0, 0, n, h])])], perm=[0, 2, 1, 3])


def _repeat(e: GraphEditor, x: ir.Value, kv: int, group: int, h: int) -> ir.Value:
    """[B, kvN, T, h] -> [B, kvN*group, T, h], each KV head repeated for its query group."""
    if group == 1:
        return x
    shape = e.op("Shape", [x])
    b, t = e.op("Slice", [shape, _i64(e, "z", [0]), _i64(e, "o", [1])]), e.op("Slice", [shape, _i64(e, "two", [2]),
                                                                               _i64(e, "three", [3])])
    five = e.op("Concat", [b, _i64(e, "kv", [kv]), _i64(e, "g", [group]), t, _i64(e, "h", [h])], axis=0)
    big = e.op("Expand", [e.op("Unsqueeze", [x, _i64(e, "a2", [2])]), five])
    four = e.op("Concat", [b, _i64(e, "n", [kv * group]), t, _i64(e, "h", [h])], axis=0)
    return e.op("Reshape", [big, four])


def _causal(e: GraphEditor, q_len: ir.Value, total: ir.Value, window: int) -> ir.Value:
    """[S, T] additive bias: 0 where key j <= (T - S) + i (and j > that - window), float32 min elsewhere."""
    zero, one = _i64(e, "z", 0), _i64(e, "o", 1)
    rows = e.op("Add", [e.op("Range", [zero, q_len, one]), e.op("Sub", [total, q_len])])
    cols = e.op("Range", [zero, total, one])
    r, c = e.op("Unsqueeze", [rows, _i64(e, "a1", [1])]), e.op("Unsqueeze", [cols, _i64(e, "a0", [0])])
    ok = e.op("LessOrEqual", [c, r])
    if window > 0:
        ok = e.op("And", [ok, e.op("Greater", [c, e.op("Sub", [r, _i64(e, "w", window)])])])
    return e.op("Where", [ok, e.const("zero", np.float32(0)), e.const("min", np.float32(MIN))])


def _sink_softmax(e: GraphEditor, scores: ir.Value, sink: np.ndarray) -> ir.Value:
    """GQA's head_sink / smooth_softmax as GPT-OSS's eager attention writes it (the form discovery reads,
    :mod:`.score_sink`): each head's sink logit a column beside the scores, the row max subtracted,
    the column sliced off the probabilities."""
    shape = e.op("Concat", [e.op("Shape", [scores], start=0, end=3), _i64(e, "one", [1])], axis=0)
    column = e.op("Expand", [e.const("head_sink", sink.astype(np.float32).reshape(1, -1, 1, 1)), shape])
    combined = e.op("Concat", [scores, column], axis=-1)
    row_max = (e.op("ReduceMax", [combined, _i64(e, "axis", [-1])], keepdims=1)
               if e.model.opset_imports.get("", 0) >= 18 else e.op("ReduceMax", [combined], axes=[-1], keepdims=1))
    shifted = e.op("Sub", [combined, row_max])
    return e.op("Slice", [e.op("Softmax", [shifted], axis=-1), _i64(e, "zero", [0]), _i64(e, "last", [-1]),
                          _i64(e, "axis", [-1])])


def _split_packed(e: GraphEditor, qkv: ir.Value, widths: list[int]) -> tuple[ir.Value, ...]:
    """q, k, v from the packed projection: three MatMuls over the weight's column blocks when it is
    a plain constant MatMul (so head pruning can slice each), else a Split of its output."""
    node = qkv.producer()
    w = node.inputs[1].const_value if node is not None and node.op_type == "MatMul" and node.domain == "" else None
    if w is None or len(qkv.uses()) != 1 or w.shape.rank() != 2 or w.shape[1] != sum(widths):
        return e.op("Split", [qkv, _i64(e, "split", widths)], axis=-1, outputs=3)
    array, start, out = w.numpy(), 0, []
    for part, width in zip(("q", "k", "v"), widths):
        out.append(e.op("MatMul", [node.inputs[0], e.const(f"{part}_proj", array[:, start:start + width].copy())],
                        hint=f"{part}_proj"))
        start += width
    return tuple(out)


def group_query_attention(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    a = node.attributes
    n, kv = a.get_int("num_heads", 0), a.get_int("kv_num_heads", 0)
    if _in(node, 10) is not None:
        raise _refuse(node, "input attention_bias is not decomposed")
    sink = _in(node, 11)
    if sink is not None and const_array(sink) is None:
        raise _refuse(node, "a head_sink computed at run time is not decomposed (a parameter is)")
    qk_used = len(node.outputs) > 3 and bool(node.outputs[3].uses())
    if a.get_int("qk_output", 0) or qk_used:
        raise _refuse(node, "qk output is not decomposed")
    if a.get_int("rotary_interleaved", 0):
        raise _refuse(node, "interleaved rotary is not decomposed (only rotate-half)")
    query, key, value, past_k, past_v = (_in(node, i) for i in range(5))
    window = a.get_int("local_window_size", -1)
    if window > 0 and past_k is not None:
        raise _refuse(node, f"a local window ({window}) over a KV cache: the buffer layout is GQA's own")
    if n <= 0 or kv <= 0 or n % kv:
        raise _refuse(node, f"num_heads {n} / kv_num_heads {kv}")
    width = _dim_int(query, -1)
    if key is None:  # packed [B, S, (N + 2 kvN) H]
        if width is None or width % (n + 2 * kv):
            raise _refuse(node, "packed QKV width unknown (needs a static last dimension)")
        h = width // (n + 2 * kv)
        q3, k3, v3 = _split_packed(e, query, [n * h, kv * h, kv * h])
    else:
        if width is None or width % n:
            raise _refuse(node, "query width unknown (needs a static last dimension)")
        h, q3, k3, v3 = width // n, query, key, value
    q, k, v = _heads(e, q3, n, h), _heads(e, k3, kv, h), _heads(e, v3, kv, h)
    for cache in (past_k, past_v, *node.outputs[1:3]):  # the builder leaves the head size symbolic
        if cache is not None and cache.shape is not None and cache.shape.rank() == 4 and not isinstance(
                cache.shape.dims[3], int):
            cache.shape = ir.Shape([*cache.shape.dims[:3], h])
    if a.get_int("do_rotary", 0):
        cos_cache, sin_cache = _in(node, 7), _in(node, 8)
        half = _dim_int(cos_cache, 1)
        if cos_cache is None or sin_cache is None or half is None:
            raise _refuse(node, "do_rotary without cos/sin caches of known width")
        pos = _in(node, 9) or position_ids(e)
        cos, sin = _angles(e, cos_cache, sin_cache, pos, 1)
        q, k = _rope(e, q, cos, sin, 2 * half, h), _rope(e, k, cos, sin, 2 * half, h)
    present_k = e.op("Concat", [past_k, k], axis=2) if past_k is not None else k
    present_v = e.op("Concat", [past_v, v], axis=2) if past_v is not None else v
    scale = a.get_float("scale", 0.0) or 1.0 / float(np.sqrt(h))
    keys_t = e.op("Transpose", [_repeat(e, present_k, kv, n // kv, h)], perm=[0, 1, 3, 2])
    scores = e.op("Mul", [e.op("MatMul", [q, keys_t]), e.const("scale", np.float32(scale))])
    softcap = a.get_float("softcap", 0.0)
    if softcap > 0:
        c = e.const("softcap", np.float32(softcap))
        scores = e.op("Mul", [e.op("Tanh", [e.op("Div", [scores, c])]), c])
    s_len = e.op("Shape", [q], start=2, end=3)
    t_len = e.op("Shape", [present_k], start=2, end=3)
    bias = _causal(e, e.op("Squeeze", [s_len]), e.op("Squeeze", [t_len]), window)
    scores = e.op("Add", [scores, bias])
    # a sink logit per head (smooth softmax: 0). onnxruntime writes every attribute of a model it saves,
    # smooth_softmax=-1 ("unset") included: only a positive value turns it on (its kernels test == 1)
    if sink is not None or a.get_int("smooth_softmax", 0) > 0:
        probs = _sink_softmax(e, scores, const_array(sink) if sink is not None else np.zeros(n, np.float32))
    else:
        probs = e.op("Softmax", [scores], axis=-1)
    y = e.op("MatMul", [probs, _repeat(e, present_v, kv, n // kv, h)])
    out = e.op("Reshape", [e.op("Transpose", [y], perm=[0, 2, 1, 3]), _i64(e, "bsd", [0, 0, n * h])])
    return [out, present_k, present_v]


def rotary_embedding(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    a = node.attributes
    if a.get_int("interleaved", 0) or a.get_int("is_packed_batching", 0):
        raise _refuse(node, "interleaved rotary / packed batching are not decomposed (only rotate-half)")
    x, pos, cos_cache, sin_cache = (_in(node, i) for i in range(4))
    half, rank = _dim_int(cos_cache, 1), x.shape.rank() if x.shape is not None else None
    if half is None or rank not in (3, 4) or pos is None:
        raise _refuse(node, "needs a 3-D or 4-D input and cos/sin caches of known width")
    rd = a.get_int("rotary_embedding_dim", 0) or 2 * half
    if a.get_float("scale", 1.0) != 1.0:
        raise _refuse(node, "a position scale other than 1 is not decomposed")
    if pos.shape is not None and pos.shape.rank() == 1:  # an offset: positions offset + arange(S)
        s_axis = 1 if rank == 3 else 2
        s_len = e.op("Squeeze", [e.op("Shape", [x], start=s_axis, end=s_axis + 1)])
        r = e.op("Range", [_i64(e, "z", 0), s_len, _i64(e, "o", 1)])
        pos = e.op("Unsqueeze", [e.op("Add", [r, e.op("Cast", [pos], to=I64)]), _i64(e, "a0", [0])])
    if rank == 4:  # [B, N, S, H]
        h = _dim_int(x, 3)
        cos, sin = _angles(e, cos_cache, sin_cache, pos, 1)
        return [_rope(e, x, cos, sin, rd, h or rd)]
    return _rope_3d(e, node, x, lambda axis: _angles(e, cos_cache, sin_cache, pos, axis), rd)


def _rope_3d(e: GraphEditor, node: ir.Node, x: ir.Value, angles, rd: int) -> list[ir.Value | None]:
    """RoPE on a 3-D x [B, S, n*H] (``num_heads`` n, else one head of width rd): as [B, S, n, H]."""
    n = node.attributes.get_int("num_heads", 0)
    width = _dim_int(x, 2)
    if width is None:
        raise _refuse(node, "3-D input of unknown width")
    h = width // n if n else rd
    x4 = e.op("Reshape", [x, _i64(e, "bsnh", [0, 0, width // h, h])])
    cos, sin = angles(2)
    return [e.op("Reshape", [_rope(e, x4, cos, sin, rd, h), _i64(e, "bsd", [0, 0, width])])]


def rotary_embedding_23(e: GraphEditor, node: ir.Node) -> list[ir.Value | None]:
    """ONNX's RotaryEmbedding (opset 23): x [B, n, S, H] or [B, S, n*H], caches [P, rd/2] read at
    position_ids, or (no position_ids) the angles themselves [B or 1, S, rd/2]."""
    if node.attributes.get_int("interleaved", 0):
        raise _refuse(node, "interleaved rotary is not decomposed (only rotate-half)")
    x, cos_cache, sin_cache, pos = (_in(node, i) for i in range(4))
    half, rank = _dim_int(cos_cache, -1), x.shape.rank() if x.shape is not None else None
    if half is None or rank not in (3, 4):
        raise _refuse(node, "needs a 3-D or 4-D input and cos/sin caches of known width")
    rd = node.attributes.get_int("rotary_embedding_dim", 0) or 2 * half

    def angles(axis: int) -> tuple[ir.Value, ir.Value]:
        if pos is not None:
            return _angles(e, cos_cache, sin_cache, pos, axis)
        return tuple(e.op("Unsqueeze", [e.op("Concat", [t, t], axis=-1), _i64(e, "axis", [axis])])
                     for t in (cos_cache, sin_cache))

    if rank == 4:
        cos, sin = angles(1)
        return [_rope(e, x, cos, sin, rd, _dim_int(x, 3) or rd)]
    return _rope_3d(e, node, x, angles, rd)
