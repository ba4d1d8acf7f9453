"""The few lines every compile ends with: what was applied per layer, the ideal FLOP and K/V-byte
ratios at a few lengths (from :func:`spatten_compiler.report.compile_report`), and the one-line way
to change or switch off each part. An identity compile says so. Printed by the compile command on
stderr before the "wrote ..." line; ``-q`` silences it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spatten_compiler.defaults import FEATURES, KINDS, PARTS, PRESET_NAMES, PRESETS, Resolution
from spatten_compiler.pipeline import Pass

REWRITES = ("prune-heads", "prune-tokens", "prune-values", "quantize-kv", "evict-kv", "evict-gqa")
MODE_TEXT = {"head": "per-KV-head"}  # evict-kv modes whose name does not read as a granularity


def _runs(values: Sequence[Any], fmt: str = "{}") -> str:
    """``1.00, 0.40 x5``: consecutive equal entries once, with their count."""
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        text = fmt.format(values[i])
        out.append(text if j == i else f"{text} x{j - i + 1}")
        i = j + 1
    return ", ".join(out)


def _why_skipped(res: Resolution, part: str) -> str:
    """The pass's refusal (the preset tried the part on the model), else the feature the model lacks."""
    return dict(res.refusals).get(part) or FEATURES[PARTS[part].needs].lacking


def _headline(res: Resolution, passes: Sequence[Pass], pipeline: str, layers: int) -> str:
    kind = KINDS.get(res.kind, "")
    if res.preset is not None:
        changed = [f"{PARTS[p].name} off" for p in res.off] + [f"your {PARTS[p].name}" for p in res.replaced] + \
            [f"{PARTS[p].name} skipped: {_why_skipped(res, p)}" for p in res.skipped]
        extra = f" ({'; '.join(changed)})" if changed else ""
        return f"spattenc: preset {res.preset.name} for {kind}, {layers} attention layers{extra}:"
    if pipeline:
        return f"spattenc: --pipeline {pipeline}:"
    return f"spattenc: your options only ({layers} attention layers; no preset, as an option turned a rewrite on):"


def _identity(res: Resolution, pipeline: str) -> list[str]:
    if res.kind == "none":
        why = f"no attention found ({res.unfound or 'spattenc inspect MODEL --explain says why'})"
    elif pipeline:
        why = f"--pipeline {pipeline} has no rewriting pass"
    elif not any(kind == res.kind for kind, _ in PRESETS):
        why = (f"no measured preset for {KINDS.get(res.kind, res.kind)} yet (docs/presets.md); --token-keep R "
               "prunes its prompt")
    elif res.skipped:
        why = "; ".join(f"the preset's {PARTS[p].name} is skipped: {_why_skipped(res, p)}"
                        + (f" ({FEATURES[PARTS[p].needs].remedy})" if p not in dict(res.refusals) else "")
                        for p in res.skipped)
    else:
        why = "every part is switched off"
    return [f"spattenc: no rewrite applied - the output computes what the input does: {why}",
            "  (with no options spattenc applies the measured default preset; see --preset)"
            if res.kind != "none" else "  (spattenc rewrites attention blocks; this model has none it recognizes)"]


def _applied(report: dict[str, Any], passes: Sequence[Pass]) -> list[str]:
    lines: list[str] = []
    by_name = {p.name: p for p in passes}
    if "token_schedule" in report:
        p = by_name["prune-tokens"]
        lines.append(f"  tokens kept per layer (of the input length, at least {getattr(p, 'min_keep', 1)}): "
                     f"{_runs(report['token_schedule'], '{:.2f}')}")
    if "head_keep_per_layer" in report:
        lines.append(f"  heads (KV groups) kept per layer: {_runs(report['head_keep_per_layer'])}")
    if "prune-values" in by_name:
        lines.append(f"  values: each query row reads the top {by_name['prune-values'].keep:.0%} of V rows (by P)")
    from spatten_compiler.eviction_form import note_for
    from spatten_compiler.passes.evict_kv import EvictKV, budget_tokens

    e = next((p for p in passes if isinstance(p, EvictKV)), None)  # evict-kv, or evict-gqa on the fused kernel
    if e is not None:
        budget = f"{e.budget:.0%} of the length so far" if e.budget <= 1 else f"{e.budget:g} tokens"
        window = (f"the last {e.recent} tokens" if e.recent
                  else f"a recent window of {e.recent_share:.0%} of the kept slots")
        floor = f"; nothing evicted while a layer holds at most {e.min_keep} tokens" if e.min_keep else ""
        if e.slack:
            floor += f"; evicted in blocks: a layer grows to its budget + {e.slack} tokens, then evicts back"
        lines.append(f"  KV cache per layer kept within {budget} across generation steps ({MODE_TEXT.get(e.mode, e.mode)} eviction by "
                     f"accumulated attention; the first {e.sinks} tokens and {window} never evicted{floor})")
        held = [n / budget_tokens(e.layer_budget(0), n, e.sinks, e.recent, n, e.min_keep) for n in (128, 512, 2048)]
        lines.append(f"  ideal at 128 / 512 / 2048 tokens so far: {' / '.join(f'{h:.1f}x' for h in held)} "
                     "smaller KV cache held (layer 0)")
        if note := note_for(e):
            lines.append(note)
    if "quantize-kv" in by_name:
        q = by_name["quantize-kv"]
        m, _, lo = q.bits.partition("+")
        planes = (f"{m}-bit MSB + {lo}-bit LSB planes, LSBs re-read where rule {q.rule} "
                  f"(threshold {q.resolved_threshold:g}) says so") if lo else f"static {m}-bit"
        lines.append(f"  K/V in every layer: {planes}, one scale per {q.granularity}")
    if report.get("prune_min_length"):
        lines.append(f"  inputs of at most {report['prune_min_length']} tokens run without token/head pruning")
    return lines


def _ratios(report: dict[str, Any]) -> list[str]:
    flops, kv = report.get("flop_ratio", {}), report.get("kv_byte_ratio", {})
    lengths = list(kv or flops)
    if not lengths:
        return []
    text = f"  ideal at {' / '.join(lengths)} tokens: " + (
        f"{' / '.join(f'{flops[n]:.2f}x' for n in lengths)} fewer FLOPs" if flops else "FLOPs unchanged")
    if kv:
        text += f", {' / '.join(f'{kv[n][0]:.1f}x' for n in lengths)} fewer K/V bytes"
        if any(kv[n][0] != kv[n][1] for n in lengths):
            text += f" ({' / '.join(f'{kv[n][1]:.1f}x' for n in lengths)} if every row re-reads its LSBs)"
    return [text]


def _switches(res: Resolution, passes: Sequence[Pass], pipeline: str) -> list[str]:
    names = {p.name for p in passes}
    parts = {"prune-tokens": "tokens", "prune-heads": "heads", "prune-values": "values", "quantize-kv": "kv",
             "evict-kv": "evict", "evict-gqa": "evict"}
    on = [parts[n] for n in REWRITES if n in names and n in parts]
    lines: list[str] = []
    if on and not pipeline:
        others = [n for n in PRESET_NAMES if (res.preset is None or n != res.preset.name) and (res.kind, n) in PRESETS]
        lines.append("  change: " + "; ".join(f"{PARTS[p].change}" for p in on) +
                     ("; --preset " + "|".join(others) if others else ""))
        # a part the user asked for explicitly is switched off by dropping the option
        off = [PARTS[p].off_flag if p in res.applied or p != "evict" else "drop --kv-budget" for p in on]
        lines.append("  off: " + ", ".join(off) + "; nothing at all: --pipeline normalize")
    elif pipeline:
        lines.append("  (an explicit --pipeline runs exactly those passes; drop it for the measured defaults)")
    if names & {"evict-kv", "evict-gqa"} and not pipeline:
        lines.append("  eviction knobs: --kv-budget B|N, --kv-min-keep N, --kv-sinks N, --kv-recent N|P%, "
                     "--kv-evict layer|cascade|head, --kv-score RULE, --kv-slack N, --kv-cache graph|shared "
                     "(docs/decoders.md)")
    if res.preset is not None:
        lines.append(f"  measured: docs/presets.md ({res.preset.note})")
    if "quantize-kv" in names:
        lines.append("  note: K/V planes save memory traffic on an accelerator; onnxruntime on CPU computes both "
                     "precisions (slower there) - use --kv-bits none for CPU serving")
    return lines


def summary_lines(res: Resolution, passes: Sequence[Pass], report: dict[str, Any], pipeline: str = "") -> list[str]:
    if not any(p.name in REWRITES for p in passes):
        return _identity(res, pipeline)
    return [_headline(res, passes, pipeline, report.get("layers", 0)), *_applied(report, passes), *res.notes,
            *_ratios(report), *_switches(res, passes, pipeline)]
