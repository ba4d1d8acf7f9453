"""NumPy implementations of the head- and value-pruning SpAtten ops (oracles for the ONNX bodies
in ``passes/prune_heads.py`` and ``passes/prune_values.py``)."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from . import spatten_ops
from .spatten_ops import spatten_op


@spatten_op
class HeadSlice(OpRun):
    def _run(self, w, sel, units, shape, axis=None):
        # The kept heads' slices of a projection weight/bias: view as blocks, take along the head axis.
        return (np.take(w.reshape(units), sel, axis=axis).reshape(shape),)


@spatten_op
class HeadImportance(OpRun):
    def _run(self, e, probs):
        # score[h] = sum over batch b, valid query rows i and dims d of |E[b, h, i, d]|;
        # row i is valid iff token i is attended to somewhere (padding has probability 0 as a key).
        valid = (probs.sum(axis=(1, 2)) > 0).astype(e.dtype)
        return (np.einsum("bhid,bi->h", np.abs(e), valid).astype(e.dtype),)


@spatten_op
class HeadSelect(OpRun):
    def _run(self, acc, sel, k):
        k = int(k.reshape(-1)[0])
        # Rank only the still-kept groups (cascade); ties: the lower index wins; ascending order out.
        order = np.argsort(-acc[sel], kind="stable")[:k]
        kept = sel[np.sort(order)]
        trace = spatten_ops.CURRENT
        if not hasattr(trace, "heads"):
            trace.heads = []
        trace.heads.append(kept.copy())
        return (kept,)


@spatten_op
class LocalValuePrune(OpRun):
    def _run(self, probs, keep):
        # Per query row keep the ceil(n * keep) largest probabilities (n = keys with P > 0, >= 1);
        # ties with the k-th largest are kept too. No renormalisation.
        keep = float(np.asarray(keep).reshape(-1)[0])
        keep = np.float32(keep)  # float32 arithmetic, as in the ONNX body
        kmax = max(1, int(np.ceil(np.float32(probs.shape[-1]) * keep)))
        n = (probs > 0).sum(axis=-1, keepdims=True).astype(np.float32)
        k = np.clip(np.ceil(n * keep), 1, kmax).astype(np.int64)
        top = -np.sort(-probs, axis=-1)[..., :kmax]
        thr = np.take_along_axis(top, k - 1, axis=-1)
        return (np.where(probs >= thr, probs, np.zeros_like(probs)),)
