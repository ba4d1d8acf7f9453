"""One decoder step at a time over onnxruntime or the reference runtime, cache state handled.

:class:`DecoderSession` reads a decoder's cache interface from its graph (``past_key_values.<l>.key``
-> ``present.<l>.key``), and, for a model rewritten by ``evict-kv``, the importance and position
state next to each layer's cache (``past_importance.<l>`` / ``past_positions.<l>``). Every layer's
cache may have its own length. Positions are true absolute positions whatever the cache keeps:
``clip(cumsum(attention_mask) - 1, 0)`` for models with a ``position_ids`` input (what the export
and transformers use), ``tokens so far + arange(q)`` for models that computed them from the cache
length (GPT-2; ``evict-kv`` gave them a ``position_ids`` input). Batches are left-padded.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from spatten_compiler.errors import OptionError

logger = logging.getLogger(__name__)
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)")  # .msb/.lsb/.scale when stored as planes
EVICT_META = "spatten.evict_kv"


def _kv_dims_from_sites(proto: onnx.ModelProto, path: Path) -> dict[int, tuple[int, int]]:
    """layer -> (K/V heads, head size) from spattenc's attention discovery, for exports whose cache
    inputs leave them symbolic (onnxruntime-genai's model builder writes ``kv_cache_dim``)."""
    import onnx_ir as ir

    from spatten_compiler.passes.find_attention import find_attention

    model = ir.load(str(path)) if path.is_file() else ir.serde.deserialize_model(proto)
    return {s.layer: (s.num_kv_heads, s.head_dim) for s in find_attention(model).sites
            if s.num_kv_heads and s.head_dim}


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | None:
    return d.dim_value if d.HasField("dim_value") else None


class DecoderSession:
    """Runs a decoder step by step. ``runtime``: ``ort`` (onnxruntime), ``reference``, or ``none``
    (no engine: :meth:`feeds` / :meth:`commit` keep the cache state for a caller that runs the graph
    itself, e.g. the functional simulator; ``model`` may then be a ModelProto). ``idle_spin=False``: the
    onnxruntime threads stop spinning when a step returns (for benchmarks that step several sessions in
    one process; a lone generation loop keeps onnxruntime's default)."""

    def __init__(self, model: str | Path | onnx.ModelProto, runtime: str = "ort", threads: int | None = None,
                 idle_spin: bool = True) -> None:
        if isinstance(model, onnx.ModelProto):
            if runtime != "none":
                raise OptionError("DecoderSession: a ModelProto needs runtime='none'")
            path, proto = Path(model.graph.name or "model"), model
        else:
            path = Path(model)
            proto = onnx.load(str(path), load_external_data=False)
        from spatten_compiler.shared_cache import is_shared

        if is_shared(proto):  # its cache is evicted by the session that binds one shared buffer, not by the graph
            raise OptionError(f"{path}: a shared-buffer eviction model (--kv-cache shared); step it with "
                              "spatten_compiler.generate.open_session or shared_cache.SharedCacheSession")
        self.input_names = [i.name for i in proto.graph.input]
        # a merged decoder (optimum's decoder_model_merged.onnx) picks its branch by this input
        self.branch_rank = next((len(i.type.tensor_type.shape.dim) for i in proto.graph.input
                                 if i.name == "use_cache_branch"), None)
        self.output_names = [o.name for o in proto.graph.output]
        self.layers: dict[int, str] = {}  # layer -> the name of one of its cache inputs
        self.state: dict[str, tuple[np.dtype, list[int | None]]] = {}  # every past_* input: dtype, dims
        for i in proto.graph.input:
            if not i.name.startswith("past_"):
                continue
            t = i.type.tensor_type
            self.state[i.name] = (onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), [_dim(d) for d in t.shape.dim])
            m = PAST.match(i.name)
            if m:
                self.layers.setdefault(int(m.group(1)), i.name)
        if not self.layers:
            raise OptionError(f"{path}: no KV cache inputs (past_key_values.<l>.key); generation needs a decoder "
                              "exported with a KV cache")
        if any(len(dims) == 4 and (dims[1] is None or dims[3] is None) for _, dims in self.state.values()):
            self._fill_kv_dims(proto, path)
        meta = {p.key: p.value for p in proto.metadata_props}
        self.evict: dict[str, Any] | None = json.loads(meta[EVICT_META]) if EVICT_META in meta else None
        has_pos = "position_ids" in self.input_names
        self.positions = (self.evict or {}).get("positions", "input" if has_pos else "arange")
        self.vocab = _dim(proto.graph.output[0].type.tensor_type.shape.dim[-1])
        # e.g. a builder model, or its eviction compiled on the fused kernel (evict-gqa): no reference runtime
        fused = next((n.op_type for n in proto.graph.node if n.domain == "com.microsoft"), None)
        del proto
        self.runtime = runtime
        self.overrides: dict[str, np.ndarray] = {}  # e.g. evict-kv's tunable spatten.kv_budget
        if runtime == "ort":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
            if not idle_spin:  # several sessions in one process: an idle one's spinning threads slow the others
                opts.add_session_config_entry("session.force_spinning_stop", "1")
            self._ort = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        elif runtime == "reference":
            from spatten_compiler.runtime.reference import ReferenceRuntime

            if fused is not None:
                raise OptionError(f"{path}: onnxruntime's {fused} is not in the reference runtime; use --runtime ort, "
                                  "or compile the original model with spattenc --kv-cache decomposed")
            self._ref = ReferenceRuntime(str(path))
        elif runtime != "none":
            raise OptionError(f"runtime must be ort, reference or none, got {runtime!r}")
        self.reset(1)


    def _fill_kv_dims(self, proto: onnx.ModelProto, path: Path) -> None:
        """Symbolic K/V head or head-size dims in the cache inputs: take them from the attention sites."""
        try:
            found = _kv_dims_from_sites(proto, path)
        except Exception:  # noqa: BLE001 (any discovery failure ends in the one-line error below)
            found = {}
        for name, (dtype, dims) in self.state.items():
            m = PAST.match(name)
            if len(dims) != 4 or (dims[1] is not None and dims[3] is not None):
                continue
            if m is None or int(m.group(1)) not in found:
                raise OptionError(f"{path}: the KV cache inputs need static head and head-size dimensions "
                                  f"('{name}' has none, and no attention block of its layer was found)")
            heads, size = found[int(m.group(1))]
            self.state[name] = (dtype, [dims[0], heads, dims[2], size])
    def reset(self, batch: int) -> None:
        """Empty caches for ``batch`` sequences."""
        self.batch = batch
        self.cache: dict[str, np.ndarray] = {}
        for name, (dtype, dims) in self.state.items():  # [batch, (heads,) 0 tokens, (size)]
            shape = [batch, 0] if len(dims) == 2 else [batch, dims[1], 0, *dims[3:]]
            self.cache[name] = np.zeros(shape, dtype)
        self.mask = np.zeros((batch, 0), np.int64)  # every token so far (dense models read all of it)
        self.steps = 0

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.runtime == "ort":
            return dict(zip(self.output_names, self._ort.run(None, feeds)))
        return self._ref.run(feeds).outputs

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Feed ``q`` new tokens per sequence ([B, q], mask 0 = left padding); returns logits [B, q, V]."""
        out = self._run(self.feeds(input_ids, attention_mask))
        self.commit(out)
        return out["logits"]

    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The graph inputs of the next step (ids, mask, positions, the cache state so far)."""
        ids = np.asarray(input_ids, np.int64)
        new = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        full = np.concatenate([self.mask, new], axis=1)
        q = ids.shape[1]
        if self.positions == "input":
            pos = np.clip(np.cumsum(full, axis=1) - 1, 0, None)[:, -q:]
        else:
            pos = np.broadcast_to(np.arange(full.shape[1] - q, full.shape[1], dtype=np.int64), ids.shape).copy()
        feeds = {"input_ids": ids, "position_ids": pos, **self.cache, **self.overrides}
        if self.evict is None:
            feeds["attention_mask"] = full
        else:  # only the new tokens' columns are read; the past's validity is in past_positions
            past0 = self.cache[self.layers[min(self.layers)]].shape[2]
            feeds["attention_mask"] = np.concatenate([np.ones((ids.shape[0], past0), np.int64), new], axis=1)
        if self.branch_rank is not None:  # the with-past branch once there is a past
            feeds["use_cache_branch"] = np.full([1] * self.branch_rank, self.mask.shape[1] > 0)
        self.next_mask = full  # every token once the step fed last is committed
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def commit(self, out: dict[str, np.ndarray]) -> None:
        """Take the step's outputs (``present*``) as the cache state of the next step."""
        for name in list(self.cache):
            self.cache[name] = out[name.replace("past_key_values.", "present.").replace("past_", "present_")]
        self.mask = self.next_mask
        self.steps += 1

    def fork(self) -> DecoderSession:
        """Another sequence state over the same loaded runtime (benchmarks step several in lockstep)."""
        twin = copy.copy(self)
        twin.overrides = dict(self.overrides)
        twin.reset(self.batch)
        return twin

    def cache_lengths(self) -> list[int]:
        return [self.cache[self.layers[layer]].shape[2] for layer in sorted(self.layers)]

    def cache_bytes(self, kv_only: bool = False) -> int:
        """Bytes of the cache state the runtime returned and gets back next step (K/V, and the
        eviction state unless ``kv_only``): the arrays really held between steps."""
        return int(sum(v.nbytes for k, v in self.cache.items() if not kv_only or k.startswith("past_key_values")))

    def kept_positions(self) -> list[np.ndarray] | None:
        if self.evict is None:
            return None
        return [self.cache[f"past_positions.{layer}"] for layer in sorted(self.layers)]


def left_pad(sequences: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[B, max_len] ids and mask, left-padded."""
    n = max(len(s) for s in sequences)
    ids = np.full((len(sequences), n), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for row, s in enumerate(sequences):
        if s:
            ids[row, n - len(s):], mask[row, n - len(s):] = s, 1
    return ids, mask
