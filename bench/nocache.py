"""No-cache decoders: next-token quality at the last prompt position under prompt token pruning / K/V bits.

A decoder exported without a KV cache recomputes the whole prompt at every generation step and uses
only the last position's logits. spattenc can prune the prompt's tokens (prune-tokens; the last token
is always kept) and quantize K/V (quantize-kv) in it. This run picks the no-option default for such
models: SmolLM2-135M-Instruct exported without a cache (``python models/export.py --real
smollm2-nocache``), WikiText-2 test, many windows of ``L`` tokens; each configuration (compiled by
the ``spattenc`` CLI from the same export) predicts token ``L+1`` from the window's last position.
Reported per configuration, paired with dense on the same windows: perplexity change of that
prediction ``exp(mean(nll - nll_dense)) - 1`` with a 95% bootstrap interval over windows, top-1
agreement with dense, mean KL(dense || config) of the next-token distribution.

    python -m bench nocache --lengths 256,512 --windows 64 \\
        --configs "t0.5=--token-keep 0.5;kv4+1=--kv-bits 4+1 --no-token-pruning"
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DEFAULT_RESULTS, REPO_ROOT, run_metadata, write_results  # noqa: E402

log = logging.getLogger("bench.nocache")
MODEL = REPO_ROOT / "models" / "cache" / "nocache-smollm2" / "model.onnx"
DATA = next((d / "shared" / "data" / "wikitext2" / "test.txt" for d in REPO_ROOT.parents
             if (d / "shared" / "data" / "wikitext2" / "test.txt").is_file()), Path("test.txt"))
Q = "--no-token-pruning --kv-stats"  # K/V only; --kv-stats: the share of rows that re-read the LSB plane
CONFIGS = ("t0.75=--token-keep 0.75 --kv-bits none;t0.5=--token-keep 0.5 --kv-bits none;"
           "t0.4=--token-keep 0.4 --kv-bits none;t0.3=--token-keep 0.3 --kv-bits none;"
           f"kv8+4=--kv-bits 8+4 {Q};kv6+4=--kv-bits 6+4 {Q};kv4+4=--kv-bits 4+4 {Q};"
           f"kv5+1=--kv-bits 5+1 --kv-rule peak --lsb-threshold 0.3 {Q};"
           f"kv4+1=--kv-bits 4+1 --kv-rule peak --lsb-threshold 0.3 {Q}")


def parse_configs(text: str) -> dict[str, list[str]]:
    """``name=spattenc options;...`` -> {name: argv}; a ``;`` inside ``{}`` (a --pipeline pass's options)
    does not separate configurations."""
    out, items, depth, cur = {}, [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == ";" and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    for item in filter(None, (x.strip() for x in items)):
        name, _, opts = item.partition("=")
        out[name.strip()] = shlex.split(opts)
    return out


def compile_config(model: Path, name: str, opts: list[str], cache: Path) -> Path:
    """One configuration compiled by the CLI (cached by name and options), its ``--report`` beside it."""
    out = cache / f"{name}.onnx"
    stamp = out.with_suffix(".opts")
    if out.exists() and stamp.exists() and stamp.read_text() == " ".join(opts) and report_of(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "spatten_compiler", str(model), "-o", str(out), *opts,
           "--report", str(out.with_suffix(".report.json"))]
    log.info("compile %s: %s", name, " ".join(opts))
    subprocess.run(cmd, check=True)
    stamp.write_text(" ".join(opts))
    return out


def report_of(path: Path) -> dict:
    """The compile report written beside a compiled configuration ({} if none)."""
    rep = path.with_suffix(".report.json")
    return json.loads(rep.read_text()) if rep.is_file() else {}


def kv_bytes(report: dict, length: int, lsb_fraction: float | None) -> dict:
    """Ideal fp32 K/V bytes / the configuration's at ``length`` (the compile report's [MSB planes only,
    every row re-reading its LSBs]) and, with the measured share of rows that re-read the LSB plane,
    the ratio at that share: bytes = MSB + fraction x LSB."""
    pair = report.get("kv_byte_ratio", {}).get(str(length))
    if not pair:
        return {}
    out = {"kv_bytes_msb": pair[0], "kv_bytes_all": pair[1]}
    if lsb_fraction is not None:
        out["lsb_fraction"] = lsb_fraction
        out["kv_bytes"] = 1 / (1 / pair[0] + lsb_fraction * (1 / pair[1] - 1 / pair[0]))
    return out


def window_starts(n_tokens: int, length: int, windows: int, split: str) -> list[int]:
    """``windows`` evenly spaced windows of ``length + 1`` tokens; ``tune`` sits half a spacing later."""
    gap = (n_tokens - length - 1) // windows
    shift = gap // 2 if split == "tune" else 0
    return [w * gap + shift for w in range(windows)]


def last_logits(session, ids: np.ndarray, batch: int) -> tuple[np.ndarray, float | None]:
    """Logits [W, V] at the last position of every window, ``batch`` windows per run, and the mean
    share of attention rows that re-read the LSB plane (``spatten_lsb_fraction``; None without it)."""
    names = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    wanted = [outputs[0]] + [n for n in ("spatten_lsb_fraction",) if n in outputs]
    out, frac = [], []
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch]
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x)}
        res = session.run(wanted, {k: v for k, v in feeds.items() if k in names})
        out.append(res[0][:, -1])
        frac += [float(np.mean(res[1]))] * len(x) if len(res) > 1 else []
    return np.concatenate(out).astype(np.float64), (float(np.mean(frac)) if frac else None)


def dense_logits(model: Path, cache: Path, prompts: np.ndarray, batch: int, so, split: str) -> np.ndarray:
    """The dense model's last-position logits, cached beside the compiled configurations (keyed by the
    model file's size and time and the windows: every run on the same windows pairs with the same)."""
    import onnxruntime as ort

    st = model.stat()
    key = f"dense-{st.st_size}-{int(st.st_mtime)}-{split}-{prompts.shape[0]}x{prompts.shape[1]}-{prompts.sum()}"
    path = cache / f"{key}.npy"
    if path.is_file():
        return np.load(path).astype(np.float64)
    t0 = time.perf_counter()
    dense, _ = last_logits(ort.InferenceSession(str(model), so), prompts, batch)
    log.info("length %d dense: %.1f s", prompts.shape[1], time.perf_counter() - t0)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, dense.astype(np.float32))
    return dense.astype(np.float32).astype(np.float64)


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def compare(dense: np.ndarray, cand: np.ndarray, targets: np.ndarray, seed: int = 0) -> dict:
    """Paired next-token metrics of ``cand`` against ``dense`` ([W, V] logits) on the same windows."""
    lp_d, lp_c = log_softmax(dense), log_softmax(cand)
    rows = np.arange(len(targets))
    d = lp_d[rows, targets] - lp_c[rows, targets]  # nll_cand - nll_dense
    boot = np.random.default_rng(seed).integers(0, len(d), (2000, len(d)))
    lo, hi = np.percentile(d[boot].mean(axis=1), [2.5, 97.5])
    kl = (np.exp(lp_d) * (lp_d - lp_c)).sum(axis=1)
    return {"ppl": float(np.exp(-lp_c[rows, targets].mean())), "change": float(np.expm1(d.mean())),
            "lo": float(np.expm1(lo)), "hi": float(np.expm1(hi)),
            "top1_agree": float((dense.argmax(1) == cand.argmax(1)).mean()),
            "top1_acc": float((cand.argmax(1) == targets).mean()), "kl": float(kl.mean())}


def _fmt(row: dict, key: str, spec: str, unit: str = "") -> str:
    return "-" if row.get(key) is None else f"{row[key]:{spec}}{unit}"


def render(rows: list[dict], meta: dict, argv: list[str]) -> str:
    lines = ["# No-cache decoder: next-token quality at the last prompt position (SmolLM2-135M, WikiText-2)", "",
             f"Command: `python bench/nocache.py {' '.join(shlex.quote(a) for a in argv)}`  ",
             f"Date: {meta.get('date_utc')}, git {meta.get('git_commit')}, "
             f"onnxruntime {meta.get('onnxruntime_version', meta.get('onnxruntime'))}, "
             f"{meta.get('intra_op_threads')} threads, load avg {meta.get('load_avg_1m'):.1f} on 2 cores.",
             "Change = `exp(mean(nll - nll_dense)) - 1` of the token after each window [95% bootstrap over "
             "windows]; agree = top-1 equal to dense; KL(dense || config) in nats. K/V bytes = fp32 K/V "
             "bytes / the configuration's (compile report: MSB planes + scales only .. every row re-reading "
             "its LSBs; measured = at the share of rows that re-read the LSB plane, `--kv-stats`).", "",
             "| length | config | options | windows | ppl | vs dense | top-1 agree | top-1 acc | KL "
             "| LSB rows | K/V bytes (MSB .. all) | K/V bytes measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['length']} | {r['config']} | `{r['options']}` | {r['windows']} | {r['ppl']:.2f} | "
                     f"{r['change']:+.1%} [{r['lo']:+.1%}, {r['hi']:+.1%}] | {r['top1_agree']:.1%} | "
                     f"{r['top1_acc']:.1%} | {r['kl']:.4f} | {_fmt(r, 'lsb_fraction', '.1%')} | "
                     f"{_fmt(r, 'kv_bytes_msb', '.2f', 'x')} .. {_fmt(r, 'kv_bytes_all', '.2f', 'x')} | "
                     f"{_fmt(r, 'kv_bytes', '.2f', 'x')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--lengths", default="256,512", help="prompt lengths (tokens)")
    p.add_argument("--windows", type=int, default=64, help="windows per length")
    p.add_argument("--split", choices=("test", "tune"), default="test")
    p.add_argument("--configs", default=CONFIGS, help="name=spattenc options;... (dense is always run)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=REPO_ROOT / "models" / "cache" / "nocache-bench" / "nocache")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--name", default="nocache-smollm2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import onnxruntime as ort
    from tokenizers import Tokenizer

    if not args.model.is_file():
        print(f"nocache: no model {args.model} (python models/export.py --real smollm2-nocache)", file=sys.stderr)
        return 2
    configs = parse_configs(args.configs)
    paths = {name: compile_config(args.model, name, opts, args.cache) for name, opts in configs.items()}
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    tok = Tokenizer.from_file(str(args.model.parent / "tokenizer.json"))
    ids = np.array(tok.encode(args.data.read_text()).ids, np.int64)
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, _stop)
    try:
        for length in (int(x) for x in args.lengths.split(",")):
            starts = window_starts(len(ids), length, args.windows, args.split)
            win = np.stack([ids[s:s + length + 1] for s in starts])
            prompts, targets = win[:, :length], win[:, length]
            dense = dense_logits(args.model, args.cache, prompts, args.batch, so, args.split)
            rows.append({"length": length, "config": "dense", "options": "", "windows": len(starts),
                         **compare(dense, dense, targets)})
            for name, path in paths.items():
                t0 = time.perf_counter()
                logits, fraction = last_logits(ort.InferenceSession(str(path), so), prompts, args.batch)
                r = {**compare(dense, logits, targets), **kv_bytes(report_of(path), length, fraction)}
                log.info("length %d %s: %+.1f%% ppl, agree %.1f%% (%.1f s)", length, name, 100 * r["change"],
                         100 * r["top1_agree"], time.perf_counter() - t0)
                rows.append({"length": length, "config": name, "options": " ".join(configs[name]),
                             "windows": len(starts), **r})
                (args.out_dir / f"partial-{args.name}.json").write_text(json.dumps(rows))
    except KeyboardInterrupt:  # a run stopped by a deadline still records the rows it finished
        log.warning("stopped: recording the %d finished rows", len(rows))
        if not rows:
            return 1
    meta = run_metadata(args.threads)
    md = render(rows, meta, argv if argv is not None else sys.argv[1:])
    write_results(args.out_dir, args.name, {"meta": meta, "rows": rows, "starts_split": args.split}, md)
    (args.out_dir / f"partial-{args.name}.json").unlink(missing_ok=True)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
