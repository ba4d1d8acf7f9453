"""Head/value pruning on MiniLM: join the per-candidate quality runs (embed_eval.py, one per model)
and one latency run (latency.py) into a table and one plot of refit accuracy (protocol b) against
measured speedup at 512 tokens, with tokens-only, heads-only and token+head candidates as series.
``--cross-fitted``: the panels are IMDB cosine, drop-in (a) and refit (b) deltas cross-fitted over
all 3000 reviews, with their 95% paired-bootstrap intervals (runs made with ``--cross-fit 5``).
``--cv-task sst2``: the same three panels for SST-2. ``--speed-on imdb``: the x axis is the speedup
measured on the latency run's IMDB reviews (the inputs whose accuracy is plotted) instead of on
512-token windows.

    python bench/plot_heads.py --quality bench/results/*-minilm-heads-*.json \
        --latency bench/results/<stamp>-minilm-heads-latency-512.json --out bench/results/<stamp>-minilm-heads
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.latency import result_group  # noqa: E402

GATED = re.compile(r"-n\d+$")  # --prune-min-length N
SERIES = {  # label prefix -> series, first match wins; value pruning is its own point
    "tokens + ablation-ranked heads, length-gated": lambda c: bool(GATED.search(c)) and "-abl-" in c,
    "tokens only, length-gated": lambda c: c.startswith("t") and bool(GATED.search(c)),
    "heads only, calibrated, layer 0 only": lambda c: c.startswith("cal-l0"),
    "tokens + calibrated heads in layer 0 only": lambda c: c.startswith("t") and "-cal-l0" in c,
    "tokens + ablation-ranked heads outside layer 0": lambda c: c.startswith("t") and "-abl-g" in c and c.endswith("n"),
    "tokens (min_keep 32/48) + ablation-ranked heads": lambda c: c.startswith("t") and "-abl-" in c and "-m" in c,
    "tokens + ablation-ranked heads": lambda c: c.startswith("t") and "-abl-" in c,
    "tokens only, min_keep 16-48": lambda c: c.startswith("t") and c.endswith(("-m16", "-m32", "-m48")),
    "tokens + magnitude-ranked heads (ablation's schedule)": lambda c: c.startswith("t") and "-mag-" in c,
    "tokens only (spattenc rule)": lambda c: c.startswith("spattenc-") or c.startswith("t") and "-h" not in c,
    "heads only, paper rule (run time)": lambda c: c.startswith("paper-h"),
    "heads only, calibrated (compile time)": lambda c: c.startswith("cal-h"),
    "heads only, calibrated, cascade importance": lambda c: c.startswith("cal-c"),
    "tokens + calibrated heads": lambda c: c.startswith("t") and "-cal-" in c,
    "tokens + paper-rule heads": lambda c: c.startswith("t") and "-paper-" in c,
    "values only": lambda c: c.startswith("v"),
}
STYLE = {"tokens + ablation-ranked heads, length-gated": ("C3", "P", ""),
         "tokens only, length-gated": ("C0", "o", "-"),
         "tokens only (spattenc rule)": ("C0", "o", "-"), "heads only, paper rule (run time)": ("C3", "v", "-"),
         "heads only, calibrated (compile time)": ("C2", "^", "-"),
         "heads only, calibrated, cascade importance": ("C5", "P", ""), "tokens + calibrated heads": ("C1", "s", "-"),
         "tokens + paper-rule heads": ("C4", "D", ""), "values only": ("C7", "x", ""),
         "heads only, calibrated, layer 0 only": ("C8", "<", ""),
         "tokens + calibrated heads in layer 0 only": ("C6", "D", ""),
         "tokens + ablation-ranked heads": ("C9", "*", ""),
         "tokens (min_keep 32/48) + ablation-ranked heads": ("C3", "*", ""),
         "tokens only, min_keep 16-48": ("C0", "s", "--"),
         "tokens + ablation-ranked heads outside layer 0": ("C2", "P", ""),
         "tokens + magnitude-ranked heads (ablation's schedule)": ("C4", "X", "")}
# (task, y value of a candidate's result, panel title); the second set with --cross-fitted
PANELS = [("imdb", lambda c: c["delta_refit_pts"], "IMDB: refit probe (protocol b)"),
          ("sst2", lambda c: c["delta_refit_pts"], "SST-2: refit probe (protocol b)")]
TASK_NAMES = {"imdb": "IMDB", "sst2": "SST-2"}


def cv_panels(task: str) -> list:
    name = TASK_NAMES[task]
    return [(task, lambda c: c["cosine_mean"], f"{name}: cosine to the dense embedding"),
            (task, lambda c: c["cross_fit"]["delta_dropin_pts"], f"{name}, cross-fitted: drop-in probe (a)"),
            (task, lambda c: c["cross_fit"]["delta_refit_pts"], f"{name}, cross-fitted: refit probe (b)")]


CV_PANELS = cv_panels("imdb")
CV_CI = {1: "delta_dropin_ci95", 2: "delta_refit_ci95"}  # panel index -> interval key


def series_of(label: str) -> str:
    return next(name for name, test in SERIES.items() if test(label))


def speed_name(info: dict) -> str:
    g = result_group(info["latency"], info["speed_on"])
    what = {"imdb": "IMDB reviews", "sst2": "SST-2 sentences"}.get(info["speed_on"])
    return "at 512 tokens" if what is None else f"on {g['n_inputs']} {what} (mean {g['mean_tokens']:.0f} tokens)"


def collect(quality: list[Path], latency: Path, speed_on: str = "512") -> tuple[list[dict], dict]:
    lat = json.loads(latency.read_text())
    group = result_group(lat, speed_on)
    speed = {m["label"]: m for m in group["models"]}
    rows, dense = {}, {}
    for path in quality:
        run = json.loads(path.read_text())
        for task in run["tasks"]:
            dense[task["task"]] = (task["dense"]["accuracy"], task["train"]["n"], task["test"]["n"])
            for c in task["candidates"]:
                row = rows.setdefault(c["label"], {"label": c["label"], "file": path.name})
                row[task["task"]] = c
    out = []
    for label, row in rows.items():
        s = speed.get(label)
        row.update(speedup=s["speedup"] if s else None, paired=s["speedup_paired"] if s else None,
                   flop=s["flop_ratio"] if s else None, series=series_of(label))
        out.append(row)
    return sorted(out, key=lambda r: (r["series"], r["speedup"] or 0)), {"dense": dense, "latency": lat,
                                                                          "speed_on": speed_on}


def _cv(c: dict | None, key: str) -> str:
    cv = (c or {}).get("cross_fit")
    if not cv:
        return "-"
    lo, hi = cv[f"{key}_ci95"]
    return f"{cv[f'{key}_pts']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def table(rows: list[dict], info: dict) -> str:
    lat = info["latency"]
    dense_ms = next(m["median_ms"] for m in result_group(lat, info["speed_on"])["models"] if m["role"] == "dense")
    d = info["dense"]
    lines = [f"Dense: IMDB {100 * d['imdb'][0]:.1f} (n={d['imdb'][1]}/{d['imdb'][2]}), SST-2 {100 * d['sst2'][0]:.1f} "
             f"(n={d['sst2'][1]}/{d['sst2'][2]}); dense latency {speed_name(info)} {dense_ms:.1f} ms "
             f"(load average {lat['meta']['load_avg_1m']:.1f}). cv = cross-fitted over train+test, 95% CI.", "",
             f"| candidate | series | speedup {info['speed_on']} (paired) | ideal FLOP ratio "
             "| IMDB cos | IMDB (a) | IMDB (b) "
             "| IMDB (a) cv | IMDB (b) cv | SST-2 cos | SST-2 (a) | SST-2 (b) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for t in ("imdb", "sst2"):
            c = r.get(t)
            cells += ["-"] * 3 if c is None else [f"{c['cosine_mean']:.3f}", f"{c['delta_dropin_pts']:+.1f}",
                                                  f"{c['delta_refit_pts']:+.1f}"]
            if t == "imdb":
                cells += [_cv(c, "delta_dropin"), _cv(c, "delta_refit")]
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x ({r['paired']:.2f}x)"
        fl = "-" if not r["flop"] else f"{r['flop']:.2f}"
        lines.append(f"| {r['label']} | {r['series']} | {sp} | {fl} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], info: dict, out: Path, cross_fitted: bool = False, cv_task: str = "imdb") -> None:
    panels = cv_panels(cv_task) if cross_fitted else PANELS
    if cross_fitted:
        rows = [r for r in rows if r.get(cv_task) and "cross_fit" in r[cv_task]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6.2), sharex=True)
    for i, (ax, (task, value, title)) in enumerate(zip(axes, panels)):
        cosine = cross_fitted and i == 0
        if not cosine:
            ax.axhline(0, color="0.6", lw=0.8)
            ax.axhline(-0.5, color="0.6", lw=0.8, ls=":")
        ax.plot([1], [1 if cosine else 0], "k*", ms=12, label="dense")
        for name in SERIES:
            pts = sorted((r["speedup"], value(r[task]), r["label"], r[task]) for r in rows
                         if r["series"] == name and r.get(task) and r["speedup"])
            if not pts:
                continue
            color, marker, ls = STYLE[name]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, marker=marker, ls=ls, color=color, label=name, ms=7)
            if i in CV_CI and cross_fitted:
                ci = [p[3]["cross_fit"][CV_CI[i]] for p in pts]
                ax.errorbar(xs, ys, yerr=[[y - lo for y, (lo, _) in zip(ys, ci)], [hi - y for y, (_, hi) in zip(ys, ci)]],
                            fmt="none", ecolor=color, alpha=0.5, capsize=3)
            for x, y, label, _ in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        n = info["dense"][task]
        ax.set_title(f"{title}\n(train {n[1]} / test {n[2]})", fontsize=10)
        ax.set_xlabel(f"measured speedup {speed_name(info)}\n(dense median / candidate median)")
        ax.set_ylabel("cosine" if cosine else "accuracy change vs dense (points)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.suptitle(f"all-MiniLM-L6-v2, onnxruntime CPU batch 1: quality vs measured speedup {speed_name(info)}\n"
                 f"(latency run at load average {info['latency']['meta']['load_avg_1m']:.1f})", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=130)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", type=Path, nargs="+", required=True)
    ap.add_argument("--latency", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.png")
    ap.add_argument("--cross-fitted", action="store_true",
                    help="plot IMDB cosine and the cross-fitted drop-in / refit deltas with their intervals")
    ap.add_argument("--speed-on", choices=("512", "imdb", "sst2"), default="512",
                    help="x axis: speedup on the latency run's 512-token windows or on its IMDB reviews")
    ap.add_argument("--cv-task", choices=tuple(TASK_NAMES), default="imdb",
                    help="with --cross-fitted: the task whose cosine and cross-fitted deltas are plotted")
    args = ap.parse_args(argv)
    rows, info = collect(args.quality, args.latency, args.speed_on)
    args.out.with_suffix(".md").write_text(table(rows, info))
    plot(rows, info, args.out.with_suffix(".png"), args.cross_fitted, args.cv_task)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
