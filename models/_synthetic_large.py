"""Synthetic models too large to hold twice in memory, exported with streamed random weights.

A 1.5B-parameter float32 model is 6 GB. Building it with random weights in torch and exporting it
the usual way (constant folding copies every transposed weight, the exporter serializes them, then
onnxruntime verifies) needs 3-4x that, more than a shared 24 GB machine has. Instead:

1. the model is created on the ``meta`` device and given *uninitialized* CPU storage
   (``to_empty``): untouched pages, so tracing reads the kernel's zero page and costs no memory;
2. the TorchScript exporter traces it with constant folding off (no transposed copies) and with
   its by-value initializer de-duplication off (all-zero weights would otherwise be merged);
3. onnx-ir reads back the graph only; every parameter becomes an ``ir.LazyTensor`` that draws its
   random values (seeded by the tensor's name) when it is written, one tensor at a time, into one
   ``model.onnx.data`` file; each ``Transpose(weight)`` is folded into a transposed lazy weight, so
   the graph has the form of a normal folded TorchScript export.

The model is not verified against torch (its torch weights were never materialized); docs/memory.md
reports an onnxruntime run of it. Measured for ``llama-1b`` (5.88 GB of weights): 626 s on 2 shared
cores (488 s of it the trace), peak resident memory 2.0 GB.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

try:  # imported as ``models._synthetic_large`` or run from ``models/export.py``
    from . import _export_core as core
    from ._build import make_feeds, sidecar_meta
    from ._fixtures import _FAMILIES, FixtureSpec, io_names
    from ._wrappers import WRAPPERS
except ImportError:  # pragma: no cover - script mode
    import _export_core as core  # type: ignore[no-redef]
    from _build import make_feeds, sidecar_meta  # type: ignore[no-redef]
    from _fixtures import _FAMILIES, FixtureSpec, io_names  # type: ignore[no-redef]
    from _wrappers import WRAPPERS  # type: ignore[no-redef]

log = logging.getLogger("spattenc.models")

WEIGHT_STD = 0.02  # HF's initializer_range for Llama
VECTOR_NOISE = 0.1  # norm weights: 1 + noise (as _build does for the fixtures)

# TinyLlama-like shape scaled to ~1.5B parameters: 22 layers x 60.8M + 2 x 65.5M embeddings.
LLAMA_1B = {
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "tie_word_embeddings": False,
}
_NOTE = "Random weights streamed to external data; the memory benchmark's large model."

LARGE: dict[str, FixtureSpec] = {
    "llama-1b": replace(_FAMILIES["llama"], name="llama-1b", purpose=_NOTE, config_kwargs=LLAMA_1B),
    # A 2-layer model of the same width: the builder's quick check (about 0.5 GB).
    "llama-1b-2l": replace(_FAMILIES["llama"], name="llama-1b-2l", purpose=_NOTE,
                           config_kwargs={**LLAMA_1B, "num_hidden_layers": 2}),
}


def _trace(spec: FixtureSpec, path: Path) -> tuple[dict, list[str], list[str]]:
    """Export ``spec`` with uninitialized weights to ``path`` (TorchScript, no folding); return dims and I/O."""
    import torch
    import transformers

    config = getattr(transformers, spec.config_cls)(**spec.config_kwargs, attn_implementation=spec.attn_implementation)
    with torch.device("meta"):
        model = getattr(transformers, spec.model_cls)(config)
    model = model.to_empty(device="cpu").eval()
    # Buffers computed in __init__ (RoPE frequencies) were lost on the meta device: compute them again.
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(module)(config=config))
    dims = core.model_dims(config)
    inputs, outputs = io_names(spec, dims["num_layers"])
    wrapper = WRAPPERS[spec.wrapper](model, inputs).eval()
    feeds = make_feeds(inputs, dims, config.vocab_size, (1, 4, 2, 0), spec.padding, 0)
    dedup = torch._C._jit_pass_onnx_deduplicate_initializers
    torch._C._jit_pass_onnx_deduplicate_initializers = lambda graph, params, training: params
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                tuple(torch.from_numpy(feeds[n]) for n in inputs),
                str(path),
                dynamo=False,
                opset_version=spec.opset,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=core.dynamic_axes_for(inputs, outputs, spec.kv_cache),
                do_constant_folding=False,
            )
    finally:
        torch._C._jit_pass_onnx_deduplicate_initializers = dedup
    return dims, inputs, outputs


def _lazy_random(name: str, shape: tuple[int, ...], vector: bool):
    """An ``ir.LazyTensor`` of seeded random float32 values, drawn only when it is written."""
    import onnx_ir as ir

    def make() -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        a = rng.standard_normal(shape, dtype=np.float32)
        if vector:
            return a * np.float32(VECTOR_NOISE) + np.float32(1.0)
        a *= np.float32(WEIGHT_STD)
        return a

    return ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=name)


def _randomize(model, params: set[str]) -> tuple[int, int]:
    """Give every parameter a lazy random value; fold ``Transpose(parameter)``; return (params, folded)."""
    import onnx_ir as ir

    graph = model.graph
    folded = 0
    for node in list(graph):
        src = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if src is None or src.name not in params or src.const_value is None or len(src.shape) != 2:
            continue
        rows, cols = (int(d) for d in src.shape)
        new = ir.Value(name=f"{src.name}.T", shape=ir.Shape([cols, rows]), type=ir.TensorType(ir.DataType.FLOAT),
                       const_value=_lazy_random(f"{src.name}.T", (cols, rows), vector=False))
        graph.register_initializer(new)
        ir.convenience.replace_all_uses_with(node.outputs[0], new)
        graph.remove(node, safe=True)
        folded += 1
    count = 0
    for value in list(graph.initializers.values()):
        if not value.uses() and value not in graph.outputs:
            graph.initializers.pop(value.name)
            continue
        if value.name in params:
            shape = tuple(int(d) for d in value.const_value.shape)
            value.const_value = _lazy_random(value.name, shape, vector=len(shape) == 1)
            count += 1
    return count, folded


def export_large(name: str, cache_dir: Path) -> Path:
    """Build ``LARGE[name]`` into ``cache_dir/<name>/model.onnx`` + ``model.onnx.data`` + ``model.json``."""
    import onnx
    import onnx_ir as ir

    spec = LARGE[name]
    out_dir = cache_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    core.set_offline()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=out_dir) as tmp:
        traced = Path(tmp) / "traced.onnx"
        dims, inputs, outputs = _trace(spec, traced)
        log.info("  traced %s in %.1fs", name, time.perf_counter() - started)
        proto = onnx.load(str(traced), load_external_data=False)
        model = ir.serde.deserialize_model(proto)
        del proto
        params = {v.name for v in model.graph.initializers.values()
                  if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size > 1
                  and "inv_freq" not in v.name and "rotary" not in v.name}
        ir.external_data.set_base_dir(model.graph, tmp)
        count, folded = _randomize(model, params)
        # Everything not randomized (RoPE frequencies, shape constants) is small: bring it in memory.
        for value in model.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.Tensor(value.const_value.numpy().copy(), name=value.name)
        total = sum(v.const_value.nbytes for v in model.graph.initializers.values())
        log.info("  %d random parameters (%d transposes folded), %.2f GB: writing", count, folded, total / 1e9)
        tmp_out = Path(tmp) / "model.onnx"
        ir.save(model, tmp_out, external_data="model.onnx.data")
        for f in ("model.onnx.data", "model.onnx"):
            shutil.move(str(Path(tmp) / f), out_dir / f)
    meta = sidecar_meta(spec, dims, inputs, outputs)
    meta |= {"parameters": int(total // 4), "weight_bytes": int(total), "reference": None}
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%s: %.2f GB in %.1fs", out_dir / "model.onnx", total / 1e9, time.perf_counter() - started)
    return out_dir / "model.onnx"
