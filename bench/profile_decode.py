"""Where a decode step's time goes: onnxruntime's profiler on one decode step of each model at a
given context, from a synthetic steady-state cache (kernel time per op type, dense vs candidates).

The cache state is what the step would see in steady state: dense models get ``context - 1`` past
tokens; evict-kv models the kept length of their budget (``budget_tokens`` at ``context - 1``, sinks +
the most recent slots + random others, in order, with random importance); a packed cache random
planes and positive scales. The values do not change the work (no data-dependent control flow
except evict-kv's ``evict_every`` slack, whose steady state is taken at the eviction step: the
worst case, the cache at budget + slack). Steps of all models are interleaved, medians reported.

    python -m bench profile_decode --context 1024 --models dense=models/cache/smollm2/model.onnx \\
        evict50=smol.kv.onnx:0.5 packed=smol.kv4.onnx:1
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time

import numpy as np


def state_feeds(session, context: int, budget: float, rng: np.random.Generator, extra: int = 0) -> dict:
    """Feeds of one decode step at ``context`` (the new token is position ``context - 1``)."""
    from spatten_compiler.passes.evict_kv import budget_tokens

    past = context - 1
    sinks = int(session.overrides.get("spatten.kv_sinks", [4])[0]) if session.evict else 0
    length = past
    if session.evict and budget < 1:
        length = min(past, budget_tokens(budget, past, sinks, 0, past) + extra)
    keep = np.arange(past)
    if length < past:
        rest = rng.choice(np.arange(sinks, past - length // 2), length - sinks - length // 2, replace=False)
        keep = np.sort(np.concatenate([np.arange(sinks), rest, np.arange(past - length // 2, past)]))
    feeds: dict[str, np.ndarray] = {}
    for name, (dtype, dims) in session.state.items():
        if len(dims) == 2:
            feeds[name] = (keep[None].astype(dtype) if "positions" in name
                           else rng.random((1, length)).astype(dtype))
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


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    from spatten_compiler.decoding import DecoderSession

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH[:BUDGET]")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--no-profile", action="store_true", help="interleaved step times only")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    runs: dict[str, tuple] = {}
    for spec in args.models:
        name, _, rest = spec.partition("=")
        path, _, budget = rest.partition(":")
        b = float(budget or 1)
        s = DecoderSession(path, threads=args.threads)
        if s.evict:
            s.overrides = {"spatten.kv_budget": np.array(b, np.float32)}
            s.overrides = {k: v for k, v in s.overrides.items() if k in s.input_names}
        feeds = state_feeds(s, args.context, b, rng)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        if not args.no_profile:
            so.enable_profiling = True
            so.profile_file_prefix = tempfile.mkdtemp() + "/profile"
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        runs[name] = (sess, feeds, [])
        del s
    for _ in range(args.runs):
        for sess, feeds, times in runs.values():
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
    import os

    dense = next(iter(runs))
    base = float(np.median(runs[dense][2]))
    print(f"context {args.context}, {args.threads} threads, {args.runs} interleaved steps, load avg "
          f"{os.getloadavg()[0]:.1f}")
    ops: dict[str, collections.Counter] = {}
    for name, (sess, _, times) in runs.items():
        ms = float(np.median(times)) * 1e3
        print(f"  {name:14} {ms:7.1f} ms  vs {dense}: {base / (ms / 1e3):.2f}x")
        if not args.no_profile:
            per = collections.Counter()
            for e in json.load(open(sess.end_profiling())):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    per[e["args"]["op_name"]] += e["dur"] / (args.runs + 1) / 1e3
            ops[name] = per
    if ops:
        total = sum(ops.values(), collections.Counter())
        print("\nkernel ms per step by op type: " + " | ".join(ops))
        for op, _ in total.most_common(args.top):
            print(f"  {op[:22]:22} " + " ".join(f"{ops[n][op]:8.2f}" for n in ops))
        print(f"  {'(sum)':22} " + " ".join(f"{sum(ops[n].values()):8.2f}" for n in ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
