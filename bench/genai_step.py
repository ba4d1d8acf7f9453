"""Decode-step latency of SmolLM2-135M: spattenc's eviction models against onnxruntime-genai's
model builder (fp32 and int4), the engine a user would otherwise pick (issue #13).

    python models/_genai.py smollm2          # the builder's models (once)
    python -m bench genai_step --contexts 512,1024,2048 --steps 24

For each context C every configuration is brought to C - warmup tokens, then ``warmup + steps``
WikiText-2 test tokens are teacher-forced one decode step at a time, the configurations stepped in
lockstep (rotating order) so their step times interleave; the median is over the ``steps`` after the
warm-up. onnxruntime models get a synthesized cache of that length (what an eviction model keeps at
that length: see ``OrtRunner``); onnxruntime-genai prefills the real tokens (one sequence continued
from context to context). Configurations (a missing model is skipped, noted):

* ``dense``: the TorchScript export (models/cache/smollm2), onnxruntime, fp32 cache.
* ``spattenc-evict50``: ``spattenc smollm2 --kv-budget 0.5``; ``spattenc-evict50-int4-opt``: the same
  with ``--weights int4 --optimize``.
* ``genai-fp32`` / ``genai-int4``: the builder's models run by onnxruntime-genai (``append_tokens``,
  one token per step; session options from genai_config.json: 2 intra-op threads).
* ``spattenc-genai-fp32-evict50`` / ``-int4-``: spattenc compiling the builder's models themselves
  (unfuse-ort decomposes GroupQueryAttention) with ``--kv-budget 0.5``, run by onnxruntime (since the
  fused kernel became the default on such models, that form is ``--kv-budget 0.5 --kv-cache decomposed``).

Reported: median (and p10/p90) step latency per configuration and context, ratios against the dense
export and genai int4, and each model's cache length after the last step.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DEFAULT_RESULTS, REPO_ROOT, run_metadata, write_results  # noqa: E402

log = logging.getLogger("bench.genai_step")
CACHE = REPO_ROOT / "models" / "cache"
BENCH = CACHE / "genai-bench"
DATA = next((d / "shared" / "data" / "wikitext2" / "test.txt" for d in REPO_ROOT.parents
             if (d / "shared" / "data" / "wikitext2" / "test.txt").exists()), Path("wikitext2/test.txt"))
# name -> (engine, path, how it was made)
CONFIGS: dict[str, tuple[str, Path, str]] = {
    "dense": ("ort", CACHE / "smollm2" / "model.onnx", "TorchScript export, onnxruntime"),
    "spattenc-evict50": ("ort", BENCH / "ts.evict50.onnx", "spattenc smollm2 --kv-budget 0.5"),
    "spattenc-evict50-int4-opt": ("ort", BENCH / "ts.evict50.int4opt.onnx",
                                  "spattenc smollm2 --kv-budget 0.5 --weights int4 --optimize"),
    "genai-fp32": ("genai", CACHE / "genai-smollm2-fp32", "model builder -p fp32, onnxruntime-genai"),
    "genai-int4": ("genai", CACHE / "genai-smollm2-int4", "model builder -p int4, onnxruntime-genai"),
    "spattenc-genai-fp32-evict50": ("ort", BENCH / "genai-fp32.evict50.onnx",
                                    "spattenc genai-smollm2-fp32 --kv-budget 0.5 --kv-cache decomposed"),
    "spattenc-genai-int4-evict50": ("ort", BENCH / "genai-int4.evict50.onnx",
                                    "spattenc genai-smollm2-int4 --kv-budget 0.5 --kv-cache decomposed"),
}


def kept_positions(context: int, kept: int) -> np.ndarray:
    """``kept`` of ``context`` positions as an eviction model holds them: 4 sinks, the newest half,
    evenly spread positions between."""
    recent = kept // 2
    middle = np.linspace(4, context - recent - 1, kept - 4 - recent).astype(np.int64)
    return np.concatenate([np.arange(4), middle, np.arange(context - recent, context)])


class OrtRunner:
    """A decode step over onnxruntime. The cache before the timed steps is synthesized at the
    context's length (random K/V; for an eviction model the ``ceil(budget * C)`` slots it keeps, with
    4 sinks, the newest half and evenly spread positions between): a step's cost depends on the
    shapes, not the values, and prefilling 2048 tokens into every model took minutes on the shared
    machine."""

    def __init__(self, path: Path, threads: int) -> None:
        from spatten_compiler.decoding import DecoderSession

        self.session = DecoderSession(path, threads=threads, idle_spin=False)

    def prefill(self, ids: np.ndarray) -> None:
        s, context = self.session, len(ids)
        s.reset(1)
        kept = context if s.evict is None else int(np.ceil(float(s.evict["budget"]) * context))
        positions = kept_positions(context, kept)[None]
        rng = np.random.default_rng(0)
        for name, (dtype, dims) in s.state.items():
            if name.startswith("past_positions"):
                s.cache[name] = positions.astype(dtype)
            elif name.startswith("past_importance"):
                s.cache[name] = rng.random((1, kept)).astype(dtype)
            else:
                s.cache[name] = rng.standard_normal((1, dims[1], kept, dims[3])).astype(dtype)
        s.mask = np.ones((1, context), np.int64)

    def step(self, token: int) -> None:
        self.session.step(np.array([[token]], np.int64))

    def cache_length(self) -> int:
        return max(self.session.cache_lengths())


class GenaiRunner:
    """onnxruntime-genai has no way to hand it a cache: it prefills the real tokens, continuing the
    same sequence from one context to the next (512, then up to 1024, then up to 2048)."""

    def __init__(self, folder: Path, max_length: int) -> None:
        import onnxruntime_genai as og

        self.og, self.model, self.max_length = og, og.Model(str(folder)), max_length
        self.generator = None
        self.length = 0

    def prefill(self, ids: np.ndarray) -> None:
        if self.generator is None:
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=self.max_length, do_sample=False)
            self.generator = self.og.Generator(self.model, params)
        if len(ids) > self.length:
            self.generator.append_tokens(ids[self.length:].astype(np.int32))
        self.length = len(ids)

    def step(self, token: int) -> None:
        self.generator.append_tokens(np.array([token], np.int32))  # one forward pass, teacher-forced
        self.length += 1

    def cache_length(self) -> int:
        return self.length


def run_context(runners: dict, ids: np.ndarray, context: int, steps: int, warmup: int) -> list[dict]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    for name, r in runners.items():
        t0 = time.perf_counter()
        r.prefill(ids[:context - warmup])  # the warm-up steps bring every model to `context` tokens
        log.info("  %s: prefill %d tokens %.1f s", name, context, time.perf_counter() - t0)
    names = list(runners)
    for i in range(warmup + steps):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runners[name].step(int(ids[context - warmup + i]))  # genai: these tokens join its sequence
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in times.items():
        a = np.array(ts) * 1e3
        rows.append({"context": context, "config": name, "median_ms": float(np.median(a)), "mean_ms": float(a.mean()),
                     "p10_ms": float(np.percentile(a, 10)), "p90_ms": float(np.percentile(a, 90)),
                     "steps": len(a), "cache_length": runners[name].cache_length()})
    return rows


def latency_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per configuration and context, median (p10-p90) step ms and the cache length."""
    contexts = sorted({r["context"] for r in rows})
    by = {(r["context"], r["config"]): r for r in rows}
    lines = ["| config | " + " | ".join(f"{c} ms | cache" for c in contexts) + " |",
             "|---|" + "---|---|" * len(contexts)]
    for n in dict.fromkeys(r["config"] for r in rows):
        cells = [f"{by[c, n]['median_ms']:.1f} ({by[c, n]['p10_ms']:.0f}-{by[c, n]['p90_ms']:.0f}) | "
                 f"{by[c, n]['cache_length']}" if (c, n) in by else "- | -" for c in contexts]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def speedup_table(rows: list[dict], references: tuple[str, ...],
                  note: Callable[[str, int, str, float, float], str] | None = None) -> list[str]:
    """Markdown lines: per configuration and context, each reference's median / the configuration's;
    ``note(config, context, reference, median, reference median)`` may append text to a cell."""
    contexts = sorted({r["context"] for r in rows})
    by = {(r["context"], r["config"]): r["median_ms"] for r in rows}
    lines = ["| config | " + " | ".join(f"vs {ref} @{c}" for c in contexts for ref in references) + " |",
             "|---|" + "---|" * len(contexts) * len(references)]
    for n in dict.fromkeys(r["config"] for r in rows):
        cells = []
        for c in contexts:
            for ref in references:
                ms, base = by.get((c, n)), by.get((c, ref))
                cells.append(f"{base / ms:.2f}x{note(n, c, ref, ms, base) if note else ''}" if ms and base else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def render(rows: list[dict], meta: dict, skipped: dict[str, str], args: argparse.Namespace) -> str:
    names = list(dict.fromkeys(r["config"] for r in rows))
    lines = ["# Decode step: spattenc vs onnxruntime-genai's model builder (SmolLM2-135M)", "",
             f"command: `{meta['command']}`  ", f"date {meta['date_utc']}, commit {meta['git_commit']}, "
             f"onnxruntime {meta['onnxruntime_version']}, {args.threads} intra-op threads (genai: "
             f"genai_config.json), {meta['cpu_count']} cores shared, load average {meta['load_avg_1m']:.1f} at the "
             f"end; {args.steps} timed steps after {args.warmup} warm-up per context, configurations interleaved.", "",
             "Median decode-step latency in ms (p10-p90); cache = tokens held per layer after the last step.", "",
             *latency_table(rows)]
    lines += ["", "Speed-up (median latency of the reference / this configuration's):", "",
              *speedup_table(rows, ("dense", "genai-int4"))]
    lines += ["", "Configurations:", ""] + [f"- `{n}`: {CONFIGS[n][2]}" for n in names]
    lines += [f"- `{n}`: skipped ({why})" for n, why in skipped.items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in dict.fromkeys(r["config"] for r in rows):
        pts = sorted((r["context"], r["median_ms"]) for r in rows if r["config"] == name)
        style = "--" if name.startswith("genai") else ("-" if name.startswith("spattenc") else ":")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("median decode step (ms)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["context"] for r in rows}), [str(c) for c in sorted({r["context"] for r in rows})])
    ax.set_title("SmolLM2-135M decode step, 2 threads (one run, shared machine)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="512,1024,2048")
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per context")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tokenizers import Tokenizer

    contexts = [int(c) for c in args.contexts.split(",")]
    tok = Tokenizer.from_file(str(CACHE / "smollm2" / "tokenizer.json"))
    ids = np.array(tok.encode(args.data.read_text()).ids, np.int64)
    start = len(ids) // 2 - max(contexts) // 2
    ids = ids[start:start + max(contexts) + args.warmup + args.steps]
    runners, skipped = {}, {}
    for name in args.configs.split(","):
        engine, path, _ = CONFIGS[name]
        if not path.exists():
            skipped[name] = f"{path.relative_to(REPO_ROOT)} not built"
            continue
        try:
            runners[name] = (OrtRunner(path, args.threads) if engine == "ort"
                             else GenaiRunner(path, max(contexts) + args.warmup + args.steps + 8))
        except ImportError as e:
            skipped[name] = f"{e.name} not installed"
    log.info("configs %s; skipped %s; pid %d", list(runners), skipped, os.getpid())
    rows: list[dict] = []
    for context in contexts:
        rows += run_context(runners, ids, context, args.steps, args.warmup)
        for r in rows[-len(runners):]:
            log.info("%5d %-30s %7.1f ms  cache %d", context, r["config"], r["median_ms"], r["cache_length"])
    meta = run_metadata(args.threads)
    md = render(rows, meta, skipped, args)
    _, md_path = write_results(args.out_dir, "genai-step", {"meta": meta, "rows": rows, "skipped": skipped}, md)
    plot(rows, md_path.with_suffix(".png"))
    print(md)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
