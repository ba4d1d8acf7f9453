"""Export the committed multi-head latent attention fixtures (``models/mla/``).

    python models/_mla.py            # deepseek_v3_{torchscript,dynamo}.{onnx,npz}

A tiny random-weight DeepSeek-V3 (transformers 5.x): 2 dense layers (no MoE), 4 heads, LoRA-compressed Q
and KV (rank 16), a per-head key part of 8 and a shared RoPE part of 8 (head size 16) and a value head of
12, so the output projection reads 4 x 12, not 4 x 16. No KV cache (see docs/coverage.md). The exports go
through models/corpus.py's builder (checked against torch within 1e-4; the .npz holds the inputs).
TorchScript writes the key assembly as ScatterND into an empty tensor, dynamo as slice_scatter.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

OUT = Path(__file__).resolve().parent / "mla"
MLA = corpus.Family(
    "deepseek_v3", "decoder", kv=False, expect={"num_kv_heads": 4, "head_dim": 16},
    overrides=dict(hidden_size=32, intermediate_size=32, vocab_size=64, num_attention_heads=4, num_key_value_heads=4,
                   q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, head_dim=8,
                   first_k_dense_replace=2, n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
                   moe_intermediate_size=16),
)


def _strip(path: Path) -> None:
    """Drop the exporter's per-node stack traces and doc strings (most of a dynamo file's bytes)."""
    import onnx

    model = onnx.load(path)
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for v in model.graph.value_info:
        del v.metadata_props[:]
    onnx.save(model, path)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    failed = 0
    for exporter in ("torchscript", "dynamo"):
        record = corpus.export_one(MLA, exporter, False, OUT)
        print(record["name"], record["status"], record.get("max_abs_diff", record.get("reason")))
        if record["status"] == "ok":
            _strip(OUT / record["onnx"])
        failed += record["status"] != "ok"
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
