"""The committed fixture models, declared as data.

Each :class:`FixtureSpec` names a tiny random-weight Hugging Face architecture (config class and
keyword arguments, model class), the wrapper that flattens its I/O, the exporter and opset.
``_build.build_fixture`` turns a spec into ``<name>.onnx`` + ``<name>.json`` and checks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


def past_names(num_layers: int) -> list[str]:
    """Flat past key/value input names, layer-major: ``past_key_values.{i}.key``, ``.value``."""
    return [f"past_key_values.{i}.{t}" for i in range(num_layers) for t in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Flat present key/value output names, layer-major: ``present.{i}.key``, ``.value``."""
    return [f"present.{i}.{t}" for i in range(num_layers) for t in ("key", "value")]


# initializer_range 0.2 (HF default 0.02): with the default, a 64-wide model's attention is
# uniform to 3 digits (max prob 0.065 over 16 keys), so token importance would be noise;
# with 0.2 the mean max prob is 0.3-0.5, like a trained model.
INIT_RANGE = 0.2
_TINY = {"vocab_size": 512, "max_position_embeddings": 128, "initializer_range": INIT_RANGE}
BERT = {
    **_TINY,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
DISTILBERT = {
    **_TINY,
    "dim": 64,
    "n_layers": 4,
    "n_heads": 4,
    "hidden_dim": 128,
    "dropout": 0.0,
    "attention_dropout": 0.0,
}
GPT2 = {
    "initializer_range": INIT_RANGE,
    "vocab_size": 512,
    "n_positions": 128,
    "n_embd": 64,
    "n_layer": 4,
    "n_head": 4,
    "n_inner": 128,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
LLAMA = {
    **_TINY,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
}


@dataclass(frozen=True)
class FixtureSpec:
    """Everything needed to build, export and describe one fixture model."""

    name: str
    architecture: str  # bert | distilbert | gpt2 | llama
    config_cls: str  # transformers config class name
    config_kwargs: Mapping[str, Any]
    model_cls: str  # transformers model class name (also the sidecar's hf_class)
    wrapper: str  # key of _wrappers.WRAPPERS
    kind: str  # encoder | decoder
    mask: str  # padding | where | causal+padding (no transformers-5 export produces 'where')
    inputs: tuple[str, ...]  # without the past_key_values.* inputs (added when kv_cache)
    outputs: tuple[str, ...]  # without the present.* outputs (added when kv_cache)
    purpose: str
    exporter: str = "torchscript"
    opset: int | None = 17  # None = the dynamo exporter's default
    attn_implementation: str = "eager"
    kv_cache: bool = False
    rope: bool = False
    extra_softmax: int = 0
    fused_attention: str | None = None
    padding: str = "right"  # where the last reference sample is padded: right | left
    dim_max: Mapping[str, int] = field(default_factory=dict)


_FAMILIES: dict[str, FixtureSpec] = {
    "bert": FixtureSpec(
        "bert",
        "bert",
        "BertConfig",
        BERT,
        "BertModel",
        "hidden_state",
        "encoder",
        "padding",
        ("input_ids", "attention_mask", "token_type_ids"),
        ("last_hidden_state",),
        "Classic BERT encoder: MatMul -> Div -> Add(mask) -> Softmax -> MatMul.",
    ),
    "distilbert": FixtureSpec(
        "distilbert",
        "distilbert",
        "DistilBertConfig",
        DISTILBERT,
        "DistilBertModel",
        "hidden_state",
        "encoder",
        "padding",
        ("input_ids", "attention_mask"),
        ("last_hidden_state",),
        "DistilBERT: separate q/k/v Linear, no token types. transformers 5 gives it BERT's additive "
        "Where(bool, 0, min) mask; the older Where-on-scores masking is gone, so mask is 'padding'.",
    ),
    "gpt2": FixtureSpec(
        "gpt2",
        "gpt2",
        "GPT2Config",
        GPT2,
        "GPT2LMHeadModel",
        "logits",
        "decoder",
        "causal+padding",
        ("input_ids", "attention_mask"),
        ("logits",),
        "GPT-2 without cache: packed QKV (Gemm/Split), causal + padding mask.",
    ),
    "gpt2_kv": FixtureSpec(
        "gpt2_kv",
        "gpt2",
        "GPT2Config",
        GPT2,
        "GPT2LMHeadModel",
        "kv_cache",
        "decoder",
        "causal+padding",
        ("input_ids", "attention_mask"),
        ("logits",),
        "GPT-2 decoding step with past/present key-value tensors (Concat on the seq axis).",
        kv_cache=True,
        padding="left",
    ),
    "llama": FixtureSpec(
        "llama",
        "llama",
        "LlamaConfig",
        LLAMA,
        "LlamaForCausalLM",
        "kv_cache",
        "decoder",
        "causal+padding",
        ("input_ids", "attention_mask", "position_ids"),
        ("logits",),
        "Llama: RoPE, grouped-query attention (4 query / 2 KV heads), KV cache.",
        kv_cache=True,
        rope=True,
        padding="left",
    ),
    "bert_cls": FixtureSpec(
        "bert_cls",
        "bert",
        "BertConfig",
        {**BERT, "num_labels": 3},
        "BertForSequenceClassification",
        "probs",
        "encoder",
        "padding",
        ("input_ids", "attention_mask", "token_type_ids"),
        ("probs",),
        "Classifier with probs = Softmax(logits): a non-attention Softmax (false positives).",
        extra_softmax=1,
    ),
}


def _spec(name: str, family: str, exporter: str, **overrides: Any) -> FixtureSpec:
    """A family's spec specialised for one exporter (opset 17 TorchScript, default dynamo)."""
    opset = 17 if exporter == "torchscript" else None
    return replace(_FAMILIES[family], name=name, exporter=exporter, **{"opset": opset, **overrides})


_OP23 = {"opset": 23, "attn_implementation": "sdpa", "fused_attention": "Attention"}
# 2 layers, vocab 128, intermediate 32: a fixture of torch's default opset-23 export under 400 KB
_LLAMA_SMALL = {**LLAMA, "num_hidden_layers": 2, "vocab_size": 128, "intermediate_size": 32}

FIXTURES: list[FixtureSpec] = [
    _spec("bert_torchscript", "bert", "torchscript"),
    _spec("bert_dynamo", "bert", "dynamo"),
    _spec("distilbert_torchscript", "distilbert", "torchscript"),
    _spec("distilbert_dynamo", "distilbert", "dynamo"),
    _spec("gpt2_torchscript", "gpt2", "torchscript"),
    _spec("gpt2_dynamo", "gpt2", "dynamo"),
    _spec("gpt2_kv_torchscript", "gpt2_kv", "torchscript"),
    _spec("gpt2_kv_dynamo", "gpt2_kv", "dynamo"),
    _spec("llama_torchscript", "llama", "torchscript"),
    _spec("llama_dynamo", "llama", "dynamo"),
    _spec("bert_cls_softmax_torchscript", "bert_cls", "torchscript"),
    _spec(
        "bert_attention_op23",
        "bert",
        "dynamo",
        **_OP23,
        purpose="BERT with SDPA exported at opset 23: one fused ONNX Attention op per layer.",
    ),
    _spec(
        "llama_attention_op23",
        "llama",
        "dynamo",
        **_OP23,
        purpose="Llama (GQA, RoPE, KV cache) with SDPA at opset 23: fused ONNX Attention.",
    ),
    _spec(
        "llama_op23_attention",
        "llama",
        "dynamo_op23",
        **_OP23,
        config_kwargs=_LLAMA_SMALL,
        purpose="Llama (2 layers) with SDPA, torch's default export (optimize=True) at opset 23: onnxscript "
        "fuses RMSNormalization and RotaryEmbedding, SDPA is the Attention op (its GQA fusion does not "
        "match: the KV heads stay repeated before it), KV cache.",
    ),
    _spec(
        "llama_op23_eager",
        "llama",
        "dynamo_op23",
        opset=23,
        config_kwargs=_LLAMA_SMALL,
        purpose="Llama (2 layers) with eager attention, torch's default export at opset 23: "
        "RMSNormalization and RotaryEmbedding fused, attention left as MatMul/Softmax.",
    ),
    _spec(
        "bert_sdpa_dynamo",
        "bert",
        "dynamo",
        attn_implementation="sdpa",
        purpose="BERT with SDPA (transformers' default) decomposed by dynamo: Q and K^T each "
        "scaled by Sqrt(scale), mask added, Softmax wrapped in Where(IsNaN(P), 0, P).",
    ),
    _spec(
        "llama_sdpa_dynamo",
        "llama",
        "dynamo",
        attn_implementation="sdpa",
        purpose="Llama with SDPA (transformers' default) decomposed by dynamo, as a default "
        "dynamo export of a Llama-style model looks (GQA, RoPE, KV cache).",
    ),
]
FIXTURES_BY_NAME: dict[str, FixtureSpec] = {s.name: s for s in FIXTURES}


def io_names(spec: FixtureSpec, num_layers: int) -> tuple[list[str], list[str]]:
    """Full input and output names of a spec, including the flat KV-cache tensors."""
    inputs, outputs = list(spec.inputs), list(spec.outputs)
    if spec.kv_cache:
        inputs += past_names(num_layers)
        outputs += present_names(num_layers)
    return inputs, outputs
