"""Does a candidate beat a speed-vs-quality curve at its own speed? Paired against the curve.

The curve between two measured points A (slower) and B (faster) is what running A on a fraction
``1 - f`` of the inputs and B on the rest achieves: mean time ``(1 - f) T_A + f T_B``, per item
the quality ``(1 - f) q_A + f q_B`` in expectation. ``f`` is chosen so that this mixture takes the
candidate's time (medians from one ``latency.py`` run: its 512-token windows or its IMDB
reviews). For every item the candidate's quality minus the mixture's is then bootstrapped:

* cosine to the dense embedding (train + test items);
* drop-in and refit correctness, cross-fitted over train + test as in ``embed_eval.py --cross-fit``
  (same folds for every model).

A positive difference whose 95% interval excludes 0 means the candidate lies above the straight
line between A and B at its speed (the K/V frontier test in ``kv_quant.py paired`` does the same in
bytes).

    python bench/paired_curve.py --dense models/cache/minilm/model.onnx \\
        --candidate C=c.onnx --slower A=a.onnx --faster B=b.onnx \\
        --latency bench/results/<stamp>-<name>.json --speed-on imdb
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench import embed_eval as ev  # noqa: E402
from bench.latency import result_group  # noqa: E402

log = logging.getLogger("bench.paired_curve")


def mixture_fraction(latency: dict, speed_on: str, cand: str, slower: str, faster: str) -> tuple[float, dict]:
    """``f`` such that ``(1 - f) T_slower + f T_faster = T_cand`` (median ms in the chosen group)."""
    group = result_group(latency, speed_on)
    if group is None:
        raise SystemExit(f"the latency run has no {speed_on} group")
    ms = {m["label"]: m["median_ms"] for m in group["models"]}
    ms["dense"] = next(m["median_ms"] for m in group["models"] if m["role"] == "dense")
    missing = [x for x in (cand, slower, faster) if x not in ms]
    if missing:
        raise SystemExit(f"the latency run has no model labelled {missing[0]} (labels: {', '.join(sorted(ms))})")
    ta, tb, tc = ms[slower], ms[faster], ms[cand]
    if not tb <= tc <= ta:
        raise SystemExit(f"{cand} ({tc:.2f} ms) is not between {faster} ({tb:.2f} ms) and {slower} ({ta:.2f} ms)")
    f = (ta - tc) / (ta - tb) if ta > tb else 0.5
    return f, {"group": group["name"], "dense_ms": ms["dense"], "ms": {k: ms[k] for k in (cand, slower, faster)}}


def per_item(emb: dict[str, Any], dense_all: np.ndarray, y: np.ndarray,
             args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Cosine to dense and cross-fitted drop-in / refit correctness of one model, per item."""
    x = np.concatenate([emb["train"].mean, emb["test"].mean])
    cv = ev.cross_fit(dense_all, x, y, args.cross_fit, args)
    a, b = cv["_correct"]
    cos = np.sum(ev.l2_normalize(x) * ev.l2_normalize(dense_all), axis=1).astype(np.float64)
    return {"cosine": cos, "dropin": a.astype(np.float64), "refit": b.astype(np.float64)}


def build_parser() -> argparse.ArgumentParser:
    p = ev.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--slower", required=True, metavar="LABEL=PATH", help="the curve's slower end (point A)")
    p.add_argument("--faster", required=True, metavar="LABEL=PATH", help="the curve's faster end (point B)")
    p.add_argument("--latency", type=Path, required=True, help="a latency.py result JSON with all three labels")
    p.add_argument("--speed-on", choices=("512", "imdb", "sst2"), default="imdb")
    p.set_defaults(task=["imdb"], cross_fit=5)
    return p


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The candidate against the curve on every task: (result dictionary, markdown)."""
    specs = {"cand": common.parse_model_spec(args.candidate[0]), "slower": common.parse_model_spec(args.slower),
             "faster": common.parse_model_spec(args.faster)}
    lat = json.loads(args.latency.read_text())
    f, speed = mixture_fraction(lat, args.speed_on, specs["cand"].label, specs["slower"].label, specs["faster"].label)
    tok_path = common.find_tokenizer(args.dense, args.tokenizer)
    tok = common.load_tokenizer(tok_path, args.max_len)
    tok_sha = common.file_sha256(tok_path)
    dense = ev.Embedder(common.ModelSpec("dense", args.dense), tok, tok_sha, args)
    models = {k: ev.Embedder(s, tok, tok_sha, args) for k, s in specs.items()}
    t = speed["ms"]
    lines = [f"# paired_curve {common.run_metadata(args.threads)['date_utc']}", "",
             f"`{common.run_metadata(args.threads)['command']}`", "",
             f"Speed ({speed['group']} group of {args.latency.name}, dense {speed['dense_ms']:.2f} ms): "
             + ", ".join(f"{specs[k].label} {t[specs[k].label]:.2f} ms ({speed['dense_ms'] / t[specs[k].label]:.2f}x)"
                         for k in ("slower", "cand", "faster"))
             + f". The curve at the candidate's time: {1 - f:.3f} x {specs['slower'].label} + {f:.3f} x "
             f"{specs['faster'].label}.", "",
             "| task | measure | candidate | curve (mixture) | candidate - curve [95% CI] |", "|---|---|---|---|---|"]
    results: dict[str, Any] = {"fraction_faster": f, "speed": speed, "tasks": {}}
    for name in args.task:
        train, test = ev.task_splits(name, args.data_dir, args.n_train, args.n_test, args.seed)
        y = np.concatenate([train.labels, test.labels])
        d = {s: dense.embed(sp, f"{name} {s} dense") for s, sp in (("train", train), ("test", test))}
        dense_all = np.concatenate([d["train"].mean, d["test"].mean])
        splits = (("train", train), ("test", test))
        items = {k: per_item({s: m.embed(sp, f"{name} {s} {m.spec.label}") for s, sp in splits}, dense_all, y, args)
                 for k, m in models.items()}
        results["tasks"][name] = {}
        for measure, scale, fmt in (("cosine", 1.0, ".4f"), ("dropin", 100.0, ".2f"), ("refit", 100.0, ".2f")):
            c = items["cand"][measure]
            mix = (1 - f) * items["slower"][measure] + f * items["faster"][measure]
            ci = ev.paired_ci95(c, mix, scale=scale)
            diff = c - mix
            results["tasks"][name][measure] = {"candidate": float(scale * c.mean()), "curve": float(scale * mix.mean()),
                                               "difference": float(scale * diff.mean()), "ci95": ci}
            unit = "" if measure == "cosine" else " pts"
            lines.append(f"| {name} | {measure if measure == 'cosine' else measure + ' acc (cv)'} | "
                         f"{scale * c.mean():{fmt}} | {scale * mix.mean():{fmt}} | "
                         f"{scale * diff.mean():+{fmt}}{unit} [{ci[0]:+{fmt}}, {ci[1]:+{fmt}}] |")
    return results, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if len(args.candidate) != 1:
        p.error("give exactly one --candidate")
    common.setup_logging(args.verbose)
    results, md = run(args)
    print(md)
    if not args.no_save:
        label = common.parse_model_spec(args.candidate[0]).label
        j, m = common.write_results(args.out_dir, args.name or f"paired-curve-{label}",
                                    {**common.run_metadata(args.threads), **results}, md)
        log.info("wrote %s and %s", j, m)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
