"""Export the committed multi-head latent attention fixtures (``models/mla/``).

    python models/_mla.py            # deepseek_v3_{torchscript,dynamo}.{onnx,npz}, deepseek_v3_torchscript_kv

A tiny random-weight DeepSeek-V3 (transformers 5.x): 2 dense layers (no MoE), 4 heads, LoRA-compressed Q
and KV (rank 16), a per-head key part of 8 and a shared RoPE part of 8 (head size 16) and a value head of
12, so the output projection reads 4 x 12, not 4 x 16. The exports go through models/corpus.py's builder
(checked against torch within 1e-4; the .npz holds the inputs). TorchScript writes the key assembly as
ScatterND into an empty tensor, dynamo as slice_scatter. ``_kv``: a decoding step with transformers 5's
cache, which holds the compressed latent (``past_key_values.i.key`` [B, 1, P, kv_lora_rank], ``.value`` the
RoPE'd k_pe [B, 1, P, 8]) concatenated before kv_b_proj - not K/V (evict-kv refuses it, see docs/coverage.md).
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


def export_latent_kv(exporter: str) -> float:
    """A decoding step (3 past + 7 new tokens) with the latent cache; returns onnxruntime's max |diff|."""
    import numpy as np
    import torch
    import transformers
    from _wrappers import KVCacheLM

    torch.manual_seed(corpus.SEED)
    model = transformers.AutoModelForCausalLM.from_config(corpus.make_config(MLA)).eval()
    rng = np.random.default_rng(corpus.SEED)
    batch, seq, past = 2, 7, 3
    feeds = {"input_ids": rng.integers(3, 64, size=(batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, past + seq), np.int64)}
    for i in range(2):
        feeds[f"past_key_values.{i}.key"] = rng.standard_normal((batch, 1, past, 16)).astype(np.float32)
        feeds[f"past_key_values.{i}.value"] = rng.standard_normal((batch, 1, past, 8)).astype(np.float32)
    inputs = list(feeds)
    outputs = ["logits", *[f"present.{i}.{t}" for i in range(2) for t in ("key", "value")]]
    wrapper = KVCacheLM(model, inputs)
    want = corpus.core.run_torch(wrapper, feeds, inputs, outputs)
    path = OUT / f"deepseek_v3_{exporter}_kv.onnx"
    corpus.core.export_onnx(wrapper, [torch.from_numpy(feeds[n]) for n in inputs], path, exporter=exporter,
                            opset=17 if exporter == "torchscript" else None, input_names=inputs,
                            output_names=outputs, dynamic_axes=corpus.core.dynamic_axes_for(inputs, outputs, True))
    got = corpus.core.run_onnx(path, feeds)
    diff = max(float(np.abs(want[k] - got[k]).max()) for k in outputs)
    if diff > corpus.ATOL:
        raise AssertionError(f"onnxruntime differs from torch by {diff:.3g}")
    np.savez(path.with_suffix(".npz"), **feeds)
    _strip(path)
    return diff


def main() -> int:
    OUT.mkdir(exist_ok=True)
    failed = 0
    for exporter in ("torchscript", "dynamo"):
        record = corpus.export_one(MLA, exporter, False, OUT)
        print(record["name"], record["status"], record.get("max_abs_diff", record.get("reason")))
        if record["status"] == "ok":
            _strip(OUT / record["onnx"])
        failed += record["status"] != "ok"
    print("deepseek_v3_torchscript_kv ok", export_latent_kv("torchscript"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
