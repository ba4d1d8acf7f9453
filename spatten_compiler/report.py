"""Compile report (``spattenc ... --report out.json``): the sites, the schedules the passes chose,
and the ideal FLOP ratio of the token schedule (dense / pruned) at a few sequence lengths.

FLOPs per layer are counted from the graph itself: every MatMul/Gemm with a constant weight between
the layer's hidden-state input and output is a per-token cost (2 * in * out), plus attention's
4 * heads * head_dim per token per context token. Embeddings and anything after the last layer are
not counted. The ratio is what a perfect runtime would gain; the benchmark measures the real one.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir

from spatten_compiler.match import is_const
from spatten_compiler.passes.find_attention import AttentionSite, find_attention
from spatten_compiler.passes.site_io import layer_region
from spatten_compiler.pipeline import Pass

LENGTHS = (128, 256, 512)


def linear_flops_per_token(site: AttentionSite) -> int:
    total = 0
    if site.layer_input is None:
        return 0
    for node in layer_region(site.layer_input, site.layer_output):
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and is_const(node.inputs[1]):
            shape = node.inputs[1].shape
            if shape is not None and shape.rank() == 2 and all(isinstance(d, int) for d in shape.dims):
                total += 2 * shape.dims[0] * shape.dims[1]
    return total


def token_flop_ratio(sites: list[AttentionSite], ratios: list[float], seq: int, min_keep: int = 1) -> float:
    dense = pruned = 0.0
    for site, r in zip(sites, ratios):
        lin, att = linear_flops_per_token(site), 4 * (site.num_heads or 0) * (site.head_dim or 0)
        n = min(seq, max(min_keep, math.ceil(seq * r)))
        dense += seq * lin + seq * seq * att
        pruned += n * lin + n * n * att
    return dense / pruned if pruned else 1.0


def compile_report(source: ir.Model, passes: list[Pass]) -> dict[str, Any]:
    """Report for ``passes`` applied to ``source`` (a normalized copy of the input model)."""
    sites = find_attention(source).sites
    report: dict[str, Any] = {"passes": [p.describe() for p in passes], "layers": len(sites)}
    for p in passes:
        ratios = getattr(p, "ratios", None)
        if ratios is None or p.name != "prune-tokens":
            continue
        schedule = ratios(len(sites))
        report["token_schedule"] = schedule
        min_keep = getattr(p, "min_keep", 1)
        report["flop_ratio"] = {str(n): round(token_flop_ratio(sites, schedule, n, min_keep), 4) for n in LENGTHS}
    return report
