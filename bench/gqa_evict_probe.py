"""The ceiling of KV eviction on onnxruntime's fused GroupQueryAttention, before building it (session 20):
is a decode step over a pruned cache with the fused kernel faster than onnxruntime-genai's int4 step?

    python bench/gqa_evict_probe.py --contexts 1024,2048,4096 --steps 16 --name s20-gqa

On the model builder's int4 SmolLM2-135M (models/cache/genai-smollm2-int4; `python models/_genai.py
smollm2` makes it), every configuration brought to context C and stepped in lockstep with the others
(rotating order, bench/genai_step.py's protocol and ``run_context``; median over the steps after the
warm-up; 2 intra-op threads; onnxruntime sessions stop spinning when a step returns):

* ``genai-int4``: onnxruntime-genai runs the builder's folder (prefills the real tokens; its cache is a
  shared max-length buffer).
* ``ort-int4``: the same model.onnx under plain onnxruntime, cache of C rows, present = past + new
  (``run_with_ort_values``: the cache stays in onnxruntime's OrtValues, no numpy round trip).
* ``ort-int4-share``: the same with the past/present buffer shared (IOBinding, one OrtValue bound as
  past input and present output): genai's form under plain onnxruntime.
* ``gqa-imp-<f>`` (f = 50, 25): the model edited ad hoc (:func:`edit_model`: every GroupQueryAttention
  outputs its softmax probabilities, ``qk_output=2``, and reads a ``position_ids`` input) plus the
  importance accumulation spattenc would add per layer (``present_importance = Pad(past_importance)
  + ReduceSum over the query heads sharing a KV head of the new row's probabilities``, ``[B, kv, n]``),
  with a cache of ``ceil(f% * C)`` rows, non-shared.
* ``gqa-imp-<f>-share``: the edited model with the shared buffer (capacity = kept rows + the steps).
* ``spattenc-genai-int4-evict50``: bench/genai_step.py's configuration of that name (``spattenc
  genai-smollm2-int4 --kv-budget 0.5 --kv-cache decomposed``: GroupQueryAttention decomposed, then
  evict-kv), run as there
  (DecoderSession, numpy caches, synthesized kept slots); skipped when that model is not built.
* ``evict-gqa-50``: the same options compiled by ``evict-gqa`` (passes/evict_gqa.py: the kernel stays
  fused), run the same way; ``evict-gqa-50-slack16``: with block eviction (``slack=16``, the decoder
  preset's). The two are compiled here on first use (models/cache/s20-gqa/). ``-ov``: the same model
  stepped with its states as OrtValues (as ``ort-int4``) instead of DecoderSession's numpy arrays.
* ``shared-50`` / ``shared-50-slack16``: ``evict-gqa{in_graph=false}`` (the graph only accumulates the
  importance) stepped by spatten_compiler/shared_cache.py's SharedCacheSession: one shared buffer per
  cache, evicted in place every step / every 16 steps (``SharedRunner``); ``shared-preset``: the same
  with the decoder preset's rule (per KV head, 256-token floor, blocks of 16).

Caches are synthesized (random K/V: a step's cost depends on the shapes). The ``gqa-imp`` steps hold
no eviction work (which rows to keep, moving them): ``compaction_ms`` (bench/_gqa_runners.py) times
one block eviction of every layer separately, and the table adds its cost amortized over ``--slack``
steps to the ``gqa-imp-*-share`` configurations. The compiled models' steps include their evictions
(the mean step covers the ones that evict every ``slack`` steps).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._gqa_runners import HEADROOM, CacheRunner, SharedRunner, compaction_ms  # noqa: E402
from bench.common import DEFAULT_RESULTS, run_metadata, write_results  # noqa: E402
from bench.genai_step import (  # noqa: E402
    CACHE,
    CONFIGS,
    DATA,
    GenaiRunner,
    OrtRunner,
    latency_table,
    run_context,
    speedup_table,
)  # noqa: E402

log = logging.getLogger("bench.gqa_evict_probe")
BUILDER = CACHE / "genai-smollm2-int4"
EDITED = CACHE / "s20-gqa" / "genai-int4.gqa-importance.onnx"
# name -> (compiled model, evict-gqa options: genai_step's spattenc-genai-int4-evict50 options, block eviction)
FUSED = {"evict-gqa-50": (CACHE / "s20-gqa" / "genai-int4.evict-gqa50.onnx", {"budget": 0.5}),
         "evict-gqa-50-slack16": (CACHE / "s20-gqa" / "genai-int4.evict-gqa50-slack16.onnx",
                                  {"budget": 0.5, "slack": 16}),
         "shared-50": (CACHE / "s20-gqa" / "genai-int4.evict-gqa50-shared.onnx", {"budget": 0.5, "in_graph": False}),
         "shared-50-slack16": (CACHE / "s20-gqa" / "genai-int4.evict-gqa50-shared-slack16.onnx",
                               {"budget": 0.5, "slack": 16, "in_graph": False}),
         # the decoder preset's rule (spatten_compiler/defaults.py: per KV head, 256 floor, slack 16)
         "shared-preset": (CACHE / "s20-gqa" / "genai-int4.evict-gqa-preset-shared.onnx",
                           {"budget": 0.5, "mode": "head", "min_keep": 256, "slack": 16, "in_graph": False})}


def edit_model(src: Path, dst: Path) -> None:
    """Every GroupQueryAttention gets ``qk_output=2`` (output 3: probabilities [B, H, 1, n]) and input 9
    ``position_ids``; per layer ``past_importance.<l>`` [B, kv, P] -> ``present_importance.<l>`` [B, kv, P+1]
    = Pad(past, one 0 column) + ReduceSum(Reshape(probs, [B, kv, H/kv, n]), axis 2). Decode steps only."""
    m = onnx.load(str(src))
    g = m.graph
    g.input.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", 1]))
    g.initializer.extend([numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 1], np.int64), "/spattenc/pad_new"),
                          numpy_helper.from_array(np.array([2], np.int64), "/spattenc/axis2")])
    extra = []
    for node in [n for n in g.node if n.op_type == "GroupQueryAttention"]:
        layer = int(node.output[1].split(".")[1])  # present.<l>.key
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kv = attrs["kv_num_heads"]
        inputs = list(node.input) + [""] * (10 - len(node.input))
        inputs[9] = "position_ids"
        del node.input[:]
        node.input.extend(inputs)
        probs, p = f"/spattenc/probs.{layer}", f"/spattenc/{layer}/"
        node.output.append(probs)
        node.attribute.append(helper.make_attribute("qk_output", 2))
        shape = numpy_helper.from_array(np.array([0, kv, -1, 0], np.int64), p + "group_shape")
        g.initializer.append(shape)
        past, present = f"past_importance.{layer}", f"present_importance.{layer}"
        g.input.append(helper.make_tensor_value_info(past, TensorProto.FLOAT,
                                                     ["batch_size", kv, "past_sequence_length"]))
        g.output.append(helper.make_tensor_value_info(present, TensorProto.FLOAT,
                                                      ["batch_size", kv, "total_sequence_length"]))
        extra += [helper.make_node("Reshape", [probs, shape.name], [p + "grouped"]),
                  helper.make_node("ReduceSum", [p + "grouped", "/spattenc/axis2"], [p + "row"], keepdims=0),
                  helper.make_node("Pad", [past, "/spattenc/pad_new"], [p + "padded"]),
                  helper.make_node("Add", [p + "padded", p + "row"], [present])]
    g.node.extend(extra)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst), save_as_external_data=True, location=dst.name + ".data")


def compile_fused(src: Path, dst: Path, options: dict) -> None:
    """``src`` through evict-gqa with ``options``, saved (external data) as ``dst``."""
    from spatten_compiler.modelio import load_model, save_model
    from spatten_compiler.pipeline import Pipeline, make_pass

    model = load_model(src)
    Pipeline([make_pass("evict-gqa", **options)], check=True)(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, dst, external_data=True)


def render(rows: list[dict], compaction: dict, meta: dict, args: argparse.Namespace) -> str:
    contexts = sorted({r["context"] for r in rows})
    lines = ["# Fused GroupQueryAttention + eviction: decode-step ceiling (SmolLM2-135M, builder int4)", "",
             f"command: `{meta['command']}`  ", f"date {meta['date_utc']}, commit {meta['git_commit']}, onnxruntime "
             f"{meta['onnxruntime_version']}, {args.threads} intra-op threads, {meta['cpu_count']} cores shared, "
             f"load average {meta['load_avg_1m']:.1f} at the end; {args.steps} timed steps after {args.warmup} "
             "warm-up per context, configurations interleaved.", "",
             "Median decode-step latency in ms (p10-p90); cache = rows held per layer after the last step.", "",
             *latency_table(rows)]
    lines += ["", f"One block eviction in the shared buffer (numpy: select the {args.slack} lowest rows per KV head, "
              f"then `ordered` gather or `holes` fill, every layer's K and V), ms once / amortized over "
              f"{args.slack} steps:", "",
              "| kept rows, form | " + " | ".join(str(c) for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
    for f in args.fractions:
        for form in ("ordered", "holes"):
            lines.append(f"| {f}%, {form} | " + " | ".join(
                f"{compaction[c, f][form]:.1f} / {compaction[c, f][form] / args.slack:.2f}" for c in contexts) + " |")
    means = {(r["context"], r["config"]): r["mean_ms"] for r in rows}
    lines += ["", "Mean step ms (includes the steps that evict; the medians above may not):", "",
              "| config | " + " | ".join(str(c) for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
    lines += [f"| {n} | " + " | ".join(f"{means[c, n]:.1f}" if (c, n) in means else "-" for c in contexts) + " |"
              for n in dict.fromkeys(r["config"] for r in rows)]
    lines += ["", "Speed-up (reference median / this median; `+evict`: the step plus the amortized `holes` "
              "eviction, on the shared configurations):", ""]

    def plus_eviction(name: str, context: int, reference: str, ms: float, base: float) -> str:
        frac = next((f for f in args.fractions if name == f"gqa-imp-{f}-share"), None)
        if frac is None or reference != "genai-int4":
            return ""
        return f" ({base / (ms + compaction[context, frac]['holes'] / args.slack):.2f}x +evict)"

    lines += speedup_table(rows, ("genai-int4", "ort-int4"), plus_eviction)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,2048,4096")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fractions", default="50,25", help="kept cache, percent of the context")
    p.add_argument("--slack", type=int, default=16, help="block eviction: steps between gathers")
    p.add_argument("--configs", default="", help="comma-separated subset (default: all)")
    p.add_argument("--name", default="", help="suffix of the result files")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    args.fractions = [int(f) for f in args.fractions.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (BUILDER / "model.onnx").exists():
        print(f"error: {BUILDER / 'model.onnx'} missing (python models/_genai.py smollm2)", file=sys.stderr)
        return 2
    if not EDITED.exists():
        edit_model(BUILDER / "model.onnx", EDITED)
    from tokenizers import Tokenizer

    contexts = [int(c) for c in args.contexts.split(",")]
    tok = Tokenizer.from_file(str(BUILDER / "tokenizer.json"))
    ids = np.array(tok.encode(DATA.read_text()).ids, np.int64)
    start = len(ids) // 2 - max(contexts) // 2
    ids = ids[start:start + max(contexts) + args.warmup + args.steps]
    if args.warmup + args.steps + 1 > HEADROOM:
        print(f"error: warmup + steps must stay below {HEADROOM}", file=sys.stderr)
        return 2
    makers = {"genai-int4": lambda: GenaiRunner(BUILDER, max(contexts) + args.warmup + args.steps + 8),
              "ort-int4": lambda: CacheRunner(BUILDER / "model.onnx", args.threads, 1.0, False),
              "ort-int4-share": lambda: CacheRunner(BUILDER / "model.onnx", args.threads, 1.0, True)}
    for f in args.fractions:
        makers[f"gqa-imp-{f}"] = lambda f=f: CacheRunner(EDITED, args.threads, f / 100, False)
        makers[f"gqa-imp-{f}-share"] = lambda f=f: CacheRunner(EDITED, args.threads, f / 100, True)
    decomposed = CONFIGS["spattenc-genai-int4-evict50"][1]
    if decomposed.exists():
        makers["spattenc-genai-int4-evict50"] = lambda: OrtRunner(decomposed, args.threads)
    for name, (path, options) in FUSED.items():
        if options.get("in_graph", True):
            makers[name] = lambda path=path: OrtRunner(path, args.threads)
            makers[f"{name}-ov"] = lambda path=path: CacheRunner(path, args.threads, 0.5, False)
        else:
            makers[name] = lambda path=path: SharedRunner(path, args.threads)
    chosen = args.configs.split(",") if args.configs else list(makers)
    for name in chosen:
        fused = FUSED.get(name.removesuffix("-ov"))
        if fused and not fused[0].exists():
            compile_fused(BUILDER / "model.onnx", *fused)
    runners = {n: makers[n]() for n in chosen}
    log.info("configs %s; pid %d", list(runners), os.getpid())
    rows: list[dict] = []
    for context in contexts:
        rows += run_context(runners, ids, context, args.steps, args.warmup)
        for r in rows[-len(runners):]:
            log.info("%5d %-22s %7.1f ms  cache %d", context, r["config"], r["median_ms"], r["cache_length"])
    compaction = {(c, f): compaction_ms(math.ceil(f / 100 * c), args.slack) for c in contexts for f in args.fractions}
    meta = run_metadata(args.threads)
    md = render(rows, compaction, meta, args)
    kind = "gqa-evict-probe" + (f"-{args.name}" if args.name else "")
    data = {"meta": meta, "rows": rows, "compaction_ms": {f"{c}@{f}": v for (c, f), v in compaction.items()}}
    _, md_path = write_results(args.out_dir, kind, data, md)
    print(md)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
