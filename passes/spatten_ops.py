"""SpAtten operations as model-local ONNX functions in the ``spatten`` domain.

Each function's body is standard ONNX, so stock onnxruntime inlines and runs it with no custom-op
library, while the rewritten graph still says what it does (``spatten.TokenSelect`` ...), so the
reference runtime can swap in a plain NumPy implementation and the accelerator backend can lower
each call to its own instruction.

  TokenImportance(probs[B,H,Sq,Sk], qvalid[B,Sq]) -> score[B,Sk]
      score[b,j] = sum_h sum_i qvalid[b,i] * probs[b,h,i,j]        (column sums over valid rows)
      computed as MatMul(qvalid[B,1,1,Sq], probs) -> [B,H,1,Sk], then a sum over heads: a batched
      GEMV instead of materializing probs * mask and reducing two non-contiguous axes
  TokenImportanceMean(probs, qvalid) -> score / max(1, number of valid query rows)
      (each layer contributes equally however many tokens it still has)
  TokenImportanceValue(probs, qvalid, v[B,H,Sk,Dh]) -> sum_h ||v[b,h,j]|| * colsum[b,h,j] / rows
      the mean rule with each head's column weighted by the key token's value norm: attention to
      a token whose value is near zero (a no-op sink) moves nothing and counts for little
  TokenImportanceCausal(probs, qvalid, v) -> sum_h ||v[b,h,j]|| * colsum[b,h,j] / readers[b,j]
      the value rule for causal attention: column j divided by the number of valid rows that can
      read it (rows i >= j: a reverse cumulative sum of qvalid), not by all rows - in a causal model
      early columns are read by more rows, so plain column sums favour them
  TokenSelect(acc[B,S], valid[B,S], protect[B,S], k[1], kper[B]) -> sel[B,k], kept[B,k]
      rank tokens by acc (padding -inf, protected +inf); keep the top k in original order;
      kept = 1 for the first kper[b] of sample b's ranking that are real tokens
  GatherTokens(x[B,S,D], sel[B,k]) -> x[b, sel[b,j], :]
  GatherRows(probs[B,H,S,S], sel[B,k]) -> probs[:, :, sel, :]  (kept query rows, pruning in-layer)
      one row Gather on probs viewed as [B*H*S, S] with indices (b*H + h)*S + sel[b,j]: contiguous
      row copies, and no int64 index tensor the size of the output (GatherElements needed one)
  ScatterTokens(buf[B,S0,D], pos[B,k], x[B,k,D]) -> buf with rows pos[b,j] replaced by x[b,j]
      ScatterND with (b, pos[b,j]) index pairs: row copies (pos is duplicate-free per sample, as
      TopK returns distinct positions)
"""

from __future__ import annotations

import onnx
import onnx.parser
import onnx_ir as ir

DOMAIN = "spatten"
OPSET = 1

def _value_weighted(name: str, divisor_nodes: str, divisor: str) -> str:
    """The value-weighted importance (each head's column sums times the key's value norm, summed over
    heads) divided by ``divisor``, which ``divisor_nodes`` compute from ``qvalid``: the two value rules
    differ only in how many rows they divide a column by."""
    return f"""
<domain: "spatten", opset_import: ["" : 17]>
{name} (probs, qvalid, v) => (score) {{
    axes12 = Constant <value_ints = [1, 2]> ()
    axes3 = Constant <value_ints = [3]> ()
    qv = Unsqueeze (qvalid, axes12)
    colsum = MatMul (qv, probs)
    vsq = Mul (v, v)
    vn2 = ReduceSum <keepdims = 1> (vsq, axes3)
    vn = Sqrt (vn2)
    vnt = Transpose <perm = [0, 1, 3, 2]> (vn)
    weighted = Mul (colsum, vnt)
    total = ReduceSum <keepdims = 0> (weighted, axes12)
{divisor_nodes}
    one = Constant <value_float = 1.0> ()
    safe = Max ({divisor}, one)
    score = Div (total, safe)
}}"""


_SOURCE = {
    "TokenImportance": """
<domain: "spatten", opset_import: ["" : 17]>
TokenImportance (probs, qvalid) => (score) {
    axes12 = Constant <value_ints = [1, 2]> ()
    qv = Unsqueeze (qvalid, axes12)
    colsum = MatMul (qv, probs)
    score = ReduceSum <keepdims = 0> (colsum, axes12)
}""",
    "TokenImportanceMean": """
<domain: "spatten", opset_import: ["" : 17]>
TokenImportanceMean (probs, qvalid) => (score) {
    axes12 = Constant <value_ints = [1, 2]> ()
    qv = Unsqueeze (qvalid, axes12)
    colsum = MatMul (qv, probs)
    total = ReduceSum <keepdims = 0> (colsum, axes12)
    axes1 = Constant <value_ints = [1]> ()
    rows = ReduceSum <keepdims = 1> (qvalid, axes1)
    one = Constant <value_float = 1.0> ()
    safe = Max (rows, one)
    score = Div (total, safe)
}""",
    "TokenImportanceValue": _value_weighted("TokenImportanceValue", """\
    axes1 = Constant <value_ints = [1]> ()
    rows = ReduceSum <keepdims = 1> (qvalid, axes1)""", "rows"),
    "TokenImportanceCausal": _value_weighted("TokenImportanceCausal", """\
    axis1 = Constant <value_int = 1> ()
    readers = CumSum <reverse = 1> (qvalid, axis1)""", "readers"),
    "TokenSelect": """
<domain: "spatten", opset_import: ["" : 17]>
TokenSelect (acc, valid, protect, k, kper) => (sel, kept) {
    low = Constant <value_float = -1e30> ()
    high = Constant <value_float = 1e30> ()
    is_valid = Cast <to = 9> (valid)
    is_protected = Cast <to = 9> (protect)
    scored = Where (is_valid, acc, low)
    guarded = And (is_valid, is_protected)
    prio = Where (guarded, high, scored)
    vals, by_rank = TopK <axis = -1, largest = 1, sorted = 1> (prio, k)
    zero = Constant <value_int = 0> ()
    one = Constant <value_int = 1> ()
    k0 = Squeeze (k)
    rank = Range (zero, k0, one)
    kcol = Unsqueeze (kper, one)
    in_budget = Less (rank, kcol)
    real = Greater (vals, low)
    ok = And (in_budget, real)
    okf = Cast <to = 1> (ok)
    posf = Cast <to = 1> (by_rank)
    pos_sorted, order = TopK <axis = -1, largest = 0, sorted = 1> (posf, k)
    sel = GatherElements <axis = 1> (by_rank, order)
    kept = GatherElements <axis = 1> (okf, order)
}""",
    "GatherTokens": """
<domain: "spatten", opset_import: ["" : 17]>
GatherTokens (x, sel) => (y) {
    minus1 = Constant <value_ints = [-1]> ()
    idx = Unsqueeze (sel, minus1)
    y = GatherND <batch_dims = 1> (x, idx)
}""",
    "GatherRows": """
<domain: "spatten", opset_import: ["" : 17]>
GatherRows (probs, sel) => (rows) {
    zero = Constant <value_int = 0> ()
    one = Constant <value_int = 1> ()
    minus1 = Constant <value_ints = [-1]> ()
    axis1 = Constant <value_ints = [1]> ()
    lead = Shape <start = 0, end = 2> (probs)
    seq = Shape <start = 2, end = 3> (probs)
    keys = Shape <start = 3, end = 4> (probs)
    nlead = ReduceProd <keepdims = 0> (lead)
    base = Range (zero, nlead, one)
    seq0 = Squeeze (seq)
    start = Mul (base, seq0)
    shape3 = Concat <axis = 0> (lead, axis1)
    offset = Reshape (start, shape3)
    selb = Unsqueeze (sel, axis1)
    idx = Add (offset, selb)
    flat_shape = Concat <axis = 0> (minus1, keys)
    flat = Reshape (probs, flat_shape)
    rows = Gather <axis = 0> (flat, idx)
}""",
    "ScatterTokens": """
<domain: "spatten", opset_import: ["" : 17]>
ScatterTokens (buf, pos, x) => (out) {
    zero = Constant <value_int = 0> ()
    one = Constant <value_int = 1> ()
    one1 = Constant <value_ints = [1]> ()
    minus1 = Constant <value_ints = [-1]> ()
    nb = Shape <start = 0, end = 1> (pos)
    shape = Shape (pos)
    nb0 = Squeeze (nb)
    b = Range (zero, nb0, one)
    col_shape = Concat <axis = 0> (nb, one1)
    bcol = Reshape (b, col_shape)
    bidx = Expand (bcol, shape)
    b3 = Unsqueeze (bidx, minus1)
    p3 = Unsqueeze (pos, minus1)
    idx = Concat <axis = -1> (b3, p3)
    out = ScatterND (buf, idx, x)
}""",
}


def define(name: str, source: str) -> None:
    """Register another SpAtten function (ONNX text, domain "spatten"); passes call this at import."""
    if name in _SOURCE and _SOURCE[name] != source:
        raise ValueError(f"spatten function {name} defined twice")
    _SOURCE[name] = source


def function_proto(name: str, opset: int = 17) -> onnx.FunctionProto:
    """The function for ``name``, importing the model's default-domain opset (bodies use ops that
    are unchanged from opset 17 on)."""
    proto = onnx.parser.parse_function(_SOURCE[name])
    for imp in proto.opset_import:
        if imp.domain == "":
            imp.version = opset
    return proto


def ensure_functions(model: ir.Model, names: list[str]) -> None:
    """Add the named SpAtten functions (once) and the ``spatten`` opset import to ``model``."""
    opset = model.opset_imports.get("", 17)
    if opset < 17:
        from spatten_compiler.errors import OptionError

        raise OptionError(f"model opset {opset} is below 17, the lowest spattenc rewrites (convert it first)")
    for name in names:
        if (DOMAIN, name, "") not in model.functions:
            fn = ir.serde.deserialize_function(function_proto(name, opset))
            model.functions[fn.identifier()] = fn
    model.opset_imports.setdefault(DOMAIN, OPSET)
    model.graph.opset_imports.setdefault(DOMAIN, OPSET)

