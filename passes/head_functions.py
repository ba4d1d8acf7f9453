"""The SpAtten ops of head pruning as ONNX functions (bodies of standard ops; onnxruntime inlines
them). Their NumPy counterparts, the reference runtime's oracles, are in ``runtime/head_ops.py``;
what each computes is described in :mod:`.prune_heads`."""

from __future__ import annotations

from .spatten_ops import define

define("HeadSlice", """
<domain: "spatten", opset_import: ["" : 17]>
HeadSlice <axis> (w, sel, units, shape) => (y) {
    blocks = Reshape (w, units)
    picked = Gather <axis: int = @axis> (blocks, sel)
    y = Reshape (picked, shape)
}""")
define("HeadSliceConcat", """
<domain: "spatten", opset_import: ["" : 17]>
HeadSliceConcat <axis, cat_axis> (w, sel, units, shape, rest) => (y) {
    blocks = Reshape (w, units)
    picked = Gather <axis: int = @axis> (blocks, sel)
    sliced = Reshape (picked, shape)
    y = Concat <axis: int = @cat_axis> (sliced, rest)
}""")
define("KeptHeads", """
<domain: "spatten", opset_import: ["" : 17]>
KeptHeads (x, heads) => (y) {
    y = Gather <axis = 1> (x, heads)
}""")
define("HeadImportance", """
<domain: "spatten", opset_import: ["" : 17]>
HeadImportance (e, probs) => (score) {
    last = Constant <value_ints = [-1]> ()
    row = Gather <axis = 2> (probs, last)
    axes12 = Constant <value_ints = [1, 2]> ()
    colsum = ReduceSum <keepdims = 0> (row, axes12)
    zero = Constant <value_float = 0.0> ()
    valid = Greater (colsum, zero)
    validf = Cast <to = 1> (valid)
    sq = Shape <start = 2, end = 3> (e)
    sk = Shape <start = -1> (probs)
    zero1 = Constant <value_ints = [0]> ()
    one = Constant <value_ints = [1]> ()
    first = Slice (validf, zero1, sq, one)
    gathered = Equal (sq, sk)
    same = Cast <to = 1> (gathered)
    onef = Constant <value_float = 1.0> ()
    all_rows = Sub (onef, same)
    rowsv = Max (first, all_rows)
    qv = Unsqueeze (rowsv, one)
    mag = Abs (e)
    axes3 = Constant <value_ints = [3]> ()
    rows = ReduceSum <keepdims = 0> (mag, axes3)
    weighted = Mul (rows, qv)
    axes02 = Constant <value_ints = [0, 2]> ()
    score = ReduceSum <keepdims = 0> (weighted, axes02)
}""")
define("HeadImportanceAll", """
<domain: "spatten", opset_import: ["" : 17]>
HeadImportanceAll (e) => (score) {
    mag = Abs (e)
    axes = Constant <value_ints = [0, 2, 3]> ()
    score = ReduceSum <keepdims = 0> (mag, axes)
}""")
define("HeadSelect", """
<domain: "spatten", opset_import: ["" : 17]>
HeadSelect (acc, sel, k) => (kept) {
    sub = Gather <axis = 0> (acc, sel)
    vals, idx = TopK <axis = -1, largest = 1, sorted = 1> (sub, k)
    idxf = Cast <to = 1> (idx)
    ordered, order = TopK <axis = -1, largest = 0, sorted = 1> (idxf, k)
    picked = Gather <axis = 0> (idx, order)
    kept = Gather <axis = 0> (sel, picked)
}""")
FUNCTIONS = ["HeadSlice", "HeadSliceConcat", "KeptHeads", "HeadImportance", "HeadImportanceAll", "HeadSelect"]
