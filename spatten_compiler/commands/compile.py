"""``spattenc compile`` (the default verb): load, validate, run the pass pipeline, write."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from spatten_compiler import api
from spatten_compiler.commands import Command, output_path, register
from spatten_compiler.config import CompileConfig, parse_ratio_list
from spatten_compiler.defaults import PRESET_NAMES
from spatten_compiler.errors import OptionError
from spatten_compiler.eviction_form import CACHE_OPTIONS
from spatten_compiler.modelio import same_file, save_model, weight_bytes
from spatten_compiler.passes.evict_kv import MODES, SCORES
from spatten_compiler.progress import Reporter

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # One or two lines per flag, each with its default; the rules behind them: docs/rules.md.
    p.add_argument("model", type=Path, help="input ONNX model (external data beside it is followed)")
    p.add_argument("-o", "--output", type=output_path, required=True, help="output ONNX model (required)")
    p.add_argument("--in-place", action="store_true", help="allow -o to be the input file")
    p.add_argument("--pipeline", default="",
                   help="explicit passes, e.g. 'normalize,prune-tokens{keep=0.5}' (default: built from the options)")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker after each pass")
    p.add_argument("--report", type=output_path, metavar="JSON",
                   help="write the schedules chosen and the ideal FLOP ratio at 128/256/512 tokens (default: none)")
    p.add_argument("--config", type=Path, help="JSON file with any option below, flags win (default: none)")
    d = p.add_argument_group("measured defaults (applied when no option below turns a rewrite on)")
    d.add_argument("--preset", choices=PRESET_NAMES,
                   help="measured settings for the model's kind (docs/presets.md); default: 'default' when no "
                   "option turns a rewrite on; explicit options override its entries")
    for part in ("token", "head", "value"):
        d.add_argument(f"--no-{part}-pruning", action="store_const", const=True,
                       help=f"leave {part} pruning out of the preset" + ("; K/V: --kv-bits none" * (part == "value")))
    d.add_argument("--no-kv-eviction", action="store_const", const=True,
                   help="leave KV-cache eviction out of the decoder preset")
    t = p.add_argument_group("cascade token pruning (encoders; decoders without a KV cache: the prompt)",
                             "defaults marked 'rule' come from --token-rule: spattenc's / the paper's")
    t.add_argument("--token-keep", type=float, metavar="R",
                   help="average fraction of tokens kept per pruned layer (default: the preset's)")
    t.add_argument("--token-keep-schedule", metavar="R,R,...",
                   help="explicit keep ratio per layer, e.g. 1,1,0.8,0.6 (default: from --token-keep)")
    t.add_argument("--token-unpruned", type=float, metavar="F",
                   help="leading fraction of layers kept whole (default 0.15)")
    t.add_argument("--token-min-keep", type=int, metavar="N", help="never keep fewer than N tokens (rule: 64 / 1)")
    t.add_argument("--token-rule", choices=("paper", "spattenc"),
                   help="preset for the options below: spattenc (default; wins on models used without "
                   "fine-tuning) or paper (SpAtten as published)")
    t.add_argument("--token-importance", choices=("sum", "mean", "value"),
                   help="accumulated column sums, per-layer mean, or mean weighted by value norms (rule: value / sum)")
    t.add_argument("--token-protect", choices=("first", "first+last", "none"),
                   help="tokens never pruned: CLS, CLS and SEP, or none (rule: first+last / first)")
    t.add_argument("--token-schedule-shape", choices=("linear", "flat"),
                   help="SpAtten's ramp around the average, or the average in every pruned layer (rule: flat / linear)")
    t.add_argument("--token-prune-point", choices=("layer-input", "after-attention"),
                   help="drop tokens at the next layer's input or right after the deciding softmax "
                   "(rule: after-attention / layer-input)")
    t.add_argument("--restore", choices=("stale", "zero", "mean"),
                   help="output row of a pruned token: last state, zeros or the kept rows' mean (rule: mean / stale)")
    t.add_argument("--emit-kept", action="store_const", const=True,
                   help="add outputs spatten_kept_mask [B,S] and the kept positions per layer (default off)")
    h = p.add_argument_group("cascade head pruning and local value pruning")
    h.add_argument("--head-keep", type=float, metavar="R",
                   help="average fraction of heads kept, first 30%% of layers whole (default: none)")
    h.add_argument("--head-keep-schedule", metavar="R,R,...",
                   help="explicit head keep ratio per layer, the last repeats; calibrated per-layer rules may "
                   "prune layer 0 (default: from --head-keep)")
    h.add_argument("--head-rule", choices=("paper", "calibrated"),
                   help="heads picked per input at run time, or once at compile time from calibration data "
                   "(default: calibrated iff --head-calibration)")
    h.add_argument("--head-calibration", metavar="NPZ",
                   help="calibration inputs, .npz of input arrays (python -m bench head_calibration; default: none)")
    h.add_argument("--head-importance", choices=("layer", "cascade", "ablation"),
                   help="calibrated rule: rank heads per layer by |output|, by SpAtten's cascade, or by the cost of "
                   "removing each (default layer)")
    h.add_argument("--head-reconstruct", action="store_true",
                   help="calibrated rule: refit each pruned layer's output projection on the calibration data "
                   "(default off)")
    h.add_argument("--value-keep", type=float, metavar="R",
                   help="per query row, keep this fraction of V rows with the largest P (default: none)")
    q = p.add_argument_group("progressive quantization of K/V")
    q.add_argument("--kv-bits", metavar="M+L",
                   help="split-precision K/V: MSB+LSB bits (4+1, 6+4), static bits (4, 8) or none "
                   "(default: the preset's)")
    q.add_argument("--lsb-threshold", type=float, metavar="T",
                   help="the rule's threshold (default per rule: peak 0.3, fixed 0.1, min 0.1, uniform 4)")
    q.add_argument("--kv-rule", choices=("fixed", "uniform", "min", "peak"),
                   help="rows that also fetch LSBs: max p > T (peak, default), max p <= T (fixed, the paper's), "
                   "max p <= T/n (uniform), max p <= min(T, F/n) (min)")
    q.add_argument("--kv-factor", type=float, metavar="F", help="the min rule's F (default 8)")
    q.add_argument("--kv-granularity", choices=("token", "head", "channel", "tensor"),
                   help="one scale per (head, token), head, (head, channel) or batch element (default token)")
    q.add_argument("--kv-stats", action="store_const", const=True,
                   help="add outputs spatten_lsb_rows.<layer> and spatten_lsb_fraction (default off)")
    e = p.add_argument_group("decoder KV-cache eviction (docs/decoders.md)",
                             "on a model whose every attention layer is onnxruntime's fused GroupQueryAttention "
                             "(onnxruntime-genai's model builder) the eviction keeps the fused kernel (evict-gqa), "
                             "unless evict-gqa refuses the model or token/head/value pruning, --kv-bits, --optimize "
                             "or --weights is asked for too (then the attention is decomposed, as on other decoders; "
                             "--kv-cache decomposed asks for that, e.g. for spattenc emit)")
    e.add_argument("--kv-budget", type=float, metavar="B",
                   help="keep each layer's cache within B: a fraction of the length so far (0.25) or tokens (256); "
                   "default: no eviction")
    e.add_argument("--kv-sinks", type=int, metavar="N", help="first N real tokens are never evicted (default 4)")
    e.add_argument("--kv-recent", metavar="N|P%",
                   help="the N most recent tokens, or a share P%% of the budget, are never evicted (default 50%%)")
    e.add_argument("--kv-evict", choices=MODES,
                   help="one kept set per KV head (head: the presets), per layer (layer: H2O; default with "
                   "--kv-budget) or SpAtten's cascade")
    e.add_argument("--kv-score", choices=tuple(SCORES),
                   help="token ranking for eviction: accumulated (H2O / SpAtten), mean, sqrt, ema, last "
                   "(TOVA) (docs/decoders.md; default accumulated)")
    e.add_argument("--kv-min-keep", type=int, metavar="N",
                   help="no eviction while a layer's cache holds at most N tokens: a floor for short prompts "
                   "(default 0; the decoder presets set it)")
    e.add_argument("--kv-slack", type=int, metavar="N",
                   help="block eviction: a cache may grow to budget + N tokens, then all layers evict at once "
                   "(default 0: evict at every step)")
    e.add_argument("--kv-cache", choices=CACHE_OPTIONS,
                   help="a builder's fused GroupQueryAttention: kept, evicted in the graph (graph, default) or by "
                   "spattenc generate (shared); decomposed (for spattenc emit)")
    g = p.add_argument_group("length gate")
    g.add_argument("--prune-min-length", type=int, metavar="N",
                   help="prune tokens and heads only for inputs longer than N tokens, via one If (default: no gate)")
    o = p.add_argument_group("onnxruntime fusions and weight quantization (after the SpAtten rewrites)")
    o.add_argument("--optimize", action="store_const", const=True,
                   help="apply onnxruntime's transformer fusions to what spattenc did not rewrite (layer norms, "
                   "GELU, embeddings, attention of unpruned layers)")
    o.add_argument("--weights", choices=("int8", "int4"),
                   help="quantize projection weights with onnxruntime: int8 (dynamic) or int4 (MatMulNBits, decoders); "
                   "default: float weights")
    p.add_argument(
        "--external-data",
        choices=("auto", "yes", "no"),
        default="auto",
        help="write weights to <output>.data: yes, no, or auto (default: if the input had them or is > 1.8 GB)",
    )


def run(args: argparse.Namespace) -> int:
    if same_file(args.model, args.output) and not args.in_place:
        raise OptionError(f"-o {args.output} is the input model; pass --in-place to overwrite it")
    report = Reporter.from_args(args)
    options = CompileConfig.read_options(args.config, {
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
        "preset": args.preset,
        "no_token_pruning": args.no_token_pruning,
        "no_head_pruning": args.no_head_pruning,
        "no_value_pruning": args.no_value_pruning,
        "no_kv_eviction": args.no_kv_eviction,
        "optimize": args.optimize,
        "weights": args.weights,
        "kv_budget": args.kv_budget,
        "kv_sinks": args.kv_sinks,
        "kv_recent": args.kv_recent,
        "kv_evict": args.kv_evict,
        "kv_score": args.kv_score,
        "kv_min_keep": args.kv_min_keep,
        "kv_slack": args.kv_slack,
        "kv_cache": args.kv_cache,
    })
    t0 = time.perf_counter()
    with report.step(f"compiling {args.model}"), report.bar(None, "passes", unit="pass") as bar:
        result = api.compile(args.model, pipeline=args.pipeline, check=not args.no_check,
                             report=args.report is not None or report.verbosity >= 0,
                             on_start=lambda p: bar.set_postfix_str(p.name),
                             on_pass=lambda p, s: (report.pass_done(p, s), bar.update()),
                             **options)
    model, summary = result.model, result.report
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    with report.step(f"writing {args.output}"), \
            report.bar(weight_bytes(model), "writing weights", unit="B", unit_scale=True) as bar:
        files = save_model(model, args.output, external_data=external, progress=lambda t, n: bar.update(n))
    if summary is not None and args.report:
        args.report.write_text(json.dumps(summary, indent=2) + "\n")
    for line in result.summary:
        report.done(line)
    size = sum(f.stat().st_size for f in files) / 1e6
    nodes = sum(1 for _ in model.graph.all_nodes())
    report.done(f"wrote {args.output} ({nodes} nodes, {size:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


register(
    Command(
        name="compile",
        help="rewrite a model with SpAtten pruning/quantization (the default verb)",
        add_arguments=add_arguments,
        run=run,
        epilog="examples:\n  spattenc model.onnx -o model.spatten.onnx        (the measured default preset)\n"
        "  spattenc model.onnx -o out.onnx --preset aggressive --kv-bits none\n"
        "  spattenc model.onnx -o model.spatten.onnx --token-keep 0.5\n"
        "  spattenc model.onnx -o out.onnx --token-keep-schedule 1,1,0.8,0.6,0.4,0.3 --emit-kept\n"
        "  spattenc model.onnx -o out.onnx --token-keep 0.15 --token-min-keep 32 --prune-min-length 32\n"
        "  spattenc model.onnx -o out.onnx --kv-cache shared   (builder GQA models: spattenc generate evicts)\n"
        "  spattenc model.onnx -o out.onnx --config spatten.json",
    )
)
