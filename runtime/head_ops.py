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
class HeadSliceConcat(OpRun):
    def _run(self, w, sel, units, shape, rest, axis=None, cat_axis=None):
        # Packed QKV under a KV cache: the kept heads' Q columns, then every K/V column.
        return (np.concatenate([np.take(w.reshape(units), sel, axis=axis).reshape(shape), rest], axis=cat_axis),)


@spatten_op
class KeptHeads(OpRun):
    def _run(self, x, heads):
        # The kept heads of cached K/V [B, heads, ., .] (the cache itself keeps every head).
        return (np.take(x, heads, axis=1),)


@spatten_op
class HeadImportance(OpRun):
    def _run(self, e, probs):
        # score[h] = sum over batch b, valid query rows i and dims d of |E[b, h, i, d]|;
        # row i is valid iff the last query row attends to token i in some head (padding, and
        # tokens masked by prune-tokens, have probability 0 as keys; causal: the last row sees all).
        # When prune-tokens has already gathered the kept query rows (fewer rows than keys), every
        # kept row votes.
        valid = (probs[:, :, -1, :].sum(axis=1) > 0).astype(e.dtype)
        if e.shape[2] != probs.shape[-1]:
            valid = np.ones((e.shape[0], e.shape[2]), e.dtype)
        return (np.einsum("bhid,bi->h", np.abs(e), valid).astype(e.dtype),)


@spatten_op
class HeadImportanceAll(OpRun):
    def _run(self, e):
        # KV-cache step: every query row is a new real token.
        return (np.abs(e).sum(axis=(0, 2, 3)).astype(e.dtype),)


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
