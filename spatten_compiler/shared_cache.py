"""A decode loop for ``evict-gqa{in_graph=false}`` models: the KV cache in one shared buffer per layer,
evicted in place (session 20; docs/decoders.md, "Fused GroupQueryAttention and eviction").

The compiled graph runs the fused GroupQueryAttention over a past/present buffer bound (IOBinding) as
both its input and its output - the kernel appends the new rows in place at the cache length, as
onnxruntime-genai's ``past_present_share_buffer`` does - and returns each layer's accumulated
importance. This session keeps each slot's position beside it and applies evict-kv's rule in numpy
when a layer holds more than its budget + ``slack`` slots (every step when ``slack`` is 0):

    k      = budget_tokens(budget, T, sinks, recent, n, min_keep)     T = newest position + 1
    forced = the ``sinks`` oldest positions and the ``max(recent, floor(share * (k - sinks)))`` newest
    keep   = top-k of Where(forced, +BIG, importance), ties to the older position (evict-kv's TopK
             over slots in position order)

per layer (``layer``) or per KV head (``head``). Attention does not depend on the order of the cached
keys (they are stored rotated), so instead of gathering the kept rows to the front in order, only the
evicted slots below ``k`` are refilled from the kept rows above it: at most ``n - k`` rows move. The
kept set equals evict-gqa's in-graph eviction with the same options (``tests/test_shared_cache.py``);
the slot order differs. Batch 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx

from spatten_compiler.errors import OptionError
from spatten_compiler.passes.evict_gqa import RUNTIME
from spatten_compiler.passes.evict_kv import BIG, budget_tokens

logger = logging.getLogger(__name__)


def keep_slots(importance: np.ndarray, positions: np.ndarray, k: int, sinks: int, window: int) -> np.ndarray:
    """Slot indices of the ``k`` kept of one group's ``n`` slots (``importance``, ``positions``: [n])."""
    by_age = np.argsort(positions, kind="stable")
    forced = np.zeros(len(positions), bool)
    forced[by_age[:sinks]] = True
    if window:
        forced[by_age[-window:]] = True
    score = np.where(forced, BIG, importance.astype(np.float64))
    return np.lexsort((positions, -score))[:k]


def refill(keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(destination, source) slots: the kept slots at or above ``k`` move into the free slots below it."""
    kept = np.zeros(max(k, int(keep.max(initial=-1)) + 1), bool)
    kept[keep] = True
    return np.flatnonzero(~kept[:k]), np.sort(keep[keep >= k])


def is_shared(proto: onnx.ModelProto) -> bool:
    """Whether ``proto`` was compiled by evict-gqa{in_graph=false}: only this session evicts it."""
    return any(p.key == RUNTIME for p in proto.metadata_props)


class SharedCacheSession:
    """Step an ``evict-gqa{in_graph=false}`` model: ``step(ids) -> logits``; ``kept_positions()`` per layer
    ``[1, n]`` (``layer``) or ``[1, kv, n]`` (``head``), in slot order."""

    def __init__(self, path: str | Path, threads: int | None = None, idle_spin: bool = True) -> None:
        import onnxruntime as ort

        proto = onnx.load(str(path), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        if RUNTIME not in meta:
            raise OptionError(f"{path}: not compiled by evict-gqa{{in_graph=false}} (no {RUNTIME} metadata)")
        self.rule = json.loads(meta[RUNTIME])
        self.kv = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
                   if i.name.startswith("past_key_values")}
        self.layers = self.rule["layers"]
        self.outputs = [o.name for o in proto.graph.output]
        logits = next(o for o in proto.graph.output if o.name == "logits").type.tensor_type.shape.dim
        self.vocab = logits[-1].dim_value or None
        del proto
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        if not idle_spin:
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        self.ort = ort
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.reset()

    def reset(self, batch: int = 1, capacity: int = 64) -> None:
        """An empty cache (batch 1) in buffers of ``capacity`` rows (grown when a step needs more)."""
        if batch != 1:
            raise OptionError("SharedCacheSession runs batch 1")
        self.length, self.position, self.capacity = 0, 0, 0
        self.buffers: dict[str, np.ndarray] = {}
        heads = {int(n.split(".")[1]): dims[1] for n, dims in self.kv.items()}
        groups = lambda layer: heads[layer] if self.rule["mode"] == "head" else 1  # noqa: E731
        self.importance = [np.zeros((groups(layer), 0), np.float32) for layer in range(self.layers)]
        self.slots = [np.zeros((groups(layer), 0), np.int64) for layer in range(self.layers)]  # positions
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        """Buffers of ``capacity`` rows holding the current ``length`` rows."""
        for name, dims in self.kv.items():
            buf = np.zeros((1, dims[1], capacity, dims[3]), np.float32)
            if name in self.buffers:
                buf[:, :, :self.length] = self.buffers[name][:, :, :self.length]
            self.buffers[name] = buf
        self.values = {n: self.ort.OrtValue.ortvalue_from_numpy(b) for n, b in self.buffers.items()}  # same memory
        self.capacity = capacity

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, np.int64)
        if ids.shape[0] != 1:
            raise OptionError("SharedCacheSession runs batch 1")
        q = ids.shape[1]
        if self.length + q > self.capacity:
            self._grow(max(2 * self.capacity, self.length + q + self.rule["slack"] + 1))
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", np.ones((1, self.length + q), np.int64))
        new = np.arange(self.position, self.position + q, dtype=np.int64)  # the new tokens' positions
        io.bind_cpu_input("position_ids", new[None])
        for layer in range(self.layers):
            io.bind_cpu_input(f"past_importance.{layer}", self._state(self.importance[layer]))
        for name, value in self.values.items():
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
        free = [o for o in self.outputs if not o.startswith("present.")]
        for o in free:
            io.bind_output(o)
        self.session.run_with_iobinding(io)
        out = dict(zip(free, (io.get_outputs()[-len(free):])))
        for layer in range(self.layers):
            imp = out[f"present_importance.{layer}"].numpy()
            self.importance[layer] = imp[0] if imp.ndim == 3 else imp
            self.slots[layer] = np.concatenate([self.slots[layer], np.broadcast_to(
                new, (self.slots[layer].shape[0], q))], axis=1)
        self.length += q
        self.position += q
        self._evict()
        return out["logits"].numpy()

    def _state(self, imp: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(imp[None] if self.rule["mode"] == "head" else imp)

    def _evict(self) -> None:
        r, n = self.rule, self.length
        k_budget = budget_tokens(r["budget"], self.position, r["sinks"], r["recent"], 1 << 62, r["min_keep"])
        if n - k_budget <= r["slack"]:  # slack 0: evict whenever over the budget (evict-kv: every step)
            return
        k = min(n, k_budget)
        window = max(r["recent"], int(np.floor(np.float32(r["recent_share"]) * np.float32(k - r["sinks"]))))
        for layer in range(self.layers):
            imp, pos = self.importance[layer], self.slots[layer]
            moves = [refill(keep_slots(imp[g], pos[g], k, r["sinks"], window), k) for g in range(len(imp))]
            for g, (dst, src) in enumerate(moves):
                imp[g, dst], pos[g, dst] = imp[g, src], pos[g, src]
                heads = [g] if len(moves) > 1 else slice(None)  # per KV head, or every head alike
                for kind in ("key", "value"):
                    buf = self.buffers[f"past_key_values.{layer}.{kind}"]
                    buf[:, heads, dst] = buf[:, heads, src]
            self.importance[layer], self.slots[layer] = imp[:, :k].copy(), pos[:, :k].copy()
        self.length = k

    @staticmethod
    def wants(path: str | Path) -> bool:
        """Whether ``path`` was compiled for this session (evict-gqa{in_graph=false})."""
        if not Path(path).is_file():
            return False
        return is_shared(onnx.load(str(path), load_external_data=False))

    def kept_positions(self) -> list[np.ndarray]:
        return [s[None] if self.rule["mode"] == "head" else s for s in self.slots]

    def cache_lengths(self) -> list[int]:
        return [self.length] * self.layers
