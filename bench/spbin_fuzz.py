"""Fuzz the .spbin reader: >= 10,000 corrupted copies of emitted binaries, each must be refused.

    python -m bench.spbin_fuzz [--cases 10000] [--deep 2000] [--seed 0] [--model models/x.onnx ...]

Each model is emitted (encoders --seq-len 32; decoders --prompt-len 16 --gen-steps 4), then every
case applies one mutation of :mod:`spatten_compiler.backend.fuzz` (flip a bit, overwrite a byte or a
run, insert, delete, truncate) and reads the result; ``--deep`` more cases change bytes inside one
section and repair the CRCs, so the checks behind them run (those may yield another valid program, but
must never crash). Written to bench/results/<stamp>-spbin_fuzz.{md,json}:
the refusal categories, the slowest case, and any accepted corruption or crash (the run then fails).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from spatten_compiler.backend import program
from spatten_compiler.backend.fuzz import classify, mutate, mutate_deep
from spatten_compiler.backend.lower import emit_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ["models/bert_torchscript.onnx", "models/gpt2_kv_torchscript.onnx", "models/llama_dynamo.onnx"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.spbin_fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--deep", type=int, default=2000, help="extra cases with CRCs repaired")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", action="append", help="ONNX model(s) to emit (default: three fixtures)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    binaries = {}
    for m in args.model or DEFAULT_MODELS:
        path = ROOT / m if not Path(m).is_absolute() else Path(m)
        decoder = "gpt2" in path.name or "llama" in path.name
        p = emit_model(path, 16 if decoder else 32, gen_steps=4 if decoder else 0)
        binaries[path.name] = program.to_bytes(p)
    r = random.Random(args.seed)
    names = sorted(binaries)
    categories: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    accepted, slowest = [], (0.0, "")
    t0 = time.perf_counter()
    deep: Counter[str] = Counter()
    for case in range(args.cases + args.deep):
        name = names[case % len(names)]
        kind, bad = mutate(r, binaries[name]) if case < args.cases else mutate_deep(r, binaries[name])
        t = time.perf_counter()
        category, message = classify(bad)
        dt_case = time.perf_counter() - t
        if dt_case > slowest[0]:
            slowest = (dt_case, f"{name} {kind}: {message}")
        kinds[kind] += 1
        if case >= args.cases:
            deep[category] += 1
            if category == "CRASH" or "\n" in message:
                accepted.append({"case": case, "model": name, "mutation": kind, "error": message})
            continue
        categories[category] += 1
        if category == "ACCEPTED" or "\n" in message:
            accepted.append({"case": case, "model": name, "mutation": kind})
    total = time.perf_counter() - t0
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python -m bench.spbin_fuzz " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "cases": args.cases, "seed": args.seed, "binaries": {k: len(v) for k, v in binaries.items()},
        "mutations": dict(kinds), "refusals": dict(categories.most_common()), "accepted_or_crashed": accepted,
        "deep_cases": args.deep, "deep_outcomes": dict(deep.most_common()),
        "seconds": round(total, 2), "slowest_case_ms": round(1e3 * slowest[0], 2), "slowest_case": slowest[1],
        "threads": os.cpu_count(), "machine": f"{platform.machine()} {platform.python_version()}, shared by 8 helpers",
    }
    (args.out / f"{stamp}-spbin_fuzz.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# .spbin fuzz: {args.cases} corrupted binaries + {args.deep} with repaired CRCs, "
             f"{len(accepted)} accepted or crashed", "",
             f"Command: `{result['command']}` (seed {args.seed}); {total:.1f} s on a {result['machine']} "
             f"({os.cpu_count()} cores); slowest case {result['slowest_case_ms']} ms.", "",
             "Binaries: " + ", ".join(f"{k} ({v:,} bytes)" for k, v in result["binaries"].items()), "",
             "Mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())), "",
             "| refusal (numbers and names elided) | cases |", "|---|---|"]
    lines += [f"| {c.replace('|', '/')} | {n} |" for c, n in categories.most_common()]
    lines += ["", f"With repaired CRCs ({args.deep} cases; ACCEPTED = the bytes still form a valid program, e.g. a "
              "changed name or an in-range field; CRASH would be a bug):", "", "| outcome | cases |", "|---|---|"]
    lines += [f"| {c.replace('|', '/')} | {n} |" for c, n in deep.most_common()]
    (args.out / f"{stamp}-spbin_fuzz.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if accepted else 0


if __name__ == "__main__":
    sys.exit(main())
