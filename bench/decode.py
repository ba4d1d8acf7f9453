"""Decode-mode benchmark of KV-cache eviction (evict-kv) on a real decoder (SmolLM2-135M).

For each context C and window of WikiText-2 test tokens: prefill the first C - D tokens, then
teacher-force the next D tokens one decode step at a time through each configuration's cache; the
perplexity is over those D predictions. All configurations (dense; StreamingLLM-style sinks + recent
window; H2O-style accumulated attention per layer with a recent window of half the budget; spattenc's
variants; SpAtten's plain cascade) run the same tokens in the same process, stepped in lockstep so
their step times interleave. Eviction models are compiled once with ``tunable`` knobs and the
budget / sinks / window share are fed per configuration.

    python -m bench.decode --contexts 512,1024,2048 --budgets 0.125,0.25,0.5 --decode 64 --windows 4 --split test

Windows of a context run as one batch (equal lengths, no padding); ``--split tune`` and ``test`` are
disjoint sets of offsets, so a rule picked on one is reported on the other. Every configuration's
per-token NLLs are kept: changes vs dense and vs each baseline are paired on the same tokens with a
block-bootstrap interval (``bench/_decode_stats.py``).

Reported per (context, budget, method): perplexity, K/V bytes held between steps (the arrays
onnxruntime returned, at the last step; the importance/position state separately), median decode
step latency (intra-op threads as given, the machine shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._decode_stats import fmt_change, paired_change  # noqa: E402
from bench.common import DEFAULT_RESULTS, REPO_ROOT, run_metadata, write_results  # noqa: E402

log = logging.getLogger("bench.decode")
MODEL = REPO_ROOT / "models" / "cache" / "smollm2" / "model.onnx"
DATA = next((d / "shared" / "data" / "wikitext2" / "test.txt" for d in REPO_ROOT.parents
             if (d / "shared" / "data" / "wikitext2" / "test.txt").exists()), Path("wikitext2/test.txt"))
# method -> (compiled mode, knobs); budget is the sweep variable; score: a rule of evict_kv.SCORES
METHODS: dict[str, tuple[str, dict]] = {
    "streaming": ("layer", {"sinks": 4, "recent": 0, "recent_share": 1.0}),  # StreamingLLM: sinks + window
    "h2o": ("layer", {"sinks": 0, "recent": 0, "recent_share": 0.5}),  # H2O: heavy hitters + recent half
    "layer-s4-r50": ("layer", {"sinks": 4, "recent": 0, "recent_share": 0.5}),  # the old default
    "layer-s4-r25": ("layer", {"sinks": 4, "recent": 0, "recent_share": 0.25}),
    "mean-s4-r50": ("layer", {"sinks": 4, "recent": 0, "recent_share": 0.5, "score": "mean"}),
    "mean-s4-r25": ("layer", {"sinks": 4, "recent": 0, "recent_share": 0.25, "score": "mean"}),
    "mean-s4-r10": ("layer", {"sinks": 4, "recent": 0, "recent_share": 0.1, "score": "mean"}),
    "sqrt-s4-r50": ("layer", {"sinks": 4, "recent": 0, "recent_share": 0.5, "score": "sqrt"}),
    "sqrt-s4-r25": ("layer", {"sinks": 4, "recent": 0, "recent_share": 0.25, "score": "sqrt"}),
    "ema95-s4-r25": ("layer", {"sinks": 4, "recent": 0, "recent_share": 0.25, "score": "ema"}),
    "ema99-s4-r25": ("layer", {"sinks": 4, "recent": 0, "recent_share": 0.25, "score": "ema", "decay": 0.99}),
    "last-s4-r25": ("layer", {"sinks": 4, "recent": 0, "recent_share": 0.25, "score": "last"}),
    # per KV head (H2O's own granularity): each KV head keeps its own tokens, scored by its query group
    "head-s4-r50": ("head", {"sinks": 4, "recent": 0, "recent_share": 0.5}),  # the default's knobs, per head
    "head-h2o": ("head", {"sinks": 0, "recent": 0, "recent_share": 0.5}),  # H2O exactly: per head, no sinks
    # block eviction (evict-kv slack, mode "<mode>~N"): the cache grows to budget + N, then evicts back
    "layer-s4-r50-b16": ("layer~16", {"sinks": 4, "recent": 0, "recent_share": 0.5}),
    "layer-s4-r50-b32": ("layer~32", {"sinks": 4, "recent": 0, "recent_share": 0.5}),
    "head-s4-r50-b16": ("head~16", {"sinks": 4, "recent": 0, "recent_share": 0.5}),  # the decoder preset's rule
    "cascade": ("cascade", {"sinks": 4, "recent": 0, "recent_share": 0.0}),  # SpAtten's plain cascade
    "cascade-r50": ("cascade", {"sinks": 4, "recent": 0, "recent_share": 0.5}),
    # the cache stored as packed 4+4-bit planes (quantize-kv's peak rule) on top of eviction
    "layer-s4-r50-q44": ("layer+4+4", {"sinks": 4, "recent": 0, "recent_share": 0.5}),
    # the default decoder preset's rule with --kv-bits 4+4: every step, and in blocks of 16 (its default)
    "head-s4-r50-q44": ("head+4+4", {"sinks": 4, "recent": 0, "recent_share": 0.5}),
    "head-s4-r50-b16-q44": ("head~16+4+4", {"sinks": 4, "recent": 0, "recent_share": 0.5}),
    "q44": ("layer+4+4", {"sinks": 4, "recent": 0, "recent_share": 0.5}),  # run with budget 1: bits alone
    # the decoder presets' K/V parts (quantize-kv's peak rule, threshold after @) on top of eviction
    "layer-s4-r50-q51": ("layer+5+1", {"sinks": 4, "recent": 0, "recent_share": 0.5}),
    "layer-s4-r50-q41": ("layer+4+1", {"sinks": 4, "recent": 0, "recent_share": 0.5}),
    "layer-s4-r50-q41t5": ("layer+4+1@0.5", {"sinks": 4, "recent": 0, "recent_share": 0.5}),
}
BASELINES = ("streaming", "h2o")
SHARED_PREFILL = {"layer": "layer", "cascade": "layer", "head": "head", "layer~16": "layer", "layer~32": "layer",
                  "head~16": "head"}  # mode -> the session that prefills it


def compiled(mode: str, cache: Path, model: Path, folder: str = "decq-evict") -> Path:
    import spatten_compiler.passes  # noqa: F401  (registers the passes)

    from spatten_compiler.modelio import load_model, save_model
    from spatten_compiler.pipeline import Pipeline, make_pass

    out = cache / folder / f"{model.parent.name}.evict-{mode}.onnx"  # tunable score knobs
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        log.info("compiling %s (%s)", out, mode)
        m = load_model(model)
        evict, _, spec = mode.partition("+")
        evict, _, slack = evict.partition("~")
        bits, _, thr = spec.partition("@")
        q = {"threshold": float(thr)} if thr else {}
        extra = [make_pass("quantize-kv", bits=bits, **q), make_pass("pack-kv-cache", bits=bits)] if bits else []
        Pipeline([make_pass("normalize"), make_pass("decompose-attention"),
                  make_pass("evict-kv", budget=0.25, sinks=4, mode=evict, slack=int(slack or 0),
                                                                tunable=True), *extra])(m)
        save_model(m, out)
    return out


def knobs(budget: float, k: dict, min_keep: int | None = None) -> dict[str, np.ndarray]:
    """The tunable inputs for one configuration (``min_keep`` only when given: older compiled models
    have no such input)."""
    from spatten_compiler.passes.evict_kv import SCORES

    rule = SCORES[k.get("score", "accumulated")]
    out = {"spatten.kv_budget": np.array(budget, np.float32), "spatten.kv_sinks": np.array([k["sinks"]], np.int64),
           "spatten.kv_recent": np.array([k["recent"]], np.int64),
           "spatten.kv_recent_share": np.array(k["recent_share"], np.float32),
           "spatten.kv_decay": np.array(k.get("decay", rule.decay), np.float32),
           "spatten.kv_norm": np.array(k.get("norm", rule.norm), np.float32)}
    if min_keep is not None:
        out["spatten.kv_min_keep"] = np.array([min_keep], np.int64)
    return out


def nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row negative log-likelihood of ``targets`` [B] under ``logits`` [B, V]."""
    z = logits.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(z - m).sum(axis=1))) - z[np.arange(len(targets)), targets]


def run_context(sessions: dict, windows: np.ndarray, context: int, decode: int, budgets: list[float],
                methods: list[str], chunk: int = 0, floors: list[int] | None = None,
                pairs: list[tuple[str, float, int | None]] | None = None) -> list[dict]:
    """All windows ([W, context] tokens, equal lengths: no padding) as one batch per configuration."""
    from spatten_compiler.decoding import DecoderSession

    configs: dict[tuple[str, float], DecoderSession] = {("dense", 1.0): sessions["dense"].fork()}
    mode_of = {("dense", 1.0): "dense"}  # a floor's config is named <method>-f<N>: not a METHODS key
    todo = pairs or [(m, b, None) for m in methods for b in ([1.0] if m == "q44" else budgets)]
    for m, b, floor in todo:
        mode, k = METHODS[m]
        for f in [floor] if floor is not None else floors or [None]:
            s = sessions[mode].fork()
            s.overrides = knobs(b, k, f)
            if f is not None and "spatten.kv_min_keep" not in s.input_names:  # a stale cached compile
                raise SystemExit(f"decode: {mode} model has no spatten.kv_min_keep input (compiled before the "
                                 "floor): pass a fresh --cache so it is recompiled")
            configs[(m if f is None else f"{m}-f{f}", b)] = s
            mode_of[(m if f is None else f"{m}-f{f}", b)] = mode
    prefix = context - decode
    losses = {c: [] for c in configs}
    times = {c: [] for c in configs}
    last = {}
    shared: dict[tuple, DecoderSession] = {}  # (state layout, decay) -> the prefix but its last token, full budget
    for c, s in configs.items():
        t0 = time.perf_counter()
        mode = mode_of[c]
        if mode in SHARED_PREFILL:  # cascade at a full budget is layer: one prefill; head has its own state
            logits = _prefill_shared(s, sessions[SHARED_PREFILL[mode]], shared, windows[:, :prefix], chunk)
        else:
            s.reset(len(windows))
            logits = _prefill(s, windows[:, :prefix], chunk)
        log.info("prefill %s %d x %d tokens: %.1f s", c, len(windows), prefix, time.perf_counter() - t0)
        last[c] = logits[:, -1]
    for t in range(prefix, context):
        if (t - prefix) % 16 == 0:
            log.info("context %d: decode step %d/%d", context, t - prefix, decode)
        for c, s in configs.items():
            losses[c].append(nll_rows(last[c], windows[:, t]))
            if t + 1 < context:
                t0 = time.perf_counter()
                last[c] = s.step(windows[:, t:t + 1])[:, -1]
                times[c].append(time.perf_counter() - t0)
    rows = []
    for (m, b), s in configs.items():
        per_token = np.stack(losses[(m, b)], axis=1)  # [W, decode]
        rows.append({"context": context, "method": m, "budget": b, "decode": decode, "prefill_chunk": chunk,
                     "windows": len(windows), "nll": float(per_token.mean()), "nll_tokens": per_token.tolist(),
                     "kv_bytes": s.cache_bytes(kv_only=True) // len(windows),
                     "state_bytes": (s.cache_bytes() - s.cache_bytes(True)) // len(windows),
                     "cache_len": s.cache_lengths()[0], "step_ms": float(np.median(times[(m, b)]) * 1e3)})
    return rows


def _prefill(s, tokens: np.ndarray, chunk: int) -> np.ndarray:
    step = chunk or tokens.shape[1]  # chunked prefill bounds the attention probabilities' memory
    for i in range(0, tokens.shape[1], step):
        logits = s.step(tokens[:, i:i + step])
    return logits


def _prefill_shared(s, layer_session, shared: dict, prefix: np.ndarray, chunk: int) -> np.ndarray:
    """A one-shot prefill of ``prefix`` through ``s``, computed once per decay for all configurations:
    prefill all but the last token at a full budget (nothing evicted; the importance only depends on
    the decay), then step the last token through ``s``: its query sees every earlier token and the
    eviction runs on the same importance, positions and length as after a one-shot prefill."""
    key = (id(layer_session), float(s.overrides["spatten.kv_decay"]))  # one per prefilling model and decay
    if key not in shared:
        base = layer_session.fork()
        base.overrides = {**s.overrides, "spatten.kv_budget": np.array(1.0, np.float32)}
        base.reset(len(prefix))
        _prefill(base, prefix[:, :-1], chunk)
        shared[key] = base
    base = shared[key]
    s.reset(len(prefix))
    s.cache, s.mask, s.steps = dict(base.cache), base.mask.copy(), base.steps  # arrays are replaced, never mutated
    return s.step(prefix[:, -1:])


def window_starts(n_tokens: int, context: int, windows: int, split: str) -> list[int]:
    """``windows`` evenly spaced starts; ``tune`` sits half a spacing after ``test``: disjoint sets
    (pick a rule on one, report on the other)."""
    gap = n_tokens // (windows + 1)
    shift = gap // 2 if split == "tune" else 0
    return [(w + 1) * gap - context // 2 + shift for w in range(windows)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--contexts", default="512,1024,2048")
    p.add_argument("--budgets", default="0.125,0.25,0.5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--decode", type=int, default=128, help="teacher-forced decode steps per window")
    p.add_argument("--windows", type=int, default=1, help="windows per context")
    p.add_argument("--batch", type=int, default=0, metavar="N",
                   help="run a context's windows N at a time (0: all as one batch); rows of a key are pooled")
    p.add_argument("--split", choices=("test", "tune"), default="test",
                   help="which disjoint set of window offsets (pick rules on tune, report on test)")
    p.add_argument("--prefill-chunk", type=int, default=0, metavar="N",
                   help="prefill the prefix N tokens per step (0: one step); eviction runs after every chunk")
    p.add_argument("--pairs", default="", metavar="METHOD@B[@FLOOR],...",
                   help="run exactly these (method, budget[, floor]) instead of --methods x --budgets")
    p.add_argument("--min-keep", default="", metavar="N,N,...",
                   help="also sweep the token floor (evict-kv's min_keep); methods are named <method>-f<N> "
                   "(default: the compiled value, 0)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=REPO_ROOT / "models" / "cache")
    p.add_argument("--compiled-dir", default="decq-evict", metavar="DIR",
                   help="folder under --cache for the tunable eviction models (compiled on first use)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--name", default="decode-smollm2")
    p.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                   help="no runs: merge the rows of earlier result / partial JSON files into one table and plot")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.render:
        return render_files(args)
    from tokenizers import Tokenizer

    from spatten_compiler.decoding import DecoderSession

    contexts = [int(x) for x in args.contexts.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    pairs = [_pair(x) for x in args.pairs.split(",") if x]
    if pairs:
        methods = sorted({m for m, _, _ in pairs})
    tok = Tokenizer.from_file(str(args.model.parent / "tokenizer.json"))
    ids = np.array(tok.encode(args.data.read_text()).ids, np.int64)
    sessions = {"dense": DecoderSession(args.model, threads=args.threads, idle_spin=False)}
    modes = {METHODS[m][0] for m in methods}
    for mode in sorted(modes | {SHARED_PREFILL[m] for m in modes if m in SHARED_PREFILL}):  # e.g. layer prefills cascade
        sessions[mode] = DecoderSession(compiled(mode, args.cache, args.model, args.compiled_dir),
                                        threads=args.threads, idle_spin=False)
    rows: list[dict] = []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for context in contexts:
        starts = window_starts(len(ids), context, args.windows, args.split)
        step = args.batch or len(starts)  # a batch's activations grow with it (6 x 2048 tokens: > 19 GB)
        for first in range(0, len(starts), step):
            chunk = starts[first:first + step]
            windows = np.stack([ids[s:s + context] for s in chunk])
            for r in run_context(sessions, windows, context, args.decode, budgets, methods, args.prefill_chunk,
                                 [int(x) for x in args.min_keep.split(",") if x] or None, pairs or None):
                rows.append({**r, "starts": chunk, "split": args.split})
            (args.out_dir / f"partial-{args.name}.json").write_text(json.dumps(rows))
        log.info("context %d done (%d windows)", context, len(starts))
        (args.out_dir / f"partial-{args.name}.json").write_text(json.dumps(rows))
    summary = summarize(rows)
    meta = run_metadata(args.threads)
    md = render(summary, meta, args)
    _, md_path = write_results(args.out_dir, args.name, {"meta": meta, "rows": rows, "summary": summary}, md)
    plot(summary, md_path.with_suffix(".png"))
    (args.out_dir / f"partial-{args.name}.json").unlink(missing_ok=True)
    print(md)
    return 0


def _pair(text: str) -> tuple[str, float, int | None]:
    """``method@budget`` or ``method@budget@floor``."""
    method, budget, *floor = text.split("@")
    return method, float(budget), int(floor[0]) if floor else None


def render_files(args: argparse.Namespace) -> int:
    rows: list[dict] = []
    for path in args.render:
        data = json.loads(path.read_text())
        rows += data["rows"] if isinstance(data, dict) else data
    summary = summarize(rows)
    meta = run_metadata(args.threads)
    md = render(summary, meta, args) + "\nMerged from: " + ", ".join(f"`{p.name}`" for p in args.render) + "\n"
    _, md_path = write_results(args.out_dir, args.name, {"meta": meta, "rows": rows, "summary": summary}, md)
    plot(summary, md_path.with_suffix(".png"))
    print(md)
    return 0


def _tokens(rows: list[dict]) -> np.ndarray:
    return np.concatenate([np.asarray(r["nll_tokens"]) for r in rows], axis=0)  # [windows, decode]


def summarize(rows: list[dict]) -> list[dict]:
    """Per (context, method, budget): perplexity, change vs dense and vs each baseline on the same
    tokens with a paired 95% interval (rows of several runs of the same key are pooled as windows)."""
    keys = sorted({(r["context"], r["method"], r["budget"]) for r in rows})
    pick = {k: [r for r in rows if (r["context"], r["method"], r["budget"]) == k] for k in keys}
    out = []
    for c, m, b in keys:
        sel, dense = pick[(c, m, b)], pick[(c, "dense", 1.0)]
        nll, ref = _tokens(sel), _tokens(dense)
        entry = {"context": c, "method": m, "budget": b, "ppl": float(np.exp(nll.mean())),
                 "decode": int(sel[0].get("decode", 0)), "windows": int(nll.shape[0]),
                 "dense_ppl": float(np.exp(ref.mean())), "vs_dense": paired_change(nll, ref),
                 "kv_bytes": int(np.mean([r["kv_bytes"] for r in sel])),
                 "dense_kv_bytes": int(np.mean([r["kv_bytes"] for r in dense])),
                 "state_bytes": int(np.mean([r["state_bytes"] for r in sel])),
                 "step_ms": float(np.median([r["step_ms"] for r in sel])),
                 "dense_step_ms": float(np.median([r["step_ms"] for r in dense]))}
        for base in BASELINES:
            if (c, base, b) in pick and base != m:
                entry[f"vs_{base}"] = paired_change(nll, _tokens(pick[(c, base, b)]))
        out.append(entry)
    return out


def render(summary: list[dict], meta: dict, args: argparse.Namespace) -> str:
    title = f"# Decode-mode KV eviction: {args.model.parent.name}, WikiText-2 test"
    lines = [title, "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date_utc']}, git {meta['git_commit']}, "
             f"onnxruntime {meta['onnxruntime_version']}, {args.threads} intra-op threads, load avg "
             f"{meta['load_avg_1m']:.1f} on {meta['cpu_count']} cores (machine shared with other jobs: "
             "latency is noisy).",
             "Windows x decode steps per context (prefix = context - decode; "
             + (f"windows run {args.batch} at a time" if getattr(args, "batch", 0) else "all windows one batch")
             + "): "
             + ", ".join(f"{c}: {w} x {d}" for c, w, d in sorted({(s['context'], s['windows'], s['decode'])
                                                                  for s in summary})) + ". "
             "Changes are on the same tokens, `mean [95% block-bootstrap interval]` (blocks of 8 tokens).", "",
             "| context | method | budget | ppl | vs dense | vs StreamingLLM | vs H2O | KV vs dense | step ms | "
             "step vs dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        vs = [fmt_change(s[k]) if k in s else "-" for k in ("vs_streaming", "vs_h2o")]
        lines.append(f"| {s['context']} | {s['method']} | {s['budget']:g} | {s['ppl']:.2f} | "
                     f"{fmt_change(s['vs_dense'])} | {vs[0]} | {vs[1]} | "
                     f"{s['kv_bytes'] / s['dense_kv_bytes']:.3f} | "
                     f"{s['step_ms']:.1f} | {s['dense_step_ms'] / s['step_ms']:.2f}x |")
    return "\n".join(lines + ["", *pivot(summary)]) + "\n"


def pivot(summary: list[dict]) -> list[str]:
    """One row per (context, budget): every method's perplexity change vs dense [95% interval]."""
    methods = [m for m in dict.fromkeys(s["method"] for s in summary) if m != "dense"]
    by = {(s["context"], s["budget"], s["method"]): s for s in summary}
    points = sorted({(s["context"], s["budget"]) for s in summary if s["method"] != "dense"})
    lines = ["| context | budget | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for c, b in points:
        cells = [fmt_change(by[(c, b, m)]["vs_dense"]) if (c, b, m) in by else "-" for m in methods]
        lines.append(f"| {c} | {b:g} | " + " | ".join(cells) + " |")
    return lines


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({s["context"] for s in summary})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, c in zip(axes[0], contexts):
        for m in sorted({s["method"] for s in summary}):
            pts = sorted((s["kv_bytes"] / 1e6, s["ppl"]) for s in summary if s["context"] == c and s["method"] == m)
            style = "k*" if m == "dense" else "o-"
            ax.plot(*zip(*pts), style, label=m, markersize=10 if m == "dense" else 4)
        ax.set_title(f"context {c}")
        ax.set_xlabel("KV cache held (MB)")
        ax.set_ylabel("perplexity (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
