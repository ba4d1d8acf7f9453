"""Progressive K/V quantization on MiniLM: build candidates, embed the test sets with the quality
harness while counting LSB refetch and K/V bytes, and write one table and one quality-vs-bytes chart.

Steps (each can be run alone; state lives in ``bench/out/kvq/``):

  build   compile every candidate of :data:`GRID` with ``spattenc --kv-bits ... --kv-rule ...
          --kv-stats`` into bench/out/kvq/<label>.onnx
  eval    one process per candidate (memory): embed_eval's Embedder embeds the IMDB and SST-2 test
          sets (dense train/test embeddings come from its cache); the same session.run calls read
          ``spatten_lsb_rows.<layer>`` and count K/V bytes with runtime.quant_ops.fetch_bytes (the
          formula the reference runtime reports). Protocol (a) drop-in: the probe is fit on the
          dense train embeddings.
          (records: bench/out/kvq/eval/<label>@<test sizes>.json)
  report  merge into bench/results/<stamp>-<name>.{md,json,png}
  paired  per-text paired bootstrap of each progressive candidate against the static frontier at
          its bytes (from the cached embeddings of eval), into bench/results/<stamp>-<name>.md

Usage: ``nice -n 10 python bench/kv_quant.py build eval report`` (default: full test sets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spatten_compiler.runtime.quant_ops import fetch_bytes  # noqa: E402

from bench import common  # noqa: E402
from bench import embed_eval as ee  # noqa: E402

log = logging.getLogger("bench.kv_quant")
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "kvq"
DENSE = ROOT / "models" / "cache" / "minilm" / "model.onnx"
LAYERS, HEADS, HEAD_DIM = 6, 12, 32  # MiniLM

# label -> (bits, rule, threshold, factor); static modes have no rule. In priority order.
GRID: dict[str, tuple[str, str | None, float | None, float | None]] = {
    "s4": ("4", None, None, None), "s5": ("5", None, None, None), "s6": ("6", None, None, None),
    "s8": ("8", None, None, None),
    "p4+4@0.1": ("4+4", "fixed", 0.1, None), "p6+4@0.1": ("6+4", "fixed", 0.1, None),
    "p8+4@0.1": ("8+4", "fixed", 0.1, None),
    "p4+4@m8": ("4+4", "min", 0.1, 8.0), "p4+4@u4": ("4+4", "uniform", 4.0, None),
    "p4+4@0.02": ("4+4", "fixed", 0.02, None), "p4+4@0.05": ("4+4", "fixed", 0.05, None),
    "p4+4@0.2": ("4+4", "fixed", 0.2, None), "p4+4@0.4": ("4+4", "fixed", 0.4, None),
    "p4+4@m16": ("4+4", "min", 0.1, 16.0), "p4+4@u8": ("4+4", "uniform", 8.0, None),
    "p6+4@m8": ("6+4", "min", 0.1, 8.0), "p6+4@0.02": ("6+4", "fixed", 0.02, None),
    "s7": ("7", None, None, None),
    "p4+4@p0.3": ("4+4", "peak", 0.3, None), "p4+4@p0.5": ("4+4", "peak", 0.5, None),
    # one LSB bit: a refetched row then costs what a static extra bit costs on that row, so only the
    # choice of rows decides whether progressive beats static. Threshold 0 of a split format is its
    # MSB-only quantizer (2^m bins read at their middle): a static point of its own.
    "p4+1@0": ("4+1", "fixed", 0.0, None), "p4+2@0": ("4+2", "fixed", 0.0, None),
    "p4+4@0": ("4+4", "fixed", 0.0, None), "p5+1@0": ("5+1", "fixed", 0.0, None),
    "p6+1@0": ("6+1", "fixed", 0.0, None), "p4+1@p0.4": ("4+1", "peak", 0.4, None),
    # the same one-bit refetch one bit lower and higher
    "s3": ("3", None, None, None), "p3+1@0": ("3+1", "fixed", 0.0, None), "p3+1@p0.3": ("3+1", "peak", 0.3, None),
    "p5+1@p0.3": ("5+1", "peak", 0.3, None), "p5+1@p0.2": ("5+1", "peak", 0.2, None),
    "p4+1@0.2": ("4+1", "fixed", 0.2, None),
    "p4+1@p0.7": ("4+1", "peak", 0.7, None), "p4+1@p0.9": ("4+1", "peak", 0.9, None),
    "p4+2@p0.5": ("4+2", "peak", 0.5, None), "p4+2@p0.7": ("4+2", "peak", 0.7, None),
    "p4+1@0.1": ("4+1", "fixed", 0.1, None), "p4+1@p0.2": ("4+1", "peak", 0.2, None),
    "p4+1@p0.3": ("4+1", "peak", 0.3, None), "p4+1@p0.5": ("4+1", "peak", 0.5, None),
    "p4+2@p0.3": ("4+2", "peak", 0.3, None),
}

# float32 scales per sample and tensor (K or V, all heads), by granularity, from the real key counts
SCALES = {"head": lambda n: HEADS + 0 * n, "token": lambda n: HEADS * n, "channel": lambda n: HEADS * HEAD_DIM + 0 * n,
          "tensor": lambda n: 1 + 0 * n}


def model_path(label: str) -> Path:
    return OUT / f"{label.replace('+', 'p').replace('@', '_')}.onnx"


def compile_args(label: str, granularity: str) -> list[str]:
    bits, rule, thr, factor = GRID[label]
    args = ["--kv-bits", bits, "--kv-granularity", granularity]
    if rule is not None:
        args += ["--kv-rule", rule, "--lsb-threshold", str(thr), "--kv-stats"]
    if factor is not None:
        args += ["--kv-factor", str(factor)]
    return args


def build_cmd(label: str, granularity: str) -> list[str]:
    return ["spattenc", str(DENSE.relative_to(ROOT)), "-o", str(model_path(label).relative_to(ROOT)),
            *compile_args(label, granularity)]


def build(labels: list[str], granularity: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for label in labels:
        cmd = build_cmd(label, granularity)
        log.info("build %s: %s", label, " ".join(cmd))
        subprocess.run(cmd, check=True, cwd=ROOT)


class FetchCounter:
    """Wraps an onnxruntime session: every run also fetches the LSB-row outputs and adds the K/V
    bytes of the batch (real keys and rows only) to per-layer totals."""

    def __init__(self, sess: Any, bits: str, granularity: str) -> None:
        self.sess, self.granularity = sess, granularity
        m, _, lo = bits.partition("+")
        self.m, self.lo = int(m), int(lo or 0)
        self.layers = [{} for _ in range(LAYERS)]

    def __getattr__(self, name: str) -> Any:  # get_inputs, get_outputs, ...
        return getattr(self.sess, name)

    def run(self, wanted: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        extra = [f"spatten_lsb_rows.{j}" for j in range(LAYERS)] if self.lo else []
        outs = self.sess.run(list(wanted) + extra, feeds)
        qvalid = feeds["attention_mask"].astype(np.float32)
        nkeys = qvalid.sum(axis=1)
        scale_bytes = 2 * 4 * float(SCALES[self.granularity](nkeys).sum())  # K and V scales, float32
        for j, tot in enumerate(self.layers):
            need = outs[len(wanted) + j] if self.lo else np.zeros((len(nkeys), HEADS, qvalid.shape[1]), np.float32)
            for k, v in fetch_bytes(need, qvalid, nkeys, HEAD_DIM, self.m, self.lo, scale_bytes=scale_bytes).items():
                tot[k] = tot.get(k, 0.0) + v
        return outs[:len(wanted)]

    def summary(self) -> dict[str, Any]:
        tot = {k: sum(layer[k] for layer in self.layers) for k in self.layers[0]}
        return {"lsb_fraction": tot["rows_lsb"] / max(tot["rows"], 1.0),
                "lsb_fraction_per_layer": [la["rows_lsb"] / max(la["rows"], 1.0) for la in self.layers],
                "lsb_heads_fraction": tot["heads_lsb"] / max(tot["heads"], 1.0),
                "bytes_ratio": tot["bytes_fp32"] / tot["bytes_read"],
                "bytes_ratio_head_policy": tot["bytes_fp32"] / tot["bytes_read_head_policy"]}


def _embedders(eargs: argparse.Namespace) -> Callable[[str, Path], ee.Embedder]:
    """embed_eval Embedders sharing the dense model's tokenizer (and so its embedding cache keys)."""
    tok_path = common.find_tokenizer(DENSE)
    tok, tok_sha = common.load_tokenizer(tok_path, eargs.max_len), hashlib.sha256(tok_path.read_bytes()).hexdigest()
    return lambda label, path: ee.Embedder(common.ModelSpec(label, path), tok, tok_sha, eargs)


def eval_one(label: str, args: argparse.Namespace) -> Path:
    """Cosine, drop-in accuracy and fetch statistics of one candidate on each task's test set."""
    eargs = ee.build_parser().parse_args(["--dense", str(DENSE), "--threads", "2", "--n-train", args.n_train,
                                          "--n-test", args.n_test])
    embedder = _embedders(eargs)
    dense, cand = embedder("dense", DENSE), embedder(label, model_path(label))
    bits = GRID[label][0]
    out: dict[str, Any] = {"label": label, "grid": GRID[label], "sha256": cand.sha256,
                           "compile": build_cmd(label, args.granularity),
                           "meta": common.run_metadata(2), "tasks": {}}
    for task in ("imdb", "sst2"):
        tdef = ee.TASKS[task]
        n_train = eargs.n_train.get(task, tdef.n_train)
        n_test = eargs.n_test.get(task, tdef.n_test)
        train = ee.load_split(eargs.data_dir / tdef.train, n_train, eargs.seed)
        test = ee.load_split(eargs.data_dir / tdef.test, n_test, eargs.seed)
        probe = ee.fit_probe(dense.embed(train, f"{task} train dense").mean, train.labels, eargs.C, eargs.max_iter)
        d_te = dense.embed(test, f"{task} test dense").mean
        dense_acc = float(probe.score(d_te, test.labels))
        cand._sess = counter = FetchCounter(common.make_session(model_path(label), 2), bits, args.granularity)
        cand._cache_path(test).unlink(missing_ok=True)  # the statistics come from the same runs
        c_te = cand.embed(test, f"{task} test {label}").mean
        acc = float(probe.score(c_te, test.labels))
        out["tasks"][task] = {"n_train": len(train.texts), "n_test": len(test.texts), "dense_acc": dense_acc,
                              "acc_dropin": acc, "delta_dropin_pts": 100 * (acc - dense_acc),
                              **ee.cosine_stats(c_te, d_te), **counter.summary()}
        log.info("%s %s %s", label, task, out["tasks"][task])
    path = eval_path(label, args.n_test)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    return path


def eval_path(label: str, n_test: str) -> Path:
    """One record per candidate and test-size setting (e.g. full sets, or an IMDB subset for a sweep)."""
    return OUT / "eval" / f"{model_path(label).stem}@{common.slug(n_test)}.json"


def is_static(row: dict, task: str) -> bool:
    """Static quantizers: the static modes, and split formats that fetched no LSBs (MSB only)."""
    return row["rule"] == "static" or row[task]["lsb_fraction"] == 0


def frontier(rows: list[dict], task: str) -> list[tuple[float, float, str]]:
    """The static frontier: the upper concave envelope of the static points as (bytes per fp32 byte,
    cosine, label), left to right - what storing a fraction of the K/V in one static format and the
    rest in the next achieves, to first order (linear in bytes per element)."""
    pts = sorted((1 / r[task]["bytes_ratio"], r[task]["cosine_mean"], r["label"]) for r in rows if is_static(r, task))
    hull: list[tuple[float, float, str]] = []
    for p in pts:  # same-bytes points: the best one
        if hull and p[0] == hull[-1][0]:
            if p[1] <= hull[-1][1]:
                continue
            hull.pop()
        while len(hull) >= 2 and (hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1]) \
                >= (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0]):
            hull.pop()
        hull.append(p)
    return hull


def segment(hull: list[tuple[float, float, str]], x: float) -> tuple[int, float] | None:
    """(i, f): x lies between hull[i] and hull[i + 1], a fraction f of the way."""
    for i in range(len(hull) - 1):
        if hull[i][0] <= x <= hull[i + 1][0]:
            return i, (x - hull[i][0]) / (hull[i + 1][0] - hull[i][0])
    return None


def static_at(rows: list[dict], task: str, ratio: float) -> float | None:
    """The static frontier's cosine at ``ratio`` x fewer bytes."""
    hull = frontier(rows, task)
    seg = segment(hull, 1 / ratio)
    if seg is None:
        return None
    i, f = seg
    return (1 - f) * hull[i][1] + f * hull[i + 1][1]


def _row(label: str, n_test: str) -> dict:
    rec = json.loads(eval_path(label, n_test).read_text())
    bits, rule, thr, factor = rec["grid"]
    compile_cmd = build_cmd(label, rec["compile"][rec["compile"].index("--kv-granularity") + 1])
    return {"label": label, "bits": bits, "rule": rule or "static", "threshold": thr, "factor": factor,
            "compile": compile_cmd, "command": rec["meta"]["command"], **rec["tasks"]}


def report(labels: list[str], stamp: str, n_test: str, name: str, chart: bool = True) -> tuple[Path, Path]:
    rows = [_row(label, n_test) for label in labels]
    t0 = rows[0]
    lines = [f"Test sets: IMDB {t0['imdb']['n_test']} (probe train {t0['imdb']['n_train']}), SST-2 "
             f"{t0['sst2']['n_test']} (probe train {t0['sst2']['n_train']}); dense accuracy IMDB "
             f"{100 * t0['imdb']['dense_acc']:.1f}, SST-2 {100 * t0['sst2']['dense_acc']:.1f}. "
             "Bytes: K+V of real keys incl. float32 scales, row policy / head policy. 'static @ same bytes' = "
             "the static curve interpolated at the candidate's bytes (linear in bytes per element).", "",
             "| candidate | rule | IMDB cos | IMDB p5 | IMDB (a) pts | IMDB LSB rows | IMDB x fewer bytes | "
             "static @ same bytes | SST-2 cos | SST-2 (a) pts | SST-2 LSB rows | SST-2 x fewer bytes | "
             "static @ same bytes |", "|" + "---|" * 13]
    for r in rows:
        cells = []
        for task in ("imdb", "sst2"):
            t = r[task]
            ref = None if is_static(r, task) else static_at(rows, task, t["bytes_ratio"])
            extra = [f"{t['cosine_p5']:.4f}"] if task == "imdb" else []
            cells += [f"{t['cosine_mean']:.5f}", *extra, f"{t['delta_dropin_pts']:+.1f}",
                      f"{100 * t['lsb_fraction']:.1f}%",
                      f"{t['bytes_ratio']:.2f} / {t['bytes_ratio_head_policy']:.2f}",
                      "" if ref is None else f"{ref:.5f}"]
        lines.append(f"| {r['label']} | {r['rule']}{'' if r['threshold'] is None else ' ' + str(r['threshold'])}"
                     f"{'' if r['factor'] is None else ' c=' + str(r['factor'])} | " + " | ".join(cells) + " |")
    lines += ["", "LSB refetch per layer (IMDB, rows): " + "; ".join(
        f"{r['label']}: " + " ".join(f"{100 * f:.0f}" for f in r["imdb"]["lsb_fraction_per_layer"])
        for r in rows if r["rule"] != "static") + " (%)", "", "Commands:", "",
        "```", *sorted({" ".join(r["compile"]) for r in rows}), *[r["command"] for r in rows], "```"]
    res = ROOT / "bench" / "results"
    md, js, png = (res / f"{stamp}-{name}.{ext}" for ext in ("md", "json", "png"))
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps({"schema": "spattenc.bench.kvquant/2", "rows": rows}, indent=1))
    if chart:
        plot(rows, png)
    return md, png


def paired(labels: list[str], stamp: str, args: argparse.Namespace) -> Path:
    """Per-text paired comparison of each progressive candidate with the static frontier at its
    bytes: the frontier's error on a text is the byte-weighted mix of the two bracketing static
    models' errors on it. 95% bootstrap interval of the mean difference in 1 - cosine."""
    rows = [_row(label, args.n_test) for label in labels]
    eargs = ee.build_parser().parse_args(["--dense", str(DENSE), "--n-train", args.n_train, "--n-test", args.n_test])
    embedder = _embedders(eargs)

    def errors(label: str, path: Path, test: Any, dense: np.ndarray) -> np.ndarray:
        cache = embedder(label, path)._cache_path(test)
        if not cache.exists():
            raise SystemExit(f"no cached embeddings of {label} for this test set: run eval first")
        e = np.load(cache)["mean"]
        return 1 - (e * dense).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(dense, axis=1)

    lines = ["Paired per-text comparison with the static frontier (1 - cosine to dense; frontier = the two "
             "bracketing static models mixed at the candidate's bytes; 95% bootstrap CI, 2000 resamples).", "",
             "| candidate | task | texts | bytes vs fp32 | frontier between | 1 - cos | frontier 1 - cos | ratio | "
             "difference [95% CI] | texts better |", "|" + "---|" * 10]
    rng = np.random.default_rng(0)
    for task in ("imdb", "sst2"):
        tdef = ee.TASKS[task]
        test = ee.load_split(eargs.data_dir / tdef.test, eargs.n_test.get(task, tdef.n_test), eargs.seed)
        d = np.load(embedder("dense", DENSE)._cache_path(test))["mean"]
        hull = frontier(rows, task)
        for r in rows:
            seg = None if is_static(r, task) else segment(hull, 1 / r[task]["bytes_ratio"])
            if seg is None:
                continue
            i, f = seg
            lo, hi = hull[i][2], hull[i + 1][2]
            mine = errors(r["label"], model_path(r["label"]), test, d)
            front = (1 - f) * errors(lo, model_path(lo), test, d) + f * errors(hi, model_path(hi), test, d)
            diff = mine - front
            boot = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)])
            lines.append(f"| {r['label']} | {task} | {len(diff)} | {r[task]['bytes_ratio']:.2f}x | {lo} .. {hi} "
                         f"({f:.2f}) | {mine.mean():.5f} | {front.mean():.5f} | {mine.mean() / front.mean():.2f} | "
                         f"{diff.mean():+.6f} [{np.percentile(boot, 2.5):+.6f}, {np.percentile(boot, 97.5):+.6f}] | "
                         f"{(diff < 0).mean():.0%} |")
    lines += ["", "Command:", "", "```", "python " + " ".join(sys.argv), "```"]
    md = ROOT / "bench" / "results" / f"{stamp}-{args.name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.6), sharey=True)
    style = {"static": ("s", "black", "static m-bit (symmetric, 2^m - 1 levels)"),
             "msb-only": ("s", "tab:gray", "static: MSB plane only of m+l (2^m bins, read at the middle)"),
             "fixed": ("o", "tab:blue", "progressive, LSBs if max p <= t (paper: t = 0.1)"),
             "uniform": ("^", "tab:red", "progressive, LSBs if max p <= t / n_keys"),
             "min": ("D", "tab:green", "progressive, LSBs if max p <= min(0.1, c / n_keys)"),
             "peak": ("v", "tab:purple", "progressive, LSBs if max p > t (peak)")}
    for ax, task in zip(axes, ("imdb", "sst2")):
        static = [r for r in rows if is_static(r, task)]
        lo, hi = min(r[task]["bytes_ratio"] for r in static), max(r[task]["bytes_ratio"] for r in static)
        xs = 1 / np.linspace(1 / hi, 1 / lo, 200)  # the interpolation the table uses
        ax.plot(xs, [1 - static_at(rows, task, x) for x in xs], color="black", linewidth=1, zorder=1)
        labels: list[tuple[float, float, str, str]] = []
        for rule, (marker, color, name) in style.items():
            pts = sorted((r[task]["bytes_ratio"], 1 - r[task]["cosine_mean"], r["label"]) for r in rows
                         if ("msb-only" if is_static(r, task) and r["rule"] != "static" else r["rule"]) == rule)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color=color, markersize=7,
                    label=name if task == "imdb" else None, zorder=2)
            if rule in ("static", "msb-only"):
                labels += [(x, y, lab, color) for x, y, lab in pts]
                continue
            # progressive: one line per format through its thresholds, labelled once (the table has each point)
            for bits in sorted({r["bits"] for r in rows if r["rule"] == rule}):
                fam = sorted((x, y) for x, y, lab in pts if GRID[lab][0] == bits)
                if not fam:  # e.g. only its MSB-only point (threshold 0), drawn as static
                    continue
                ax.plot([p[0] for p in fam], [p[1] for p in fam], "-", color=color, linewidth=0.8, alpha=0.6, zorder=1)
                labels.append((fam[-1][0], fam[-1][1], f"{bits} {rule}", color))
        ax.set_yscale("log")
        ax.set_xlim(right=max(ax.get_xlim()[1], 6.8))
        _place_labels(ax, labels)
        ax.set_xlabel("K/V bytes read: x fewer than fp32 (row policy, float32 scales counted)")
        ax.set_title(f"all-MiniLM-L6-v2, {task.upper()} test ({rows[0][task]['n_test']} texts)")
        ax.axhline(0.005, color="gray", linewidth=0.8, linestyle=":")
        ax.axvline(6, color="gray", linewidth=0.8, linestyle=":")
        ax.text(6.03, 1.2e-5, "target region:\n>= 6x fewer bytes,\ncosine >= 0.995", fontsize=7.5, color="gray")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("1 - embedding cosine to dense (log; lower is better)")
    fig.legend(loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle("Progressive K/V quantization vs static: a point below the black line (the static frontier) "
                 "beats static at equal bytes", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(png, dpi=120)


def _place_labels(ax, labels: list[tuple[float, float, str, str]]) -> None:
    """Annotate points, trying a few offsets so that labels do not sit on each other."""
    placed: list[np.ndarray] = []
    offsets = [(6, 3), (6, -11), (-8, 8), (-8, -14), (6, 14), (6, -22), (-8, 20), (-8, -26)]
    for x, y, lab, color in sorted(labels, key=lambda t: -t[0]):
        px = ax.transData.transform((x, y))
        for dx, dy in offsets:
            at = px + np.array([dx + (3 * len(lab) if dx > 0 else -3 * len(lab)), dy + 3])
            if all(abs(at[0] - q[0]) > 5.5 * len(lab) or abs(at[1] - q[1]) > 10 for q in placed):
                break
        placed.append(at)
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7.5, color=color,
                    ha="left" if dx > 0 else "right")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("steps", nargs="+", choices=("build", "eval", "eval-one", "report", "paired"))
    p.add_argument("--only", nargs="*", default=list(GRID), help="candidate labels (default: all, in GRID order)")
    p.add_argument("--granularity", default="token")
    p.add_argument("--n-train", default="imdb=all,sst2=4000", help="probe training sizes (embed_eval syntax)")
    p.add_argument("--n-test", default="all", help="test sizes (embed_eval syntax)")
    p.add_argument("--name", default="kvquant-full", help="report: result file name after the time stamp")
    p.add_argument("--no-chart", action="store_true", help="report: table only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    labels = args.only
    if "build" in args.steps:
        build(labels, args.granularity)
    if "eval-one" in args.steps:
        for label in labels:
            eval_one(label, args)
    if "eval" in args.steps:  # one process per candidate: sessions at batch 32 x 512 tokens are large
        for label in labels:
            subprocess.run([sys.executable, __file__, "eval-one", "--only", label, "--granularity", args.granularity,
                            "--n-train", args.n_train, "--n-test", args.n_test], check=True, cwd=ROOT)
    if "report" in args.steps:
        md, png = report(labels, time.strftime("%Y%m%d-%H%M%S", time.gmtime()), args.n_test, args.name,
                         not args.no_chart)
        log.info("wrote %s and %s", md, png)
    if "paired" in args.steps:
        log.info("wrote %s", paired(labels, time.strftime("%Y%m%d-%H%M%S", time.gmtime()), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
