"""Peak memory and time of ``spattenc inspect`` and ``spattenc compile`` per option, against model size.

    python -m bench.compile_memory                                 # the models found in models/cache
    python -m bench.compile_memory --model minilm=models/cache/minilm/model.onnx --repeats 3

Every command runs in its own process under ``/usr/bin/time`` (peak resident set size, wall time);
the commands of one model are interleaved and repeated, medians are reported. Baselines, run the
same way: the interpreter with spattenc's imports (``spattenc --help``), a plain ``cp`` of the
model's files, and onnx's own ``onnx.load`` + ``onnx.save`` of the file (skipped when the machine
has less than 2.5x the weights available: onnx holds the weights twice while saving).

Targets checked (issue #19): peak <= 1.5x the model's weight bytes, compile time <= 2x onnx's
load + save. Results: ``bench/results/<stamp>-compile_memory.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DEFAULT_RESULTS, REPO_ROOT, run_metadata, write_results  # noqa: E402

log = logging.getLogger("bench.compile_memory")

CACHE = REPO_ROOT / "models" / "cache"
DEFAULT_MODELS = ("minilm", "smollm2", "llama-1b-2l", "llama-1b")
# Options per model kind; token pruning is for encoders. The decoder options of the decoder issue
# (branch `decoders`) had not landed when this was written: add them here when they do.
OPTIONS: dict[str, list[tuple[str, list[str]]]] = {
    "encoder": [("identity", []), ("--token-keep 0.5", ["--token-keep", "0.5"]),
                ("--head-keep 0.75", ["--head-keep", "0.75"]), ("--kv-bits 4+4", ["--kv-bits", "4+4"]),
                ("--value-keep 0.5", ["--value-keep", "0.5"])],
    "decoder": [("identity", []), ("--head-keep 0.75", ["--head-keep", "0.75"]),
                ("--kv-bits 4+4", ["--kv-bits", "4+4"]), ("--value-keep 0.5", ["--value-keep", "0.5"])],
}
ONNX_COPY = """import onnx, sys
src, dst, external = sys.argv[1], sys.argv[2], sys.argv[3] == '1'
m = onnx.load(src)
if external:
    onnx.save_model(m, dst, save_as_external_data=True, location='copy.onnx.data')
else:
    onnx.save(m, dst)
"""


def _model_files(path: Path) -> list[Path]:
    return [f for f in (path, path.with_name(path.name + ".data")) if f.exists()]


def weight_bytes(path: Path) -> int:
    """Bytes of the model's initializers (read with spattenc's lazy reader: no weight is loaded)."""
    from spatten_compiler.modelio import load_model, weight_bytes

    return weight_bytes(load_model(path, check=False))


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` under /usr/bin/time; return wall seconds, peak RSS (bytes) and the exit status."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        proc = subprocess.run(["/usr/bin/time", "-o", t.name, "-f", "%e %M", *cmd], capture_output=True, text=True,
                              env=env)
        parts = Path(t.name).read_text().split()
    seconds, kb = (float(parts[-2]), int(parts[-1])) if len(parts) >= 2 else (None, None)
    if proc.returncode:
        log.warning("%s exited %d: %s", shlex.join(cmd), proc.returncode, proc.stderr.strip().splitlines()[-1:])
    return {"seconds": seconds, "peak_bytes": kb * 1024 if kb else None, "status": proc.returncode}


def commands(path: Path, kind: str, out: Path, onnx_baseline: bool,
             options: list[tuple[str, list[str]]] | None = None) -> list[tuple[str, list[str]]]:
    spattenc = [sys.executable, "-m", "spatten_compiler"]
    external = "1" if path.with_name(path.name + ".data").exists() else "0"
    cmds: list[tuple[str, list[str]]] = [
        ("baseline: imports", [*spattenc, "--help"]),
        ("baseline: cp", ["cp", *map(str, _model_files(path)), str(out.parent)]),
    ]
    if onnx_baseline:
        cmds.append(("baseline: onnx load+save", [sys.executable, "-c", ONNX_COPY, str(path), str(out), external]))
    cmds.append(("inspect", [*spattenc, "inspect", str(path), "-q"]))
    cmds += [(label, [*spattenc, str(path), "-o", str(out), "-q", *args]) for label, args in options or OPTIONS[kind]]
    return cmds


def run_model(label: str, path: Path, repeats: int, work: Path,
              options: list[tuple[str, list[str]]] | None = None) -> dict[str, Any]:
    meta_path = path.with_name("model.json")
    kind = json.loads(meta_path.read_text()).get("kind", "decoder") if meta_path.exists() else "decoder"
    wbytes = weight_bytes(path)
    avail = _available_bytes()
    onnx_baseline = avail is None or avail > 2.5 * wbytes
    out_dir = work / label
    out_dir.mkdir(parents=True, exist_ok=True)
    cmds = commands(path, kind, out_dir / "out.onnx", onnx_baseline, options)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in cmds}
    for r in range(repeats):
        for name, cmd in cmds:
            res = measure(cmd)
            runs[name].append(res)
            log.info("%s [%d/%d] %-24s %7.1f s  %8.1f MB%s", label, r + 1, repeats, name, res["seconds"] or -1,
                     (res["peak_bytes"] or 0) / 1e6, "" if not res["status"] else f"  (exit {res['status']})")
            for f in out_dir.iterdir():
                f.unlink()
    rows = {}
    for name, rs in runs.items():
        ok = [x for x in rs if x["status"] == 0 and x["seconds"] is not None]
        rows[name] = {
            "seconds": statistics.median(x["seconds"] for x in ok) if ok else None,
            "peak_bytes": statistics.median(x["peak_bytes"] for x in ok) if ok else None,
            "runs": rs,
        }
    return {"label": label, "path": str(path), "kind": kind, "weight_bytes": wbytes,
            "file_bytes": sum(f.stat().st_size for f in _model_files(path)),
            "available_bytes_at_start": avail, "onnx_baseline": onnx_baseline, "rows": rows}


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# spattenc compile memory and time", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date_utc']}, commit {meta['git_commit']}"
             f"{' (dirty)' if meta['git_dirty'] else ''}, {meta['cpu_count']} cores, load average (1 min) "
             f"{meta['load_avg_1m']:.1f} at the start: the machine was shared with other jobs, so times are "
             "noisy (medians of the repeats; each command its own process, commands interleaved).", "",
             "peak = peak resident set size of the process (/usr/bin/time %M); x weights = peak / the model's "
             "initializer bytes; x onnx = time / the time of onnx.load + onnx.save of the same file.", ""]
    for r in results:
        rows, w = r["rows"], r["weight_bytes"]
        base = rows.get("baseline: onnx load+save", {}).get("seconds")
        imports = rows["baseline: imports"]["peak_bytes"]
        lines += [f"## {r['label']} ({r['kind']}, weights {w / 1e6:.1f} MB, files {r['file_bytes'] / 1e6:.1f} MB)", "",
                  "| command | time s | peak MB | x weights | peak - imports, x weights | x onnx time |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, row in rows.items():
            s, p = row["seconds"], row["peak_bytes"]
            if s is None:
                lines.append(f"| {name} | failed | | | | |")
                continue
            extra = _ratio(p - imports, w) if p and imports else None
            lines.append(f"| {name} | {s:.1f} | {p / 1e6:.0f} | {_ratio(p, w):.2f} | "
                         f"{'' if extra is None else f'{extra:.2f}'} | "
                         f"{'' if _ratio(s, base) is None else f'{_ratio(s, base):.2f}'} |")
        if not r["onnx_baseline"]:
            lines.append(f"\nonnx load+save not run: {r['available_bytes_at_start'] / 1e9:.1f} GB available "
                         f"< 2.5x the weights.")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["weight_bytes"])
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8))
    sizes = [r["weight_bytes"] / 1e9 for r in results]
    for name in dict.fromkeys(n for r in results for n in r["rows"] if n != "baseline: imports"):
        pts = [(r["weight_bytes"] / 1e9, r["rows"][name]) for r in results if name in r["rows"]]
        pts = [(x, row) for x, row in pts if row["seconds"] is not None]
        style = "--" if name.startswith("baseline") else "-"
        ax_m.plot([x for x, _ in pts], [row["peak_bytes"] / 1e9 for _, row in pts], style, marker="o", label=name)
        ax_t.plot([x for x, _ in pts], [row["seconds"] for _, row in pts], style, marker="o", label=name)
    ax_m.plot(sizes, [1.5 * s for s in sizes], ":", color="red", label="target: 1.5x weights")
    for ax, title in ((ax_m, "peak resident memory (GB)"), (ax_t, "wall time (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model weights (GB)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7, loc="upper left")
    fig.suptitle("spattenc: memory and time vs model size (2 shared cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                        help=f"model to measure (repeatable; default: {', '.join(DEFAULT_MODELS)} from models/cache)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command per model (median reported)")
    parser.add_argument("--large-repeats", type=int, default=1, help="runs for models over 2 GB of weights")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--work-dir", type=Path, default=None, help="where outputs are written (default: a temp dir "
                        "beside the models, same filesystem)")
    parser.add_argument("--option", action="append", default=[], metavar="ARGS",
                        help="compile options to measure instead of the built-in list (repeatable), e.g. "
                        "--option='--kv-budget 0.5'")
    parser.add_argument("--name", default="compile_memory", help="what was measured (result file names)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    models = [tuple(m.split("=", 1)) for m in args.model] or [
        (n, CACHE / n / "model.onnx") for n in DEFAULT_MODELS if (CACHE / n / "model.onnx").exists()]
    if not models:
        log.error("no models: export some (models/export.py --real minilm ...) or pass --model")
        return 2
    meta = run_metadata(threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    results = []
    with tempfile.TemporaryDirectory(prefix=".compile-memory-", dir=args.work_dir or CACHE) as work:
        for label, path in models:
            path = Path(path)
            wbytes = weight_bytes(path)
            repeats = args.large_repeats if wbytes > 2e9 else args.repeats
            options = [(o, shlex.split(o)) for o in args.option] or None
            results.append(run_model(label, path, repeats, Path(work), options))
    markdown = render(results, meta)
    print(markdown)
    if not args.no_save:
        json_path, md_path = write_results(args.out_dir, args.name, {"meta": meta, "results": results},
                                           markdown)
        png = md_path.with_suffix(".png")
        plot(results, png)
        md_path.write_text(markdown + f"\n![memory and time vs size]({png.name})\n")
        log.info("wrote %s, %s, %s", json_path, md_path, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
