"""Progressive K/V quantization on MiniLM: build candidates, measure LSB refetch and K/V bytes,
run the quality harness (embed_eval.py), and write a table and a quality-vs-bytes plot.

Steps (each can be run alone; state lives in ``bench/out/kvq/``):

  build   compile every candidate of :data:`GRID` with ``spattenc --kv-bits ... --lsb-threshold ...``
          (+ ``--pipeline`` for the uniform rule / stats outputs) into bench/out/kvq/<label>.onnx
  stats   run each candidate in onnxruntime on a subset of IMDB and SST-2 test texts, read the
          ``spatten_lsb_rows.<layer>`` outputs and count K/V bytes with runtime.quant_ops.fetch_bytes
  quality run bench/embed_eval.py on all candidates in one run (dense embeddings cached)
  report  merge into bench/results/<stamp>-kvquant.{md,json,png}

Usage: ``python bench/kv_quant.py all --n-train imdb=300,sst2=1000 --n-test imdb=300,sst2=all``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spatten_compiler.runtime.quant_ops import fetch_bytes  # noqa: E402

from bench import common  # noqa: E402
from bench.embed_eval import TASKS, load_split  # noqa: E402

log = logging.getLogger("bench.kv_quant")
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "kvq"
DENSE = ROOT / "models" / "cache" / "minilm" / "model.onnx"

# label -> (bits, rule, threshold); static modes have no threshold.
GRID: dict[str, tuple[str, str, float]] = {
    "s4": ("4", "fixed", 0.0), "s5": ("5", "fixed", 0.0), "s6": ("6", "fixed", 0.0), "s8": ("8", "fixed", 0.0),
    "p4+4@0.1": ("4+4", "fixed", 0.1), "p4+4@u4": ("4+4", "uniform", 4.0), "p4+4@u8": ("4+4", "uniform", 8.0),
    "p6+4@0.1": ("6+4", "fixed", 0.1), "p8+4@0.1": ("8+4", "fixed", 0.1),
    "p4+4@m8": ("4+4", "min", 8.0), "p4+4@m16": ("4+4", "min", 16.0),
}
# Refetch/bytes only (no quality run): a denser threshold sweep of 4+4.
SWEEP: dict[str, tuple[str, str, float]] = {
    "p4+4@0.02": ("4+4", "fixed", 0.02), "p4+4@0.05": ("4+4", "fixed", 0.05), "p4+4@0.2": ("4+4", "fixed", 0.2),
    "p4+4@u2": ("4+4", "uniform", 2.0), "p4+4@u16": ("4+4", "uniform", 16.0),
}
GRID.update(SWEEP)


# float32 scales per sample (K or V, all 12 heads of MiniLM) by granularity, from the real key counts
SCALES = {"head": lambda n: 12 + 0 * n, "token": lambda n: 12 * n, "channel": lambda n: 12 * 32 + 0 * n,
          "tensor": lambda n: 1 + 0 * n}


def model_path(label: str) -> Path:
    return OUT / f"{label.replace('+', 'p').replace('@', '_')}.onnx"


def build(labels: list[str], granularity: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for label in labels:
        bits, rule, thr = GRID[label]
        # rule "min": max p <= min(0.1, thr / n_keys)
        opts = (f"bits={bits};threshold={0.1 if rule == 'min' else thr};rule={rule};granularity={granularity};"
                f"emit_stats=true" + (f";factor={thr}" if rule == "min" else ""))
        cmd = [sys.executable, "-m", "spatten_compiler", str(DENSE), "-o", str(model_path(label)),
               "--pipeline", f"normalize,quantize-kv{{{opts}}}"]
        log.info("build %s", label)
        subprocess.run(cmd, check=True, cwd=ROOT)


def stats(labels: list[str], n_texts: int, args: argparse.Namespace) -> dict:
    """LSB refetch fraction and K/V bytes on the first ``n_texts`` seeded test texts of each task."""
    tok = common.load_tokenizer(common.find_tokenizer(DENSE), 512)
    pad = common.pad_id_of(tok)
    data = Path(args.data_dir) if args.data_dir else common.DEFAULT_DATA
    out: dict[str, dict] = {}
    for label in labels:
        bits, _, _ = GRID[label]
        m, _, lo = bits.partition("+")
        sess = common.make_session(model_path(label), 2) if lo else None
        names = common.output_names(sess) if sess else []
        out[label] = {}
        for task in ("imdb", "sst2"):
            split = load_split(data / TASKS[task].test, n_texts, 0)
            tot: dict[str, float] = {}
            per_layer: list[list[float]] = []
            for i in range(0, len(split.texts), 8):
                batch = common.pad_encodings(tok.encode_batch(split.texts[i:i + 8]), pad)
                res = dict(zip(names, sess.run(names, common.feeds_for(sess, batch)))) if lo else {}
                qvalid = batch["attention_mask"].astype(np.float32)
                nkeys = qvalid.sum(axis=1)
                layers = sorted(k for k in res if k.startswith("spatten_lsb_rows."))
                scale_bytes = 2 * 4 * float(SCALES[args.granularity](nkeys).sum())  # K and V, float32
                for j in range(6):  # MiniLM: 6 layers, 12 heads of 32
                    need = res[layers[j]] if lo else np.zeros((len(nkeys), 12, qvalid.shape[1]), np.float32)
                    s = fetch_bytes(need, qvalid, nkeys, 32, int(m), int(lo or 0), scale_bytes=scale_bytes)
                    for k, v in s.items():
                        tot[k] = tot.get(k, 0.0) + v
                    if len(per_layer) <= j:
                        per_layer.append([0.0, 0.0])
                    per_layer[j][0] += s["rows_lsb"]
                    per_layer[j][1] += s["rows"]
            out[label][task] = {
                "n_texts": len(split.texts),
                "lsb_fraction": tot.get("rows_lsb", 0.0) / max(tot.get("rows", 0.0), 1.0),
                "lsb_fraction_per_layer": [a / max(b, 1.0) for a, b in per_layer],
                "bytes_ratio": tot["bytes_fp32"] / tot["bytes_read"],
                "bytes_ratio_head_policy": tot["bytes_fp32"] / tot["bytes_read_head_policy"],
            }
            log.info("%s %s %s", label, task, out[label][task])
    return out


def quality(labels: list[str], args: argparse.Namespace) -> list[Path]:
    """One embed_eval process per candidate (dense embeddings come from the cache): a process that
    holds every candidate's onnxruntime session at batch 32 x 512 tokens ran out of memory."""
    out: list[Path] = []
    for label in labels:
        name = f"{args.quality_name}-{label.replace('+', 'p').replace('@', '_')}"
        cmd = [sys.executable, "bench/embed_eval.py", "--dense", str(DENSE), "--name", name,
               "--n-train", args.n_train, "--n-test", args.n_test, "--threads", "2",
               "--candidate", f"{label}={model_path(label).relative_to(ROOT)}"]
        before = set((ROOT / "bench" / "results").glob(f"*{name}.json"))
        subprocess.run(cmd, check=True, cwd=ROOT)
        out += sorted(set((ROOT / "bench" / "results").glob(f"*{name}.json")) - before)[-1:]
    return out


def report(labels: list[str], st: dict, quality_jsons: list[Path], stamp: str) -> tuple[Path, Path]:
    runs = [json.loads(p.read_text()) for p in quality_jsons]
    q = runs[0]
    rows: list[dict] = []
    for label in labels:
        bits, rule, thr = GRID[label]
        row: dict = {"label": label, "bits": bits, "rule": "static" if "+" not in bits else rule,
                     "threshold": thr if "+" in bits else None}
        run = next(r for r in runs if any(c["label"] == label for c in r["tasks"][0]["candidates"]))
        for task in run["tasks"]:
            c = next(c for c in task["candidates"] if c["label"] == label and c["pooling"] == "mean")
            s = st[label][task["task"]]
            row[task["task"]] = {"cosine": c["cosine_mean"], "cosine_p5": c["cosine_p5"],
                                 "delta_dropin": c["delta_dropin_pts"], "delta_refit": c["delta_refit_pts"],
                                 "acc_dropin": c["acc_dropin"], "dense": task["dense"]["accuracy"], **s}
        rows.append(row)
    lines = [f"quality: {', '.join(f'`{p.name}`' for p in quality_jsons)} (sizes: train {q['tasks'][0]['train']['n']}/"
             f"{q['tasks'][-1]['train']['n']}, test {q['tasks'][0]['test']['n']}/{q['tasks'][-1]['test']['n']}); "
             f"LSB/bytes statistics on {st[labels[0]]['imdb']['n_texts']} test texts per task", "",
             "| candidate | rule | task | cosine | p5 | drop-in pts | refit pts | LSB rows "
             "| K/V bytes vs fp32 (row / head policy) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for task in ("imdb", "sst2"):
            t = r[task]
            lines.append(f"| {r['label']} | {r['rule']} | {task} | {t['cosine']:.4f} | {t['cosine_p5']:.4f} | "
                         f"{t['delta_dropin']:+.1f} | {t['delta_refit']:+.1f} | {100 * t['lsb_fraction']:.1f}% | "
                         f"{t['bytes_ratio']:.2f}x / {t['bytes_ratio_head_policy']:.2f}x |")
    sweep = [k for k in st if k not in labels]
    if sweep:
        n = st[sweep[0]]["imdb"]["n_texts"]
        lines += ["", f"Refetch-only sweep (no quality run; {n} test texts per task):", "",
                  "| candidate | IMDB LSB rows | IMDB bytes (row / head) | SST-2 LSB rows | SST-2 bytes (row / head) |",
                  "|---|---|---|---|---|"]
        for k in sorted(sweep, key=lambda k: (GRID[k][1], GRID[k][2])):
            a, b = st[k]["imdb"], st[k]["sst2"]
            lines.append(f"| {k} | {100 * a['lsb_fraction']:.1f}% | {a['bytes_ratio']:.2f}x / "
                         f"{a['bytes_ratio_head_policy']:.2f}x | {100 * b['lsb_fraction']:.1f}% | "
                         f"{b['bytes_ratio']:.2f}x / {b['bytes_ratio_head_policy']:.2f}x |")
    res = ROOT / "bench" / "results"
    md, js, png = (res / f"{stamp}-kvquant.{ext}" for ext in ("md", "json", "png"))
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps({"schema": "spattenc.bench.kvquant/1", "quality": [p.name for p in quality_jsons],
                              "rows": rows,
                              "refetch_sweep": {k: st[k] for k in sweep}}, indent=1))
    plot(rows, png)
    return md, png


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    style = {"static": ("s", "tab:gray"), "fixed": ("o", "tab:blue"), "uniform": ("^", "tab:red"),
             "min": ("D", "tab:green")}
    for ax, task in zip(axes, ("imdb", "sst2")):
        for rule, (marker, color) in style.items():
            pts = sorted((r[task]["bytes_ratio"], r[task]["cosine"], r["label"]) for r in rows if r["rule"] == rule)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color=color,
                    linestyle="-" if rule == "static" else "none", linewidth=0.8,
                    label={"static": "static (MSB only)", "fixed": "progressive, max p <= t",
                           "uniform": "progressive, max p <= t / n_keys",
                           "min": "progressive, max p <= min(0.1, t / n_keys)"}[rule])
            for x, y, lab in pts:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xlabel("K/V bytes reduction vs fp32 (x, row policy)")
        ax.set_ylabel("embedding cosine to dense (mean)")
        ax.set_title(f"MiniLM {task.upper()}: quality vs K/V bytes")
        ax.axhline(0.995, color="k", linewidth=0.5, linestyle=":")
        ax.axvline(6, color="k", linewidth=0.5, linestyle=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=("build", "stats", "quality", "report", "all"))
    p.add_argument("--only", nargs="*", default=[k for k in GRID if k not in SWEEP],
                   help="candidate labels (default: all but the refetch-only sweep)")
    p.add_argument("--granularity", default="token")
    p.add_argument("--n-stats", type=int, default=64, help="test texts per task for LSB/bytes statistics")
    p.add_argument("--n-train", default="imdb=200,sst2=1000")
    p.add_argument("--n-test", default="imdb=400,sst2=all")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quality-json", type=Path, nargs="*", default=[],
                   help="report: the embed_eval results holding the candidates (default: newest kvquant-quality)")
    p.add_argument("--quality-name", default="kvquant-quality", help="quality: --name for embed_eval")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    labels = args.only
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    st_path = OUT / "stats.json"
    if args.step in ("build", "all"):
        build(labels, args.granularity)
    if args.step in ("stats", "all"):
        OUT.mkdir(parents=True, exist_ok=True)
        old = json.loads(st_path.read_text()) if st_path.exists() else {}
        old.update(stats(labels, args.n_stats, args))
        st_path.write_text(json.dumps(old, indent=1))
    qj = list(args.quality_json)
    if args.step in ("quality", "all"):
        qj = quality(labels, args)
    if args.step in ("report", "all"):
        if not qj:
            qj = sorted((ROOT / "bench" / "results").glob(f"*{args.quality_name}-*.json"))
        md, png = report(labels, json.loads(st_path.read_text()), qj, stamp)
        log.info("wrote %s and %s", md, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
