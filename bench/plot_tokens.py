"""Join a quality run (embed_eval.py) and a latency run (latency.py) into one table and a plot of
IMDB accuracy change against measured speedup, one point per candidate and pooling.

    python bench/plot_tokens.py --quality bench/results/<...>-minilm-token-pruning.json \
        --latency bench/results/<...>-minilm-token-latency.json --out bench/results/minilm-token-pruning
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def merge(runs: list[dict]) -> dict:
    """One quality document from several embed_eval runs (one candidate each, same dense model)."""
    merged = json.loads(json.dumps(runs[0]))
    by_task = {t["task"]: t for t in merged["tasks"]}
    for run in runs[1:]:
        for task in run["tasks"]:
            by_task[task["task"]]["candidates"].extend(task["candidates"])
    return merged


def speedups(latency: dict) -> dict[str, dict[str, dict]]:
    """label -> group name -> {speedup, flop_ratio, median_ms}."""
    out: dict[str, dict[str, dict]] = {}
    for group in latency["groups"]:
        for m in group["models"]:
            out.setdefault(m["label"], {})[group["name"]] = m
    return out


def quality_rows(quality: dict) -> dict[tuple[str, str], dict[str, dict]]:
    """(label, pooling) -> task -> candidate entry; plus the dense accuracy per task under 'dense'."""
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for task in quality["tasks"]:
        rows.setdefault(("dense", "mean"), {})[task["task"]] = {"acc_refit": task["dense"]["accuracy"],
                                                                "acc_dropin": task["dense"]["accuracy"],
                                                                "cosine_mean": 1.0}
        for c in task["candidates"]:
            rows.setdefault((c["label"], c["pooling"]), {})[task["task"]] = c
    return rows


def table(quality: dict, latency: dict | None) -> list[str]:
    sp = speedups(latency) if latency else {}
    groups = [g["name"] for g in latency["groups"]] if latency else []
    head = ["candidate", "pooling", *[f"speedup {g}" for g in groups], "FLOP ratio 512",
            "IMDB cos", "IMDB (a)", "IMDB (b)", "SST-2 cos", "SST-2 (a)", "SST-2 (b)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, pooling), tasks in quality_rows(quality).items():
        lat = sp.get(label, {})
        flop = next((m.get("flop_ratio") for m in lat.values() if m.get("flop_ratio")), None)
        cells = [label, pooling, *[f"{lat[g]['speedup']:.2f}x" if g in lat else "-" for g in groups],
                 f"{flop:.2f}" if isinstance(flop, (int, float)) else "-"]
        for task in ("imdb", "sst2"):
            t = tasks.get(task)
            if t is None:
                cells += ["-", "-", "-"]
                continue
            da, db = t.get("delta_dropin_pts"), t.get("delta_refit_pts")
            cells += [f"{t['cosine_mean']:.3f}",
                      f"{100 * t['acc_dropin']:.1f}" + (f" ({da:+.1f})" if da is not None else ""),
                      f"{100 * t['acc_refit']:.1f}" + (f" ({db:+.1f})" if db is not None else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(quality: dict, latency: dict, out: Path, group: str) -> None:
    sp = speedups(latency)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharex=True)
    for ax, key, title in ((axes[0], "cosine_mean", "IMDB embedding cosine to dense (precise)"),
                           (axes[1], "delta_refit_pts", "IMDB protocol (b): probe refit (SE ~1.9 pts)"),
                           (axes[2], "delta_dropin_pts", "IMDB protocol (a): dense probe, drop-in")):
        for (label, pooling), tasks in quality_rows(quality).items():
            t = tasks.get("imdb")
            if label == "dense" or t is None or group not in sp.get(label, {}):
                continue
            x, y = sp[label][group]["speedup"], t[key]
            color = "tab:blue" if label.startswith("paper") else "tab:red"
            marker = "o" if pooling == "mean" else "s"
            ax.scatter(x, y, c=color, marker=marker, s=40)
            ax.annotate(f"{label}/{pooling}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(2.0, ls=":", c="gray", lw=0.8)
        if key != "cosine_mean":
            ax.axhline(-0.5, ls="--", c="gray", lw=0.8)
            ax.axhline(0, c="black", lw=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"measured speedup vs dense ({group}, batch 1, 2 threads)")
        ax.set_ylabel("cosine" if key == "cosine_mean" else "accuracy change (points)")
    fig.suptitle("all-MiniLM-L6-v2 cascade token pruning: blue = paper rule, red = spattenc rule; "
                 "circle = mean pooling, square = kept-token pooling", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", type=Path, nargs="+", required=True, help="embed_eval JSON files (merged)")
    ap.add_argument("--latency", type=Path)
    ap.add_argument("--group", default="wikitext2-512", help="latency group on the x axis")
    ap.add_argument("--out", type=Path, required=True, help="output prefix (.md and .png)")
    args = ap.parse_args()
    quality = merge([load(q) for q in args.quality])
    latency = load(args.latency) if args.latency else None
    lines = table(quality, latency)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if latency:
        plot(quality, latency, args.out.with_suffix(".png"), args.group)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
