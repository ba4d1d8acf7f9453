"""``spattenc compile`` (the default verb): load, validate, run the pass pipeline, write."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from spatten_compiler.commands import Command, register
from spatten_compiler.config import CompileConfig, parse_ratio_list
from spatten_compiler.errors import OptionError
from spatten_compiler.modelio import load_model, same_file, save_model
from spatten_compiler.passes.length_gate import compile_gated, refuse_gated
from spatten_compiler.pipeline import Pipeline, parse_pipeline
from spatten_compiler.progress import Reporter

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="input ONNX model (external data beside it is followed)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output ONNX model")
    p.add_argument("--in-place", action="store_true", help="allow -o to be the input file")
    p.add_argument(
        "--pipeline",
        default="",
        help="explicit pass pipeline, e.g. 'normalize,prune-tokens{keep=0.5}' (default: from options)",
    )
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker after each pass")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="write a compile report: schedules chosen and the ideal FLOP ratio at 128/256/512 tokens")
    p.add_argument("--config", type=Path, help="JSON file with any of the options below (flags win)")
    t = p.add_argument_group("cascade token pruning (encoders)")
    t.add_argument("--token-keep", type=float, metavar="R",
                   help="average keep ratio with SpAtten's schedule (first 15%% of layers unpruned, then linear)")
    t.add_argument("--token-keep-schedule", metavar="R,R,...",
                   help="explicit keep ratio per layer (fractions of the input length), e.g. 1,1,0.8,0.6")
    t.add_argument("--token-unpruned", type=float, metavar="F", help="leading fraction of layers kept whole (0.15)")
    t.add_argument("--token-min-keep", type=int, metavar="N", help="never keep fewer than N tokens (preset: paper 1, spattenc 64)")
    t.add_argument("--token-rule", choices=("paper", "spattenc"),
                   help="preset (default spattenc): paper = SpAtten as published (sum importance, CLS kept, linear "
                   "schedule, stale restore, prune at the layer input); spattenc = value-weighted per-layer importance, "
                   "CLS+SEP kept, flat schedule, mean restore, >= 64 tokens kept, prune after attention")
    t.add_argument("--token-importance", choices=("sum", "mean", "value"),
                   help="sum: column sums accumulated (paper); mean: each layer's sums / its valid query rows; "
                   "value: mean with each head's column weighted by the token's value norm")
    t.add_argument("--token-protect", choices=("first", "first+last", "none"),
                   help="tokens never pruned: CLS, CLS and the last real token (SEP), or none")
    t.add_argument("--token-schedule-shape", choices=("linear", "flat"),
                   help="linear: SpAtten's ramp around the average; flat: every pruned layer keeps the average")
    t.add_argument("--token-prune-point", choices=("layer-input", "after-attention"),
                   help="drop tokens at the next layer's input, or already after the deciding layer's softmax "
                   "(same kept outputs, that layer's FFN runs on the kept tokens only)")
    t.add_argument("--restore", choices=("stale", "zero", "mean"),
                   help="output row of a pruned token: its last computed state, zeros, or the mean of the kept rows")
    t.add_argument("--emit-kept", action="store_const", const=True,
                   help="extra outputs: spatten_kept_mask [B,S] and the kept positions per pruning layer")
    h = p.add_argument_group("cascade head pruning and local value pruning")
    h.add_argument("--head-keep", type=float, metavar="R",
                   help="average head keep ratio with SpAtten's schedule (first 30%% of layers unpruned)")
    h.add_argument("--head-keep-schedule", metavar="R,R,...",
                   help="explicit head keep ratio per layer, missing trailing entries repeat the last; a cascade "
                   "(first 1.0, never increasing) except with --head-rule calibrated and --head-importance layer or ablation, "
                   "where any layer may be pruned (0.5,1: layer 0 keeps half, the rest all)")
    h.add_argument("--head-rule", choices=("paper", "calibrated"),
                   help="paper: heads chosen at run time from each input's scores (SpAtten); calibrated: chosen "
                   "once from --head-calibration data and sliced out of the weights at compile time "
                   "(default: calibrated when a calibration file is given, else paper)")
    h.add_argument("--head-calibration", metavar="NPZ",
                   help="calibration inputs (.npz of the model's input arrays, batch first; "
                   "bench/head_calibration.py writes one)")
    h.add_argument("--head-importance", choices=("layer", "cascade", "ablation"),
                   help="calibrated rule: each layer ranks its own heads by |attention output| (layer, default), "
                   "SpAtten's accumulated cascade, or by the cosine change of the mean-pooled output when the "
                   "head alone is removed (ablation; one run over the calibration data per head of each pruned layer)")
    h.add_argument("--head-reconstruct", action="store_true",
                   help="calibrated rule: refit each pruned layer's output projection so its kept heads "
                   "reproduce the full layer's output on the calibration data (least squares; no run-time cost). "
                   "On MiniLM it helped head pruning alone and hurt it combined with token pruning")
    h.add_argument("--value-keep", type=float, metavar="R",
                   help="local value pruning: per query row, only this fraction of V rows (largest P) contribute")
    q = p.add_argument_group("progressive quantization of K/V")
    q.add_argument("--kv-bits", metavar="M+L",
                   help="split-precision K/V: MSB+LSB bits (4+4, 6+4, 8+4) or static MSB only (4, 6, 8)")
    q.add_argument("--lsb-threshold", type=float, metavar="T",
                   help="the confidence rule's threshold (default per rule: fixed 0.1, peak 0.3, min 0.1, uniform 4)")
    q.add_argument("--kv-rule", choices=("fixed", "uniform", "min", "peak"),
                   help="LSBs when max p > T (peak, the default: concentrated rows, whose errors do not average "
                   "out), max p <= T (fixed, the paper's), max p <= T / n_keys (uniform), or max p <= min(T, F / n_keys) (min)")
    q.add_argument("--kv-factor", type=float, metavar="F", help="the min rule's F (default 8)")
    q.add_argument("--kv-granularity", choices=("token", "head", "channel", "tensor"),
                   help="one scale per (head, token) (default), head, (head, channel) or batch element")
    q.add_argument("--kv-stats", action="store_const", const=True,
                   help="diagnostic outputs spatten_lsb_rows.<layer> [B,H,S] and spatten_lsb_fraction [layers]")
    d = p.add_argument_group("decoder KV-cache eviction (docs/decoders.md)")
    d.add_argument("--kv-budget", type=float, metavar="B",
                   help="keep each layer's cache within B: a fraction of the length so far (0.25) or tokens (256)")
    d.add_argument("--kv-sinks", type=int, metavar="N", help="first N real tokens are never evicted (default 4)")
    d.add_argument("--kv-recent", metavar="N|P%",
                   help="the N most recent tokens, or a share P%% of the budget, are never evicted (default 50%%)")
    d.add_argument("--kv-evict", choices=("layer", "cascade"),
                   help="layer: each layer keeps its own top tokens by accumulated attention (H2O-style, default); "
                   "cascade: SpAtten's, a token dropped at layer l is dropped at every deeper layer")
    g = p.add_argument_group("length gate")
    g.add_argument("--prune-min-length", type=int, metavar="N",
                   help="prune tokens and heads only for inputs longer than N tokens; shorter inputs run the "
                   "model without them (one If on input_ids' length; unchanged weights are stored once)")
    p.add_argument(
        "--external-data",
        choices=("auto", "yes", "no"),
        default="auto",
        help="write weights to <output>.data (auto: when the input had external data or is > 1.8 GB)",
    )


def run(args: argparse.Namespace) -> int:
    if same_file(args.model, args.output) and not args.in_place:
        raise OptionError(f"-o {args.output} is the input model; pass --in-place to overwrite it")
    report = Reporter.from_args(args)
    config = CompileConfig.load(args.config, {
        "token_keep": args.token_keep,
        "token_keep_schedule": parse_ratio_list(args.token_keep_schedule) if args.token_keep_schedule else None,
        "token_unpruned": args.token_unpruned,
        "token_min_keep": args.token_min_keep,
        "token_rule": args.token_rule,
        "token_importance": args.token_importance,
        "token_protect": args.token_protect,
        "token_schedule_shape": args.token_schedule_shape,
        "token_prune_point": args.token_prune_point,
        "restore": args.restore,
        "emit_kept": args.emit_kept,
        "head_keep": args.head_keep,
        "head_keep_schedule": parse_ratio_list(args.head_keep_schedule) if args.head_keep_schedule else None,
        "head_rule": args.head_rule,
        "head_calibration": args.head_calibration,
        "head_importance": args.head_importance,
        "head_reconstruct": args.head_reconstruct or None,
        "value_keep": args.value_keep,
        "kv_bits": args.kv_bits,
        "lsb_threshold": args.lsb_threshold,
        "kv_rule": args.kv_rule,
        "kv_factor": args.kv_factor,
        "kv_granularity": args.kv_granularity,
        "kv_stats": args.kv_stats,
        "prune_min_length": args.prune_min_length,
        "kv_budget": args.kv_budget,
        "kv_sinks": args.kv_sinks,
        "kv_recent": args.kv_recent,
        "kv_evict": args.kv_evict,
    })
    if args.pipeline and config.passes():
        raise OptionError("--pipeline replaces the option-built pipeline; give one or the other")
    passes = parse_pipeline(args.pipeline) if args.pipeline else config.passes()
    t0 = time.perf_counter()
    with report.step(f"loading {args.model}"):
        model = load_model(args.model)
    if passes:
        refuse_gated(model, args.model)
    summary = _report(args.model, passes, config.prune_min_length) if args.report else None
    if config.prune_min_length:
        compile_gated(model, passes, config.unpruned().passes(), config.prune_min_length,
                      check=not args.no_check, on_pass=report.pass_done)
    else:
        Pipeline(passes, check=not args.no_check, on_pass=report.pass_done)(model)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    with report.step(f"writing {args.output}"):
        files = save_model(model, args.output, external_data=external)
    if summary is not None:
        args.report.write_text(json.dumps(summary, indent=2) + "\n")
    size = sum(f.stat().st_size for f in files) / 1e6
    report.done(f"wrote {args.output} ({sum(1 for _ in model.graph.all_nodes())} nodes, {size:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


def _report(path: Path, passes: list, prune_min_length: int | None) -> dict:
    from spatten_compiler.passes.normalize import Normalize
    from spatten_compiler.report import compile_report

    source = load_model(path, check=False)
    Normalize()(source)
    return compile_report(source, passes, prune_min_length)


register(
    Command(
        name="compile",
        help="rewrite a model with SpAtten pruning/quantization (the default verb)",
        add_arguments=add_arguments,
        run=run,
        epilog="examples:\n  spattenc model.onnx -o model.spatten.onnx --token-keep 0.5\n"
        "  spattenc model.onnx -o out.onnx --token-keep-schedule 1,1,0.8,0.6,0.4,0.3 --emit-kept\n"
        "  spattenc model.onnx -o out.onnx --token-keep 0.15 --token-min-keep 32 --prune-min-length 32\n"
        "  spattenc model.onnx -o out.onnx --config spatten.json",
    )
)
