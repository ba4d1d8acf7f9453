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


def _weight_flops(nodes: list[ir.Node]) -> int:
    total = 0
    for node in nodes:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and is_const(node.inputs[1]):
            shape = node.inputs[1].shape
            if shape is not None and shape.rank() == 2 and all(isinstance(d, int) for d in shape.dims):
                total += 2 * shape.dims[0] * shape.dims[1]
    return total


def linear_flops_per_token(site: AttentionSite) -> tuple[int, int]:
    """(before the softmax: Q/K/V projections, after it: output projection and FFN) per token."""
    if site.layer_input is None:
        return 0, 0
    layer = layer_region(site.layer_input, site.layer_output)
    post: dict[int, ir.Node] = {}
    for start in (site.pv.outputs[0] if site.pv else None, site.residual.outputs[0] if site.residual else None):
        if start is not None:
            post.update((id(n), n) for n in layer_region(start, site.layer_output))
    return _weight_flops([n for n in layer if id(n) not in post]), _weight_flops(list(post.values()))


def token_flop_ratio(sites: list[AttentionSite], ratios: list[float], seq: int, min_keep: int = 1,
                     in_layer: bool = False) -> float:
    """Dense / pruned FLOPs. ``in_layer``: a layer whose successor keeps fewer tokens already runs
    P@V rows, output projection and FFN on the successor's tokens (prune point after-attention)."""
    counts = [min(seq, max(min_keep, math.ceil(seq * r))) for r in ratios]
    dense = pruned = 0.0
    for i, site in enumerate(sites):
        pre, post = linear_flops_per_token(site)
        att = 2 * (site.num_heads or 0) * (site.head_dim or 0)  # per (query, key) pair, for QK^T and for PV
        n = counts[i]
        out = counts[i + 1] if in_layer and i + 1 < len(counts) else n
        dense += seq * (pre + post) + 2 * seq * seq * att
        pruned += n * pre + out * post + n * n * att + out * n * att
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
        in_layer = getattr(p, "prune_point", "layer-input") == "after-attention"
        report["flop_ratio"] = {str(n): round(token_flop_ratio(sites, schedule, n, min_keep, in_layer), 4)
                                for n in LENGTHS}
    return report
