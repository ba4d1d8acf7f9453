"""``python -m bench [NAME [ARGS...]]``: list the benchmarks, or run one.

A benchmark is any module ``bench/<name>.py`` (not starting with ``_``) with a module docstring and
a top-level ``def main(argv)``; it is found by reading the file, so a new module appears here
without editing a list, and listing imports nothing heavy. ``python -m bench NAME --help`` shows a
benchmark's own options.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    summary: str  # the docstring's first line


def discover(folder: Path = HERE) -> dict[str, Benchmark]:
    """Every benchmark module in ``folder``, by name (helpers without ``main`` are skipped)."""
    found: dict[str, Benchmark] = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        doc = ast.get_docstring(tree)
        has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        if doc and has_main:
            paragraph = " ".join(doc.strip().split("\n\n")[0].split())
            found[path.stem] = Benchmark(path.stem, paragraph.split(". ")[0].rstrip("."))
    return found


def usage(benchmarks: dict[str, Benchmark]) -> str:
    width = max((len(n) for n in benchmarks), default=0)
    lines = ["usage: python -m bench NAME [ARGS...]   (python -m bench NAME --help for its options)", "",
             "benchmarks:"]
    lines += [f"  {b.name.ljust(width)}  {b.summary}" for b in benchmarks.values()]
    lines += ["", "protocols and recorded results: docs/benchmarks.md"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    benchmarks = discover()
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(usage(benchmarks))
        return 0
    name, rest = argv[0].removesuffix(".py"), argv[1:]
    if name not in benchmarks:
        print(f"python -m bench: no benchmark {name!r}; run 'python -m bench' for the list", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    saved, sys.argv = sys.argv, [f"bench/{name}.py", *rest]  # results record `python bench/NAME.py ARGS`
    try:
        code = module.main(rest)
    finally:
        sys.argv = saved
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
