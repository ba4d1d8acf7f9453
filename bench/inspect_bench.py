"""Attention discovery speed and coverage: ``spattenc inspect`` vs onnxruntime's transformer optimizer.

Each tool runs in its own process on the same file (so peak memory is that tool's alone), timed
wall-clock with peak RSS from ``resource``. Reported per model: attention sites found, seconds,
peak RSS in MB and as a multiple of the file size.

    python bench/inspect_bench.py models/cache/smollm2/model.onnx models/cache/smollm2-dynamo/model.onnx \
        --ort-model-type gpt2 --heads 9 --hidden 576
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
kind, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if kind == "spattenc":
    from spatten_compiler.commands.inspect import inspect_model
    from pathlib import Path
    found = len(inspect_model(Path(path)).sites)
else:
    import logging
    logging.disable(logging.WARNING)
    from onnxruntime.transformers import optimizer
    model = optimizer.optimize_model(path, model_type=sys.argv[3], num_heads=int(sys.argv[4]),
                                     hidden_size=int(sys.argv[5]), opt_level=0)
    ops = {}
    for n in model.model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    found = sum(ops.get(k, 0) for k in ("Attention", "MultiHeadAttention", "GroupQueryAttention"))
seconds = time.perf_counter() - t0
print(json.dumps({"found": found, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(kind: str, path: Path, extra: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), *extra], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--ort-model-type", default="gpt2")
    ap.add_argument("--heads", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    rows = []
    for path in args.models:
        size_mb = sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 2**20
        for kind in ("spattenc", "ort-optimizer"):
            extra = [args.ort_model_type, str(args.heads), str(args.hidden)]
            runs = [run(kind, path, extra) for _ in range(args.repeats if kind == "spattenc" else 1)]
            ok = [r for r in runs if "error" not in r]
            best = min(ok, key=lambda r: r["seconds"]) if ok else runs[0]
            row = {"model": str(path), "tool": kind, "file_mb": round(size_mb, 1), **best,
                   "seconds_all": [round(r["seconds"], 2) for r in ok]}
            if ok:
                row["rss_over_file"] = round(best["peak_rss_mb"] / size_mb, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    meta = {"command": " ".join(sys.argv), "load_avg_1m": os.getloadavg()[0], "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "date_utc": stamp}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}-inspect-bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| model | tool | sites found | seconds (best) | peak RSS MB | RSS / file |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['model']).parent.name} | {r['tool']} | {r.get('found', r.get('error'))} | "
                     f"{r.get('seconds', 0):.2f} | {r.get('peak_rss_mb', 0):.0f} | {r.get('rss_over_file', '-')} |")
    sizes = ", ".join(f"{Path(r['model']).parent.name} {r['file_mb']} MB" for r in rows[::2])
    lines.append(f"\nfile sizes: {sizes}; load average at start {meta['load_avg_1m']:.1f}; "
                 f"command: `{meta['command']}`")
    (args.out / f"{stamp}-inspect-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
