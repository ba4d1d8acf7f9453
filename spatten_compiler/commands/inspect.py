"""``spattenc inspect``: the attention blocks spattenc finds, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from spatten_compiler import api
from spatten_compiler.commands import Command, register
from spatten_compiler.errors import NoAttentionError
from spatten_compiler.passes.find_attention import AttentionReport, AttentionSite
from spatten_compiler.progress import Reporter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="ONNX model")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--explain", action="store_true", help="also list every Softmax not taken, with the reason")


def _cached_per_token(site: AttentionSite) -> int | None:
    """Values a KV cache holds per token: K and V (``2 * kv_heads * head_dim``), or the latent caches'
    widths (multi-head latent attention caches what K/V are computed from)."""
    if site.latent_caches:
        dims = [tuple(c.past.shape.dims) if c.past.shape is not None else () for c in site.latent_caches]
        if all(len(x) == 4 and isinstance(x[1], int) and isinstance(x[3], int) for x in dims):
            return sum(x[1] * x[3] for x in dims)
        return None
    return 2 * site.num_kv_heads * site.head_dim if site.num_kv_heads and site.head_dim else None


def site_costs(site: AttentionSite, dtype_bytes: int = 4) -> dict[str, int | None]:
    """Per-token costs: projection FLOPs, attention FLOPs per context token, K/V bytes per token."""
    h, hk, d, hidden = site.num_heads, site.num_kv_heads, site.head_dim, site.hidden_size
    proj = 2 * hidden * (h + 2 * hk) * d + 2 * h * d * hidden if None not in (h, hk, d, hidden) else None
    cached = _cached_per_token(site)
    return {
        "proj_flops_per_token": proj,
        "attn_flops_per_token_per_ctx": 4 * h * d if h and d else None,  # QK^T and PV, one context token
        "kv_bytes_per_token": cached * dtype_bytes if cached else None,
    }


def report_dict(report: AttentionReport) -> dict[str, Any]:
    return {
        "sites": [{**s.to_dict(), **site_costs(s)} for s in report.sites],
        "rejected": [{"softmax": n, "reason": r} for n, r in report.rejected],
    }


def _fmt(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def render_table(report: AttentionReport) -> str:
    head = ["layer", "heads", "kv", "dim", "mask", "rope", "kv-cache", "form", "proj FLOP/tok",
            "attn FLOP/tok/ctx", "K/V B/tok"]
    rows = []
    for s in report.sites:
        c = site_costs(s)
        form = s.to_dict()["kind"] if s.fused is not None else f"{s.variant['scale']}/{s.variant['mask']}"
        packed = " packed" if s.q is not None and s.q.packed is not None else ""
        packed += " +sink" if s.sinks else ""  # learned sink columns beside the scores (GPT-OSS)
        rows.append([str(s.layer), str(s.num_heads), str(s.num_kv_heads), str(s.head_dim), s.mask_kind,
                     "yes" if s.rope else "-", "yes" if s.kv_cache else "latent" if s.caches else "-", form + packed,
                     _fmt(c["proj_flops_per_token"]), _fmt(c["attn_flops_per_token_per_ctx"]),
                     _fmt(c["kv_bytes_per_token"])])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    return "\n".join(lines)


def render_rejected(report: AttentionReport) -> str:
    if not report.rejected:
        return "every Softmax is an attention site"
    return "\n".join(f"not attention: {n}: {r}" for n, r in report.rejected)


def inspect_model(path: Path) -> AttentionReport:
    return api.inspect_report(path)


def run(args: argparse.Namespace) -> int:
    report_progress = Reporter.from_args(args)
    with report_progress.step(f"inspecting {args.model}"):
        report = inspect_model(args.model)
    if not report.sites:
        reasons = "; ".join(f"{n}: {r}" for n, r in report.rejected[:3]) or "the model has no Softmax"
        raise NoAttentionError(f"{args.model}: no attention found ({reasons})")
    if args.json:
        json.dump(report_dict(report), sys.stdout, indent=2)
        print()
        return 0
    s0 = report.sites[0]
    print(f"{args.model}: {len(report.sites)} attention sites, hidden size {s0.hidden_size}, "
          f"mask source {s0.mask_source or '-'}")
    print(render_table(report))
    if args.explain:
        print(render_rejected(report))
    return 0


register(
    Command(
        name="inspect",
        help="list the attention blocks spattenc finds in a model",
        add_arguments=add_arguments,
        run=run,
        epilog="examples:\n  spattenc inspect model.onnx\n  spattenc inspect model.onnx --explain\n"
        "  spattenc inspect model.onnx --json > sites.json",
    )
)
