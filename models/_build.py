"""Build one fixture from its :class:`~_fixtures.FixtureSpec`: random-weight model, sample
inputs with padding, export, verification and sidecar."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

try:  # imported as ``models._build`` or run from ``models/export.py``
    from . import _export_core as core
    from ._fixtures import FixtureSpec, io_names
    from ._wrappers import WRAPPERS
except ImportError:  # pragma: no cover - script mode
    import _export_core as core  # type: ignore[no-redef]
    from _fixtures import FixtureSpec, io_names  # type: ignore[no-redef]
    from _wrappers import WRAPPERS  # type: ignore[no-redef]

log = logging.getLogger("spattenc.models")

ATOL = 1e-4
SEED = 0
# Std of the noise added to every 1-D parameter (biases, norm weights) after init. HF init
# leaves them all 0 or 1: identical tensors that the TorchScript exporter deduplicates into one
# initializer shared through Identity nodes, which no trained model shows.
VECTOR_NOISE = 0.1
# (batch, sequence, past, padded positions in the last sample) of the stored reference ...
REFERENCE_SHAPE = (2, 7, 3, 2)
# ... and of extra runs that only prove the dynamic axes (past=0 is a prefill step).
EXTRA_SHAPES = ((3, 4, 5, 1), (1, 9, 0, 0))


def make_feeds(
    input_names: Sequence[str],
    dims: dict[str, int],
    vocab: int,
    shape: tuple[int, int, int, int],
    padding: str,
    seed: int,
) -> dict[str, np.ndarray]:
    """Random inputs for ``input_names`` with the last sample padded.

    ``shape`` is (batch, sequence, past, pad). Right padding (encoders, GPT-2 without cache)
    zeroes the last ``pad`` mask positions and sets those tokens to id 0. Left padding (KV-cache
    decoders) zeroes the first ``pad`` of the ``past + sequence`` mask positions, i.e. inside the
    past; ``position_ids`` then count only unmasked positions (``cumsum(mask) - 1``, clamped).
    ``token_type_ids`` mark a sentence pair: 0 for the first half, 1 for the second.
    """
    batch, seq, past, pad = shape
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, past + seq), dtype=np.int64)
    if pad and padding == "right":
        mask[-1, -pad:] = 0
        ids[-1, -pad:] = 0
    elif pad:
        mask[-1, :pad] = 0
    feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
    types = np.zeros((batch, seq), dtype=np.int64)
    types[:, seq // 2 :] = 1
    feeds["token_type_ids"] = types * mask[:, past:]
    feeds["position_ids"] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:]
    kv_shape = (batch, dims["num_kv_heads"], past, dims["head_dim"])
    for name in input_names:
        if name.startswith("past_key_values."):
            feeds[name] = rng.standard_normal(kv_shape).astype(np.float32)
    return {n: feeds[n] for n in input_names}


def build_model(spec: FixtureSpec) -> tuple[torch.nn.Module, Any]:
    """The spec's random-weight model in eval mode (seeded, 1-D params perturbed), and its config."""
    torch.manual_seed(SEED)
    config_cls = getattr(transformers, spec.config_cls)
    config = config_cls(**spec.config_kwargs, attn_implementation=spec.attn_implementation)
    model = getattr(transformers, spec.model_cls)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * VECTOR_NOISE)
    actual = model.config._attn_implementation
    if actual != spec.attn_implementation:
        raise RuntimeError(f"asked for {spec.attn_implementation} attention, model uses {actual}")
    return model, config


def sidecar_meta(spec: FixtureSpec, dims: dict[str, int], inputs: list[str], outputs: list[str]) -> dict[str, Any]:
    """The sidecar fields of a fixture, in the documented order (reference added later)."""
    return {
        "name": spec.name,
        "architecture": spec.architecture,
        "hf_class": spec.model_cls,
        "kind": spec.kind,
        "exporter": spec.exporter,
        "opset": spec.opset,
        **dims,
        "mask": spec.mask,
        "rope": spec.rope,
        "kv_cache": spec.kv_cache,
        "fused_attention": spec.fused_attention,
        "extra_softmax": spec.extra_softmax,
        "inputs": inputs,
        "outputs": outputs,
    }


def build_fixture(spec: FixtureSpec, out_dir: Path) -> core.ExportResult:
    """Export ``spec`` to ``out_dir/<name>.onnx`` + ``.json`` and verify it against torch.

    Raises on any failure after removing the partial files, so a stale model never survives
    next to a failed export.
    """
    onnx_path, json_path = out_dir / f"{spec.name}.onnx", out_dir / f"{spec.name}.json"
    try:
        model, config = build_model(spec)
        dims = core.model_dims(config)
        inputs, outputs = io_names(spec, dims["num_layers"])
        wrapper = WRAPPERS[spec.wrapper](model, inputs).eval()
        past_free = [(b, s, 0 if not spec.kv_cache else p, d) for b, s, p, d in EXTRA_SHAPES]
        feeds = make_feeds(
            inputs,
            dims,
            config.vocab_size,
            REFERENCE_SHAPE if spec.kv_cache else (*REFERENCE_SHAPE[:2], 0, 2),
            spec.padding,
            SEED,
        )
        extra = [
            make_feeds(inputs, dims, config.vocab_size, shp, spec.padding, SEED + 1 + i)
            for i, shp in enumerate(past_free)
        ]
        return core.export_verified(
            wrapper,
            sidecar_meta(spec, dims, inputs, outputs),
            feeds,
            onnx_path,
            json_path,
            extra_feeds=extra,
            dim_max=spec.dim_max,
            atol=ATOL,
        )
    except BaseException:
        for path in (onnx_path, json_path):
            path.unlink(missing_ok=True)
        raise
