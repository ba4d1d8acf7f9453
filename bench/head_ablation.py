"""Per-head ablation costs of a model on head-calibration data (``spattenc --head-importance ablation``'s scores).

For every (layer, head): the mean cosine distance between the mean-pooled output with all heads and
with only that head removed, on the calibration windows (WikiText-2, bench/head_calibration.py), next
to SpAtten's magnitude score. Prints how many heads are cheap and, for each ``--prune`` fraction, the
per-layer keep schedule that prunes the globally cheapest heads: with ``--head-importance ablation``
each layer then drops exactly those heads.

    python bench/head_ablation.py --calibration bench/out/heads/calib-wt2-64x256.npz --prune 0.2,0.35
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spatten_compiler.passes.decompose_attention import DecomposeAttention  # noqa: E402
from spatten_compiler.passes.find_attention import find_attention  # noqa: E402
from spatten_compiler.passes.head_calibration import ablation_scores, calibration_scores  # noqa: E402
from spatten_compiler.passes.normalize import Normalize  # noqa: E402

from bench import common  # noqa: E402
from spatten_compiler.modelio import load_model  # noqa: E402


def global_schedule(cost: np.ndarray, fraction: float, whole: tuple[int, ...] = ()) -> tuple[list[int], str]:
    """Heads kept per layer when the ``fraction`` cheapest heads of the whole model are pruned
    (at least one kept per layer, every head in the ``whole`` layers), and the
    ``--head-keep-schedule`` that keeps those counts."""
    layers, groups = cost.shape
    drop = int(round(fraction * cost.size))
    kept = [groups] * layers
    cost = cost.astype(np.float64).copy()
    cost[list(whole)] = np.inf
    for i in np.argsort(cost, axis=None, kind="stable"):
        if drop == 0:
            break
        layer = int(i) // groups
        if kept[layer] > 1 and np.isfinite(cost.flat[i]):
            kept[layer] -= 1
            drop -= 1
    return kept, ",".join(f"{k / groups:.10g}" for k in kept)  # ceil(G * r) must give back k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/cache/minilm/model.onnx"))
    ap.add_argument("--calibration", type=Path, required=True, help=".npz of input feeds (bench/head_calibration.py)")
    ap.add_argument("--prune", default="0.2,0.35", help="fractions of all heads to prune, cheapest first")
    ap.add_argument("--cheap", type=float, default=0.002, help="cosine distance below which a head counts as cheap")
    ap.add_argument("--whole-layers", default="", metavar="L,L",
                    help="layers that keep every head in the printed schedules (e.g. 0: with token pruning, "
                    "layer 0 ranks the tokens from all its heads)")
    ap.add_argument("--out-dir", type=Path, default=common.DEFAULT_RESULTS)
    ap.add_argument("--name", default="head-ablation")
    args = ap.parse_args(argv)
    common.setup_logging(False)
    model = load_model(args.model)
    Normalize()(model)
    DecomposeAttention()(model)
    sites = find_attention(model).sites
    cost = ablation_scores(model, sites, args.calibration)
    magnitude = calibration_scores(model, sites, args.calibration)
    layers, groups = cost.shape
    md = [f"# head ablation {common.run_metadata(2)['date_utc']}", "",
          f"`{common.run_metadata(2)['command']}`", "",
          "Cosine distance (x1e-3) of the mean-pooled embedding when only that head is removed, mean over "
          f"{args.calibration}; rank = the head's rank by SpAtten's |E| magnitude in its layer (0 = largest).", "",
          "| layer | " + " | ".join(f"h{h}" for h in range(groups)) + f" | heads < {args.cheap:g} |",
          "|---" * (groups + 2) + "|"]
    for layer in range(layers):
        rank = np.argsort(np.argsort(-magnitude[layer], kind="stable"), kind="stable")
        cells = [f"{1e3 * c:.2f} (r{r})" for c, r in zip(cost[layer], rank)]
        md.append(f"| {layer} | " + " | ".join(cells) + f" | {int((cost[layer] < args.cheap).sum())} |")
    flat = np.sort(cost, axis=None)
    md += ["", f"{int((cost < args.cheap).sum())} of {cost.size} heads below {args.cheap:g}; "
           f"quantiles (x1e-3): min {1e3 * flat[0]:.2f}, 20% {1e3 * np.quantile(flat, 0.2):.2f}, "
           f"35% {1e3 * np.quantile(flat, 0.35):.2f}, median {1e3 * np.median(flat):.2f}, max {1e3 * flat[-1]:.2f}. "
           "Spearman correlation of ablation cost and magnitude, per layer: " + ", ".join(
               f"{np.corrcoef(np.argsort(np.argsort(c)), np.argsort(np.argsort(m)))[0, 1]:+.2f}"
               for c, m in zip(cost, magnitude)), ""]
    schedules = {}
    whole = tuple(int(x) for x in args.whole_layers.split(",") if x.strip())
    for frac in (float(x) for x in args.prune.split(",") if x.strip()):
        kept, sched = global_schedule(cost, frac, whole)
        schedules[frac] = {"kept": kept, "schedule": sched}
        md.append(f"- prune the cheapest {frac:.0%} globally{f' (layers {whole} whole)' if whole else ''}: kept {kept}, "
                  f"`--head-importance ablation --head-keep-schedule {sched}`")
    text = "\n".join(md) + "\n"
    print(text)
    payload = {**common.run_metadata(2), "calibration": str(args.calibration), "ablation_cost": cost,
               "magnitude": magnitude, "schedules": schedules}
    j, m = common.write_results(args.out_dir, args.name, payload, text)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
