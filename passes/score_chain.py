"""Structural fallback of the attention core: Softmax over the key axis of scores computed from one
MatMul of two activations, through any scale, mask and additive score terms (issue #16).

:data:`.attention_patterns.CORE` lists the chains exporters write for BERT/GPT/Llama. Other
families add position information to the scores (T5's and MPNet's relative-position buckets, ALiBi
slopes, DeBERTa's disentangled c2p/p2c terms) or cap them (Gemma 2's tanh). :func:`score_chain` walks
from the Softmax input to the score MatMul through :data:`CHAIN` ops:

    Add(scores, term)         # term: the padding/causal mask or an additive position bias
    Sub(scores, term)         # the same term subtracted (XLNet: scores - 1e30 * mask)
    Add(scores, c)            # a scalar constant: one shift for every score (TF's stable_softmax adds
                              # 1e-9), carried along
    Mul/Div(scores, scalar)   # the 1/sqrt(d) scale (several multiply)
    Where(cond, scores, fill) # a boolean mask (either branch)
    Tanh, Cast, Identity      # soft-capping, dtype changes: element-wise, carried along
    Max/Min/Clip(scores, c)   # clamping by a scalar (XGLM's max(scores, finfo.min))
    Reshape                   # [B*H, S, S] -> [B, H, S, S]: heads folded into the batch axis (BLOOM,
                              # DeBERTa-v2 use 3-D bmm); found, tagged layout=folded, and not rewritten
    Squeeze                   # a unit axis: tf2onnx's Einsum lowering (TF T5's scores) is
                              # Squeeze(Reshape(bmm, [B, H, S, S, 1]))
    Sub(x, ReduceMax(x, -1))  # the row max: softmax is invariant to it (GPT-OSS), carried along
    Concat(scores, sink)      # learned sink columns on the key axis, sliced off P after the Softmax
                              # (GPT-OSS; :mod:`.score_sink`)

An ``Add`` continues on the input that itself reaches the score MatMul through these ops; the other
input is a term. Where both do (LiLT adds its text and layout streams' scores before each stream's
Softmax), the one whose queries are projected from the hidden state the values are is the scores, the
other a term. A term is the *mask* when it is built from no float tensor other than scalars (masks
are booleans/integers with a fill value); otherwise it is a *position bias*, kept untouched as part
of the scores (rewrites that would have to gather or slice it refuse, with that reason).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import onnx_ir as ir

from spatten_compiler.match import NoMatch, const_array, is_const, match

from .attention_patterns import MASKED
from .attention_trace import Branch, trace_branch
from .score_sink import row_max_shift, sink_concat, sink_slice

PASS_THROUGH = frozenset({"Cast", "Identity", "Tanh", "Reshape", "Squeeze"})
CLAMPS = frozenset({"Max", "Min", "Clip"})
CHAIN = frozenset({"Add", "Mul", "Div", "Where", "Sub", "Concat", *PASS_THROUGH, *CLAMPS})
FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _score_matmul(node: ir.Node | None) -> bool:
    return (node is not None and node.op_type == "MatMul"
            and not is_const(node.inputs[0]) and not is_const(node.inputs[1]))


def _reaches_scores(value: ir.Value | None, depth: int = 10) -> bool:
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return False
    if _score_matmul(node):
        return True
    if node.op_type not in CHAIN:
        return False
    data = node.inputs[1:] if node.op_type == "Where" else node.inputs
    return any(_reaches_scores(i, depth - 1) for i in data if i is not None and not is_const(i))


def _score_node(value: ir.Value | None, depth: int = 10) -> ir.Node | None:
    """The score MatMul ``value`` is computed from through :data:`CHAIN` ops (the first one reached)."""
    for _ in range(depth):
        node = value.producer() if value is not None else None
        if node is None or _score_matmul(node):
            return node
        if node.op_type not in CHAIN:
            return None
        value = next((i for i in (node.inputs[1:] if node.op_type == "Where" else node.inputs)
                      if i is not None and _reaches_scores(i)), None)
    return None


def _stream(value: ir.Value | None, graph: ir.Graph) -> ir.Value | None:
    """The hidden state a Q or V value is projected from (its projection's input), or None."""
    branch = trace_branch(value, graph) if value is not None else None
    return branch.projection.input if isinstance(branch, Branch) and branch.projection is not None else None


def _own_scores(softmax: ir.Node, sides: list[ir.Value]) -> ir.Value | None:
    """Of two score sums added, the one whose queries are projected from the hidden state the values are:
    LiLT's text and layout streams each weigh their own values by their own scores plus the other
    stream's, which is then an additive term (like DeBERTa's position scores). None when not exactly one."""
    pvs = [u.node for u in softmax.outputs[0].uses() if u.node.op_type == "MatMul" and u.idx == 0]
    graph = softmax.graph
    values = _stream(pvs[0].inputs[1], graph) if len(pvs) == 1 and graph is not None else None
    if values is None:
        return None
    own = [s for s in sides if (qk := _score_node(s)) is not None and _stream(qk.inputs[0], graph) is values]
    return own[0] if len(own) == 1 else None


def _reads(value: ir.Value, target: ir.Value, limit: int = 200) -> bool:
    """Whether ``value`` is computed from ``target``."""
    todo, seen = deque([value]), set()
    while todo and len(seen) < limit:
        v = todo.popleft()
        if v is target:
            return True
        if v is None or id(v) in seen or v.producer() is None:
            continue
        seen.add(id(v))
        todo.extend(v.producer().inputs)
    return False


def _subtracted_term(sub: ir.Node) -> bool:
    """``scores - term``: the first input reaches the score MatMul, the second is not computed from it (a
    row statistic of the scores is a shift: :func:`.score_sink.row_max_shift` reads the max)."""
    x, t = sub.inputs[0], sub.inputs[1]
    return t is not None and _reaches_scores(x) and not _reaches_scores(t) and not _reads(t, x)


def _scalar(value: ir.Value | None) -> float | None:
    a = const_array(value, max_elements=1)
    return float(a.reshape(())) if a is not None and a.size == 1 else None


def is_mask_term(term: ir.Value, limit: int = 200) -> bool:
    """A mask reads no non-scalar float constant and no projection (MatMul with a weight)."""
    todo, seen = deque([term]), 0
    while todo and seen < limit:
        v = todo.popleft()
        if v is None:
            continue
        seen += 1
        node = v.producer()
        if node is None:
            if v.const_value is not None and v.dtype in FLOAT and v.const_value.size > 1:
                return False
            continue
        if node.op_type in ("Shape", "Size") or node.domain == "spatten":
            continue  # spattenc's own ops (token selection) give kept/valid flags, not a position bias
        if node.op_type in ("MatMul", "Gemm", "Einsum"):
            return False
        if node.op_type == "DequantizeLinear":
            return False  # dequantized data (quantize_dynamic's int8 position-bias table): masks are not quantized
        if node.op_type == "Constant":
            a = const_array(v)
            if a is not None and a.dtype.kind == "f" and a.size > 1:
                return False
            continue
        todo.extend(node.inputs)
    return True


def score_chain(softmax: ir.Node) -> dict[str, Any] | NoMatch:
    """Bindings like :data:`CORE`'s (q, kt, scale, mask, mask_node, variants) plus ``bias_terms``."""
    axis = softmax.attributes.get_int("axis", -1)
    rank = softmax.inputs[0].shape.rank() if softmax.inputs[0].shape is not None else None
    if axis not in (-1, None) and (rank is None or axis != rank - 1):
        return NoMatch(f"Softmax over axis {axis}, not the key axis")
    value, scale, scale_node, capped, folded = softmax.inputs[0], 1.0, None, False, False
    masks: list[tuple[ir.Node, ir.Value]] = []
    biases: list[ir.Value] = []
    bias_adds: list[ir.Node] = []
    where: ir.Node | None = None
    sink: dict[str, Any] = {}
    nonlinear = False  # a Tanh/clamp seen (nearer the Softmax): a row shift before it is not a no-op
    for _ in range(24):
        node = value.producer()
        if node is None:
            return NoMatch("the Softmax input is not computed from a MatMul of two activations")
        if _score_matmul(node):
            found: dict[str, Any] = {"q": node.inputs[0], "kt": node.inputs[1], "qk": node, "bias_terms": biases,
                                     "bias_adds": bias_adds,
                                     "scale_variant": "after" if scale_node is not None else "none"}
            if scale_node is not None:
                found["scale:value"] = ir.tensor([scale]).numpy()
                found["scale_node"] = scale_node
            if len(masks) == 1 and where is None:
                found["mask_node"], found["mask"] = masks[0]
                found["mask_variant"] = "additive"
            elif where is not None and not masks:
                found["mask_node"], found["mask"] = where, where.inputs[0]
                found["mask_variant"] = "where" if _reaches_scores(where.inputs[2]) else "where_scores_true"
            elif masks or where is not None:
                return NoMatch(f"{len(masks) + (where is not None)} masks applied to the scores")
            else:
                found["mask_variant"] = "none"
            found["mask_variant"] += "+bias" if biases else ""
            found["scale_variant"] += "+softcap" if capped else ""
            found["folded"] = folded
            found.update(sink)
            return found
        op = node.op_type
        if op not in CHAIN:
            return NoMatch(f"{op} '{node.name}' between the score MatMul and Softmax")
        nonlinear |= op in CLAMPS or op == "Tanh"
        if op == "Sub" and _subtracted_term(node):  # scores - term: the term added negated (XLNet's
            term = node.inputs[1]                     # scores - 1e30 * mask); the node is the Add's place
            if is_mask_term(term):
                masks.append((node, term))
            else:
                biases.append(term)
                bias_adds.append(node)
            value = node.inputs[0]
            continue
        if op == "Sub":  # x - rowmax(x): softmax(x - m) == softmax(x)
            why = row_max_shift(node)
            if why is None and nonlinear:
                why = f"Sub '{node.name}' shifts the scores before a non-linear op (not a softmax no-op)"
            if why is not None:
                return NoMatch(why)
            value = node.inputs[0]
            continue
        if op == "Concat":
            data = [i for i in node.inputs if _reaches_scores(i)]
            if len(data) != 1 or sink or masks or biases or where is not None or scale_node is not None:
                return NoMatch(f"Concat '{node.name}' is not one set of sink columns joined to the finished scores")
            terms = sink_concat(node, data[0])
            if isinstance(terms, NoMatch):
                return terms
            cut = sink_slice(softmax, terms[1])
            if isinstance(cut, NoMatch):
                return cut
            sink = {"sink": terms[0], "sink_concat": node, "sink_slice": cut, "sink_variant": terms[1]}
            value = data[0]
            core = match(MASKED, value)  # the scores below the sink as CORE has them (GPT-2's causal Where + mask)
            if core and (core.get("mask_variant") != "additive" or is_mask_term(core["mask"])):
                return {**core, **sink, "folded": False}
            continue
        if op in CLAMPS:  # Max(scores, finfo.min) and the like: element-wise, carried along
            data = [i for i in node.inputs if _reaches_scores(i)]
            rest = [i for i in node.inputs[1:] if i is not None and i not in data] if op == "Clip" else \
                [i for i in node.inputs if i is not None and i not in data]
            if len(data) != 1 or any(_scalar(i) is None for i in rest):
                return NoMatch(f"{op} '{node.name}' clamps the scores by something other than a scalar")
            value = data[0]
            continue
        if op in PASS_THROUGH:
            capped |= op == "Tanh"
            folded |= op == "Reshape"
            value = node.inputs[0]
        elif op == "Where":
            sides = [i for i in (1, 2) if _reaches_scores(node.inputs[i])]
            if len(sides) != 1 or where is not None:
                return NoMatch(f"Where '{node.name}' is not one mask on the scores")
            where, value = node, node.inputs[sides[0]]
        elif op in ("Mul", "Div"):
            data = [i for i in node.inputs if _reaches_scores(i)]
            other = next((i for i in node.inputs if i is not (data[0] if data else None)), None)
            s = _scalar(other)
            if len(data) != 1 or s is None or (op == "Div" and other is node.inputs[0]):
                return NoMatch(f"{op} '{node.name}' scales the scores by something other than a scalar")
            scale *= 1.0 / s if op == "Div" else s
            scale_node = scale_node or node
            value = data[0]
        else:  # Add: one side is the scores, the other a term
            sides = [i for i in node.inputs if _reaches_scores(i)]
            own = _own_scores(softmax, sides) if len(sides) == 2 else None
            sides = [own] if own is not None else sides
            if len(sides) != 1:
                return NoMatch(f"Add '{node.name}': {len(sides)} inputs come from score MatMuls (and not exactly one "
                               "from queries of the hidden state the values are projected from)")
            term = next(i for i in node.inputs if i is not sides[0])
            if _scalar(term) is not None:  # the same shift for every score (Keras' stable_softmax: + 1e-9)
                value = sides[0]
                continue
            if is_mask_term(term):
                masks.append((node, term))
            else:
                biases.append(term)
                bias_adds.append(node)
            value = sides[0]
    return NoMatch("no score MatMul within 24 ops of the Softmax")


def reads_projection(term: ir.Value, limit: int = 200) -> bool:
    """True when a score term is computed from activations (DeBERTa's c2p/p2c read q and k)."""
    todo, seen = deque([term]), 0
    while todo and seen < limit:
        v = todo.popleft()
        seen += 1
        node = v.producer() if v is not None else None
        if node is None or node.op_type in ("Shape", "Size"):
            continue
        if node.op_type in ("MatMul", "Gemm", "Einsum"):
            return True
        todo.extend(node.inputs)
    return False


# The rank of a value whose inferred shape is unknown, from its producer (ONNX's shape rules); the
# ranks of the inputs come from their shapes or, recursively, the same rules. An ``If`` whose branches
# compute one score term two ways (Optimum's DeBERTa p2c: ``GatherElements`` of the term when the query
# and key lengths differ, the term itself otherwise) has the rank both branches agree on.
_SAME = ("Identity", "Cast", "Neg", "Abs", "Sigmoid", "Tanh", "Relu", "Exp", "Sqrt", "Reciprocal", "Clip",
         "Transpose", "GatherElements", "Softmax", "LayerNormalization", "Dropout")
_BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "And", "Or")
RANK_RULES = {
    **{op: lambda node, rank: rank(node.inputs[0]) for op in _SAME},  # element-wise / same-rank ops
    **{op: lambda node, rank: _max_rank([rank(i) for i in node.inputs if i is not None]) for op in _BROADCAST},
    "MatMul": lambda node, rank: _max_rank([rank(i) for i in node.inputs]),  # batch dims broadcast
    "Reshape": lambda node, rank: _length(node.inputs[1]),  # as many dims as the target has entries
    "Slice": lambda node, rank: rank(node.inputs[0]),
    "Shape": lambda node, rank: 1,
    "Unsqueeze": lambda node, rank: _plus(rank(node.inputs[0]), _length(_axes(node))),
    "Squeeze": lambda node, rank: _plus(rank(node.inputs[0]), -(_length(_axes(node)) or 0) or None),
    "Gather": lambda node, rank: _plus(rank(node.inputs[0]), _plus(rank(node.inputs[1]), -1)),
}


def _axes(node: ir.Node) -> ir.Value | None:
    return node.inputs[1] if len(node.inputs) > 1 else None  # opset 13+: axes are an input


def _plus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b
  # If: :func:`_if_rank` (per output)


def _length(value: ir.Value | None, depth: int = 4) -> int | None:
    """Entries of a 1-D shape vector: static, constant, or a Concat of such pieces (Cast/Unsqueeze of a
    scalar: one entry) - known after a pass dropped the inferred shapes."""
    if value is None:
        return None
    if value.shape is not None and value.shape.rank() == 1 and isinstance(value.shape.dims[0], int):
        return value.shape.dims[0]
    if (a := const_array(value, max_elements=64)) is not None:
        return a.size
    node = value.producer()
    if node is None or depth == 0:
        return None
    if node.op_type == "Concat":
        lengths = [_length(i, depth - 1) for i in node.inputs]
        return None if any(n is None for n in lengths) else sum(lengths)
    if node.op_type == "Cast":
        return _length(node.inputs[0], depth - 1)
    if node.op_type == "Unsqueeze" and static_rank(node.inputs[0]) == 0:
        return 1
    return None


def _max_rank(ranks: list[int | None]) -> int | None:
    return None if not ranks or any(r is None for r in ranks) else max(ranks)


def _if_rank(node: ir.Node, value: ir.Value, depth: int) -> int | None:
    i = list(node.outputs).index(value)
    ranks = {static_rank(node.attributes[b].value.outputs[i], depth - 1)
             for b in ("then_branch", "else_branch") if b in node.attributes}
    return ranks.pop() if len(ranks) == 1 else None


def static_rank(value: ir.Value | None, depth: int = 12) -> int | None:
    """``value``'s rank: from its shape, else derived from its producer (:data:`RANK_RULES`); None when
    neither tells."""
    if value is None:
        return None
    if value.shape is not None:
        return value.shape.rank()
    if value.const_value is not None:
        return len(value.const_value.shape)
    node = value.producer()
    if node is None or depth == 0 or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "If":
        return _if_rank(node, value, depth)
    rule = RANK_RULES.get(node.op_type)
    return rule(node, lambda v: static_rank(v, depth - 1)) if rule is not None else None
