"""Short chat prompts under KV eviction: greedy agreement with the dense model per token floor.

A fractional budget evicts part of a short prompt at prefill (``--kv-budget 0.5`` hands over half of
a 33-token chat prompt, docs/decoders.md); evict-kv's ``min_keep`` floor keeps the whole cache while
it holds at most that many tokens. This run measures what the floor buys: ~20 real prompts of 20-200
chat tokens (SST-2 dev sentences and IMDB test reviews turned into questions, SmolLM2's chat
template), each generated greedily through the same path as ``spattenc generate --chat``
(:func:`spatten_compiler.generate.generate_ids`) by the dense model and by one tunable evict-kv model
at every (budget, floor); reported per configuration: the share of prompts whose first generated
token equals the dense one, the mean length of the common prefix with the dense tokens (of the first
N), the share of the first N positions equal, and how many prompt tokens the prefill evicted.

    python -m bench chat_floor --floors 0,64,128,256 --budgets 0.75,0.5,0.25 --new-tokens 32
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DEFAULT_RESULTS, REPO_ROOT, run_metadata, write_results  # noqa: E402
from bench.decode import METHODS, MODEL, compiled, knobs  # noqa: E402

log = logging.getLogger("bench.chat_floor")
DATA = next((d / "shared" / "data" for d in REPO_ROOT.parents if (d / "shared" / "data" / "sst2").is_dir()),
            Path("data"))
BINS = ((20, 60), (60, 100), (100, 150), (150, 200))  # chat-token lengths, prompts spread evenly over them
TEMPLATES = ("What is the sentiment of this movie review, and why? {}", "Summarize: {}",
             "Explain what the writer of this review thinks of the movie: {}")


def _rows(path: Path) -> list[str]:
    with path.open() as f:
        return [r[0] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]


def prompts(tok, n: int) -> list[tuple[str, list[int]]]:
    """``n`` prompts (text, chat token ids) spread evenly over the length bins, each source text used
    once, in file order: SST-2 dev sentences, then IMDB test reviews cut after 1-8 sentences (the
    first cut whose length fills a bin that still has room)."""
    items = [[s.strip()] for s in _rows(DATA / "sst2" / "dev.tsv")] + \
        [[". ".join(r.split(". ")[:k]) + "." for k in range(1, 9)] for r in _rows(DATA / "imdb" / "test.tsv")]
    per_bin = -(-n // len(BINS))
    chosen: dict[tuple[int, int], list[tuple[str, list[int]]]] = {b: [] for b in BINS}
    for i, cuts in enumerate(items):
        for text in cuts:
            prompt = TEMPLATES[i % len(TEMPLATES)].format(text)
            ids = tok.encode(tok.chat(prompt))
            b = next((b for b in BINS if b[0] <= len(ids) < b[1]), None)
            if b is not None and len(chosen[b]) < per_bin:
                chosen[b].append((prompt, ids))
                break
        if all(len(v) >= per_bin for v in chosen.values()):
            break
    return [p for b in BINS for p in chosen[b]][:n]


def greedy(session, ids: list[int], new: int, eos: set[int]) -> tuple[list[int], list[int]]:
    """The first ``new`` greedy tokens (stops at EOS) and the cache length per layer after prefill."""
    from spatten_compiler.generate import generate_ids

    out: list[int] = []
    after_prefill: list[int] = []
    gen = generate_ids(session, ids, new, eos_ids=eos)
    for t in gen:
        if not out:
            after_prefill = session.cache_lengths()
        out.append(t)
    return out, after_prefill or session.cache_lengths()


def agreement(dense: list[int], other: list[int], n: int) -> dict[str, float]:
    """An output that stops (EOS) early or late disagrees from there on."""
    d, o = dense[:n], other[:n]
    prefix = next((i for i, (a, b) in enumerate(zip(d, o)) if a != b), min(len(d), len(o)))
    same = sum(a == b for a, b in zip(d, o))
    return {"first": float(bool(d) and bool(o) and d[0] == o[0]), "prefix": float(prefix),
            "match": same / max(len(d), 1), "identical": float(d == o)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--floors", default="0,64,128,256")
    p.add_argument("--budgets", default="0.75,0.5,0.25")
    p.add_argument("--configs", default="", metavar="B:F,...",
                   help="exactly these (budget, floor) pairs instead of --budgets x --floors")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="no runs: the table from a partial-<name>.json of an interrupted run")
    p.add_argument("--method", default="layer-s4-r50", choices=sorted(METHODS),
                   help="eviction rule and K/V bits (bench.decode's methods)")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--example", default="What is gravity?",
                   help="one more prompt shown in the text, not in the statistics (docs/decoders.md's example)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=REPO_ROOT / "models" / "cache" / "presets-decode")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--name", default="chat-floor-smollm2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from spatten_compiler.decoding import DecoderSession
    from spatten_compiler.generate import TextTokenizer

    tok = TextTokenizer(args.model.parent)
    chosen = prompts(tok, args.prompts)
    if args.example:
        chosen.append((args.example, tok.encode(tok.chat(args.example))))
    partial = args.out_dir / f"partial-{args.name}.json"
    if args.render:
        return finish(json.loads(args.render.read_text()), chosen, args, partial)
    log.info("%d prompts, chat lengths %s", len(chosen), [len(i) for _, i in chosen])
    mode, k = METHODS[args.method]
    args.cache.mkdir(parents=True, exist_ok=True)
    dense = DecoderSession(args.model, threads=args.threads, idle_spin=False)
    evict = DecoderSession(compiled(mode, args.cache, args.model), threads=args.threads, idle_spin=False)
    configs = [(float(b), int(f)) for b, _, f in (c.partition(":") for c in args.configs.split(",") if c)] or \
        [(float(b), int(f)) for b in args.budgets.split(",") for f in args.floors.split(",")]
    rows: list[dict] = []
    t0 = time.perf_counter()
    for i, (_, ids) in enumerate(chosen):
        ref, _ = greedy(dense, ids, args.new_tokens, tok.eos_ids)
        extra = bool(args.example) and i == len(chosen) - 1
        rows.append({"prompt": i, "extra": extra, "length": len(ids), "budget": 1.0, "floor": -1, "tokens": ref,
                     "cache_after_prefill": len(ids), "text": tok.decode(ref)})
        for b, f in configs:
            evict.overrides = knobs(b, k, f)
            got, lens = greedy(evict, ids, args.new_tokens, tok.eos_ids)
            rows.append({"prompt": i, "extra": extra, "length": len(ids), "budget": b, "floor": f, "tokens": got,
                         "cache_after_prefill": int(lens[0]), **agreement(ref, got, args.new_tokens),
                         "text": tok.decode(got)})
        log.info("prompt %d/%d (%d tokens) done, %.0f s", i + 1, len(chosen), len(ids), time.perf_counter() - t0)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(rows))
    return finish(rows, chosen, args, partial)


def finish(rows: list[dict], chosen: list, args: argparse.Namespace, partial: Path) -> int:
    done = {r["prompt"] for r in rows}
    if len(done) < len(chosen):  # an interrupted run: the prompts it finished (the example is the last)
        chosen = [c for i, c in enumerate(chosen) if i in done]
        rows = [dict(r, extra=False) for r in rows]
        args.example = ""
    summary = summarize(rows, args.new_tokens)
    meta = run_metadata(args.threads)
    md = render(summary, rows, chosen, meta, args)
    _, md_path = write_results(args.out_dir, args.name, {"meta": meta, "prompts": [t for t, _ in chosen],
                                                          "rows": rows, "summary": summary}, md)
    plot(summary, md_path.with_suffix(".png"), args.new_tokens)
    partial.unlink(missing_ok=True)
    print(md)
    return 0


def summarize(rows: list[dict], new: int) -> list[dict]:
    out = []
    rows = [r for r in rows if not r["extra"]]
    for b, f in sorted({(r["budget"], r["floor"]) for r in rows if r["floor"] >= 0}, key=lambda x: (-x[0], x[1])):
        sel = [r for r in rows if (r["budget"], r["floor"]) == (b, f)]
        out.append({"budget": b, "floor": f, "n": len(sel), **{m: float(np.mean([r[m] for r in sel]))
                                                              for m in ("first", "prefix", "match", "identical")},
                    "evicted_at_prefill": float(np.mean([1 - r["cache_after_prefill"] / r["length"] for r in sel])),
                    "first_short": float(np.mean([r["first"] for r in sel if r["length"] < 100] or [np.nan])),
                    "new": new})
    return out


def render(summary: list[dict], rows: list[dict], chosen: list, meta: dict, args: argparse.Namespace) -> str:
    lengths = [len(i) for _, i in (chosen[:-1] if args.example else chosen)]
    lines = [f"# Short chat prompts under KV eviction: greedy agreement with dense ({args.model.parent.name})", "",
             f"Command: `{meta['command']}`  ",
             f"Date: {meta['date_utc']}, git {meta['git_commit']}, onnxruntime {meta['onnxruntime_version']}, "
             f"{args.threads} intra-op threads, load avg {meta['load_avg_1m']:.1f} on {meta['cpu_count']} cores.",
             f"Eviction: {args.method} ({METHODS[args.method]}), tunable budget and floor (min_keep) fed per row. "
             f"{len(lengths)} prompts (SST-2 dev / IMDB test text in a question, SmolLM2 chat template), "
             f"{min(lengths)}-{max(lengths)} chat tokens (median {int(np.median(lengths))}); "
             f"{args.new_tokens} greedy new tokens (stop at EOS).", "",
             "Columns: first = share of prompts whose first new token is the dense one (first <100 = prompts "
             "under 100 tokens); prefix = mean common prefix with the dense tokens; match = share of the "
             "dense tokens' positions with the same token; identical = share of prompts whose whole output "
             "equals dense; evicted = mean share of the prompt dropped at prefill.", "",
             "| budget | floor | first | first <100 | prefix (of N) | match | identical | evicted at prefill |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['budget']:g} | {s['floor']} | {s['first']:.2f} | {s['first_short']:.2f} | "
                     f"{s['prefix']:.1f} / {s['new']} | {s['match']:.2f} | {s['identical']:.2f} | "
                     f"{s['evicted_at_prefill']:.0%} |")
    lines += ["", "First words per prompt (dense, then budget 0.5 at each floor):", ""]
    for i, (text, ids) in enumerate(chosen):
        sel = [r for r in rows if r["prompt"] == i and r["budget"] in (1.0, 0.5)]
        lines.append(f"- {len(ids)} tok: `{text[:70]}...`")
        for r in sel:
            tag = "dense" if r["floor"] < 0 else f"floor {r['floor']}"
            lines.append(f"  - {tag}: {json.dumps(r['text'][:90])}")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, new: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for b in sorted({s["budget"] for s in summary}, reverse=True):
        pts = sorted((s["floor"], s["prefix"], s["first"]) for s in summary if s["budget"] == b)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"budget {b:g}")
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"budget {b:g}")
    axes[0].set_ylabel(f"common prefix with dense (of {new} tokens)")
    axes[1].set_ylabel("first token = dense (share of prompts)")
    for ax in axes:
        ax.set_xlabel("floor (min_keep, tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
