"""Quality of pruned sentence-embedding models against the dense model, measured in the same run.

For each task (IMDB, SST-2) the dense model and every candidate embed the train and test texts
(MiniLM pooling: mean over the attention mask, then L2-normalise; ``kept`` pooling averages only
over tokens whose ``spatten_kept_mask`` is 1). Reported per candidate and pooling mode:

* cosine between candidate and dense test embeddings (mean, 5th percentile, minimum);
* protocol (a) drop-in: a logistic-regression probe fit on DENSE train embeddings, scored on the
  candidate's test embeddings (what a deployed classifier sees when only the encoder is swapped);
* protocol (b) refit: the probe fit on the candidate's own train embeddings, scored on its test
  embeddings (how much information the pruned embeddings still carry);
* the dense accuracy and both deltas in accuracy points.

Usage: ``python bench/embed_eval.py --dense models/cache/minilm/model.onnx --candidate pruned.onnx``.
See bench/README.md for the protocols and result files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import ModelSpec  # noqa: E402

log = logging.getLogger("bench.embed_eval")

CACHE_VERSION = 1
POOLINGS = ("mean", "kept")


@dataclass(frozen=True)
class TaskDef:
    """Where a task's files live and its default sizes (None = the whole file)."""

    train: str
    test: str
    n_train: int | None
    n_test: int | None


TASKS: dict[str, TaskDef] = {
    "imdb": TaskDef("imdb/train.tsv", "imdb/test.tsv", None, None),
    "sst2": TaskDef("sst2/train.tsv", "sst2/dev.tsv", 4000, None),
}


def task_splits(name: str, data_dir: Path, n_train: dict[str, int], n_test: dict[str, int],
                seed: int) -> tuple[Split, Split]:
    """A task's train and test splits at the sizes asked for (per task, or "*" for every task)."""
    tdef = TASKS[name]
    return (load_split(data_dir / tdef.train, n_train.get(name, n_train.get("*", tdef.n_train)), seed),
            load_split(data_dir / tdef.test, n_test.get(name, n_test.get("*", tdef.n_test)), seed))


@dataclass
class Split:
    """A (possibly subsampled) labelled text file."""

    file: Path
    texts: list[str]
    labels: np.ndarray
    indices: np.ndarray
    file_sha256: str

    def describe(self) -> dict[str, Any]:
        return {"file": str(self.file), "n": len(self.texts), "file_sha256": self.file_sha256,
                "positives": int(self.labels.sum())}

    def key(self) -> str:
        return hashlib.sha256(self.file_sha256.encode() + self.indices.tobytes()).hexdigest()


def load_split(path: Path, n: int | None, seed: int) -> Split:
    """Read ``path`` and keep a seeded subset of ``n`` rows (all rows when n is None)."""
    texts, labels = common.read_labeled_tsv(path)
    idx = common.seeded_subset(len(texts), n, seed)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Split(path, [texts[i] for i in idx], labels[idx], idx, sha)


@dataclass
class Embeddings:
    """Pooled, L2-normalised embeddings of one split by one model."""

    mean: np.ndarray
    kept: np.ndarray | None  # None when the model has no spatten_kept_mask output
    kept_fraction: float | None  # kept tokens / real tokens over the whole split
    seconds: float | None  # wall time to embed (None when loaded from the cache)
    run_seconds: float | None  # of which inside session.run

    def pooled(self, mode: str) -> np.ndarray | None:
        return self.mean if mode == "mean" else self.kept


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def masked_mean(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean of ``hidden`` [b, s, d] over s weighted by ``weights`` [b, s] (sentence-transformers style)."""
    w = weights.astype(np.float32)[..., None]
    return (hidden * w).sum(axis=1) / np.clip(w.sum(axis=1), 1e-9, None)


class Embedder:
    """Embeds splits with one ONNX model; caches results in bench/.cache keyed by content hashes."""

    def __init__(self, spec: ModelSpec, tok: Any, tok_sha: str, args: argparse.Namespace) -> None:
        self.spec = spec
        self.tok = tok
        self.tok_sha = tok_sha
        self.args = args
        self.sha256 = common.file_sha256(spec.path)
        self._sess: Any = None

    @property
    def session(self) -> Any:
        if self._sess is None:
            self._sess = common.make_session(self.spec.path, self.args.threads,
                                             custom_op_libs=self.args.custom_op_lib)
        return self._sess

    def has_kept_output(self) -> bool:
        return common.KEPT_OUTPUT in common.output_names(self.session)

    def _cache_path(self, split: Split) -> Path:
        libs = [common.file_sha256(p) for p in self.args.custom_op_lib]
        key = json.dumps([CACHE_VERSION, self.sha256, self.tok_sha, self.args.max_len,
                          self.args.batch_size, split.key(), libs])
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return common.CACHE_DIR / f"{self.sha256[:12]}-{digest}.npz"

    def embed(self, split: Split, desc: str) -> Embeddings:
        """Embeddings of ``split``, from the cache when possible."""
        path = self._cache_path(split)
        if not self.args.no_cache and path.exists():
            log.info("%s: cached embeddings %s", desc, path.name)
            with np.load(path) as z:
                kept = z["kept"] if z["kept"].size else None
                frac = float(z["kept_fraction"]) if kept is not None else None
                return Embeddings(z["mean"], kept, frac, None, None)
        emb = self._compute(split.texts, desc)
        if not self.args.no_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, mean=emb.mean, kept=emb.kept if emb.kept is not None else np.zeros(0),
                     kept_fraction=np.float64(emb.kept_fraction or 0.0))
        return emb

    def _compute(self, texts: Sequence[str], desc: str) -> Embeddings:
        from tqdm import tqdm

        t0 = time.perf_counter()
        encs = self.tok.encode_batch(list(texts))
        order = np.argsort([len(e.ids) for e in encs], kind="stable")  # length-sorted: less padding
        pad_id = common.pad_id_of(self.tok)
        has_kept = self.has_kept_output()
        wanted = [common.HIDDEN_OUTPUT] + ([common.KEPT_OUTPUT] if has_kept else [])
        n, bs = len(texts), self.args.batch_size
        mean_out: np.ndarray | None = None
        kept_out: np.ndarray | None = None
        kept_tokens = real_tokens = 0.0
        run_s = 0.0
        for start in tqdm(range(0, n, bs), desc=desc, unit="batch", leave=False):
            rows = order[start:start + bs]
            batch = common.pad_encodings([encs[i] for i in rows], pad_id)
            t1 = time.perf_counter()
            outs = self.session.run(wanted, common.feeds_for(self.session, batch))
            run_s += time.perf_counter() - t1
            hidden, mask = outs[0], batch["attention_mask"]
            if mean_out is None:
                mean_out = np.zeros((n, hidden.shape[-1]), dtype=np.float32)
                kept_out = np.zeros_like(mean_out) if has_kept else None
            mean_out[rows] = l2_normalize(masked_mean(hidden, mask))
            if has_kept and kept_out is not None:
                keep = outs[1].astype(np.float32) * mask
                empty = keep.sum(axis=1) == 0  # nothing marked kept: fall back to the attention mask
                keep[empty] = mask[empty]
                kept_out[rows] = l2_normalize(masked_mean(hidden, keep))
                kept_tokens += float(keep.sum())
                real_tokens += float(mask.sum())
        assert mean_out is not None
        secs = time.perf_counter() - t0
        log.info("%s: %d texts in %.1f s (%.0f ms per 1000)", desc, n, secs, 1e6 * secs / max(n, 1))
        frac = kept_tokens / real_tokens if has_kept and real_tokens else None
        return Embeddings(mean_out, kept_out, frac, secs, run_s)


def cosine_stats(cand: np.ndarray, dense: np.ndarray) -> dict[str, float]:
    """Row-wise cosine of two L2-normalised embedding matrices: mean, 5th percentile, minimum."""
    cos = np.sum(l2_normalize(cand) * l2_normalize(dense), axis=1).astype(np.float64)
    return {"cosine_mean": float(cos.mean()), "cosine_p5": float(np.percentile(cos, 5)),
            "cosine_min": float(cos.min())}


def fit_probe(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> Any:
    """The fixed linear probe: sklearn LogisticRegression(C, max_iter), no feature scaling."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)


def paired_ci95(correct: np.ndarray, reference: np.ndarray, resamples: int = 2000, seed: int = 0,
                scale: float = 100.0) -> list[float]:
    """95% paired-bootstrap interval of ``scale`` * (mean - reference mean); by default accuracy
    points: test items are resampled together, so the interval reflects which reviews happen to be
    in the test set (not the probe's training sample)."""
    diff = correct.astype(np.float64) - reference.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return [float(scale * np.percentile(means, 2.5)), float(scale * np.percentile(means, 97.5))]


def cross_fit(dense_x: np.ndarray, cand_x: np.ndarray, y: np.ndarray, k: int, args: argparse.Namespace) -> dict[str, Any]:
    """Both protocols cross-fitted over train+test pooled (stratified k folds, seeded): every item is
    scored once by probes that did not see it, so the deltas rest on all items, not only the test
    split (about sqrt(n_all / n_test) narrower intervals). Drop-in: probe fit on the other folds'
    DENSE embeddings, applied to the candidate; refit: probe fit on the other folds' candidate ones."""
    from sklearn.model_selection import StratifiedKFold

    ok_d, ok_a, ok_b = (np.zeros(len(y), bool) for _ in range(3))
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=args.seed).split(dense_x, y):
        probe = fit_probe(dense_x[tr], y[tr], args.C, args.max_iter)
        ok_d[te] = probe.predict(dense_x[te]) == y[te]
        ok_a[te] = probe.predict(cand_x[te]) == y[te]
        ok_b[te] = fit_probe(cand_x[tr], y[tr], args.C, args.max_iter).predict(cand_x[te]) == y[te]
    return {"folds": k, "n": len(y), "dense_acc": float(ok_d.mean()), "_correct": (ok_a, ok_b),
            "delta_dropin_pts": 100.0 * float(ok_a.mean() - ok_d.mean()),
            "delta_refit_pts": 100.0 * float(ok_b.mean() - ok_d.mean()),
            "delta_dropin_ci95": paired_ci95(ok_a, ok_d), "delta_refit_ci95": paired_ci95(ok_b, ok_d)}


def ms_per_1000(emb: Embeddings, n: int) -> float | None:
    return None if emb.seconds is None else 1e6 * emb.seconds / max(n, 1)


def timing(train: Embeddings, test: Embeddings, n_train: int, n_test: int) -> dict[str, Any]:
    """Embedding speed over train+test (None when either came from the cache)."""
    if train.seconds is None or test.seconds is None:
        return {"embed_seconds": None, "ms_per_1000": None, "run_ms_per_1000": None}
    n = n_train + n_test
    secs = train.seconds + test.seconds
    run = (train.run_seconds or 0.0) + (test.run_seconds or 0.0)
    return {"embed_seconds": secs, "ms_per_1000": 1e6 * secs / n, "run_ms_per_1000": 1e6 * run / n}


def evaluate_task(name: str, dense: Embedder, cands: Sequence[Embedder],
                  args: argparse.Namespace) -> dict[str, Any]:
    """All numbers for one task: dense reference plus one row per (candidate, pooling mode)."""
    train, test = task_splits(name, args.data_dir, args.n_train, args.n_test, args.seed)
    d_tr = dense.embed(train, f"{name} train dense")
    d_te = dense.embed(test, f"{name} test dense")
    probe = fit_probe(d_tr.mean, train.labels, args.C, args.max_iter)
    dense_ok = probe.predict(d_te.mean) == test.labels
    dense_acc = float(dense_ok.mean())
    log.info("%s: dense accuracy %.4f", name, dense_acc)
    rows: list[dict[str, Any]] = []
    for cand in cands:
        c_tr = cand.embed(train, f"{name} train {cand.spec.label}")
        c_te = cand.embed(test, f"{name} test {cand.spec.label}")
        for mode in args.pooling:
            x_tr, x_te = c_tr.pooled(mode), c_te.pooled(mode)
            if x_tr is None or x_te is None:
                log.warning("%s has no %s output: skipping pooling %r", cand.spec.label,
                            common.KEPT_OUTPUT, mode)
                continue
            ok_a = probe.predict(x_te) == test.labels
            ok_b = fit_probe(x_tr, train.labels, args.C, args.max_iter).predict(x_te) == test.labels
            acc_a, acc_b = float(ok_a.mean()), float(ok_b.mean())
            rows.append({
                "label": cand.spec.label, "path": str(cand.spec.path), "sha256": cand.sha256,
                "pooling": mode, "has_kept_mask": c_te.kept is not None,
                "kept_fraction_test": c_te.kept_fraction, **cosine_stats(x_te, d_te.mean),
                "acc_dropin": acc_a, "acc_refit": acc_b,
                "delta_dropin_pts": 100.0 * (acc_a - dense_acc), "delta_refit_pts": 100.0 * (acc_b - dense_acc),
                "delta_dropin_ci95": paired_ci95(ok_a, dense_ok), "delta_refit_ci95": paired_ci95(ok_b, dense_ok),
                **timing(c_tr, c_te, len(train.texts), len(test.texts)),
            })
            if args.cross_fit:
                rows[-1]["cross_fit"] = cross_fit(np.concatenate([d_tr.mean, d_te.mean]),
                                                  np.concatenate([x_tr, x_te]),
                                                  np.concatenate([train.labels, test.labels]), args.cross_fit, args)
    if args.versus:
        paired_versus(rows, args.versus)
    for r in rows:
        r.get("cross_fit", {}).pop("_correct", None)
    return {"task": name, "train": train.describe(), "test": test.describe(),
            "dense": {"accuracy": dense_acc, **timing(d_tr, d_te, len(train.texts), len(test.texts))},
            "candidates": rows}


def paired_versus(rows: list[dict[str, Any]], base_label: str) -> None:
    """Cross-fitted deltas of every other candidate against the candidate ``base_label`` (same
    pooling), paired per item: does A beat B, not only each the dense model."""
    for r in rows:
        base = next((b for b in rows if b["label"] == base_label and b["pooling"] == r["pooling"]), None)
        if base is None:
            raise SystemExit(f"--versus {base_label}: no such candidate (labels: {', '.join(x['label'] for x in rows)})")
        if r is base or "cross_fit" not in r:
            continue
        (a, b), (a0, b0) = r["cross_fit"]["_correct"], base["cross_fit"]["_correct"]
        r["cross_fit"]["versus"] = {
            "label": base_label,
            "delta_dropin_pts": 100.0 * float(a.mean() - a0.mean()), "delta_dropin_ci95": paired_ci95(a, a0),
            "delta_refit_pts": 100.0 * float(b.mean() - b0.mean()), "delta_refit_ci95": paired_ci95(b, b0)}


MD_HEADER = ("| task | candidate | pooling | kept % | cos mean | cos p5 | dense acc | drop-in acc (Δ pts [95% CI]) "
             "| refit acc (Δ pts [95% CI]) | ms/1000 emb |\n|---|---|---|---|---|---|---|---|---|---|")


def _delta(row: dict[str, Any], protocol: str) -> str:
    text = f"{row[f'delta_{protocol}_pts']:+.2f}"
    ci = row.get(f"delta_{protocol}_ci95")
    return text if ci is None else f"{text} [{ci[0]:+.1f}, {ci[1]:+.1f}]"


def markdown_rows(task: dict[str, Any]) -> list[str]:
    """One markdown table row per candidate/pooling (plus a dense reference row)."""
    d = task["dense"]
    lines = [f"| {task['task']} (n={task['train']['n']}/{task['test']['n']}) | dense | mean | | | | "
             f"{d['accuracy']:.4f} | | | {common.fmt(d['ms_per_1000'], '.0f')} |"]
    for r in task["candidates"]:
        kept = common.fmt(None if r["kept_fraction_test"] is None else 100 * r["kept_fraction_test"], ".1f")
        lines.append(
            f"| {task['task']} | {r['label']} | {r['pooling']} | {kept} | {r['cosine_mean']:.4f} | "
            f"{r['cosine_p5']:.4f} | {d['accuracy']:.4f} | {r['acc_dropin']:.4f} ({_delta(r, 'dropin')}) | "
            f"{r['acc_refit']:.4f} ({_delta(r, 'refit')}) | {common.fmt(r['ms_per_1000'], '.0f')} |")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    m, c = result["meta"], result["config"]
    head = [f"# embed_eval {m['date_utc']}", "", f"`{m['command']}`", "",
            f"onnxruntime {m['onnxruntime_version']}, {m['intra_op_threads']} intra-op threads, "
            f"max_len {c['max_len']}, batch {c['batch_size']}, probe LogisticRegression(C={c['C']}, "
            f"max_iter={c['max_iter']}), seed {c['seed']}, load avg {m['load_avg_1m']:.1f}, "
            f"git {str(m['git_commit'])[:10]}"
            f"{' (dirty)' if m['git_dirty'] else ''}", "", MD_HEADER]
    for task in result["tasks"]:
        head.extend(markdown_rows(task))
    cv = [(t["task"], r) for t in result["tasks"] for r in t["candidates"] if "cross_fit" in r]
    if cv:
        head += _delta_table(f"Cross-fitted over train+test ({cv[0][1]['cross_fit']['folds']} stratified folds, every "
                             "item scored once by probes that did not see it):", ["n", "dense acc"],
                             [(name, r, r["cross_fit"], [str(r["cross_fit"]["n"]), f"{r['cross_fit']['dense_acc']:.4f}"])
                              for name, r in cv])
        vs = [(name, r, r["cross_fit"]["versus"], []) for name, r in cv if "versus" in r["cross_fit"]]
        if vs:
            head += _delta_table(f"Cross-fitted, paired against candidate {vs[0][2]['label']} (same items, same "
                                 "folds; positive = better than it):", [], vs)
    return "\n".join(head) + "\n"


def _delta_table(title: str, extra: list[str], rows: list[tuple[str, dict, dict, list[str]]]) -> list[str]:
    """A markdown table of drop-in and refit deltas: one ``(task, row, deltas, extra cells)`` per line."""
    cols = ["task", "candidate", "pooling", *extra, "drop-in Δ pts [95% CI]", "refit Δ pts [95% CI]"]
    lines = ["", title, "", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for name, r, d, cells in rows:
        lines.append("| " + " | ".join([name, r["label"], r["pooling"], *cells, _delta(d, "dropin"),
                                        _delta(d, "refit")]) + " |")
    return lines


def parse_sizes(text: str) -> dict[str, int | None]:
    """``"500"`` -> every task 500; ``"imdb=200,sst2=all"`` -> per task (``all``: the whole file)."""
    sizes: dict[str, int | None] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        task, sep, value = part.rpartition("=")
        key = task if sep else "*"
        if sep and task not in TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {task!r}")
        sizes[key] = None if value == "all" else int(value)
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dense", type=Path, required=True, help="the dense reference ONNX model")
    p.add_argument("--candidate", action="append", default=[], metavar="[LABEL=]PATH",
                   help="a candidate ONNX model (repeatable)")
    p.add_argument("--task", nargs="+", choices=sorted(TASKS), default=["sst2", "imdb"])
    p.add_argument("--n-train", type=parse_sizes, default={}, metavar="N|TASK=N,...",
                   help="train rows, for all tasks or per task (default: imdb all, sst2 4000)")
    p.add_argument("--n-test", type=parse_sizes, default={}, metavar="N|TASK=N,...",
                   help="test rows, for all tasks or per task (default: all)")
    p.add_argument("--pooling", nargs="+", choices=POOLINGS, default=["mean"],
                   help="candidate pooling modes (dense always uses mean)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per session.run (length-sorted)")
    p.add_argument("-C", "--C", dest="C", type=float, default=1.0, help="probe inverse regularisation")
    p.add_argument("--max-iter", type=int, default=2000, help="probe max_iter")
    p.add_argument("--seed", type=int, default=0, help="subsampling seed")
    p.add_argument("--cross-fit", type=int, default=0, metavar="K",
                   help="also report both protocols cross-fitted over train+test in K folds (0: off)")
    p.add_argument("--versus", metavar="LABEL",
                   help="with --cross-fit: also report every candidate's deltas paired against this candidate")
    p.add_argument("--no-cache", action="store_true", help="recompute embeddings, write no cache")
    common.add_common_options(p)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate all tasks; return the result dictionary (see bench/README.md for its schema)."""
    tok_path = common.find_tokenizer(args.dense, args.tokenizer)
    tok = common.load_tokenizer(tok_path, args.max_len)
    tok_sha = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    dense = Embedder(ModelSpec("dense", args.dense), tok, tok_sha, args)
    cands = [Embedder(common.parse_model_spec(s), tok, tok_sha, args) for s in args.candidate]
    tasks = [evaluate_task(t, dense, cands, args) for t in args.task]
    return {
        "schema": "spattenc.bench.embed_eval/1",
        "meta": common.run_metadata(args.threads),
        "config": {"max_len": args.max_len, "batch_size": args.batch_size, "pooling": args.pooling,
                   "C": args.C, "max_iter": args.max_iter, "seed": args.seed, "cross_fit": args.cross_fit,
                   "data_dir": str(args.data_dir), "tokenizer": str(tok_path)},
        "dense": {"path": str(args.dense), "sha256": dense.sha256},
        "tasks": tasks,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.versus and not args.cross_fit:
        parser.error("--versus needs --cross-fit K")
    common.setup_logging(args.verbose)
    result = run(args)
    md = render_markdown(result)
    print(md)
    if not args.no_save:
        what = args.name or "embed-eval-" + "-".join(args.task) + "".join(
            f"-{common.parse_model_spec(s).label}" for s in args.candidate)
        j, m = common.write_results(args.out_dir, what, result, md)
        log.info("wrote %s and %s", j, m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
