"""Runners for bench/gqa_evict_probe.py (not a benchmark itself): a builder model stepped with its
states as OrtValues (optionally one shared past/present buffer), SharedCacheSession brought to a
context by a synthesized state, and the cost of one in-place block eviction."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from bench.common import make_session
from bench.genai_step import kept_positions

HEADROOM = 64  # shared buffers: rows beyond the kept cache for the steps of one context


class CacheRunner:
    """One decode step of a builder model over onnxruntime, every state kept as OrtValues (no numpy
    round trip), from a synthesized cache of ``ceil(fraction * C)`` rows; ``shared``: past/present one
    IOBinding-bound buffer. Other ``past_*`` states (the edited model's importance; a compiled
    eviction model's importance and positions) are synthesized as bench/genai_step.py does; a model
    with a ``position_ids`` input gets the true position."""

    def __init__(self, path: Path, threads: int, fraction: float, shared: bool) -> None:
        import onnxruntime as ort

        self.ort, self.fraction, self.shared = ort, fraction, shared
        self.session = make_session(path, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]
        inputs = self.session.get_inputs()
        self.kv = {i.name: i.shape[1] for i in inputs if i.name.startswith("past_key_values")}
        self.extra = {i.name: i for i in inputs if i.name.startswith("past_") and i.name not in self.kv}
        self.positions = any(i.name == "position_ids" for i in inputs)
        self.head = 64

    def _value(self, a: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(a)

    def prefill(self, ids: np.ndarray) -> None:
        self.position = len(ids)
        self.length = math.ceil(self.fraction * len(ids))
        self.capacity = self.length + (HEADROOM if self.shared else 0)
        rng = np.random.default_rng(0)
        self.cache = {n: self._value(rng.standard_normal((1, kv, self.capacity, self.head)).astype(np.float32))
                      for n, kv in self.kv.items()}
        kept = kept_positions(len(ids), self.length)
        self.state = {}
        for name, i in self.extra.items():  # [B, n] or [B, kv, n]
            lead = [1] + ([self.kv[f"past_key_values.{name.split('.')[1]}.key"]] if len(i.shape) == 3 else [])
            a = (np.broadcast_to(kept, (*lead, self.length)).astype(np.int64) if "int64" in i.type
                 else rng.random((*lead, self.length)).astype(np.float32))
            self.state[name] = self._value(np.ascontiguousarray(a))

    def _small(self, token: int) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, self.length + 1), np.int64)}
        if self.positions:
            feeds["position_ids"] = np.array([[self.position]], np.int64)
        return feeds

    def step(self, token: int) -> None:
        feeds = self._small(token)
        if self.shared:
            if self.length + 1 > self.capacity:
                raise RuntimeError("shared buffer full: raise HEADROOM")
            io = self.session.io_binding()
            for n, a in feeds.items():
                io.bind_cpu_input(n, a)
            for n, v in {**self.cache, **self.state}.items():
                io.bind_ortvalue_input(n, v)
            for n, v in self.cache.items():
                io.bind_ortvalue_output(n.replace("past_key_values", "present"), v)
            free = [o for o in self.outputs if not o.startswith("present.")]
            for o in free:
                io.bind_output(o)
            self.session.run_with_iobinding(io)
            out = dict(zip([o for o in self.outputs if o.startswith("present.")] + free, io.get_outputs()))
            self.length += 1
        else:
            values = {n: self._value(a) for n, a in feeds.items()} | self.cache | self.state
            out = dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, values)))
            self.cache = {n: out[n.replace("past_key_values", "present")] for n in self.cache}
            self.length = next(iter(self.cache.values())).shape()[2]  # an eviction model keeps its budget
        self.state = {n: out[n.replace("past_", "present_")] for n in self.state}
        self.position += 1

    def cache_length(self) -> int:
        return self.length


class SharedRunner:
    """spatten_compiler.shared_cache.SharedCacheSession over an ``evict-gqa{in_graph=false}`` model, brought
    to a context by a synthesized state: ``ceil(budget * C)`` random rows in each shared buffer, their
    positions as bench/genai_step.py's (``kept_positions``), random importance. Its steps include the
    in-place evictions (every step, or every ``slack`` steps): compare ``mean_ms`` too."""

    def __init__(self, path: Path, threads: int) -> None:
        from spatten_compiler.shared_cache import SharedCacheSession

        self.session = SharedCacheSession(path, threads=threads, idle_spin=False)

    def prefill(self, ids: np.ndarray) -> None:
        s, context = self.session, len(ids)
        kept = math.ceil(s.rule["budget"] * context)
        s.reset(1, kept + HEADROOM)
        rng = np.random.default_rng(0)
        for buf in s.buffers.values():
            buf[:, :, :kept] = rng.standard_normal((1, buf.shape[1], kept, buf.shape[3]))
        positions = kept_positions(context, kept)
        s.slots = [np.repeat(positions[None], len(g), axis=0) for g in s.slots]
        s.importance = [rng.random((len(g), kept)).astype(np.float32) for g in s.importance]
        s.length, s.position = kept, context

    def step(self, token: int) -> None:
        self.session.step(np.array([[token]], np.int64))

    def cache_length(self) -> int:
        return self.session.length


def compaction_ms(kept: int, slack: int, layers: int = 30, kv: int = 3, head: int = 64,
                  repeats: int = 5) -> dict[str, float]:
    """Median ms of one block eviction in a shared buffer of ``kept + slack`` rows per KV head, every
    layer's K and V (numpy, in place; ``--kv-evict head``): pick the ``slack`` lowest-scored rows per
    head (argpartition), then ``ordered``: gather the kept rows to the front in their order (what
    evict-kv's Gather keeps), or ``holes``: move only the kept rows from ``[kept, kept + slack)`` into
    the evicted slots below ``kept`` (at most ``slack`` rows per head: attention does not depend on the
    order of the keys, the stored keys are already rotated; their positions move with them)."""
    rng = np.random.default_rng(0)
    n = kept + slack
    bufs = [rng.standard_normal((1, kv, n + HEADROOM, head)).astype(np.float32) for _ in range(2 * layers)]
    scores = [rng.random((1, kv, n)).astype(np.float32) for _ in range(layers)]
    result = {}
    for form in ("ordered", "holes"):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for layer in range(layers):
                drop = np.argpartition(scores[layer][0], slack, axis=-1)[:, :slack]
                for h in range(kv):
                    if form == "ordered":
                        src, dst = np.setdiff1d(np.arange(n), drop[h], assume_unique=True), slice(0, kept)
                    else:
                        dst = np.sort(drop[h][drop[h] < kept])
                        src = np.setdiff1d(np.arange(kept, n), drop[h], assume_unique=True)
                    for b in bufs[2 * layer:2 * layer + 2]:
                        b[0, h, dst] = b[0, h, src]
            times.append(time.perf_counter() - t0)
        result[form] = float(np.median(times) * 1e3)
    return result
