"""Batch-1 CPU latency of the dense model and pruned candidates, interleaved in the same run.

Input groups: WikiText-2 test windows of exactly N tokens (``[CLS] ... [SEP]``) for each N in
``--lengths``, and IMDB test reviews at their natural length (truncated at ``--max-len``). For each
input and repeat every model runs once, back to back; the model order rotates each round so no
model always runs first (cache/turbo effects hit all of them alike). Warm-up runs come first.

Per group and model: median latency (ms), speedup = dense median / candidate median, a paired
speedup (median over inputs of the per-input ratio), a run-paired one (median over inputs and repeats
of the ratio of the two runs with the same input and repeat index; ``paired_runs``), every timed run
(``times_ms`` in the JSON), the fraction of tokens the candidate kept to
the last layer (from ``spatten_kept_mask``) and, when the compiler wrote a ``<model>.spatten.json``
sidecar, its ``flop_ratio`` for that length.

Usage: ``python bench/latency.py --dense models/cache/minilm/model.onnx --candidate pruned.onnx``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import ModelSpec  # noqa: E402

log = logging.getLogger("bench.latency")


@dataclass
class InputGroup:
    """Batch-1 inputs that are summarised together (one WikiText length, or the IMDB reviews)."""

    name: str
    source: str
    length: int | None  # exact token count, None for natural-length inputs
    ids: list[list[int]]

    def feeds(self, i: int) -> dict[str, np.ndarray]:
        ids = np.asarray([self.ids[i]], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


@dataclass
class Model:
    """A loaded model under test plus its compiler sidecar's FLOP ratios (if any)."""

    spec: ModelSpec
    session: Any
    sha256: str
    sidecar: Path | None
    flop_ratios: dict[str, float]


def special_ids(tok: Any) -> tuple[list[int], list[int]]:
    """Ids the post-processor adds before and after a single sequence (BERT: [CLS] / [SEP])."""
    enc = tok.encode("", add_special_tokens=True)
    mask = enc.special_tokens_mask
    n_pre = next((k for k, m in enumerate(mask) if not m), len(mask))
    if n_pre == len(mask):  # empty text: everything is special; assume one leading token
        n_pre = min(1, len(mask))
    return list(enc.ids[:n_pre]), list(enc.ids[n_pre:])


def iter_token_ids(path: Path, tok: Any, chunk: int = 256) -> Iterator[int]:
    """Word-piece ids of the non-empty lines of ``path``, in order, without special tokens."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                lines.append(line.strip())
            if len(lines) == chunk:
                for enc in tok.encode_batch(lines, add_special_tokens=False):
                    yield from enc.ids
                lines = []
    for enc in tok.encode_batch(lines, add_special_tokens=False):
        yield from enc.ids


def wikitext_group(path: Path, tok: Any, n_tokens: int, count: int) -> InputGroup:
    """``count`` non-overlapping windows of the concatenated text, each exactly ``n_tokens`` long."""
    pre, post = special_ids(tok)
    body = n_tokens - len(pre) - len(post)
    if body <= 0:
        raise ValueError(f"length {n_tokens} leaves no room for text")
    stream = iter_token_ids(path, tok)
    windows: list[list[int]] = []
    while len(windows) < count:
        piece = [t for _, t in zip(range(body), stream, strict=False)]
        if len(piece) < body:
            log.warning("%s: only %d windows of %d tokens", path, len(windows), n_tokens)
            break
        windows.append(pre + piece + post)
    return InputGroup(f"wikitext2-{n_tokens}", str(path), n_tokens, windows)


def text_group(name: str, path: Path, tok: Any, count: int, seed: int) -> InputGroup:
    """``count`` seeded texts of a labelled TSV (IMDB reviews, SST-2 sentences) at natural length
    (``tok`` truncates)."""
    texts, _ = common.read_labeled_tsv(path)
    idx = common.seeded_subset(len(texts), count, seed)
    encs = tok.encode_batch([texts[i] for i in idx])
    return InputGroup(name, str(path), None, [list(e.ids) for e in encs])


def result_group(result: dict[str, Any], which: str) -> dict[str, Any] | None:
    """A group of a latency result: ``"512"`` (any number) the WikiText-2 windows of that length,
    else the group of that name (``imdb``, ``sst2``); None if the run has none."""
    return next((g for g in result["groups"] if (g["length"] == int(which) if which.isdigit() else g["name"] == which)),
                None)


def load_flop_ratios(model: Path, explicit: Path | None) -> tuple[Path | None, dict[str, float]]:
    """``flop_ratio`` from the compiler sidecar: a number, ``{length: ratio}`` or ``[{length, flop_ratio}]``."""
    options = [explicit] if explicit else [Path(str(model) + ".spatten.json"), model.with_suffix(".spatten.json")]
    path = next((p for p in options if p is not None and p.is_file()), None)
    if path is None:
        return None, {}
    raw = json.loads(path.read_text()).get("flop_ratio")
    ratios: dict[str, float] = {}
    if isinstance(raw, int | float):
        ratios["*"] = float(raw)
    elif isinstance(raw, dict):
        ratios = {str(k): float(v) for k, v in raw.items() if isinstance(v, int | float)}
    elif isinstance(raw, list):
        for item in raw:
            key = item.get("length", item.get("seq_len", item.get("n_tokens")))
            if key is not None and isinstance(item.get("flop_ratio"), int | float):
                ratios[str(key)] = float(item["flop_ratio"])
    if not ratios:
        log.warning("%s: no usable flop_ratio field", path)
    return path, ratios


def flop_ratio_for(model: Model, group: InputGroup) -> float | None:
    for key in (str(group.length), group.name, "*"):
        if key in model.flop_ratios:
            return model.flop_ratios[key]
    return None


def kept_fraction(names: Sequence[str], outs: Sequence[np.ndarray]) -> float | None:
    if common.KEPT_OUTPUT not in names:
        return None
    return float(np.mean(outs[list(names).index(common.KEPT_OUTPUT)]))


def _interleaved(m: int, repeats: int, i: int) -> Iterator[tuple[int, int, bool]]:
    """Each repeat runs every model once, the start rotating: drift hits all models alike, but every
    run follows another model's (cold caches; with spinning, the previous session's threads compete)."""
    for r in range(repeats):
        for k in range(m):
            yield (i * repeats + r + k) % m, r, True


def _blocked(m: int, repeats: int, i: int) -> Iterator[tuple[int, int, bool]]:
    """Each model runs one untimed and then all its repeats back to back, the model order rotating per
    input: what a user who serves one model sees (warm caches), still with drift spread over models."""
    for k in range(m):
        j = (i + k) % m
        yield j, -1, False
        for r in range(repeats):
            yield j, r, True


CYCLE_BLOCK = 3  # timed runs per visit in the cycled order


def _cycled(m: int, repeats: int, i: int) -> Iterator[tuple[int, int, bool]]:
    """Blocked in short visits: the models take turns, each visit one untimed run and then
    CYCLE_BLOCK timed runs back to back, until every model has its repeats; the order rotates per visit
    round and per input. Warm as in blocked, but each model's runs are spread over the whole input's
    time window, so a machine whose speed drifts over seconds (a shared host) slows every model alike
    instead of whichever was running then."""
    rounds = -(-repeats // CYCLE_BLOCK)
    for c in range(rounds):
        for k in range(m):
            j = (i + c + k) % m
            yield j, -1, False
            for r in range(c * CYCLE_BLOCK, min(repeats, (c + 1) * CYCLE_BLOCK)):
                yield j, r, True


ORDERS = {"interleaved": _interleaved, "blocked": _blocked, "cycled": _cycled}


def time_group(models: Sequence[Model], group: InputGroup, repeats: int, warmup: int,
               order: str = "interleaved") -> dict[str, Any]:
    """Time every model on every input of the group in the given ORDERS schedule. Times in ms."""
    from tqdm import tqdm

    m = len(models)
    times = np.zeros((m, len(group.ids), repeats))
    kept: list[list[float]] = [[] for _ in models]
    names = [common.output_names(x.session) for x in models]
    first = group.feeds(0)
    for x in models:
        for _ in range(warmup):
            x.session.run(None, common.feeds_for(x.session, first))
    for i in tqdm(range(len(group.ids)), desc=group.name, unit="input", leave=False):
        feeds = [common.feeds_for(x.session, group.feeds(i)) for x in models]
        for j, r, timed in ORDERS[order](m, repeats, i):
            t0 = time.perf_counter_ns()
            outs = models[j].session.run(None, feeds[j])
            if not timed:
                continue
            times[j, i, r] = (time.perf_counter_ns() - t0) / 1e6
            if r == 0:
                frac = kept_fraction(names[j], outs)
                if frac is not None:
                    kept[j].append(frac)
    return summarize(models, group, times, kept)


def paired_runs(times: np.ndarray, a: int, b: int) -> float:
    """Median over (input, repeat) of model a's time over model b's for the same input and repeat index:
    in the interleaved and cycled orders those two runs are seconds apart at most, so a machine whose
    speed drifts over a run changes both alike (the ratio of medians mixes slow and fast minutes)."""
    return float(np.median(times[a] / times[b]))


def summarize(models: Sequence[Model], group: InputGroup, times: np.ndarray,
              kept: list[list[float]]) -> dict[str, Any]:
    """Per-model statistics; speedups relative to models[0] (the dense model). ``times_ms``: every timed
    run, [model][input][repeat]."""
    dense_med = float(np.median(times[0]))
    dense_per_input = np.median(times[0], axis=1)
    rows = []
    for j, x in enumerate(models):
        med = float(np.median(times[j]))
        per_input = np.median(times[j], axis=1)
        rows.append({
            "label": x.spec.label, "role": "dense" if j == 0 else "candidate",
            "median_ms": med, "mean_ms": float(times[j].mean()), "min_ms": float(times[j].min()),
            "p10_ms": float(np.percentile(times[j], 10)), "p90_ms": float(np.percentile(times[j], 90)),
            "speedup": dense_med / med, "speedup_paired": float(np.median(dense_per_input / per_input)),
            "speedup_paired_runs": paired_runs(times, 0, j),
            "kept_fraction": float(np.mean(kept[j])) if kept[j] else None,
            "flop_ratio": flop_ratio_for(x, group),
        })
    lengths = [len(t) for t in group.ids]
    return {"name": group.name, "source": group.source, "length": group.length,
            "n_inputs": len(group.ids), "repeats": int(times.shape[2]),
            "mean_tokens": float(np.mean(lengths)), "max_tokens": int(max(lengths)), "models": rows,
            "times_ms": np.round(times, 4).tolist()}


MD_HEADER = ("| input | tokens (mean) | inputs x repeats | model | median ms | speedup | paired speedup "
             "| run-paired speedup | kept % | flop ratio |\n|---|---|---|---|---|---|---|---|---|---|")


def spin_text(config: dict[str, Any]) -> str:
    """How a run's sessions spun (results written before ``spin_idle`` existed spun between runs too)."""
    if not config.get("spin"):
        return "no spinning"
    if config.get("spin_idle", True):
        return "spinning during and between runs (idle sessions spin)"
    return "spinning during runs (stopped when a run returns)"


def render_markdown(result: dict[str, Any]) -> str:
    m, c = result["meta"], result["config"]
    lines = [f"# latency {m['date_utc']}", "", f"`{m['command']}`", "",
             f"onnxruntime {m['onnxruntime_version']}, batch 1, {m['intra_op_threads']} intra-op threads, "
             f"{spin_text(c)}, order {c.get('order', 'interleaved')}, warm-up {c['warmup']}, "
             f"{'without ' + ', '.join(c['ort_disabled']) + ', ' if c.get('ort_disabled') else ''}"
             f"load avg {m['load_avg_1m']}, "
             f"git {str(m['git_commit'])[:10]}{' (dirty)' if m['git_dirty'] else ''}", "", MD_HEADER]
    for g in result["groups"]:
        for r in g["models"]:
            kept = common.fmt(None if r["kept_fraction"] is None else 100 * r["kept_fraction"], ".1f")
            lines.append(f"| {g['name']} | {g['mean_tokens']:.0f} | {g['n_inputs']} x {g['repeats']} | "
                         f"{r['label']} | {r['median_ms']:.2f} | {r['speedup']:.3f} | "
                         f"{r['speedup_paired']:.3f} | {common.fmt(r.get('speedup_paired_runs'), '.3f')} | "
                         f"{kept} | {common.fmt(r['flop_ratio'], '.3f')} |")
    return "\n".join(lines) + "\n"


def add_timing_options(p: argparse.ArgumentParser) -> None:
    """--spin and --order (shared with bench/vs_ort.py)."""
    # Interleaving many sessions in one process: each session's intra-op threads keep spinning after
    # its run and steal the cores from the next model (measured: dense 106-132 ms with spinning vs
    # 85 ms without, and pruned models hit harder because they are shorter), so spinning is off
    # unless asked for.
    p.add_argument("--spin", action="store_true",
                   help="allow onnxruntime intra-op thread spinning while a run is in progress (off by default); "
                        "the threads stop spinning when the run returns, so idle sessions do not compete")
    p.add_argument("--spin-idle", action="store_true",
                   help="with --spin: keep spinning after a run returns too (onnxruntime's default; the protocol "
                        "of the --spin runs before docs/optimize.md 4n, where idle sessions took cores from the next "
                        "model)")
    p.add_argument("--no-spin", action="store_true", help=argparse.SUPPRESS)  # the old flag; now the default
    p.add_argument("--order", choices=list(ORDERS), default="interleaved",
                   help="interleaved: every run follows another model's; blocked: one untimed run, then "
                        "each model's repeats back to back (warm, as when serving one model); cycled: "
                        f"blocked in visits of {CYCLE_BLOCK} timed runs, the models taking turns (warm, and "
                        "robust to a machine whose speed drifts)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dense", type=Path, required=True, help="the dense reference ONNX model")
    p.add_argument("--candidate", action="append", default=[], metavar="[LABEL=]PATH",
                   help="a candidate ONNX model (repeatable)")
    p.add_argument("--lengths", default="128,256,512", help="comma-separated WikiText-2 window lengths")
    p.add_argument("--n-inputs", type=int, default=20, help="WikiText-2 windows per length")
    p.add_argument("--n-imdb", type=int, default=50, help="IMDB test reviews (0: skip IMDB)")
    p.add_argument("--n-sst2", type=int, default=0, help="SST-2 dev sentences (0: skip SST-2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model per input")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per model per group")
    p.add_argument("--seed", type=int, default=0, help="IMDB subsampling seed")
    p.add_argument("--flop-ratio", action="append", default=[], metavar="LABEL=JSON",
                   help="sidecar JSON for a candidate (default: <model>.spatten.json if present)")
    add_timing_options(p)
    common.add_common_options(p)
    return p


def load_models(args: argparse.Namespace) -> list[Model]:
    explicit = {spec.label: spec.path for spec in map(common.parse_model_spec, args.flop_ratio)}
    specs = [ModelSpec("dense", args.dense)] + [common.parse_model_spec(s) for s in args.candidate]
    models = []
    for spec in specs:
        sess = common.make_session(spec.path, args.threads, spin=args.spin, spin_idle=args.spin_idle,
                                   custom_op_libs=args.custom_op_lib, disabled_optimizers=args.ort_disable)
        sidecar, ratios = (None, {}) if spec.label == "dense" and spec.path == args.dense else \
            load_flop_ratios(spec.path, explicit.get(spec.label))
        models.append(Model(spec, sess, common.file_sha256(spec.path), sidecar, ratios))
    return models


def build_groups(args: argparse.Namespace) -> list[InputGroup]:
    tok_path = common.find_tokenizer(args.dense, args.tokenizer)
    tok = common.load_tokenizer(tok_path, args.max_len)
    free = common.load_tokenizer(tok_path, None)  # WikiText stream: no truncation
    groups = []
    for n in (int(x) for x in args.lengths.split(",") if x.strip()):
        if n > args.max_len:
            log.warning("skipping length %d > --max-len %d", n, args.max_len)
            continue
        groups.append(wikitext_group(args.data_dir / "wikitext2" / "test.txt", free, n, args.n_inputs))
    if args.n_imdb > 0:
        groups.append(text_group("imdb", args.data_dir / "imdb" / "test.tsv", tok, args.n_imdb, args.seed))
    if args.n_sst2 > 0:
        groups.append(text_group("sst2", args.data_dir / "sst2" / "dev.tsv", tok, args.n_sst2, args.seed))
    return groups


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every group; return the result dictionary (schema in bench/README.md)."""
    models = load_models(args)
    groups = build_groups(args)
    results = []
    for g in groups:
        results.append(time_group(models, g, args.repeats, args.warmup, args.order))
        log.info("%s: %s", g.name, ", ".join(f"{r['label']} {r['median_ms']:.1f} ms"
                                             for r in results[-1]["models"]))
    return {
        "schema": "spattenc.bench.latency/1",
        "meta": common.run_metadata(args.threads),
        "config": {"lengths": args.lengths, "n_inputs": args.n_inputs, "n_imdb": args.n_imdb, "n_sst2": args.n_sst2,
                   "repeats": args.repeats, "warmup": args.warmup, "max_len": args.max_len,
                   "spin": args.spin, "spin_idle": args.spin and args.spin_idle, "batch": 1, "order": args.order,
                   "ort_disabled": args.ort_disable,
                   "data_dir": str(args.data_dir)},
        "models": [{"label": x.spec.label, "path": str(x.spec.path), "sha256": x.sha256,
                    "sidecar": str(x.sidecar) if x.sidecar else None} for x in models],
        "groups": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.verbose)
    result = run(args)
    md = render_markdown(result)
    print(md)
    if not args.no_save:
        what = args.name or "latency" + "".join(f"-{common.parse_model_spec(s).label}" for s in args.candidate)
        j, m = common.write_results(args.out_dir, what, result, md)
        log.info("wrote %s and %s", j, m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
