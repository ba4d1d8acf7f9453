"""spattenc against the best dense model onnxruntime's own tools build, in one run.

Four compositions, each as a dense model and as the pruned one (``--token-keep R``):

    raw             the export as is                      | spattenc --token-keep R
    optimized       spattenc --optimize (= onnxruntime.transformers fusions on the export)
    int8            spattenc --weights int8 (= onnxruntime quantize_dynamic)
    optimized+int8  spattenc --optimize --weights int8

Latency: batch 1, WikiText-2 windows of exactly 128/256/512 tokens and IMDB test reviews at natural
length, all models (eight, or two per --compositions entry) interleaved per input (bench/latency.py's loop,
rotating order, no spinning; ``--order blocked --spin``: each model's runs back to back, its threads
spinning during a run as onnxruntime's default does, as when one model is served; ``--order cycled
--spin``: the same warm runs in short visits, the models taking turns, so a drifting machine slows all
of them alike). With ``--spin`` a session's threads stop spinning when its run returns, so the idle
sessions do not take cores from the one running (``--spin-idle``: they keep spinning, the protocol of
the runs before 4n in docs/optimize.md).
Reported per pair: candidate vs its own dense counterpart, vs the raw fp32 dense model, and the
fraction of the ideal FLOP ratio (the compiler's ``--report``, docs/optimize.md) each pair reaches.
Quality (``--quality``): the issue-#4 protocols (bench/embed_eval.py: cosine, drop-in, refit) on
IMDB and SST-2, each candidate against its own dense counterpart with paired 95% bootstrap intervals;
embeddings come from bench/.cache when bench/embed_eval.py already computed them.

    python -m bench.vs_ort --model models/cache/minilm/model.onnx --token-keep 0.3 --quality
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, latency  # noqa: E402
from bench.common import ModelSpec  # noqa: E402
from bench.embed_eval import parse_sizes  # noqa: E402

log = logging.getLogger("bench.vs_ort")
COMPOSITIONS: dict[str, list[str]] = {
    "raw": [],
    "optimized": ["--optimize"],
    "int8": ["--weights", "int8"],
    "optimized+int8": ["--optimize", "--weights", "int8"],
}
# (label, dense composition, pruned composition): every pair against its own dense counterpart, and the
# issue's target pair (--optimize --weights int8 against the int8 dense model a user builds today)
QUALITY_PAIRS = (*((c, c, c) for c in COMPOSITIONS), ("optimized+int8 vs int8 dense", "int8", "optimized+int8"))
# The dense counterparts: --optimize / --weights alone turn no SpAtten rewrite on, so without these the
# encoder preset (token pruning + K/V quantization, spatten_compiler/defaults.py) would be applied too.
DENSE_FLAGS = ["--no-token-pruning", "--kv-bits", "none"]


ORDER_TEXT = {"interleaved": "interleaved per input and repeat (rotating)",
              "blocked": "blocked per input (one untimed run, then each model's repeats back to back; rotating)",
              "cycled": f"cycled per input (the models take turns: one untimed run, then {latency.CYCLE_BLOCK} timed "
                        "runs back to back; rotating)"}


def _slug(comp: str) -> str:
    return comp.replace("+", "-")


def build_models(model: Path, keep: float, out: Path, reuse: bool,
                 compositions: Sequence[str] = tuple(COMPOSITIONS)) -> dict[str, dict[str, Path]]:
    """Compile every (composition, dense | pruned) model with the spattenc CLI; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model.parent / name).exists():
            (out / name).write_bytes((model.parent / name).read_bytes())
    paths: dict[str, dict[str, Path]] = {}
    for comp, flags in COMPOSITIONS.items():
        if comp not in compositions:
            continue
        dense, pruned = out / f"dense-{_slug(comp)}.onnx", out / f"k{keep:g}-{_slug(comp)}.onnx"
        jobs = [(pruned, ["--token-keep", str(keep), *flags, "--report", str(pruned) + ".spatten.json"])]
        jobs.append((dense, [*DENSE_FLAGS, *flags]) if flags else (dense, None))
        for path, args in jobs:
            if reuse and path.exists():
                continue
            if args is None:
                path.write_bytes(model.read_bytes())
                continue
            cmd = [sys.executable, "-m", "spatten_compiler", str(model), "-o", str(path), *args]
            log.info("%s", " ".join(cmd[2:]))
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        paths[comp] = {"dense": dense, "pruned": pruned}
    return paths


def _pairs(res: dict[str, Any], comps: Sequence[str]) -> tuple[list[dict[str, Any]], float | None]:
    """Each composition's pruned model against its own dense counterpart and the raw fp32 one, from one
    timed group (latency.time_group); with the ideal FLOP ratio of the pruned raw model."""
    med = {r["label"]: r["median_ms"] for r in res["models"]}
    index = {r["label"]: k for k, r in enumerate(res["models"])}
    times = np.asarray(res["times_ms"])

    def run_paired(a: str, b: str) -> float:
        return latency.paired_runs(times, index[a], index[b])

    ratio = next((r["flop_ratio"] for r in res["models"] if r["label"] == "pruned-raw"), None)
    pairs = []
    for comp in comps:
        d, c = med[f"dense-{comp}"], med[f"pruned-{comp}"]
        own = run_paired(f"dense-{comp}", f"pruned-{comp}")
        pairs.append(
            {
                "composition": comp,
                "dense_ms": d,
                "pruned_ms": c,
                "speedup_vs_own_dense": d / c,
                "dense_vs_raw_fp32": med["dense-raw"] / d,
                "pruned_vs_raw_fp32": med["dense-raw"] / c,
                "fraction_of_ideal": d / c / ratio if ratio else None,
                "run_paired": {
                    "speedup_vs_own_dense": own,
                    "pruned_vs_raw_fp32": run_paired("dense-raw", f"pruned-{comp}"),
                    "fraction_of_ideal": own / ratio if ratio else None,
                },
            }
        )
    return pairs, ratio


def run_latency(paths: dict[str, dict[str, Path]], args: argparse.Namespace) -> dict[str, Any]:
    specs = [(f"{role}-{comp}", p[role]) for comp, p in paths.items() for role in ("dense", "pruned")]
    models = []
    for label, path in specs:
        sess = common.make_session(path, args.threads, spin=args.spin, spin_idle=args.spin_idle,
                                   disabled_optimizers=args.ort_disable)
        sidecar, ratios = latency.load_flop_ratios(path, None)
        models.append(latency.Model(ModelSpec(label, path), sess, common.file_sha256(path), sidecar, ratios))
    ns = argparse.Namespace(
        dense=paths["raw"]["dense"],
        tokenizer=None,
        max_len=args.max_len,
        lengths=args.lengths,
        data_dir=args.data_dir,
        n_inputs=args.n_inputs,
        n_imdb=args.n_imdb,
        n_sst2=0,
        seed=args.seed,
    )
    groups = []
    for g in latency.build_groups(ns):
        res = latency.time_group(models, g, args.repeats, args.warmup, args.order)
        pairs, ratio = _pairs(res, list(paths))
        raw = pairs[0]["speedup_vs_own_dense"]
        groups.append(
            {**res, "pairs": pairs, "ideal_flop_ratio": ratio, "fraction_of_ideal": raw / ratio if ratio else None}
        )
        log.info("%s: %s", g.name, ", ".join(f"{p['composition']} {p['speedup_vs_own_dense']:.2f}x" for p in pairs))
    return {"groups": groups}


def run_quality(paths: dict[str, dict[str, Path]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each candidate against its own dense counterpart under the issue-#4 protocols."""
    from bench import embed_eval as ee

    ea = ee.build_parser().parse_args(
        [
            "--dense",
            str(paths["raw"]["dense"]),
            "--data-dir",
            str(args.data_dir),
            "--max-len",
            str(args.max_len),
            "--threads",
            str(args.threads),
        ]
    )
    tok_path = common.find_tokenizer(paths["raw"]["dense"], None)
    tok, tok_sha = common.load_tokenizer(tok_path, args.max_len), common.file_sha256(tok_path)
    out = []
    for task in args.tasks:
        train, test = ee.task_splits(task, args.data_dir, args.n_train, args.n_test, ea.seed)
        for comp, dense_comp, pruned_comp in (q for q in QUALITY_PAIRS if q[1] in paths and q[2] in paths):
            emb = {}
            for role, c in (("dense", dense_comp), ("pruned", pruned_comp)):
                e = ee.Embedder(ModelSpec(f"{role}-{c}", paths[c][role]), tok, tok_sha, ea)
                emb[role] = (
                    e.embed(train, f"{task} train {role}-{c}").mean,
                    e.embed(test, f"{task} test {role}-{c}").mean,
                )
            (d_tr, d_te), (c_tr, c_te) = emb["dense"], emb["pruned"]
            probe = ee.fit_probe(d_tr, train.labels, ea.C, ea.max_iter)
            d_ok = probe.predict(d_te) == test.labels
            a_ok = probe.predict(c_te) == test.labels
            b_ok = ee.fit_probe(c_tr, train.labels, ea.C, ea.max_iter).predict(c_te) == test.labels
            cv = None
            if args.cross_fit:  # every train+test item scored once by probes that did not see it
                cv = ee.cross_fit(np.concatenate([d_tr, d_te]), np.concatenate([c_tr, c_te]),
                                  np.concatenate([train.labels, test.labels]), args.cross_fit, ea)
                cv.pop("_correct")
            out.append(
                {
                    "task": task,
                    "composition": comp,
                    "n_train": len(train.texts),
                    "n_test": len(test.texts),
                    "dense_acc": float(d_ok.mean()),
                    "dropin_acc": float(a_ok.mean()),
                    "refit_acc": float(b_ok.mean()),
                    "delta_dropin_pts": 100 * float(a_ok.mean() - d_ok.mean()),
                    "delta_dropin_ci95": ee.paired_ci95(a_ok, d_ok),
                    "delta_refit_pts": 100 * float(b_ok.mean() - d_ok.mean()),
                    "delta_refit_ci95": ee.paired_ci95(b_ok, d_ok),
                    **ee.cosine_stats(c_te, d_te),
                    **({"cross_fit": cv} if cv else {}),
                }
            )
            log.info("%s %s: refit %+.2f pts vs own dense", task, comp, out[-1]["delta_refit_pts"])
    return out


def render(result: dict[str, Any]) -> str:
    m, c = result["meta"], result["config"]
    lines = [
        f"# spattenc vs onnxruntime's tools {m['date_utc']}",
        "",
        f"`{m['command']}`",
        "",
        f"MiniLM (`{c['model']}`), `--token-keep {c['token_keep']}`, onnxruntime {m['onnxruntime_version']}, batch 1, "
        f"{m['intra_op_threads']} intra-op threads, "
        f"{latency.spin_text(c)}, "
        f"{c['n_inputs']} WikiText-2 windows per length and "
        f"{c['n_imdb']} IMDB reviews x {c['repeats']} repeats, all {2 * len(result['models'])} models "
        f"{ORDER_TEXT[c.get('order', 'interleaved')]}; "
        f"load average {m['load_avg_1m']:.1f} at start on {m['cpu_count']} cores "
        "(machine shared with other jobs), "
        f"{'sessions without ' + ', '.join(c['ort_disabled']) + ', ' if c.get('ort_disabled') else ''}"
        f"git {str(m['git_commit'])[:10]}{' (dirty)' if m['git_dirty'] else ''}.",
        "",
        "## Latency (median ms; speedups are ratios of medians)",
        "",
        "| input | tokens | composition | dense ms | pruned ms | pruned vs own dense | dense vs raw fp32 "
        "| pruned vs raw fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in result["latency"]["groups"]:
        for p in g["pairs"]:
            lines.append(
                f"| {g['name']} | {g['mean_tokens']:.0f} | {p['composition']} | {p['dense_ms']:.1f} | "
                f"{p['pruned_ms']:.1f} | {p['speedup_vs_own_dense']:.2f}x | {p['dense_vs_raw_fp32']:.2f}x | "
                f"{p['pruned_vs_raw_fp32']:.2f}x |"
            )
    comps = [p["composition"] for p in result["latency"]["groups"][0]["pairs"]] if result["latency"]["groups"] else []
    lines += ["", "Fraction of the ideal FLOP ratio (the compiler's report, docs/optimize.md) each pair reaches:", "",
              "| input | ideal FLOP ratio | " + " | ".join(comps) + " |", "|---|---|" + "---|" * len(comps)]
    for g in result["latency"]["groups"]:
        if g["ideal_flop_ratio"]:
            lines.append(
                f"| {g['name']} | {g['ideal_flop_ratio']:.2f} | "
                + " | ".join(f"{p['speedup_vs_own_dense']:.2f}x ({100 * p['fraction_of_ideal']:.0f}%)"
                             for p in g["pairs"]) + " |"
            )
    run_paired = [g for g in result["latency"]["groups"] if g["pairs"] and "run_paired" in g["pairs"][0]]
    if run_paired:
        lines += ["", "Run-paired (median over inputs and repeats of the ratio of the two runs with the same input "
                  "and repeat index, which drift on the machine changes alike; bench/latency.py `paired_runs`): "
                  "pruned vs own dense (fraction of the ideal ratio); pruned vs raw fp32:", "",
                  "| input | " + " | ".join(comps) + " |", "|---|" + "---|" * len(comps)]
        for g in run_paired:
            lines.append(f"| {g['name']} | " + " | ".join(
                f"{p['run_paired']['speedup_vs_own_dense']:.2f}x"
                + (f" ({100 * p['run_paired']['fraction_of_ideal']:.0f}%)" if p["run_paired"]["fraction_of_ideal"]
                   else "")
                + f"; {p['run_paired']['pruned_vs_raw_fp32']:.2f}x" for p in g["pairs"]) + " |")
    if result.get("quality"):
        lines += [
            "",
            "## Quality: each pruned model against its own dense counterpart (accuracy points, 95% paired bootstrap)",
            "",
            "| task | composition | dense acc | drop-in delta | refit delta | cosine mean / p5 |",
            "|---|---|---|---|---|---|",
        ]
        for q in result["quality"]:
            a, b = q["delta_dropin_ci95"], q["delta_refit_ci95"]
            lines.append(
                f"| {q['task']} ({q['n_train']}/{q['n_test']}) | {q['composition']} | {100 * q['dense_acc']:.1f} | "
                f"{q['delta_dropin_pts']:+.2f} [{a[0]:+.1f}, {a[1]:+.1f}] | {q['delta_refit_pts']:+.2f} "
                f"[{b[0]:+.1f}, {b[1]:+.1f}] | {q['cosine_mean']:.4f} / {q['cosine_p5']:.4f} |"
            )
        cv = [q for q in result["quality"] if q.get("cross_fit")]
        if cv:
            lines += [
                "",
                f"Cross-fitted over train+test ({cv[0]['cross_fit']['folds']} stratified folds, every item scored once "
                "by probes that did not see it):",
                "",
                "| task | composition | n | dense acc | drop-in delta | refit delta |",
                "|---|---|---|---|---|---|",
            ]
            for q in cv:
                c = q["cross_fit"]
                a, b = c["delta_dropin_ci95"], c["delta_refit_ci95"]
                lines.append(
                    f"| {q['task']} | {q['composition']} | {c['n']} | {100 * c['dense_acc']:.1f} | "
                    f"{c['delta_dropin_pts']:+.2f} [{a[0]:+.1f}, {a[1]:+.1f}] | {c['delta_refit_pts']:+.2f} "
                    f"[{b[0]:+.1f}, {b[1]:+.1f}] |"
                )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="the exported dense model (MiniLM)")
    p.add_argument("--token-keep", type=float, default=0.3)
    p.add_argument("--work-dir", type=Path, default=Path("bench/out/vs_ort"), help="compiled models go here")
    p.add_argument("--reuse", action="store_true", help="keep models already compiled in --work-dir")
    p.add_argument("--compositions", type=lambda t: [c for c in t.split(",") if c], default=list(COMPOSITIONS),
                   help=f"comma-separated subset of {','.join(COMPOSITIONS)} (raw is always included)")
    p.add_argument("--lengths", default="128,256,512")
    p.add_argument("--n-inputs", type=int, default=8, help="WikiText-2 windows per length")
    p.add_argument("--n-imdb", type=int, default=16, help="IMDB test reviews timed")
    p.add_argument("--repeats", type=int, default=3)
    latency.add_timing_options(p)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", action="store_true", help="also the issue-#4 quality protocols per pair")
    p.add_argument("--tasks", nargs="+", default=["imdb", "sst2"])
    p.add_argument(
        "--n-train",
        type=parse_sizes,
        default={},
        metavar="N|TASK=N,...",
        help="train texts per task (bench/embed_eval.py's sizes by default: all of IMDB, 4000 SST-2)",
    )
    p.add_argument("--n-test", type=parse_sizes, default={}, metavar="N|TASK=N,...", help="test texts per task")
    p.add_argument("--cross-fit", type=int, default=5, metavar="K",
                   help="quality deltas also cross-fitted over train+test in K stratified folds (0: off)")
    p.add_argument("--skip-latency", action="store_true", help="quality only (e.g. to fill the embedding cache)")
    common.add_common_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [c for c in args.compositions if c not in COMPOSITIONS]
    if unknown:
        parser.error(f"--compositions: unknown {unknown[0]!r} (choose from {', '.join(COMPOSITIONS)})")
    args.compositions = ["raw", *(c for c in args.compositions if c != "raw")]
    common.setup_logging(args.verbose)
    paths = build_models(args.model, args.token_keep, args.work_dir, args.reuse, args.compositions)
    result = {
        "schema": "spattenc.bench.vs_ort/1",
        "meta": common.run_metadata(args.threads),
        "config": {
            "model": str(args.model),
            "token_keep": args.token_keep,
            "lengths": args.lengths,
            "n_inputs": args.n_inputs,
            "n_imdb": args.n_imdb,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "max_len": args.max_len,
            "spin": args.spin,
            "spin_idle": args.spin and args.spin_idle,
            "order": args.order,
            "ort_disabled": args.ort_disable,
            "batch": 1,
        },
        "models": {comp: {k: str(v) for k, v in p.items()} for comp, p in paths.items()},
    }
    result["latency"] = {"groups": []} if args.skip_latency else run_latency(paths, args)
    if args.quality:
        result["quality"] = run_quality(paths, args)
    md = render(result)
    print(md)
    if not args.no_save:
        j, m = common.write_results(
            args.out_dir, args.name or "vs-ort", json.loads(json.dumps(result, default=str)), md
        )
        log.info("wrote %s and %s", j, m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
