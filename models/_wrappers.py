"""Thin ``nn.Module`` wrappers that give Hugging Face models a flat, ONNX-friendly signature.

Every wrapper takes its inputs positionally as ``forward(*inputs)`` in the order of
``input_names`` and returns a flat tuple of tensors in the order of the exported output names.
A single variadic signature keeps both exporters happy: the TorchScript exporter only needs the
positional order, and the dynamo exporter gets one ``dynamic_shapes={"inputs": (...)}`` entry.

transformers 5 passes the key/value cache as a ``Cache`` object (keyword ``cache=``) and returns
it as ``output.cache``; :class:`KVCacheLM` converts between that object and flat
``past_key_values.{i}.key/value`` / ``present.{i}.key/value`` tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

KV_INPUTS_START = "past_key_values."


class _NamedInputs(torch.nn.Module):
    """Base class: maps positional ``*inputs`` to keyword arguments by ``input_names``."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def _kwargs(self, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs, got {len(inputs)}")
        return dict(zip(self.input_names, inputs, strict=True))


class HiddenState(_NamedInputs):
    """Encoder wrapper returning only ``last_hidden_state`` (drops e.g. BERT's pooler output)."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(**self._kwargs(inputs)).last_hidden_state,)


class Logits(_NamedInputs):
    """Causal LM wrapper without a cache: returns only ``logits``."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(**self._kwargs(inputs), use_cache=False).logits,)


class Probs(_NamedInputs):
    """Sequence-classifier wrapper returning ``softmax(logits, -1)``: a non-attention Softmax."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.softmax(self.model(**self._kwargs(inputs)).logits, dim=-1),)


class KVCacheLM(_NamedInputs):
    """Causal LM with a flat key/value cache.

    Inputs: the names in ``input_names`` that do not start with ``past_key_values.`` are passed
    to the model as keywords (``input_ids``, ``attention_mask`` covering past + current tokens,
    optionally ``position_ids``); the trailing ``past_key_values.{i}.key/value`` tensors
    (``[batch, kv_heads, past_seq, head_dim]``) are packed into a :class:`DynamicCache`.
    Outputs: ``logits`` followed by ``present.{i}.key/value`` for every layer.
    """

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = self._kwargs(inputs)
        kwargs = {k: v for k, v in named.items() if not k.startswith(KV_INPUTS_START)}
        past = [v for k, v in named.items() if k.startswith(KV_INPUTS_START)]
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(**kwargs, cache=cache, use_cache=True)
        presents: list[torch.Tensor] = []
        for layer in out.cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


WRAPPERS: dict[str, type[_NamedInputs]] = {
    "hidden_state": HiddenState,
    "logits": Logits,
    "probs": Probs,
    "kv_cache": KVCacheLM,
}
