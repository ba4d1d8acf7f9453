"""Constant view targets that hold the export's token count, in a token-pruned layer.

Rewrite (in a layer that runs on ``k`` kept tokens, exported with a fixed token count ``S``)::

    Reshape(x, [c_0 .. c_{j-1}, S, c_{j+1} ..])  ->  Reshape(x, Concat([c_0 .. c_{j-1}], Shape(x)[a], [c_{j+1} ..]))

where ``a`` is x's token axis derived from the data flow (:func:`.token_axis.flow_axis`) and ``j`` the
target entry that indexes it (:func:`.token_axis.view_entry`: same size and the same number of
elements after it). onnxscript's optimizer and onnxruntime fold ``Concat(Shape(x)[:1], [H, S, Dh])``
to one constant when the token count is fixed by the model (Whisper's frames; the batch stays -1),
so the export's inputs are dynamic but the target still says ``S``. Where the entry cannot be proven
(no data flow, the tokens merged with other axes, or ``S`` also a head size with no way to tell them
apart) prune-tokens refuses in one line: a target left at ``S`` writes a model onnxruntime rejects.

Fixed-shape exports (every data dim static) are ``prune_tokens._free_static_target``'s case.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array

from .token_axis import view_entry


def rebind_token_entry(e: GraphEditor, node: ir.Node, static: int | None,
                       flow: Callable[[ir.Value], int | None]) -> ir.Value | None:
    """The new target of Reshape ``node`` (its input replaced), or None when this rule does not apply:
    no fixed token count, a target that is not one constant, no entry equal to the count, data whose
    dims are all static (fixed shapes), or a count at target axis 1 of data without a derived token
    axis (left to ``prune_tokens._split_static_target``, which reads axis 1 as the tokens: ViT's
    ``[-1, 17, 64]`` after onnxslim, as before). Raises OptionError where the entry is not proven."""
    target = const_array(node.inputs[1], max_elements=16) if static else None
    data = node.inputs[0]
    dims = list(data.shape.dims) if data is not None and data.shape is not None else None
    if target is None or target.ndim != 1 or dims is None or all(isinstance(d, int) for d in dims):
        return None
    t = target.astype(np.int64)
    if static not in t.tolist():
        return None
    axis = flow(data)
    if axis is not None and 0 <= axis < len(dims) and not isinstance(dims[axis], int):
        dims[axis] = static  # the pruned layer's token axis held the exported count
    j = view_entry(t, dims, axis)
    if j is None:
        if axis is None and len(t) > 1 and int(t[1]) == static:
            return None
        where = "its data's token axis is not derived from the layer input" if axis is None else (
            f"no entry indexes its data's token axis {axis} of {[str(d) for d in dims]}")
        raise OptionError(f"Reshape '{node.name}' has a target folded to a constant holding the export's {static} "
                          f"tokens ({t.tolist()}) and {where}; prune-tokens cannot shrink it (export with a "
                          "dynamic sequence length, or --no-token-pruning)")
    pieces = [*([e.const("target", t[:j])] if j else []), e.op("Shape", [data], start=axis, end=axis + 1),
              *([e.const("target", t[j + 1:])] if j + 1 < len(t) else [])]
    new = e.op("Concat", pieces, axis=0)
    node.replace_input_with(1, new)
    return new
