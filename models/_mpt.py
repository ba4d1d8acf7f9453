"""Export the committed MPT fixture with a KV cache (``models/mpt/``).

    python models/_mpt.py            # mpt_torchscript_kv.{onnx,npz}

A tiny random-weight MPT (transformers 5.x): 2 layers, 4 heads of 8, vocabulary 64, ``max_seq_len`` 64 - its
ALiBi is a fixed ``[4, 1, 64]`` table whose last ``n`` columns (``n`` = the cache length) the attention adds
to the scores, masked by ``Where(mask, finfo.min, scores + alibi)``: evict-kv's ``where+bias`` form
(docs/decoders.md). Exported through models/corpus.py's builder (checked against torch within 1e-4; the .npz
holds the inputs: 7 new tokens after a 3-token past). Only TorchScript: torch.export fails on MPT's
attention with a KV cache (``Eq(s41 + Max(0, -2*s41 - s8 + 1), 1) is inconsistent``, transformers' slice
bounds ``max(0, size - key_length)`` under symbolic shapes).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
from _mla import _strip  # noqa: E402

OUT = Path(__file__).resolve().parent / "mpt"
MPT = corpus.Family("mpt", "decoder", overrides=dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2,
                                                     vocab_size=64, max_seq_len=64))


def main() -> int:
    OUT.mkdir(exist_ok=True)
    record = corpus.export_one(MPT, "torchscript", True, OUT)
    print(record["name"], record["status"], record.get("max_abs_diff", record.get("reason")))
    if record["status"] != "ok":
        return 1
    _strip(OUT / record["onnx"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
