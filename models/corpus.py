"""Export a corpus of tiny random-weight transformers (one per architecture family) with both
torch.onnx exporters, for discovery and coverage tests (issue #16). Not committed: it is generated.

    python models/corpus.py                      # every family, both exporters
    python models/corpus.py --only llama,bert    # a sample
    python models/corpus.py --exporters dynamo --resume

Writes ``models/cache/corpus/<name>.onnx`` and ``<name>.npz`` (the reference inputs) and appends
one JSON line per model to ``manifest.jsonl``: family, exporter, kind, the layer/head/KV-head/head-dim
numbers read from the Hugging Face config (what discovery must find), and for a failed export the
reason. ``name`` is ``<family>_<exporter>`` plus ``_kv`` for a decoder with a KV cache.

Families are data (:data:`FAMILIES`): a transformers ``model_type``, the kind of model, and config
overrides. Every config gets the same tiny sizes (:data:`TINY`) where it has the attribute.
Exporters ``optimum`` and ``optimum_merged`` (opt-in): Hugging Face Optimum (optimum-onnx) needs
transformers < 5, so ``models/_optimum.py`` runs under a separate venv's python (``--optimum-python``
or ``$SPATTENC_OPTIMUM_PYTHON``; skipped when neither is set). ``optimum``: the default task
(feature-extraction; seq2seq / Whisper: the export's ``encoder_model.onnx``) and, for decoders,
``text-generation`` and ``text-generation-with-past`` (``_kv``); ``optimum_merged``: the legacy merged
decoder (``decoder_model_merged.onnx``, an ``If`` on ``use_cache_branch``). See docs/coverage.md.
Exporter ``tf2onnx`` (opt-in): the families transformers 4.x has a TensorFlow class for, converted with
tf2onnx by ``models/_tf2onnx.py`` under a TensorFlow venv's python (``--tf-python`` or
``$SPATTENC_TF_PYTHON``; skipped when neither is set). See docs/coverage.md, "The tf2onnx corpus".

Exporters ``dynamo_opt`` and ``dynamo_op23`` (opt-in): ``torch.onnx.export``'s defaults (dynamo,
``optimize=True``: onnxscript's constant folding and rewrite rules), the latter at opset 23 where the
optimizer also fuses ONNX ``RMSNormalization``, ``RotaryEmbedding`` and GQA ``Attention``
(:data:`_export_core.EXPORTERS`). ``dynamo`` stays the raw graph (``optimize=False``). Every corpus model
uses eager attention except ``dynamo_op23_sdpa`` (transformers' default SDPA: the ONNX Attention op).

Exporters ``builder`` and ``builder_int4`` (when onnxruntime-genai is installed; skipped otherwise):
the decoder families onnxruntime-genai's model builder supports (:data:`BUILDER_FAMILIES`) are saved
with ``save_pretrained`` (and a tiny tokenizer) into a temporary folder and built with
``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu`` (``models/_genai.py``): KV cache,
com.microsoft GroupQueryAttention, RotaryEmbedding, MatMulNBits. fp32 builds are verified against
torch on a prompt without past (int4 records its difference); the reference inputs are one sequence
of 7 tokens after a random 3-token past, with the ``position_ids`` the decomposed model reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _export_core as core  # noqa: E402
import _genai  # noqa: E402
from _wrappers import KVCacheLM, Logits, _NamedInputs  # noqa: E402

log = logging.getLogger("spattenc.corpus")
OUT = Path(__file__).resolve().parent / "cache" / "corpus"
ATOL = 1e-4
SEED = 0

# Applied where the config has the attribute (attribute_map aliases such as n_embd included).
TINY: dict[str, Any] = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
    "vocab_size": 256, "max_position_embeddings": 128, "initializer_range": 0.1, "head_dim": 16, "rotary_dim": 8,
    "num_key_value_heads": 2, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "attention_dropout": 0.0, "dropout": 0.0, "embed_dim": 64, "ffn_dim": 128,
    "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_heads": 4,
    "num_layers": 2, "image_size": 32, "patch_size": 8, "num_channels": 3, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1, "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Family:
    model_type: str
    kind: str  # encoder | decoder | seq2seq-encoder | vision | audio-encoder | audio-wave
    overrides: dict[str, Any] = field(default_factory=dict)
    kv: bool = True  # decoders: also export with a KV cache
    heads_attr: str = "num_attention_heads"
    layers_attr: str = "num_hidden_layers"
    # expected_dims entries the config cannot tell; ``site_head_dims``: every site's head size, where they differ
    expect: dict[str, Any] = field(default_factory=dict)


def _fam(model_type: str, kind: str, kv: bool = True, expect: dict[str, Any] | None = None,
         **overrides: Any) -> Family:
    return Family(model_type, kind, overrides, kv, expect=expect or {})


# MoE families: transformers 5's default experts implementation uses aten::histc (no ONNX export);
# batched_mm exports with both exporters.
_MOE = {"_experts_implementation": "batched_mm"}
# wav2vec2-style raw-waveform encoders: a 2-layer conv feature extractor (stride 10) instead of 7 layers.
_WAVE = dict(conv_dim=(64, 64), conv_kernel=(10, 3), conv_stride=(5, 2), num_feat_extract_layers=2,
             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_prob=0.0)


FAMILIES: list[Family] = [
    *[_fam(t, "encoder") for t in ("bert", "roberta", "electra", "distilbert", "xlm-roberta", "ernie",
                                  "megatron-bert", "data2vec-text", "mpnet", "roformer", "esm")],
    _fam("albert", "encoder", embedding_size=32),
    _fam("deberta", "encoder", relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=16),
    _fam("deberta-v2", "encoder", relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=8),
    _fam("modernbert", "encoder", global_attn_every_n_layers=1, local_attention=16),
    _fam("big_bird", "encoder", attention_type="original_full"),
    *[_fam(t, "encoder") for t in ("camembert", "ibert", "bert-generation", "splinter", "layoutlm", "markuplm",
                                  "roc_bert", "xlm-roberta-xl", "roberta-prelayernorm", "nomic_bert", "eurobert")],
    _fam("xlm", "encoder", emb_dim=64, n_heads=4, n_layers=2),
    _fam("flaubert", "encoder", emb_dim=64, n_heads=4, n_layers=2),
    _fam("rembert", "encoder", input_embedding_size=32, output_embedding_size=32),
    _fam("luke", "encoder", entity_vocab_size=16, entity_emb_size=32),
    # two attentions per layer: text (head size 24) and layout (96 / 4 / 4 = 6), each softmax over its own
    # stream's scores plus the other's; the last layer's layout attention is dead code (its output unused)
    _fam("lilt", "encoder", hidden_size=96, channel_shrink_ratio=4,
         expect={"head_dim": 24, "hidden_size": 96, "num_layers": 3, "site_head_dims": [6, 24, 24]}),
    _fam("xmod", "encoder", languages=["en_XX"], default_language="en_XX"),
    _fam("mobilebert", "encoder", embedding_size=32, intra_bottleneck_size=64, true_hidden_size=64,
         num_feedforward_networks=1),
    _fam("convbert", "encoder", embedding_size=32, head_ratio=2, conv_kernel_size=3,
         expect={"num_heads": 2, "num_kv_heads": 2}),  # head_ratio 2: half the heads attend, head size 16
    _fam("squeezebert", "encoder", embedding_size=64, q_groups=4, k_groups=4, v_groups=4),
    _fam("xlnet", "encoder", d_head=16, d_inner=128, n_head=4, n_layer=2, mem_len=None),  # torchscript only
    # dynamo only (torchscript: onnxruntime FusedMatMul fails); 5 layers: 2 deep ones plus the 1-layer
    # initial (local: 2 chunks of 4 at 7 chars) and final character encoders
    _fam("canine", "encoder", downsampling_rate=2, local_transformer_stride=4, num_hash_buckets=64,
         num_hash_functions=2, max_position_embeddings=256, expect={"num_layers": 5}),
    *[_fam(t, "decoder") for t in ("gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "bloom", "codegen",
                                  "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2",
                                  "stablelm", "starcoder2", "granite", "xglm", "biogpt", "smollm3",
                                  "helium", "glm", "cohere", "phi3")],
    _fam("gpt_bigcode", "decoder", multi_query=True),
    _fam("falcon", "decoder", new_decoder_architecture=False, multi_query=True, alibi=False),
    _fam("phi", "decoder", partial_rotary_factor=0.5),
    _fam("persimmon", "decoder", partial_rotary_factor=0.5),
    _fam("gemma3_text", "decoder", sliding_window=64),
    _fam("mixtral", "decoder", num_local_experts=2, num_experts_per_tok=1),
    _fam("mpt", "decoder", d_model=64, n_heads=4, n_layers=2, expansion_ratio=2),
    *[_fam(t, "decoder") for t in ("arcee", "seed_oss", "ministral", "hunyuan_v1_dense", "olmo3", "exaone4",
                                  "nemotron", "bitnet", "modernbert-decoder", "jetmoe")],
    # dynamo only (torchscript: 'All tensors must have the same rank' / aten::expm1 / onnxruntime Reshape)
    *[_fam(t, "decoder") for t in ("glm4", "ernie4_5", "apertus", "cohere2")],
    _fam("ctrl", "decoder", n_embd=64, n_head=4, n_layer=2, dff=128),
    _fam("qwen2_moe", "decoder", num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
         shared_expert_intermediate_size=32, **_MOE),
    _fam("qwen3_moe", "decoder", num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, **_MOE),
    _fam("olmoe", "decoder", num_experts=2, num_experts_per_tok=1, **_MOE),
    _fam("granitemoe", "decoder", num_local_experts=2, num_experts_per_tok=1, **_MOE),
    _fam("phimoe", "decoder", num_local_experts=2, num_experts_per_tok=1, **_MOE),
    _fam("gpt_oss", "decoder", num_local_experts=2, num_experts_per_tok=1, experts_per_token=1, sliding_window=4,
         **_MOE),
    # MLA: no KV-cache export (transformers 5 caches the latent [B, 1, S, kv_lora_rank] and k_pe, not the wrapper's
    # flat [B, H_kv, P, Dh]); head_dim is the rope part
    _fam("deepseek_v3", "decoder", kv=False, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
         qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1,
         moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4,
         head_dim=8, expect={"num_kv_heads": 4, "head_dim": 16}, **_MOE),
    *[_fam(t, "seq2seq-encoder") for t in ("t5", "bart", "pegasus", "marian", "m2m_100", "mt5", "mbart", "plbart",
                                          "blenderbot")],
    _fam("whisper", "audio-encoder", num_mel_bins=16, max_source_positions=16),
    *[_fam(t, "vision") for t in ("vit", "deit", "dinov2", "beit", "clip_vision_model", "siglip_vision_model",
                                 "yolos", "data2vec-vision", "vit_msn", "ijepa", "dinov3_vit")],
    _fam("swin", "vision", embed_dim=64, depths=[2], num_heads=[4], num_layers=1, window_size=2, patch_size=4,
         expect={"num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_dim": 16}),
    _fam("segformer", "vision", image_size=32, num_encoder_blocks=1, depths=[2], sr_ratios=[2], hidden_sizes=[64],
         num_attention_heads=[4], patch_sizes=[7], strides=[4], mlp_ratios=[2],
         expect={"num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_dim": 16, "hidden_size": 64}),
    *[_fam(t, "audio-wave", **_WAVE, **({"num_buckets": 32, "max_bucket_distance": 64} if t == "wavlm" else {}))
      for t in ("wav2vec2", "hubert", "wavlm", "data2vec-audio")],
]
FAMILIES_BY_TYPE = {f.model_type: f for f in FAMILIES}
# Decoder families whose architecture onnxruntime-genai's model builder lists (builder.py).
BUILDER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "phi", "gemma", "gemma2", "gemma3_text",
                    "olmo", "granite", "smollm3")
BUILDERS = {"builder": "fp32", "builder_int4": "int4"}
# Run by models/_optimum.py under the optimum venv's python (optimum-onnx needs transformers < 5).
OPTIMUM_EXPORTERS = ("optimum", "optimum_merged")
# Run by models/_tf2onnx.py under the TensorFlow venv's python (transformers 4.x TF classes, tf2onnx).
TF_EXPORTERS = ("tf2onnx",)


def make_config(fam: Family, attn_implementation: str = "eager") -> Any:
    config = transformers.AutoConfig.for_model(fam.model_type)
    for key, value in {**TINY, **fam.overrides}.items():
        if hasattr(config, key) or key in fam.overrides:
            try:
                setattr(config, key, value)
            except (AttributeError, NotImplementedError):  # a derived property (Falcon's head_dim); XLNet's
                pass                                          # max_position_embeddings, Funnel's layer count
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer types of the default depth
        config.layer_types = (config.layer_types * 2)[:config.num_hidden_layers]
    if (getattr(config, "num_key_value_heads", None) and fam.model_type not in ("falcon", "gpt_bigcode")
            and "num_key_value_heads" not in fam.overrides):
        config.num_key_value_heads = 2
    config._attn_implementation = attn_implementation
    return config


def expected_dims(config: Any, fam: Family) -> dict[str, int]:
    """What discovery must report, from the config alone (or the family's ``expect``)."""
    if fam.expect and fam.kind == "vision":  # per-stage lists (Swin, SegFormer): all from expect
        return {"num_layers": 0, "num_heads": 0, "num_kv_heads": 0, "head_dim": 0, "hidden_size": 64, **fam.expect}
    return {**_expected_dims(config, fam), **fam.expect}


def _expected_dims(config: Any, fam: Family) -> dict[str, int]:
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), None)  # noqa: E731
    heads = int(get("encoder_attention_heads", "num_attention_heads", "num_heads", "n_heads")
                if fam.kind in ("seq2seq-encoder", "audio-encoder")
                else get("num_attention_heads", "num_heads", "n_heads"))
    layers = int(get("encoder_layers", "num_layers", "num_hidden_layers")
                 if fam.kind in ("seq2seq-encoder", "audio-encoder") else get("num_hidden_layers", "n_layers"))
    hidden = int(get("hidden_size", "d_model", "n_embd"))
    kv = get("num_key_value_heads") or heads
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv = 1
    head_dim = get("head_dim", "d_kv") or hidden // heads
    return {"num_layers": layers, "num_heads": heads, "num_kv_heads": int(kv), "head_dim": int(head_dim),
            "hidden_size": hidden}


class Encoder(_NamedInputs):
    """Any module returning ``last_hidden_state`` (an encoder, or a seq2seq model's encoder)."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(**self._kwargs(inputs)).last_hidden_state,)


def build(fam: Family, kv: bool, attn_implementation: str = "eager") -> tuple[
        torch.nn.Module, Any, list[str], list[str], dict[str, np.ndarray]]:
    torch.manual_seed(SEED)
    config = make_config(fam, attn_implementation)
    rng = np.random.default_rng(SEED)
    dims = expected_dims(config, fam)
    batch, seq = 2, 7
    ids = rng.integers(3, min(int(getattr(config, "vocab_size", 256) or 256), 256), size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if fam.kind == "vision":
        model = transformers.AutoModel.from_config(config)
        size = int(config.image_size)
        feeds = {"pixel_values": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
        return Encoder(model.eval(), ["pixel_values"]), config, ["pixel_values"], ["last_hidden_state"], feeds
    if fam.kind == "audio-encoder":
        model = transformers.AutoModel.from_config(config).get_encoder()
        frames = 2 * int(config.max_source_positions)
        feeds = {"input_features": rng.standard_normal((batch, config.num_mel_bins, frames)).astype(np.float32)}
        return Encoder(model.eval(), ["input_features"]), config, ["input_features"], ["last_hidden_state"], feeds
    if fam.kind == "audio-wave":  # raw waveform (wav2vec2, HuBERT, WavLM, data2vec-audio): 400 samples -> 39 frames
        model = transformers.AutoModel.from_config(config)
        feeds = {"input_values": rng.standard_normal((batch, 400)).astype(np.float32)}
        return Encoder(model.eval(), ["input_values"]), config, ["input_values"], ["last_hidden_state"], feeds
    mask[-1, -2:] = 0
    if fam.kind in ("encoder", "seq2seq-encoder"):
        model = transformers.AutoModel.from_config(config)
        model = model.get_encoder() if fam.kind == "seq2seq-encoder" else model
        feeds = {"input_ids": ids, "attention_mask": mask}
        return Encoder(model.eval(), list(feeds)), config, list(feeds), ["last_hidden_state"], feeds
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if not kv:
        feeds = {"input_ids": ids, "attention_mask": mask}
        return Logits(model, list(feeds)), config, list(feeds), ["logits"], feeds
    past = 3
    full = np.ones((batch, past + seq), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": full}
    shape = (batch, dims["num_kv_heads"], past, dims["head_dim"])
    for i in range(dims["num_layers"]):
        for t in ("key", "value"):
            feeds[f"past_key_values.{i}.{t}"] = rng.standard_normal(shape).astype(np.float32)
    outs = ["logits", *[f"present.{i}.{t}" for i in range(dims["num_layers"]) for t in ("key", "value")]]
    return KVCacheLM(model, list(feeds)), config, list(feeds), outs, feeds


def _batch_one(path: Path) -> bool:
    """Whether the reference inputs must have batch 1: onnxruntime's ONNX ``RotaryEmbedding`` kernel
    (opset 23) wants cos/sin caches of x's batch, and onnxscript's fusion (``dynamo_op23``) gives
    them batch 1 (the ONNX function broadcasts them; onnxruntime fails at batch 2)."""
    return bool(core.inspect_graph(path).op_counts.get("RotaryEmbedding"))


def export_one(fam: Family, exporter: str, kv: bool, out: Path) -> dict[str, Any]:
    name = f"{fam.model_type.replace('-', '_')}_{exporter}{'_kv' if kv else ''}"
    record: dict[str, Any] = {"name": name, "family": fam.model_type, "exporter": exporter, "kind": fam.kind,
                              "kv_cache": kv, "onnx": f"{name}.onnx"}
    path = out / f"{name}.onnx"
    t0 = time.perf_counter()
    try:
        attn = core.EXPORTERS[exporter].attn_implementation or "eager"
        wrapper, config, inputs, outputs, feeds = build(fam, kv, attn)
        record.update(expected_dims(config, fam))
        expected = core.run_torch(wrapper, feeds, inputs, outputs)
        axes = core.dynamic_axes_for(inputs, outputs, kv)
        for name_ in inputs:
            if name_ in ("pixel_values", "input_features", "input_values"):
                axes[name_] = {0: "batch"}
        core.export_onnx(wrapper, [torch.from_numpy(feeds[n]) for n in inputs], path, exporter=exporter,
                         opset=17 if exporter == "torchscript" else None, input_names=inputs,
                         output_names=outputs, dynamic_axes=axes)
        if _batch_one(path):
            record["batch"] = 1
            feeds = {n: v[:1] for n, v in feeds.items()}
            expected = core.run_torch(wrapper, feeds, inputs, outputs)
        got = core.run_onnx(path, feeds)
        diff = max(float(np.abs(expected[k].astype(np.float64) - got[k]).max()) for k in outputs if expected[k].size)
        record["max_abs_diff"] = diff
        if not np.isfinite(diff) or diff > ATOL:
            raise AssertionError(f"onnxruntime differs from torch by {diff:.3g}")
        np.savez(out / f"{name}.npz", **feeds)
        record["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is recorded with its reason
        core.record_failure(record, path, e)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def export_builder(fam: Family, exporter: str, out: Path) -> dict[str, Any]:
    """One family through onnxruntime-genai's model builder (``exporter`` in :data:`BUILDERS`)."""
    import tempfile

    import onnx

    name = f"{fam.model_type.replace('-', '_')}_{exporter}_kv"
    record: dict[str, Any] = {"name": name, "family": fam.model_type, "exporter": exporter, "kind": fam.kind,
                              "kv_cache": True, "onnx": f"{name}.onnx"}
    path = out / f"{name}.onnx"
    t0 = time.perf_counter()
    try:
        torch.manual_seed(SEED)
        config = make_config(fam)
        if isinstance(getattr(config, "layer_types", None), list):  # save_pretrained validates its length
            config.layer_types = config.layer_types[:config.num_hidden_layers]
        record.update(expected_dims(config, fam))
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        rng = np.random.default_rng(SEED)
        with tempfile.TemporaryDirectory(prefix="corpus-builder-") as tmp:
            hf, built = Path(tmp) / "hf", Path(tmp) / "onnx"
            model.save_pretrained(hf)
            _genai.save_tiny_tokenizer(hf, int(config.vocab_size))
            _genai.build(hf, built, BUILDERS[exporter], timeout=600)
            proto = onnx.load(str(built / "model.onnx"))  # tiny: weights inline, one file per model
        onnx.save(proto, str(path))
        past, seq, dims = 3, 7, record
        ids = rng.integers(3, 256, size=(1, seq), dtype=np.int64)
        empty = {f"past_key_values.{i}.{t}": np.zeros((1, dims["num_kv_heads"], 0, dims["head_dim"]), np.float32)
                 for i in range(dims["num_layers"]) for t in ("key", "value")}
        got = core.run_onnx(path, {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty})
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        record["max_abs_diff"] = diff = float(np.abs(want - got["logits"]).max())
        if BUILDERS[exporter] == "fp32" and (not np.isfinite(diff) or diff > ATOL):
            raise AssertionError(f"onnxruntime differs from torch by {diff:.3g}")
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, past + seq), np.int64),
                 "position_ids": np.arange(past, past + seq, dtype=np.int64)[None]}
        for i in range(dims["num_layers"]):
            for t in ("key", "value"):
                feeds[f"past_key_values.{i}.{t}"] = rng.standard_normal(
                    (1, dims["num_kv_heads"], past, dims["head_dim"])).astype(np.float32)
        np.savez(out / f"{name}.npz", **feeds)
        record["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is recorded with its reason
        core.record_failure(record, path, e)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def read_manifest(out: Path = OUT) -> list[dict[str, Any]]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    latest: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            latest[rec["name"]] = rec
    return list(latest.values())


def append_record(manifest: Any, rec: dict[str, Any]) -> None:
    """Log one export's record and append it to the open manifest (flushed: a crash keeps what was done)."""
    log.info("%-32s %-6s %5.1fs %s", rec["name"], rec["status"], rec["seconds"], rec.get("reason", ""))
    manifest.write(json.dumps(rec) + "\n")
    manifest.flush()


def run_optimum(python: str | None, exporters: list[str], out: Path, only: str | None, resume: bool) -> int:
    """Delegate the Optimum exporters to ``models/_optimum.py`` under ``python`` (the optimum venv's);
    it appends its records to the same manifest. Skipped (logged) when no python is configured."""
    if not python:
        log.info("%-32s skipped: optimum venv not configured (--optimum-python or SPATTENC_OPTIMUM_PYTHON)",
                 ",".join(exporters))
        return 0
    cmd = [python, str(Path(__file__).resolve().parent / "_optimum.py"), "--exporters", ",".join(exporters),
           "--out", str(out), *(["--only", only] if only else []), *(["--resume"] if resume else [])]
    log.info("%s", " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode


def run_tf2onnx(python: str | None, out: Path, only: str | None, resume: bool) -> int:
    """Delegate the tf2onnx exporter to ``models/_tf2onnx.py`` under ``python`` (the TensorFlow venv's);
    it appends its records to the same manifest (families it has no TF class for are left out).
    Skipped (logged) when no python is configured."""
    if not python:
        log.info("%-32s skipped: TensorFlow venv not configured (--tf-python or SPATTENC_TF_PYTHON)", "tf2onnx")
        return 0
    script = Path(__file__).resolve().parent / "_tf2onnx.py"
    if only:  # the families of --only that have a TF class
        listed = subprocess.run([python, str(script), "--list"], check=False, capture_output=True, text=True)
        kept = ",".join(t for t in only.split(",") if t in listed.stdout.split())
        if not kept:
            log.info("%-32s skipped: no TF class for %s", "tf2onnx", only)
            return 0
        only = kept
    cmd = [python, str(script), "--out", str(out), *(["--only", only] if only else []),
           *(["--resume"] if resume else [])]
    log.info("%s", " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated model_types (default: all)")
    p.add_argument("--exporters", default="torchscript,dynamo,builder,builder_int4",
                   help="torchscript, dynamo, builder, builder_int4 (the last two: onnxruntime-genai, if installed); "
                        "opt-in: dynamo_opt, dynamo_op23, dynamo_op23_sdpa (torch's default optimize=True; "
                        "at opset 23; and with SDPA attention), "
                        "optimum, optimum_merged (need --optimum-python), tf2onnx (needs --tf-python)")
    p.add_argument("--optimum-python", default=os.environ.get("SPATTENC_OPTIMUM_PYTHON"),
                   help="python of a venv with optimum-onnx (default: $SPATTENC_OPTIMUM_PYTHON; "
                        "without it the optimum exporters are skipped)")
    p.add_argument("--tf-python", default=os.environ.get("SPATTENC_TF_PYTHON"),
                   help="python of a venv with TensorFlow, transformers 4.x and tf2onnx (default: "
                        "$SPATTENC_TF_PYTHON; without it the tf2onnx exporter is skipped)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--resume", action="store_true", help="skip models already in the manifest")
    args = p.parse_args(argv)
    exporters = args.exporters.split(",")
    unknown = set(exporters) - {*core.EXPORTERS, *BUILDERS, *OPTIMUM_EXPORTERS, *TF_EXPORTERS}
    if unknown:
        p.error(f"unknown exporter(s) {', '.join(sorted(unknown))}; known: "
                f"{', '.join([*core.EXPORTERS, *BUILDERS, *OPTIMUM_EXPORTERS, *TF_EXPORTERS])}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    core.set_offline()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    done = {r["name"] for r in read_manifest(args.out)} if args.resume else set()
    fams = [FAMILIES_BY_TYPE[t] for t in args.only.split(",")] if args.only else FAMILIES
    optimum = [e for e in exporters if e in OPTIMUM_EXPORTERS]
    delegated = (*OPTIMUM_EXPORTERS, *TF_EXPORTERS)
    with (args.out / "manifest.jsonl").open("a") as manifest:
        for fam in fams:
            for exporter in (e for e in exporters if e not in delegated):
                if exporter in BUILDERS:
                    name = f"{fam.model_type.replace('-', '_')}_{exporter}_kv"
                    if fam.model_type not in BUILDER_FAMILIES or name in done:
                        continue
                    if not _genai.available():
                        log.info("%-32s skipped: onnxruntime-genai is not installed", name)
                        continue
                    rec = export_builder(fam, exporter, args.out)
                    append_record(manifest, rec)
                    continue
                for kv in ((False, True) if fam.kind == "decoder" and fam.kv else (False,)):
                    name = f"{fam.model_type.replace('-', '_')}_{exporter}{'_kv' if kv else ''}"
                    if name in done:
                        continue
                    rec = export_one(fam, exporter, kv, args.out)
                    append_record(manifest, rec)
    rc = run_optimum(args.optimum_python, optimum, args.out, args.only, args.resume) if optimum else 0
    if any(e in TF_EXPORTERS for e in exporters):
        rc = run_tf2onnx(args.tf_python, args.out, args.only, args.resume) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
