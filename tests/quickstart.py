"""Run the README's quick start and compare (or, with ``--update``, re-paste) its printed output.

The README marks the blocks with HTML comments just above the fences:
``<!-- quickstart: commands -->`` (a bash block, one command per line), ``<!-- quickstart: output -->``
(the text block they print, stdout and stderr together) and ``<!-- quickstart: file NAME -->``
(a file written before the commands run). The commands run in a temporary folder holding a link to
``models/``, with this interpreter's ``bin`` first on PATH. Timings (``0.2 s``) are masked when
comparing.

    python tests/quickstart.py            # run and show the differences (exit 1 if any)
    python tests/quickstart.py --update   # run and write the real output into README.md
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"<!-- quickstart: (commands|output|file [\w./-]+) -->\n```\w*\n(.*?)^```", re.S | re.M)
TIMING = re.compile(r"\b\d+(?:\.\d+)? (s|ms)\b")


def blocks(text: str) -> dict[str, str]:
    """{'commands': ..., 'output': ..., 'file NAME': ...} from the marked fenced blocks."""
    return {m.group(1): m.group(2) for m in MARK.finditer(text)}


def run(text: str) -> str:
    """The commands' combined output, run from a temporary folder (not the repository)."""
    found = blocks(text)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "models").symlink_to(ROOT / "models", target_is_directory=True)
        for key, body in found.items():
            if key.startswith("file "):
                (cwd / key.split(" ", 1)[1]).write_text(body)
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("PYTHONPATH", None)
        out = []
        for cmd in filter(None, (c.strip() for c in found["commands"].splitlines())):
            r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"README quick start: {cmd!r} failed ({r.returncode}):\n{r.stdout}")
            out.append(r.stdout)
    return "".join(out)


def masked(text: str) -> list[str]:
    return [TIMING.sub(r"<n> \1", line).rstrip() for line in text.strip().splitlines()]


def update(text: str, output: str) -> str:
    m = next(m for m in MARK.finditer(text) if m.group(1) == "output")
    return text[:m.start(2)] + output.rstrip() + "\n" + text[m.end(2):]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="write the real output into README.md")
    args = ap.parse_args(argv)
    text = README.read_text()
    output = run(text)
    if args.update:
        README.write_text(update(text, output))
        print(f"README.md quick-start output updated ({len(output.splitlines())} lines)")
        return 0
    diff = list(difflib.unified_diff(masked(blocks(text)["output"]), masked(output), "README", "actual", lineterm=""))
    print("\n".join(diff) if diff else "README quick start matches")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
