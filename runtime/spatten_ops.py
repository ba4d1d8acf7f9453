"""Plain NumPy implementations of the SpAtten operations (the oracle for the ONNX function bodies
in ``passes/spatten_ops.py``). Registered by (domain, op) for the reference evaluator."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

SPATTEN_OPS: list[type[OpRun]] = []


def spatten_op(cls: type[OpRun]) -> type[OpRun]:
    cls.op_domain = "spatten"
    SPATTEN_OPS.append(cls)
    return cls


class Trace:
    """What the SpAtten ops did during one run, in execution order (layer order)."""

    def __init__(self) -> None:
        self.selections: list[dict[str, np.ndarray]] = []


CURRENT = Trace()


@spatten_op
class TokenImportance(OpRun):
    def _run(self, probs, qvalid):
        # score[b, j] = sum over heads h and valid query rows i of P[b, h, i, j]
        return (np.einsum("bhij,bi->bj", probs, qvalid.astype(probs.dtype)).astype(probs.dtype),)


def _head_colsums(probs: np.ndarray, qvalid: np.ndarray) -> np.ndarray:
    """[B, H, Sk]: per head, the probability each key receives from the valid query rows."""
    return np.einsum("bhij,bi->bhj", probs, qvalid.astype(probs.dtype))


def _per_valid_row(total: np.ndarray, qvalid: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray]:
    """Scores divided by the number of valid query rows, so every layer weighs the same."""
    return ((total / np.maximum(qvalid.sum(axis=1, keepdims=True), 1)).astype(dtype),)


@spatten_op
class TokenImportanceMean(OpRun):
    def _run(self, probs, qvalid):
        return _per_valid_row(_head_colsums(probs, qvalid).sum(axis=1), qvalid, probs.dtype)


@spatten_op
class TokenImportanceValue(OpRun):
    def _run(self, probs, qvalid, v):
        # Each head's column sums weighted by the key token's value norm, then summed over heads.
        weighted = _head_colsums(probs, qvalid) * np.linalg.norm(v, axis=-1)
        return _per_valid_row(weighted.sum(axis=1), qvalid, probs.dtype)


@spatten_op
class TokenImportanceCausal(OpRun):
    def _run(self, probs, qvalid, v):
        # The value rule with column j divided by the valid rows i >= j (the rows a causal mask lets read it).
        weighted = (_head_colsums(probs, qvalid) * np.linalg.norm(v, axis=-1)).sum(axis=1)
        readers = np.cumsum(qvalid[:, ::-1], axis=1)[:, ::-1]
        return ((weighted / np.maximum(readers, 1)).astype(probs.dtype),)


@spatten_op
class TokenSelect(OpRun):
    def _run(self, acc, valid, protect, k, kper):
        k = int(k.reshape(-1)[0])
        batch, _ = acc.shape
        sel = np.zeros((batch, k), np.int64)
        kept = np.zeros((batch, k), np.float32)
        for b in range(batch):
            prio = np.where(valid[b] > 0, acc[b], -np.inf)
            prio = np.where((valid[b] > 0) & (protect[b] > 0), np.inf, prio)
            # Highest first; ties: lower index first (stable sort on the negated score).
            order = np.argsort(-prio, kind="stable")[:k]
            real = np.isfinite(prio[order]) | (prio[order] == np.inf)
            ok = (np.arange(k) < kper[b]) & real
            by_pos = np.argsort(order, kind="stable")
            sel[b], kept[b] = order[by_pos], ok[by_pos]
        CURRENT.selections.append({"tokens_in": np.full(batch, acc.shape[1]), "sel": sel, "kept": kept})
        return sel, kept


@spatten_op
class GatherTokens(OpRun):
    def _run(self, x, sel):
        return (x[np.arange(x.shape[0])[:, None], sel],)


@spatten_op
class GatherRows(OpRun):
    def _run(self, probs, sel):
        return (probs[np.arange(probs.shape[0])[:, None], :, sel].transpose(0, 2, 1, 3),)


@spatten_op
class ScatterTokens(OpRun):
    def _run(self, buf, pos, x):
        out = buf.copy()
        out[np.arange(buf.shape[0])[:, None], pos] = x
        return (out,)
