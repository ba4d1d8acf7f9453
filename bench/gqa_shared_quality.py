"""Perplexity of the shared-buffer eviction on the model builder's int4 SmolLM2: the builder model
itself (dense cache, DecoderSession) against the same model compiled by ``evict-gqa{in_graph=false}``
and stepped by SharedCacheSession (session 20; docs/decoders.md, "Fused GroupQueryAttention and eviction").

    python bench/gqa_shared_quality.py --windows 4 --prompt 1024 --decode 64 --name s20-gqa

Each window: ``prompt`` WikiText-2 test tokens prefilled in one step, then ``decode`` teacher-forced
steps; the NLL of each decoded token under each model. Reported: perplexity per model over all decoded
tokens, and the paired mean NLL difference to dense with a bootstrap 95% interval over windows. The
compiled models are bench/gqa_evict_probe.py's (``shared-50-slack16``, ``shared-preset``; compiled
there on first use).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DEFAULT_RESULTS, run_metadata, write_results  # noqa: E402
from bench.genai_step import DATA  # noqa: E402
from bench.gqa_evict_probe import BUILDER, FUSED, compile_fused  # noqa: E402

log = logging.getLogger("bench.gqa_shared_quality")


def nll(session, window: np.ndarray, prompt: int) -> np.ndarray:
    """NLL of ``window[prompt:]`` (each token from the logits of the step before it)."""
    logits = session.step(window[None, :prompt])[0, -1]
    out = []
    for j in range(prompt, len(window)):
        z = logits.astype(np.float64) - logits.max()
        out.append(np.log(np.exp(z).sum()) - z[window[j]])
        logits = session.step(window[None, j:j + 1])[0, -1]
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default="shared-50-slack16,shared-preset")
    p.add_argument("--name", default="")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tokenizers import Tokenizer

    from spatten_compiler.decoding import DecoderSession
    from spatten_compiler.shared_cache import SharedCacheSession

    names = args.configs.split(",")
    if unknown := [n for n in names if n not in FUSED or FUSED[n][1].get("in_graph", True)]:
        print(f"error: not a shared-buffer configuration: {', '.join(unknown)}", file=sys.stderr)
        return 2
    for n in names:
        if not FUSED[n][0].exists():
            compile_fused(BUILDER / "model.onnx", *FUSED[n])
    ids = np.array(Tokenizer.from_file(str(BUILDER / "tokenizer.json")).encode(DATA.read_text()).ids, np.int64)
    size = args.prompt + args.decode
    starts = np.linspace(0, len(ids) - size, args.windows).astype(int)
    sessions = {"dense": DecoderSession(BUILDER / "model.onnx", threads=args.threads)}
    sessions |= {n: SharedCacheSession(FUSED[n][0], threads=args.threads) for n in names}
    result: dict[str, list[list[float]]] = {n: [] for n in sessions}
    for i, s in enumerate(starts):
        for name, session in sessions.items():
            session.reset(1)
            result[name].append(nll(session, ids[s:s + size], args.prompt).tolist())
        means = {n: round(float(np.mean(v[-1])), 4) for n, v in result.items()}
        log.info("window %d/%d: %s", i + 1, len(starts), means)
    rng = np.random.default_rng(0)
    dense = np.array(result["dense"])
    lines = ["# Shared-buffer eviction: perplexity on the builder's int4 SmolLM2", "",
             f"command: `{run_metadata(args.threads)['command']}`  ",
             f"{args.windows} WikiText-2 test windows: {args.prompt}-token prompt, {args.decode} teacher-forced "
             "steps.", "",
             "| model | ppl | mean NLL - dense [95% CI over windows] |", "|---|---|---|"]
    for name, rows in result.items():
        a = np.array(rows)
        diff = (a - dense).mean(axis=1)
        boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
        lines.append(f"| {name} | {np.exp(a.mean()):.3f} | {diff.mean():+.4f} "
                     f"[{np.percentile(boot, 2.5):+.4f}, {np.percentile(boot, 97.5):+.4f}] |")
    md = "\n".join(lines) + "\n"
    kind = "gqa-shared-quality" + (f"-{args.name}" if args.name else "")
    _, md_path = write_results(args.out_dir, kind, {"meta": run_metadata(args.threads), "nll": result,
                                                    "starts": starts.tolist()}, md)
    print(md)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
