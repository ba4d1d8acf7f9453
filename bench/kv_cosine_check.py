"""Quick embedding-cosine check of K/V-quantized MiniLM variants against the dense model (no probes).

Used for the scale-granularity table in bench/README.md: ``python bench/kv_cosine_check.py 24 64
a.onnx b.onnx ...`` embeds N_IMDB IMDB and N_SST2 SST-2 test texts (seed 1) with the dense model and
each candidate and prints the mean cosine per task.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.embed_eval import l2_normalize, load_split, masked_mean  # noqa: E402

log = logging.getLogger("bench.kv_cosine_check")
DENSE = Path(__file__).resolve().parent.parent / "models" / "cache" / "minilm" / "model.onnx"


def embed(path: Path, texts: list[str], tok, pad: int) -> np.ndarray:
    sess = common.make_session(path, 2)
    order = np.argsort([len(t) for t in texts])
    out = []
    for i in range(0, len(texts), 8):
        batch = common.pad_encodings(tok.encode_batch([texts[j] for j in order[i:i + 8]]), pad)
        hidden = sess.run(["last_hidden_state"], common.feeds_for(sess, batch))[0]
        out.append(l2_normalize(masked_mean(hidden, batch["attention_mask"])))
    emb = np.concatenate(out)
    result = np.empty_like(emb)
    result[order] = emb
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3:
        print("usage: python -m bench kv_cosine_check N_IMDB N_SST2 MODEL.onnx...", file=sys.stderr)
        return 2
    n_imdb, n_sst2, paths = int(argv[0]), int(argv[1]), [Path(p) for p in argv[2:]]
    tok = common.load_tokenizer(common.find_tokenizer(DENSE), 512)
    pad = common.pad_id_of(tok)
    splits = {"imdb": load_split(common.DEFAULT_DATA / "imdb/test.tsv", n_imdb, 1),
              "sst2": load_split(common.DEFAULT_DATA / "sst2/dev.tsv", n_sst2, 1)}
    dense = {k: embed(DENSE, s.texts, tok, pad) for k, s in splits.items()}
    for path in paths:
        cos = {k: float((embed(path, s.texts, tok, pad) * dense[k]).sum(-1).mean()) for k, s in splits.items()}
        log.info("%s %s", path.stem, {k: round(v, 5) for k, v in cos.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
