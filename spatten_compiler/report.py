"""Compile report (``spattenc ... --report out.json``): the sites, the schedules the passes chose,
and the ideal FLOP ratio of the token schedule (dense / pruned) at a few sequence lengths, and the
ideal K/V-byte ratio (fp32 dense / rewritten; MSB planes only and with every LSB plane re-read).

FLOPs per layer are counted from the graph itself: every MatMul/Gemm with a constant weight (or an
int4 MatMulNBits, its K x N) between the layer's hidden-state input and output is a per-token cost
(2 * in * out), plus attention's 4 * heads * head_dim per token per context token. Embeddings and
anything after the last layer are not counted. The ratio is what a perfect runtime would gain; the
benchmark measures the real one.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir

from spatten_compiler.match import is_const
from spatten_compiler.passes.find_attention import AttentionSite, find_attention
from spatten_compiler.passes.nbits_blocks import in_width, is_nbits, out_width
from spatten_compiler.passes.site_io import layer_region
from spatten_compiler.pipeline import Pass

LENGTHS = (128, 256, 512)


def _weight_flops(nodes: list[ir.Node]) -> int:
    total = 0
    for node in nodes:
        if is_nbits(node):  # int4 blocks: the logical K x N weight
            total += 2 * in_width(node) * out_width(node)
        elif node.op_type in ("MatMul", "Gemm", "MatMulInteger") and len(node.inputs) > 1 and is_const(node.inputs[1]):
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
                     in_layer: bool = False, heads: list[float] | None = None) -> float:
    """Dense / pruned FLOPs. ``in_layer``: a layer whose successor keeps fewer tokens already runs
    P@V rows, output projection and FFN on the successor's tokens (prune point after-attention).
    ``heads``: fraction of each layer's heads kept (prune-heads): Q (and, without a KV cache, K and
    V) projection columns, output-projection rows and the attention itself shrink with it."""
    counts = [min(seq, max(min_keep, math.ceil(seq * r))) for r in ratios]
    dense = pruned = 0.0
    for i, site in enumerate(sites):
        pre, post = linear_flops_per_token(site)
        f = heads[i] if heads else 1.0
        qkv = [_weight_flops([b.projection.node]) if b is not None and b.projection is not None else 0
               for b in (site.q, site.k, site.v)]
        if site.q is not None and site.q.packed is not None:
            qkv = [qkv[0] / 3] * 3
        kv_full = sum(qkv[1:]) if site.kv_cache else 0
        o = _weight_flops([site.out_proj.node]) if site.out_proj is not None else 0
        pre_h = pre - (1 - f) * (sum(qkv) - kv_full)
        post_h = post - (1 - f) * o
        att = 2 * (site.num_heads or 0) * (site.head_dim or 0)  # per (query, key) pair, for QK^T and for PV
        n = counts[i]
        out = counts[i + 1] if in_layer and i + 1 < len(counts) else n
        dense += seq * (pre + post) + 2 * seq * seq * att
        pruned += n * pre_h + out * post_h + f * (n * n * att + out * n * att)
    return dense / pruned if pruned else 1.0


def head_fractions(p: Pass, sites: list[AttentionSite]) -> list[float]:
    """Fraction of head groups prune-heads keeps per layer (the schedule's counts)."""
    from spatten_compiler.passes.prune_heads import kept_groups

    groups = sites[0].num_kv_heads or 1
    if getattr(p, "heads", ()):
        return [len(h) / groups if h else 1.0 for h in p.heads]
    return [kept_groups(groups, r, p.min_keep) / groups for r in p.ratios(len(sites))]


def compile_report(source: ir.Model, passes: list[Pass], prune_min_length: int | None = None) -> dict[str, Any]:
    """Report for ``passes`` applied to ``source`` (a normalized copy of the input model); with a length
    gate, lengths up to ``prune_min_length`` run unpruned (ratio 1)."""
    sites = find_attention(source).sites
    report: dict[str, Any] = {"passes": [p.describe() for p in passes], "layers": len(sites)}
    schedule, min_keep, in_layer, heads = [1.0] * len(sites), 1, False, None
    for p in passes:
        if p.name == "prune-heads" and sites:
            heads = head_fractions(p, sites)
            report["head_keep_per_layer"] = [round(f * (sites[0].num_kv_heads or 1)) for f in heads]
        if p.name != "prune-tokens":
            continue
        schedule = p.ratios(len(sites))
        report["token_schedule"] = schedule
        min_keep = getattr(p, "min_keep", 1)
        in_layer = getattr(p, "prune_point", "layer-input") == "after-attention"
    if "token_schedule" in report or heads:
        report["flop_ratio"] = {str(n): round(token_flop_ratio(sites, schedule, n, min_keep, in_layer, heads), 4)
                                if prune_min_length is None or n > prune_min_length else 1.0 for n in LENGTHS}
    kv = next((p for p in passes if p.name == "quantize-kv"), None)
    if sites and (kv is not None or "flop_ratio" in report):
        report["kv_byte_ratio"] = {
            str(n): [round(kv_byte_ratio(sites, schedule if prune_min_length is None or n > prune_min_length
                                         else [1.0] * len(sites), n, min_keep, heads, kv, lsb), 4)
                     for lsb in (False, True)] for n in LENGTHS}
    if prune_min_length is not None:
        report["prune_min_length"] = prune_min_length
    return report


def kv_byte_ratio(sites: list[AttentionSite], ratios: list[float], seq: int, min_keep: int = 1,
                  heads: list[float] | None = None, kv: Pass | None = None, lsb: bool = False) -> float:
    """fp32 K/V bytes of the dense model / the rewritten model's, each layer's K and V read once for
    its keys (token pruning: the tokens entering the layer; head pruning without a KV cache: the kept
    heads' only). ``kv``: the quantize-kv pass - MSB planes plus a float32 scale per (token, head) for
    per-token granularity, and with ``lsb`` the LSB planes too (every row re-reading them: the upper
    bound; the share of rows that do is data-dependent, ``--kv-stats`` measures it)."""
    from spatten_compiler.passes.quantize_kv import parse_bits

    m, lo = parse_bits(kv.bits) if kv is not None else (32, 0)
    tensors = 2 if kv is None or getattr(kv, "values", True) else 1
    dense = pruned = 0.0
    for i, site in enumerate(sites):
        dh, hkv = site.head_dim or 0, site.num_kv_heads or site.num_heads or 0
        n = min(seq, max(min_keep, math.ceil(seq * ratios[i])))
        f = heads[i] if heads and not site.kv_cache else 1.0
        scale = 4 if kv is not None and kv.granularity == "token" else 0  # float32 per (token, head)
        quant = tensors * (dh * (m + (lo if lsb else 0)) / 8 + scale)
        fp32 = (2 - tensors) * dh * 4  # an unquantized V
        dense += seq * hkv * 2 * dh * 4
        pruned += n * hkv * f * (quant + fp32)
    return dense / pruned if pruned else 1.0
