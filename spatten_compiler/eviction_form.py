"""Which form the KV-cache eviction takes on a model (session 20): the one place that decides.

:data:`FORMS` is the table: ``decomposed`` (unfuse-ort, normalize, decompose-attention, then
evict-kv: every decoder spattenc reads), ``fused`` (evict-gqa: onnxruntime's fused
com.microsoft GroupQueryAttention kept, the eviction in the graph around it) and ``shared``
(``evict-gqa{in_graph=false}``: the kernel over one shared buffer per layer that spattenc's
runtime evicts in place). ``--kv-cache`` (:data:`CACHE_OPTIONS`) asks for the graph (default),
the shared buffer, or the decomposed form itself (the accelerator backend, ``spattenc emit``, lowers
Softmax attention, not the fused kernel); :func:`choose` turns that into a form for the model at hand:

- ``fused`` / ``shared`` when every attention layer is a fused GroupQueryAttention and evict-gqa
  takes the options on it (tried on a clone of the model: the pass's own refusals, such as
  :func:`spatten_compiler.passes.evict_gqa.why_not`, decide), and no other rewrite that needs the
  decomposed attention is asked for (:data:`NEEDS_DECOMPOSED`);
- ``decomposed`` otherwise, as before session 20, with the reason in the summary when the model
  has fused GroupQueryAttention; ``--kv-cache shared`` then refuses (one line) instead.

Structural: decided by the nodes and the options, never by the model's name. Measured:
docs/decoders.md, "Fused GroupQueryAttention and eviction" (the fused eviction keeps evict-kv's
slots, logits within 1e-4, and runs 1.2-1.6x the decomposed one).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from spatten_compiler.errors import OptionError

if TYPE_CHECKING:
    from spatten_compiler.config import CompileConfig

OP = ("com.microsoft", "GroupQueryAttention")
# --kv-cache: what a user asks for (decomposed: the old path, e.g. for the accelerator backend, spattenc emit)
CACHE_OPTIONS = ("graph", "shared", "decomposed")


@dataclasses.dataclass(frozen=True)
class Form:
    """One way of compiling the eviction: its pass, the pass's extra options, and the summary's line."""

    pass_name: str
    options: tuple[tuple[str, Any], ...]
    fused: bool  # keeps the fused attention: the decomposing front passes do not run
    note: str  # the compile summary's line ("" = none)


SHARED_NOTE = ("  KV cache: one shared buffer per layer, evicted in place by spattenc's runtime (spattenc generate, "
               "spatten_compiler.shared_cache.SharedCacheSession); a plain onnxruntime loop runs it unevicted")
FORMS: dict[str, Form] = {
    "decomposed": Form("evict-kv", (), False, ""),
    "fused": Form("evict-gqa", (), True, "  KV cache evicted in the graph around the fused GroupQueryAttention "
                  "kernel (evict-gqa; --kv-cache shared: a shared buffer evicted by spattenc's runtime)"),
    "shared": Form("evict-gqa", (("in_graph", False),), True, SHARED_NOTE),
}
# --kv-cache (or a form by name: the plan's own output, a config file) -> the form when the model takes it
WANTED = {"graph": "fused", "shared": "shared", "fused": "fused", "decomposed": "decomposed"}

# Rewrites that read the decomposed attention (CompileConfig attribute -> what the summary calls it):
# asked for together with eviction, the eviction stays on the decomposed attention too.
NEEDS_DECOMPOSED = {"prunes_tokens": "token pruning", "prunes_heads": "head pruning",
                    "value_keep": "value pruning", "kv_bits": "--kv-bits planes",
                    "optimize": "--optimize", "weights": "--weights"}


def form_of(value: str | None) -> Form:
    """The form a CompileConfig's ``kv_cache`` names; unresolved (no model seen: None, graph) is decomposed."""
    return FORMS.get(value or "decomposed", FORMS["decomposed"])


def note_for(p: Any) -> str:
    """The summary's line for an eviction pass (evict-kv, evict-gqa in the graph or over a shared buffer)."""
    if p.name != FORMS["fused"].pass_name:
        return ""
    return FORMS["fused" if getattr(p, "in_graph", True) else "shared"].note


def decomposed_needs(cfg: Any) -> list[str]:
    """The rewrites ``cfg`` asks for besides eviction that read the decomposed attention."""
    return [text for key, text in NEEDS_DECOMPOSED.items() if getattr(cfg, key) not in (None, False, "none")]


def _needing(others: list[str]) -> str:
    return f"{', '.join(others)} need{'s' * (len(others) == 1)} the decomposed attention"


def check_form(cfg: Any) -> None:
    """A fused form asked for by name beside a rewrite that needs the decomposed attention: one line."""
    if cfg.kv_budget is not None and form_of(cfg.kv_cache).fused and (others := decomposed_needs(cfg)):
        flag = "--kv-cache shared" if cfg.kv_cache == "shared" else f"kv_cache {cfg.kv_cache}"
        raise OptionError(f"{flag} keeps the fused GroupQueryAttention, but {_needing(others)}; give one or the other")


def choose(cfg: CompileConfig, model: ir.Model, layers: int) -> tuple[str, str]:
    """(the form for ``cfg``'s eviction on ``model``, the summary's line on why a model with fused
    GroupQueryAttention stays decomposed, or ""). ``layers``: the attention layers of the decomposed model."""
    wanted = WANTED[cfg.kv_cache or "graph"]
    if wanted == "decomposed":
        return wanted, ""
    why = _why_decomposed(cfg, model, layers, wanted)
    if why is None:
        return wanted, ""  # the summary names the fused forms from the pass (note_for)
    if wanted == "shared":
        raise OptionError(f"--kv-cache shared: {why}")
    gqa = any((n.domain, n.op_type) == OP for n in model.graph)
    return "decomposed", f"  KV-cache eviction on the decomposed attention (unfuse-ort): {why}" if gqa else ""


def _why_decomposed(cfg: CompileConfig, model: ir.Model, layers: int, wanted: str) -> str | None:
    """Why evict-gqa cannot take this eviction on ``model``, or None."""
    from spatten_compiler.passes.length_gate import short_input_model
    from spatten_compiler.pipeline import Pipeline
    from spatten_compiler.plan import run_quietly

    fused = sum(1 for n in model.graph if (n.domain, n.op_type) == OP)
    if not fused:
        return "the model has no com.microsoft GroupQueryAttention (onnxruntime-genai's model builder writes it)"
    if others := decomposed_needs(cfg):
        return _needing(others)
    if fused < layers:
        return f"{layers - fused} of {layers} attention layers are not a fused GroupQueryAttention"
    if fused > layers:
        return f"{fused} GroupQueryAttention nodes but {layers} attention layers found"
    # checked as the pipeline checks it: a graph the pass would leave invalid keeps the decomposed form too
    trial = Pipeline([dataclasses.replace(cfg, kv_cache=wanted).eviction_pass()], check=True)
    refusal = run_quietly(trial, short_input_model(model))
    return None if refusal is None else str(refusal).splitlines()[0]
