"""Calibration inputs for ``spattenc --head-calibration``: WikiText-2 windows as an ``.npz``.

Windows of exactly ``--length`` tokens ([CLS] ... [SEP]) from WikiText-2 test, starting after the
first ``--skip`` windows of that length, so that they do not overlap latency.py's WikiText-2 inputs
(which are the first windows of the file). Neither IMDB nor SST-2 is touched: the head set is
chosen on text unrelated to the evaluation tasks.

    python bench/head_calibration.py --out bench/out/heads/calib-wt2-64x256.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.latency import wikitext_group  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/cache/minilm/model.onnx"), help="finds tokenizer.json")
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--skip", type=int, default=200, help="windows skipped at the start of the file")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    tok = common.load_tokenizer(common.find_tokenizer(args.model), None)
    group = wikitext_group(args.data_dir / "wikitext2" / "test.txt", tok, args.length, args.skip + args.count)
    ids = np.array(group.ids[args.skip:], dtype=np.int64)
    if len(ids) < args.count:
        print(f"error: only {len(ids)} calibration windows after skipping {args.skip}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.npz")
    np.savez(tmp, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    tmp.rename(args.out)
    print(f"{args.out}: {len(ids)} windows of {args.length} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
