"""Corrections to ``onnx.reference``'s implementations of standard ops, used by the reference runtime.

``GatherElements``: onnx 1.23 gathers with ``np.choose``, which takes at most 64 choices; past
that it falls back to a routine that reads one element per row and fails to reshape (or returns
wrong values), so any gather along an axis longer than 64 - token pruning on inputs over 64 tokens -
broke the oracle. Replaced by ``np.take_along_axis`` with the ONNX semantics (negative indices
count from the end; the output has the indices' shape).
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

STD_OPS: list[type[OpRun]] = []


def std_op(cls: type[OpRun]) -> type[OpRun]:
    cls.op_domain = ""
    STD_OPS.append(cls)
    return cls


@std_op
class GatherElements(OpRun):
    def _run(self, data, indices, axis=None):
        axis = 0 if axis is None else int(axis)
        axis = axis % data.ndim
        idx = indices.astype(np.int64)
        idx = np.where(idx < 0, idx + data.shape[axis], idx)
        # Only the leading part of data's other axes takes part (indices may be smaller there).
        view = data[tuple(slice(None) if d == axis else slice(0, n) for d, n in enumerate(idx.shape))]
        return (np.take_along_axis(view, idx, axis=axis),)
