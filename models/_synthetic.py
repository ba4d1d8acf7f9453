"""Paper-shaped random-weight models for the accelerator simulator, exported into ``models/cache/``.

Timing and DRAM traffic depend on shapes, not weights, so the paper's workloads (GPT-2-small and
-medium at a 1024-token context, BERT-base) are reproduced with random weights. Each entry is a
:class:`~_fixtures.FixtureSpec` (the same data the committed fixtures use) with the paper model's
dimensions; ``_build.build_fixture`` exports and verifies it like a fixture, into
``models/cache/<name>/<name>.onnx`` (git-ignored: gpt2-medium is ~1.4 GB). Add a model = add an
entry to :data:`SYNTHETIC`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

try:  # imported as ``models._synthetic`` or run from ``models/export.py``
    from ._fixtures import _FAMILIES, GPT2, FixtureSpec
    from ._synthetic_large import LARGE, export_large
except ImportError:  # pragma: no cover - script mode
    from _fixtures import _FAMILIES, GPT2, FixtureSpec  # type: ignore[no-redef]
    from _synthetic_large import LARGE, export_large  # type: ignore[no-redef]

_GPT2 = {**GPT2, "initializer_range": 0.02, "vocab_size": 50257, "n_positions": 1024}
_BERT_BASE = {
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
_NOTE = "Random weights, paper shape (simulator workloads)."

SYNTHETIC: dict[str, FixtureSpec] = {
    "gpt2-small": replace(
        _FAMILIES["gpt2_kv"], name="gpt2-small", purpose=_NOTE,
        config_kwargs={**_GPT2, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": 3072},
    ),
    "gpt2-medium": replace(
        _FAMILIES["gpt2_kv"], name="gpt2-medium", purpose=_NOTE,
        config_kwargs={**_GPT2, "n_embd": 1024, "n_layer": 24, "n_head": 16, "n_inner": 4096},
    ),
    "bert-base": replace(_FAMILIES["bert"], name="bert-base", purpose=_NOTE, config_kwargs=_BERT_BASE),
}


def export_synthetic(name: str, cache_dir: Path) -> Path:
    """Export ``SYNTHETIC[name]`` to ``cache_dir/<name>/<name>.onnx`` (+ sidecar) and return the path."""
    try:
        from . import _export_core as core
        from ._build import build_fixture
    except ImportError:  # pragma: no cover - script mode
        import _export_core as core  # type: ignore[no-redef]
        from _build import build_fixture  # type: ignore[no-redef]

    if name in LARGE:  # weights streamed to external data (_synthetic_large)
        return export_large(name, cache_dir)
    core.set_offline()
    out_dir = cache_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    return build_fixture(SYNTHETIC[name], out_dir).onnx_path
