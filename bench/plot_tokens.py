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
            if task["task"] not in by_task:
                by_task[task["task"]] = json.loads(json.dumps(task))
                merged["tasks"].append(by_task[task["task"]])
            else:
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
            "IMDB cos", "IMDB (a)", "IMDB (b)", "IMDB (a) cross-fit [95% CI]", "IMDB (b) cross-fit [95% CI]",
            "SST-2 cos", "SST-2 (a)", "SST-2 (b)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, pooling), tasks in quality_rows(quality).items():
        lat = sp.get(label, {})
        flop = lat.get("wikitext2-512", {}).get("flop_ratio")
        cells = [label, pooling, *[f"{lat[g]['speedup']:.2f}x" if g in lat else "-" for g in groups],
                 f"{flop:.2f}" if isinstance(flop, (int, float)) else "-"]
        for task in ("imdb", "sst2"):
            t = tasks.get(task)
            if t is None:
                cells += ["-"] * (5 if task == "imdb" else 3)
                continue
            da, db = t.get("delta_dropin_pts"), t.get("delta_refit_pts")
            cells += [f"{t['cosine_mean']:.3f}",
                      f"{100 * t['acc_dropin']:.1f}" + (f" ({da:+.1f})" if da is not None else ""),
                      f"{100 * t['acc_refit']:.1f}" + (f" ({db:+.1f})" if db is not None else "")]
            if task == "imdb":
                cv = t.get("cross_fit")
                cells += [f"{cv[f'delta_{p}_pts']:+.1f} [{cv[f'delta_{p}_ci95'][0]:+.1f}, {cv[f'delta_{p}_ci95'][1]:+.1f}]"
                          if cv else "-" for p in ("dropin", "refit")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _imdb_point(entry: dict, key: str) -> tuple[float, tuple[float, float] | None]:
    """Value and 95% interval for a quality key, preferring the cross-fitted numbers (all items)."""
    if key == "cosine_mean":
        return entry[key], None
    cv = entry.get("cross_fit")
    src = cv if cv is not None else entry
    ci = src.get(key.replace("_pts", "_ci95"))
    return src[key], (tuple(ci) if ci else None)


def plot(quality: dict, latency: dict, out: Path, group: str) -> None:
    """One line per rule family (label prefix before '-r'), points sorted by measured speedup, 95%
    intervals as error bars (cross-fitted when the run had --cross-fit)."""
    sp = speedups(latency)
    # family = label prefix before "-r<keep>"; names as the candidates file writes them
    colors = {"paper": "tab:blue", "spattenc": "tab:orange", "spattenc-value": "tab:red"}
    names = {"paper": "paper rule", "spattenc": "spattenc rule, mean importance",
             "spattenc-value": "spattenc rule (default: value importance)"}
    panels = (("cosine_mean", "IMDB embedding cosine to dense"),
              ("delta_refit_pts", "IMDB protocol (b) refit: accuracy change, 95% CI"),
              ("delta_dropin_pts", "IMDB protocol (a) drop-in: accuracy change, 95% CI"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharex=True)
    families: dict[str, list[tuple[float, str, dict]]] = {}
    for (label, pooling), tasks in quality_rows(quality).items():
        t = tasks.get("imdb")
        if label == "dense" or t is None or pooling != "mean" or group not in sp.get(label, {}) or "-r" not in label:
            continue
        families.setdefault(label.split("-r")[0], []).append((sp[label][group]["speedup"], label, t))
    for ax, (key, title) in zip(axes, panels):
        for fam, pts in sorted(families.items()):
            pts.sort()
            xs = [x for x, _, _ in pts]
            vals = [_imdb_point(t, key) for _, _, t in pts]
            ys = [v for v, _ in vals]
            color = colors.get(fam, "tab:gray")
            ax.plot(xs, ys, "-o", color=color, label=names.get(fam, fam), ms=5)
            for x, (y, ci) in zip(xs, vals):
                if ci is not None:
                    ax.errorbar(x, y, yerr=[[y - ci[0]], [ci[1] - y]], color=color, capsize=3, lw=0.8)
            for x, y, (_, label, _) in zip(xs, ys, pts):
                keep = label[len(fam) + 2:].split("-")[0]
                ax.annotate(keep, (x, y), fontsize=7, color=color, xytext=(4, -10), textcoords="offset points")
        ax.axvline(2.0, ls=":", c="gray", lw=0.8)
        if key != "cosine_mean":
            ax.axhline(0, c="black", lw=0.5)
            ax.axhline(-0.5, ls="--", c="gray", lw=0.8, label="target: -0.5 at >= 2x")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"measured speedup vs dense ({group}, batch 1, 2 threads)", fontsize=8)
        ax.set_ylabel("cosine" if key == "cosine_mean" else "points")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("all-MiniLM-L6-v2 cascade token pruning (keep ratio next to each point; IMDB 2000/1000, "
                 "probes cross-fitted over all 3000 reviews where available)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", type=Path, nargs="+", required=True, help="embed_eval JSON files (merged)")
    ap.add_argument("--latency", type=Path)
    ap.add_argument("--group", default="wikitext2-512", help="latency group on the x axis")
    ap.add_argument("--out", type=Path, required=True, help="output prefix (.md and .png)")
    args = ap.parse_args(argv)
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
