"""Compile every candidate of a candidates file into OUT/NAME.onnx, with its compile report beside it.

A candidates file (``bench/candidates/*.txt``) has one ``NAME<TAB>spattenc options`` line per
candidate (``#`` starts a comment). Each is compiled in-process by the CLI with ``--emit-kept``
(latency.py and embed_eval.py read the kept-token outputs) and its report written to
``OUT/NAME.spatten.json`` (latency.py reads the ideal FLOP ratio from it):

    python -m bench compile_candidates bench/candidates/tokens.txt models/cache/minilm/model.onnx bench/out/tokens
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spatten_compiler.cli import build_parser  # noqa: E402


def read_candidates(path: Path) -> list[tuple[str, list[str]]]:
    """``[(name, [flag, ...])]`` in file order."""
    out = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, opts = line.partition("\t")
        out.append((name.strip(), shlex.split(opts)))
    return out


def compile_one(dense: Path, out: Path, name: str, flags: list[str]) -> dict:
    """``spattenc DENSE -o OUT/NAME.onnx FLAGS --emit-kept --report ...``, run in-process."""
    target, report = out / f"{name}.onnx", out / f"{name}.spatten.json"
    args = build_parser().parse_args(["compile", str(dense), "-o", str(target), *flags, "--emit-kept",
                                      "--report", str(report), "-q"])
    if args._run(args) != 0:
        raise SystemExit(f"{name}: compile failed")
    return json.loads(report.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidates", type=Path, help="NAME<TAB>options file (bench/candidates/*.txt)")
    ap.add_argument("dense", type=Path, help="the dense ONNX model")
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--only", nargs="*", help="compile only these names")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, flags in read_candidates(args.candidates):
        if args.only and name not in args.only:
            continue
        report = compile_one(args.dense, args.out, name, flags)
        print(f"{name}: {report.get('token_schedule')} {report.get('flop_ratio')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
