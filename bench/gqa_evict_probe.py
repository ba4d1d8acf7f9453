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
  genai-smollm2-int4 --kv-budget 0.5``: GroupQueryAttention decomposed, then evict-kv), run as there
  (DecoderSession, numpy caches, synthesized kept slots); skipped when that model is not built.
* ``shared-50`` / ``shared-50-slack16``: ``evict-gqa{in_graph=false}`` (the graph only accumulates the
  importance) stepped by spatten_compiler/shared_cache.py's SharedCacheSession: one shared buffer per
  cache, evicted in place every step / every 16 steps (``SharedRunner``); ``shared-preset``: the same
  with the decoder preset's rule (per KV head, 256-token floor, blocks of 16).
* ``evict-gqa-50``: the same options compiled by ``evict-gqa`` (passes/evict_gqa.py: the kernel stays
  fused), run the same way; ``evict-gqa-50-slack16``: with block eviction (``slack=16``, the decoder
  preset's). The two are compiled here on first use (models/cache/s20-gqa/). ``-ov``: the same model
  stepped with its states as OrtValues (as ``ort-int4``) instead of DecoderSession's numpy arrays.

Caches are synthesized (random K/V: a step's cost depends on the shapes). Eviction's own work - which
rows to keep and moving them - is not in the step: :func:`compaction_ms` times one block eviction of
every layer separately, and the table adds its cost amortized over ``--slack`` steps (evict-block) to
the shared configurations'.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DEFAULT_RESULTS, make_session, run_metadata, write_results  # noqa: E402
from bench.genai_step import (  # noqa: E402
    CACHE,
    CONFIGS,
    DATA,
    GenaiRunner,
    OrtRunner,
    kept_positions,
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
HEADROOM = 64  # shared buffers: rows beyond the kept cache for the steps of one context


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


class CacheRunner:
    """One decode step of a builder model over onnxruntime, every state kept as OrtValues (no numpy
    round trip), from a synthesized cache of ``ceil(fraction * C)`` rows; ``shared``: past/present one
    IOBinding-bound buffer. Other ``past_*`` states (the edited model's importance; a compiled
    eviction model's importance and positions) are synthesized as bench/genai_step.py does; a model
    with a ``position_ids`` input gets the true position."""

    def __init__(self, path: Path, threads: int, fraction: float, shared: bool) -> None:
        import onnxruntime as ort

        self.ort, self.fraction, self.shared = ort, fraction, shared
        self.session = make_session(path, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]
        inputs = self.session.get_inputs()
        self.kv = {i.name: i.shape[1] for i in inputs if i.name.startswith("past_key_values")}
        self.extra = {i.name: i for i in inputs if i.name.startswith("past_") and i.name not in self.kv}
        self.positions = any(i.name == "position_ids" for i in inputs)
        self.head = 64

    def _value(self, a: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(a)

    def prefill(self, ids: np.ndarray) -> None:
        self.position = len(ids)
        self.length = math.ceil(self.fraction * len(ids))
        self.capacity = self.length + (HEADROOM if self.shared else 0)
        rng = np.random.default_rng(0)
        self.cache = {n: self._value(rng.standard_normal((1, kv, self.capacity, self.head)).astype(np.float32))
                      for n, kv in self.kv.items()}
        kept = kept_positions(len(ids), self.length)
        self.state = {}
        for name, i in self.extra.items():  # [B, n] or [B, kv, n]
            lead = [1] + ([self.kv[f"past_key_values.{name.split('.')[1]}.key"]] if len(i.shape) == 3 else [])
            a = (np.broadcast_to(kept, (*lead, self.length)).astype(np.int64) if "int64" in i.type
                 else rng.random((*lead, self.length)).astype(np.float32))
            self.state[name] = self._value(np.ascontiguousarray(a))

    def _small(self, token: int) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, self.length + 1), np.int64)}
        if self.positions:
            feeds["position_ids"] = np.array([[self.position]], np.int64)
        return feeds

    def step(self, token: int) -> None:
        feeds = self._small(token)
        if self.shared:
            if self.length + 1 > self.capacity:
                raise RuntimeError("shared buffer full: raise HEADROOM")
            io = self.session.io_binding()
            for n, a in feeds.items():
                io.bind_cpu_input(n, a)
            for n, v in {**self.cache, **self.state}.items():
                io.bind_ortvalue_input(n, v)
            for n, v in self.cache.items():
                io.bind_ortvalue_output(n.replace("past_key_values", "present"), v)
            free = [o for o in self.outputs if not o.startswith("present.")]
            for o in free:
                io.bind_output(o)
            self.session.run_with_iobinding(io)
            out = dict(zip([o for o in self.outputs if o.startswith("present.")] + free, io.get_outputs()))
            self.length += 1
        else:
            values = {n: self._value(a) for n, a in feeds.items()} | self.cache | self.state
            out = dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, values)))
            self.cache = {n: out[n.replace("past_key_values", "present")] for n in self.cache}
            self.length = next(iter(self.cache.values())).shape()[2]  # an eviction model keeps its budget
        self.state = {n: out[n.replace("past_", "present_")] for n in self.state}
        self.position += 1

    def cache_length(self) -> int:
        return self.length


class SharedRunner:
    """spatten_compiler.shared_cache.SharedCacheSession over an ``evict-gqa{in_graph=false}`` model, brought
    to a context by a synthesized state: ``ceil(budget * C)`` random rows in each shared buffer, their
    positions as bench/genai_step.py's (``kept_positions``), random importance. Its steps include the
    in-place evictions (every step, or every ``slack`` steps): compare ``mean_ms`` too."""

    def __init__(self, path: Path, threads: int) -> None:
        from spatten_compiler.shared_cache import SharedCacheSession

        self.session = SharedCacheSession(path, threads=threads, idle_spin=False)

    def prefill(self, ids: np.ndarray) -> None:
        s, context = self.session, len(ids)
        kept = math.ceil(s.rule["budget"] * context)
        s.reset(1, kept + HEADROOM)
        rng = np.random.default_rng(0)
        for buf in s.buffers.values():
            buf[:, :, :kept] = rng.standard_normal((1, buf.shape[1], kept, buf.shape[3]))
        positions = kept_positions(context, kept)
        s.slots = [np.repeat(positions[None], len(g), axis=0) for g in s.slots]
        s.importance = [rng.random((len(g), kept)).astype(np.float32) for g in s.importance]
        s.length, s.position = kept, context

    def step(self, token: int) -> None:
        self.session.step(np.array([[token]], np.int64))

    def cache_length(self) -> int:
        return self.session.length


def compaction_ms(kept: int, slack: int, layers: int = 30, kv: int = 3, head: int = 64,
                  repeats: int = 5) -> dict[str, float]:
    """Median ms of one block eviction in a shared buffer of ``kept + slack`` rows per KV head, every
    layer's K and V (numpy, in place; ``--kv-evict head``): pick the ``slack`` lowest-scored rows per
    head (argpartition), then ``ordered``: gather the kept rows to the front in their order (what
    evict-kv's Gather keeps), or ``holes``: move only the kept rows from ``[kept, kept + slack)`` into
    the evicted slots below ``kept`` (at most ``slack`` rows per head: attention does not depend on the
    order of the keys, the stored keys are already rotated; their positions move with them)."""
    rng = np.random.default_rng(0)
    n = kept + slack
    bufs = [rng.standard_normal((1, kv, n + HEADROOM, head)).astype(np.float32) for _ in range(2 * layers)]
    scores = [rng.random((1, kv, n)).astype(np.float32) for _ in range(layers)]
    result = {}
    for form in ("ordered", "holes"):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for layer in range(layers):
                drop = np.argpartition(scores[layer][0], slack, axis=-1)[:, :slack]
                for h in range(kv):
                    if form == "ordered":
                        src, dst = np.setdiff1d(np.arange(n), drop[h], assume_unique=True), slice(0, kept)
                    else:
                        dst = np.sort(drop[h][drop[h] < kept])
                        src = np.setdiff1d(np.arange(kept, n), drop[h], assume_unique=True)
                    for b in bufs[2 * layer:2 * layer + 2]:
                        b[0, h, dst] = b[0, h, src]
            times.append(time.perf_counter() - t0)
        result[form] = float(np.median(times) * 1e3)
    return result


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
