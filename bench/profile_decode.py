"""Where a decode step's time goes: onnxruntime's profiler on one decode step of each model at a
given context, from a synthetic steady-state cache (kernel time per op type, dense vs candidates).

The cache state is what the step would see in steady state: dense models get ``context - 1`` past
tokens; evict-kv models the kept length of their budget (``budget_tokens`` at ``context - 1``, sinks +
the most recent slots + random others, in order, with random importance); a packed cache random
planes and positive scales. The values do not change the work, except for block eviction
(evict-kv ``slack`` > 0: the cache grows to budget + slack, then one step evicts): such a model runs
one whole cycle per timed run - from the freshly evicted cache, real consecutive steps (its outputs
fed back, positions advancing) up to and including the next eviction step - and its step time is
that cycle's mean (so the eviction step is paid in full, and the context it sees is up to a cycle
longer than the others'). Runs of all models are interleaved, medians over runs reported; the sessions'
threads spin during a run and stop when it returns (``--spin-idle``: they keep spinning, the earlier
protocol).

    python -m bench profile_decode --context 1024 --models dense=models/cache/smollm2/model.onnx \\
        evict50=smol.kv.onnx:0.5 packed=smol.kv4.onnx:1
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def state_feeds(session, context: int, budget: float, rng: np.random.Generator, extra: int = 0) -> dict:
    """Feeds of one decode step at ``context`` (the new token is position ``context - 1``)."""
    from spatten_compiler.passes.evict_kv import budget_tokens

    past = context - 1
    sinks = int(session.overrides.get("spatten.kv_sinks", [4])[0]) if session.evict else 0
    length = past
    if session.evict and budget != 1:  # a fraction of the length or tokens (1: the full cache)
        length = min(past, budget_tokens(budget, past, sinks, 0, past) + extra)
    keep = np.arange(past)
    if length < past:
        rest = rng.choice(np.arange(sinks, past - length // 2), length - sinks - length // 2, replace=False)
        keep = np.sort(np.concatenate([np.arange(sinks), rest, np.arange(past - length // 2, past)]))
    feeds: dict[str, np.ndarray] = {}
    for name, (dtype, dims) in session.state.items():
        if len(dims) in (2, 3):  # eviction state: per layer [1, n] or per KV head [1, Hkv, n]
            heads = (dims[1],) if len(dims) == 3 else ()
            feeds[name] = (np.broadcast_to(keep, (1, *heads, length)).astype(dtype) if "positions" in name
                           else rng.random((1, *heads, length)).astype(dtype))
        elif dtype == np.uint8:
            feeds[name] = rng.integers(0, 256, (1, dims[1], length, dims[3]), dtype=np.uint8)
        elif name.endswith(".scale"):
            feeds[name] = (rng.random((1, dims[1], length, 1)) * 0.1 + 0.01).astype(dtype)
        else:
            feeds[name] = rng.standard_normal((1, dims[1], length, dims[3])).astype(dtype)
    mask_len = length if session.evict else past
    feeds.update({"input_ids": np.array([[1234]], np.int64), "position_ids": np.array([[past]], np.int64),
                  "attention_mask": np.ones((1, mask_len + 1), np.int64), **session.overrides})
    return {k: v for k, v in feeds.items() if k in session.input_names}


def next_feeds(feeds: dict, outputs: dict) -> dict:
    """The feeds of the following decode step: the step's ``present*`` outputs as the cache state."""
    nxt = dict(feeds)
    for name in feeds:
        if name.startswith("past_"):
            nxt[name] = outputs[name.replace("past_key_values.", "present.").replace("past_", "present_")]
    length = next(v for k, v in nxt.items() if k.startswith("past_key_values")).shape[2]
    nxt["position_ids"] = feeds["position_ids"] + 1
    nxt["attention_mask"] = np.ones((1, length + 1), np.int64)
    return nxt


def cycle(sess, feeds: dict, limit: int = 512) -> list[dict]:
    """Block eviction: the feeds of consecutive steps from ``feeds`` (a freshly evicted cache) up to
    and including the next step whose output cache is shorter than its input (the eviction step)."""
    names = [o.name for o in sess.get_outputs()]
    steps = [feeds]
    for _ in range(limit):
        out = dict(zip(names, sess.run(None, steps[-1])))
        before = next(v for k, v in steps[-1].items() if k.startswith("past_key_values")).shape[2]
        if next(v for k, v in out.items() if k.startswith("present.")).shape[2] <= before:
            return steps
        steps.append(next_feeds(steps[-1], out))
    raise SystemExit(f"profile_decode: no eviction within {limit} steps")


class _Meta:
    """The cache interface of a decoder (DecoderSession's, read without loading the weights)."""

    def __init__(self, path: str) -> None:
        import onnx

        from spatten_compiler.decoding import EVICT_META, _dim

        proto = onnx.load(path, load_external_data=False)
        self.input_names = [i.name for i in proto.graph.input]
        self.state = {i.name: (onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type),
                               [_dim(d) for d in i.type.tensor_type.shape.dim])
                      for i in proto.graph.input if i.name.startswith("past_")}
        meta = {p.key: p.value for p in proto.metadata_props}
        self.evict = json.loads(meta[EVICT_META]) if EVICT_META in meta else None
        self.overrides: dict[str, np.ndarray] = {}


def main(argv: list[str] | None = None) -> int:
    import os

    import onnxruntime as ort

    from bench.common import DEFAULT_RESULTS, run_metadata, write_results
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH[:BUDGET]",
                   help="the first is the baseline of the ratios")
    p.add_argument("--contexts", default="1024")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--no-profile", action="store_true", help="interleaved step times only, written to bench/results")
    p.add_argument("--spin-idle", action="store_true",
                   help="let a session's threads keep spinning after its step returns (onnxruntime's default; the "
                        "protocol before session 19, where the idle sessions took cores from the one being timed)")
    p.add_argument("--name", default="decode-step")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    specs = []
    for spec in args.models:
        name, _, rest = spec.partition("=")
        path, _, budget = rest.partition(":")
        specs.append((name, path, float(budget or 1)))
    sessions: dict[str, tuple] = {}  # one onnxruntime session per file (budgets are inputs)
    for _, path, _ in specs:
        if path in sessions:
            continue
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        if not args.spin_idle:  # spin during a step, stop when it returns (docs/benchmarks.md)
            so.add_session_config_entry("session.force_spinning_stop", "1")
        if not args.no_profile:
            so.enable_profiling = True
            so.profile_file_prefix = tempfile.mkdtemp() + "/profile"
        sessions[path] = (_Meta(path), ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]))
    rows = []
    lines = []
    for context in [int(c) for c in args.contexts.split(",")]:
        runs: dict[str, tuple] = {}
        for name, path, b in specs:
            meta, sess = sessions[path]
            meta.overrides = {"spatten.kv_budget": np.array(b, np.float32)} if meta.evict else {}
            meta.overrides = {k: v for k, v in meta.overrides.items() if k in meta.input_names}
            feeds = state_feeds(meta, context, b, rng)
            sess.run(None, feeds)
            steps = cycle(sess, feeds) if meta.evict and meta.evict.get("slack") else [feeds]
            runs[name] = (sess, steps, [], feeds[next(k for k in feeds if k.startswith("past_key_values"))].shape[2])
        for _ in range(args.runs):
            for sess, steps, times, _ in runs.values():
                t0 = time.perf_counter()
                for feeds in steps:
                    sess.run(None, feeds)
                times.append((time.perf_counter() - t0) / len(steps))
        base_name = specs[0][0]
        base = float(np.median(runs[base_name][2]))
        load = os.getloadavg()[0]
        lines.append(f"context {context}, {args.threads} threads, {args.runs} interleaved steps, load avg {load:.1f}")
        for name, (_, steps, times, length) in runs.items():
            ms = float(np.median(times)) * 1e3
            kv = float(np.mean([sum(v.nbytes for k, v in f.items() if k.startswith("past_key_values")) for f in steps]))
            if len(steps) > 1:  # block eviction: the cycle's shortest-longest past
                length = f"{length}-{length + len(steps) - 1} ({len(steps)}-step cycle)"
            rows.append({"context": context, "model": name, "cache_len": length, "step_ms": ms,
                         "spin_idle": args.spin_idle,
                         "vs_first": base * 1e3 / ms, "kv_bytes": kv, "load_avg": load,
                         "q25_ms": float(np.percentile(times, 25)) * 1e3,
                         "q75_ms": float(np.percentile(times, 75)) * 1e3})
            lines.append(f"  {name:14} past {length!s:>5}  {ms:7.1f} ms  vs {base_name}: {base * 1e3 / ms:.2f}x")
        print("\n".join(lines[-len(runs) - 1:]), flush=True)
    if args.no_profile:
        meta = run_metadata(args.threads)
        md = [f"# Decode step time, steady-state synthetic cache ({args.runs} interleaved steps per context)", "",
              f"Command: `{meta['command']}`  ", f"Date: {meta['date_utc']}, git {meta['git_commit']}, onnxruntime "
              f"{meta['onnxruntime_version']}, {args.threads} intra-op threads, "
              f"{'idle sessions spinning' if args.spin_idle else 'spinning only during a run'}, "
              f"{meta['cpu_count']} cores shared "
              "with other jobs (load average per context below).", "",
              "| context | model | past length | step ms (median) | q25-q75 ms | vs " + specs[0][0] + " | load avg |",
              "|---|---|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['context']} | {r['model']} | {r['cache_len']} | {r['step_ms']:.1f} | "
                      f"{r['q25_ms']:.0f}-{r['q75_ms']:.0f} | {r['vs_first']:.2f}x | {r['load_avg']:.1f} |")
        write_results(args.out_dir, args.name, {"meta": meta, "rows": rows}, "\n".join(md) + "\n")
        print("\n".join(md))
        return 0
    ops: dict[str, collections.Counter] = {}
    done: dict[str, collections.Counter] = {}
    for name, path, _ in specs:  # one profile per file (the last context's runs)
        if path not in done:
            per = collections.Counter()
            for e in json.load(open(sessions[path][1].end_profiling())):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    per[e["args"]["op_name"]] += e["dur"] / 1e3
            done[path] = per
            ops[name] = per
    total = sum(ops.values(), collections.Counter())
    print("\nkernel ms summed over all profiled runs, by op type: " + " | ".join(ops))
    for op, _ in total.most_common(args.top):
        print(f"  {op[:22]:22} " + " ".join(f"{ops[n][op]:8.1f}" for n in ops))
    print(f"  {'(sum)':22} " + " ".join(f"{sum(ops[n].values()):8.1f}" for n in ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
