"""From the user's options and the loaded model to the final compile options.

The model's kind (encoder / decoder / none) is read from the attention sites of a normalized probe
(a clone sharing the weights; the model itself is left to the pass pipeline), then the preset for
that kind fills in what the options leave open (:func:`spatten_compiler.defaults.resolve`). The probe
is returned for the compile report, which counts FLOPs on the normalized graph.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import onnx_ir as ir

from spatten_compiler.config import CompileConfig
from spatten_compiler.defaults import PARTS, Resolution, model_features, model_kind, resolve
from spatten_compiler.errors import NoAttentionError, OptionError, SpattencError
from spatten_compiler.eviction_form import choose

logger = logging.getLogger(__name__)


def plan(options: dict[str, Any] | CompileConfig, model: ir.Model, path: Path | str, pipeline: str = "") -> tuple[
        CompileConfig, Resolution, ir.Model]:
    """``options``: the user's options (unset = None), or a CompileConfig built from them (the Python
    API's form: its None fields count as unset, so it resolves the same way)."""
    if isinstance(options, CompileConfig):
        options = dataclasses.asdict(options)
    from spatten_compiler.passes.decompose_attention import DecomposeAttention
    from spatten_compiler.passes.find_attention import find_attention
    from spatten_compiler.passes.length_gate import refuse_gated, short_input_model
    from spatten_compiler.passes.normalize import Normalize
    from spatten_compiler.passes.unfuse_ort import UnfuseOrt

    if pipeline and (options.get("preset") or any(p.is_off(options) for p in PARTS.values())):
        raise OptionError("--pipeline runs exactly the passes it names; --preset and the off-switches do not "
                          "combine with it")
    refuse_gated(model, path)
    probe = short_input_model(model)
    run_quietly(UnfuseOrt(), probe)  # as the pipeline's front does: onnxruntime's fused ops to plain ONNX
    Normalize()(probe)
    report = find_attention(probe)
    sites = report.sites
    if any(s.fused is not None for s in sites):
        run_quietly(DecomposeAttention(), probe)
        sites = find_attention(probe).sites or sites  # the attention as the passes will see it
    kind = model_kind(sites)
    if kind == "none" and options.get("preset"):
        raise NoAttentionError(f"--preset {options['preset']}: no attention found in {path}; nothing to apply")
    resolved, chosen = resolve(options, kind, pipeline, model_features(sites))
    if kind == "none" and report.unreadable:
        chosen = dataclasses.replace(chosen, unfound=report.unreadable[0])
    if chosen.preset is not None:
        resolved, chosen = _drop_refused(resolved, chosen, probe)
        logger.debug("preset %s for %s: %s", chosen.preset.name, kind, chosen.applied)
    config = CompileConfig.build(resolved)
    if config.kv_budget is not None:  # the eviction on the decomposed or the fused attention (eviction_form.py)
        form, note = choose(config, model, len(sites))
        config = dataclasses.replace(config, kv_cache=form)
        chosen = dataclasses.replace(chosen, notes=(*chosen.notes, note) if note else chosen.notes)
    return config, chosen, probe


# Parts the preset tries on a clone of the probe first: their passes refuse some layouts only while
# rewriting (prune-tokens: DeBERTa's position terms computed from activations; evict-kv: MPT's ALiBi
# beside a Where mask; quantize-kv: a layer whose P @ V reads the probabilities through an op it cannot
# clone, or after what an earlier part wrote). A part the user asked for still refuses (exit 2); a part
# only the preset chose is left out and the summary says why.
FRONT = ("unfuse-ort", "normalize", "decompose-attention")  # what the probe has been through already
TRIED = {"tokens": "prune-tokens", "evict": "evict-kv", "kv": "quantize-kv"}


def _drop_refused(resolved: dict[str, Any], chosen: Resolution, probe: ir.Model) -> tuple[dict[str, Any], Resolution]:
    """The preset's passes run in pipeline order on a clone of the probe, up to the last tried part's (a part
    can refuse only what the earlier ones wrote: quantize-kv after prune-tokens' importance); the first tried
    part that refuses is left out and the trial runs again without it."""
    while True:
        refused = _first_refusal(resolved, chosen, probe)
        if refused is None:
            return resolved, chosen
        part, reason = refused
        logger.debug("preset %s: %s left out: %s", chosen.preset.name, part, reason)
        resolved = {k: v for k, v in resolved.items() if k not in chosen.applied[part]}
        chosen = dataclasses.replace(
            chosen, applied={k: v for k, v in chosen.applied.items() if k != part},
            skipped=(*chosen.skipped, part), refusals=(*chosen.refusals, (part, reason)))


def _first_refusal(resolved: dict[str, Any], chosen: Resolution, probe: ir.Model) -> tuple[str, str] | None:
    """(part, its pass's one-line reason) for the first preset part that refuses on the probe, in order;
    None when none does, or when a pass the user asked for refuses first (the pipeline then reports it)."""
    from spatten_compiler.passes.length_gate import short_input_model

    tried = {TRIED[part]: part for part in chosen.applied if part in TRIED}
    passes = CompileConfig.build(resolved).passes()
    ends = [i for i, p in enumerate(passes) if p.name in tried]
    if not ends:
        return None
    trial = short_input_model(probe)  # normalized, attention decomposed: the front passes have run
    for p in passes[: ends[-1] + 1]:
        if p.name in FRONT:
            continue
        refusal = run_quietly(p, trial)
        if refusal is not None:
            return (tried[p.name], str(refusal).splitlines()[0]) if p.name in tried else None
    return None


def run_quietly(p: Any, probe: ir.Model) -> SpattencError | None:
    """Run pass ``p`` on the probe as the pipeline will run it on the model, so the report counts the
    same FLOPs and the preset sees the same attention; the pipeline itself reports what it does. Its
    refusal, if any, is returned (the preset's trial of a part reads it)."""
    logs = [logging.getLogger(name) for name in (type(p).__module__, "spatten_compiler.passes")]  # and its helpers
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        p(probe)
    except SpattencError as e:
        return e
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return None
