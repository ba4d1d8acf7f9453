"""Steady-state onnxruntime profile of dense vs candidate models: kernel time per op type.

Same input repeated (no interleaving), so it shows what each model costs once warm and where a
pruned model's time goes (the README's "steady-state profile" figures).

    python bench/profile_ort.py models/cache/minilm/model.onnx bench/out/tokens/spattenc-r0.3-m64.onnx --tokens 512
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile

import numpy as np
import onnxruntime as ort


def profile(path: str, feeds: dict[str, np.ndarray], runs: int, threads: int,
            per_node: bool = False) -> tuple[float, collections.Counter]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = tempfile.mkdtemp() + "/profile"
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    out = [sess.get_outputs()[0].name]
    sess.run(out, feeds)
    for _ in range(runs):
        sess.run(out, feeds)
    events = json.load(open(sess.end_profiling()))
    per_op: collections.Counter = collections.Counter()
    run_us = [e["dur"] for e in events if e.get("name") == "model_run"][1:]  # first run is warm-up
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            key = e["name"][: -len("_kernel_time")] if per_node else e["args"]["op_name"]
            per_op[key if not per_node else f'{e["args"]["op_name"]}:{key}'] += e["dur"] / (runs + 1)
    return float(np.median(run_us)) / 1e3, per_op


def by_layer(per_node: collections.Counter) -> collections.Counter:
    """Per-node times (``op:name``) summed per transformer layer (``layer.N`` in the node name)."""
    out: collections.Counter = collections.Counter()
    for key, t in per_node.items():
        m = re.search(r"layer\.(\d+)", key)
        out[f"layer {int(m.group(1)):2d}" if m else "other"] += t
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dense")
    ap.add_argument("candidates", nargs="+")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-node", action="store_true", help="kernel time per node (op:name) instead of per op type")
    ap.add_argument("--by-layer", action="store_true",
                    help="kernel time per transformer layer (node names with layer.N; the rest: other)")
    ap.add_argument("--top", type=int, default=12, help="rows per candidate")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1000, 20000, (1, args.tokens)), "attention_mask": np.ones((1, args.tokens), np.int64),
             "token_type_ids": np.zeros((1, args.tokens), np.int64)}
    dense_ms, dense_ops = profile(args.dense, feeds, args.runs, args.threads, args.per_node or args.by_layer)
    if args.by_layer:
        dense_ops = by_layer(dense_ops)
    print(f"dense: {dense_ms:.1f} ms per run ({args.tokens} tokens, {args.threads} threads, median of {args.runs})")
    for path in args.candidates:
        ms, ops = profile(path, feeds, args.runs, args.threads, args.per_node or args.by_layer)
        if args.by_layer:
            ops = by_layer(ops)
        print(f"\n{path}: {ms:.1f} ms per run, speedup {dense_ms / ms:.2f}x")
        for op, _ in (dense_ops + ops).most_common(args.top):
            print(f"  {op[:60]:20} dense {dense_ops[op] / 1e3:7.2f} ms   candidate {ops[op] / 1e3:7.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
