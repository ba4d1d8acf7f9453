"""Constant view targets that hold the export's token count, in a token-pruned layer.

Rewrite (in a layer that runs on ``k`` kept tokens, exported with a fixed token count ``S``)::

    Reshape(x, [c_0 .. c_{j-1}, S, c_{j+1} ..])  ->  Reshape(x, Concat([c_0 .. c_{j-1}], Shape(x)[a], [c_{j+1} ..]))

for every entry ``j`` equal to ``S`` that indexes one axis ``a`` of x exactly (same size, the same number
of elements after both: :func:`.token_axis.view_axes`), so the rewrite is exact whatever size axis ``a``
has at run time - the tokens shrink, a head size that happens to equal ``S`` stays. An entry equal to
``S`` inside a split or merge of other axes (``[B, 16, 64] -> [-1, 16, 4, 16]``: the last 16 splits the
features) stays when x's token axis from the data flow (:func:`.token_axis.flow_axis`) is not among
those axes. onnxscript's optimizer and onnxruntime fold ``Concat(Shape(x)[:1], [H, S, Dh])``
to one constant when the model fixes the token count (Whisper's frames; the batch stays -1), so the
export's inputs are dynamic but the target still says ``S``; onnx-simplifier at fixed input shapes folds
every target (BLOOM / XGLM's ``[B*H, S, S] -> [B, H, S, S]`` score view holds ``S`` twice). Where an
entry cannot be proven (the tokens merged with other axes, no data flow) prune-tokens refuses in one
line: a target left at ``S`` writes a model onnxruntime rejects.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array

from .token_axis import view_axes, view_groups


def rebind_token_entry(e: GraphEditor, node: ir.Node, static: int | None,
                       flow: Callable[[ir.Value], int | None]) -> ir.Value | None:
    """The new target of Reshape ``node`` (its input replaced), or None when this rule does not apply:
    no fixed token count, a target that is not one constant, or no entry equal to the count. Such an entry
    that indexes one data axis exactly (:func:`.token_axis.view_axes`) reads that axis's size; one inside
    a split or merge of other axes stays when the data flow shows the tokens are elsewhere.
    Unproven: on data whose dims are all static (fixed shapes) one such entry becomes -1 (no other -1),
    more are left to ``prune_tokens._free_static_target``
    (the load check after the pass refuses what it cannot free); a count at target axis 1 of data without
    a derived token axis left to ``prune_tokens._split_static_target`` (axis 1 read as the tokens: ViT's
    ``[-1, 17, 64]`` after onnxslim, as before); anything else raises OptionError."""
    target = const_array(node.inputs[1], max_elements=16) if static else None
    data = node.inputs[0]
    dims = list(data.shape.dims) if data is not None and data.shape is not None else None
    if target is None or target.ndim != 1 or dims is None:
        return None
    t = target.astype(np.int64)
    entries = [j for j, v in enumerate(t.tolist()) if v == static]
    if not entries:
        return None
    fixed = all(isinstance(d, int) for d in dims)
    axis = flow(data)
    if axis is not None and 0 <= axis < len(dims) and not isinstance(dims[axis], int):
        dims[axis] = static  # the pruned layer's token axis held the exported count
    axes = view_axes(t, dims)
    groups = {j: d for g, d in view_groups(t, dims) for j in g}
    # an entry inside a split or merge of other axes (a head size of 16 beside 16 tokens) stays; the
    # data flow must show the tokens are not in its group
    unproven = [j for j in entries if j not in axes and (axis is None or j not in groups or axis in groups[j])]
    entries = [j for j in entries if j in axes]
    if fixed and len(unproven) == 1 and -1 not in t.tolist():
        # fixed shapes, so the batch is a constant: the one entry left free takes what its group holds
        # (GPT-BigCode's Gemm rows [B*S, 3D] -> [B, 1, S, 3D]: S from B*k rows); exact at the export
        t[unproven.pop()] = -1
    if unproven:
        if fixed or (axis is None and unproven == [1]):
            return None
        where = "its data's token axis is not derived from the layer input" if axis is None else (
            f"entry {unproven[0]} is not its data's token axis {axis} alone (data {[str(d) for d in dims]})")
        raise OptionError(f"Reshape '{node.name}' has a target folded to a constant holding the export's {static} "
                          f"tokens ({t.tolist()}) and {where}; prune-tokens cannot shrink it (export with a "
                          "dynamic sequence length, or --no-token-pruning)")
    pieces, run = [], []
    for j, v in enumerate(t.tolist()):
        if j in entries:
            pieces += [e.const("target", np.array(run, np.int64))] if run else []
            pieces.append(e.op("Shape", [data], start=axes[j], end=axes[j] + 1))
            run = []
        else:
            run.append(v)
    pieces += [e.const("target", np.array(run, np.int64))] if run else []
    new = e.op("Concat", pieces, axis=0)
    node.replace_input_with(1, new)
    return new
