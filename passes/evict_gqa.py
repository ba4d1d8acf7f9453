"""evict-gqa: evict-kv on onnxruntime's fused com.microsoft ``GroupQueryAttention`` (the model builder's
attention), without decomposing it (session 20; the measurement that motivated it: docs/decoders.md,
"Fused GroupQueryAttention and eviction").

Rewrite of every GroupQueryAttention ``l`` whose past_key/past_value are graph inputs and whose
present_key/present_value are graph outputs (the non-shared cache form)::

    Y, present_k, present_v = GQA(qkv, k, v, past_k, past_v, seqlens_k, total, cos, sin; N, kvN, ...)
 -> Y, present_k, present_v, P_l = GQA(qkv, k, v, past_k, past_v, seqlens_k, total, cos, sin,
                                      position_ids, bias_l; N, kvN, ..., qk_output=2)

followed by evict-kv's own rewrite of the layer (``EvictKV.evict``, unchanged: importance, scoring rule,
sinks, recent window, budget, TopK, the row Gathers of present_k/present_v, block eviction with
``slack``). The kernel gives what the decomposed rewrite computes itself: ``P_l`` is its
post-softmax ``output_qk`` ``[B, N, q, n]`` (``qk_output=2``); ``bias_l`` (``MIN`` on empty slots, the
causal block of the new tokens) enters as its ``attention_bias``; ``position_ids`` (a new graph input,
input 9) rotates the new tokens at their true positions once eviction has shortened the cache (the
kernel would otherwise take ``seqlens_k``, the cache length). ``--kv-evict head``: the kernel's own
head mapping, query head ``h`` reads KV head ``h // (N / kvN)``. Probed against a numpy reference in
tests/test_gqa_kernel_probe.py.

The kernel still takes the cache length from ``attention_mask`` (``seqlens_k = sum - 1``, ``total`` =
its width), which DecoderSession feeds as ones over layer 0's kept cache plus the new tokens: every
layer must hold the same number of slots (one budget: a per-layer ``schedule`` is refused), and a
left-padded batch is not expressed. The in-graph form copies the cache every step (present = past +
new, then the kept rows' Gathers); the shared-buffer form below does not. Refused with the reason: caches that are not graph input/output pairs, a local window, a quantized
cache, an existing attention_bias / position_ids / qk output, a rotary computed outside the kernel.

``in_graph=false``: the shared-buffer form. The graph keeps only the kernel (``qk_output=2``,
``position_ids``, no attention_bias: every slot below the cache length is valid) and the importance
accumulation ``present_importance.l = Concat(past_importance.l, 0) + ReduceSum(P_l)`` (over the query
rows and heads; ``head``: per KV head); no TopK, Gather or If. spatten_compiler/shared_cache.py
binds one buffer per cache as past and present and evicts in place by the same rule (its metadata:
``RUNTIME``); ``layer``/``head`` with the accumulated score only.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import NoAttentionError, OptionError
from spatten_compiler.pipeline import PassResult, register_pass

from .attention_trace import Branch, KVCache
from .evict_kv import EvictKV
from .find_attention import AttentionSite, find_attention
from .unfuse_ort import trust_initializer_shapes

logger = logging.getLogger(__name__)
RUNTIME = "spatten.evict_gqa_runtime"  # metadata of the in_graph=false form: the rule the runtime applies
OP = ("com.microsoft", "GroupQueryAttention")
PAST_K, PAST_V, POSITION_IDS, ATTENTION_BIAS = 3, 4, 9, 10
# inputs this rewrite must find empty, with the reason (the eviction sets 9 and 10; 12-13: k/v scales)
EMPTY_INPUTS = {POSITION_IDS: "position_ids already wired", ATTENTION_BIAS: "an attention_bias input",
                12: "a quantized KV cache (k_scale)", 13: "a quantized KV cache (v_scale)"}
# attribute -> (the value this rewrite needs, the reason for any other)
ATTRIBUTES = {"local_window_size": (-1, "a local window counts slots, not positions, after eviction"),
              "sliding_window_cache": (0, "a windowed cache evicts by itself"),
              "qk_output": (0, "qk output already taken"),
              "do_rotary": (1, "rotary outside the kernel reads positions evict-gqa does not rewire")}


def why_not(node: ir.Node, graph: ir.Graph) -> str | None:
    """The reason ``node`` cannot be evicted in place, or None."""
    inputs, outputs = set(graph.inputs), set(graph.outputs)
    if (len(node.inputs) <= PAST_V or any(node.inputs[i] not in inputs for i in (PAST_K, PAST_V))
            or any(node.outputs[i] not in outputs for i in (1, 2))):
        return "past_key/past_value are not graph inputs or present_key/present_value not graph outputs"
    for index, why in EMPTY_INPUTS.items():
        if index < len(node.inputs) and node.inputs[index] is not None:
            return why
    for name, (want, why) in ATTRIBUTES.items():
        a = node.attributes.get(name)
        if (a.value if a is not None else {"local_window_size": -1, "do_rotary": 0}.get(name, 0)) != want:
            return why
    return None


@register_pass
@dataclasses.dataclass(frozen=True)
class EvictGQA(EvictKV):
    """evict-kv's options and rule on fused GroupQueryAttention nodes (see the module docstring)."""

    name = "evict-gqa"
    # False: the graph only accumulates the importance; a runtime (spatten_compiler/shared_cache.py) holds
    # the cache in one shared buffer and evicts in place by the same rule (see RUNTIME)
    in_graph: bool = True

    def call(self, model: ir.Model) -> PassResult:
        self._validate()
        if not self.in_graph and (why := self._runtime_why()):
            raise OptionError(f"evict-gqa{{in_graph=false}}: {why}")
        if len(set(self.schedule)) > 1:
            raise OptionError("evict-gqa: the kernel reads one cache length (attention_mask) for every layer; "
                              "a per-layer schedule needs the decomposed form (unfuse-ort, then evict-kv)")
        graph = model.graph
        nodes = [n for n in graph if (n.domain, n.op_type) == OP]
        if not nodes:
            raise NoAttentionError("evict-gqa: no com.microsoft GroupQueryAttention node")
        for node in nodes:
            if (why := why_not(node, graph)) is not None:
                raise OptionError(f"GroupQueryAttention '{node.name}': {why}; evict-gqa does not rewrite it")
        if any(v.name == "position_ids" for v in graph.inputs):
            raise OptionError("evict-gqa: the model already has a position_ids input the kernel does not read")
        trust_initializer_shapes(graph)  # onnxruntime's saved models: value_info older than the folded tensors
        positions = ir.Value(name="position_ids", shape=ir.Shape(["batch", "sequence"]),
                             type=ir.TensorType(ir.DataType.INT64))
        graph.inputs.append(positions)
        # head sizes as the attention finder reads them from the fused node (the cache inputs may leave
        # them symbolic: the builder's kv_cache_dim); written into the cache shapes, which outlive the rewrite
        sizes = {id(s.fused): s.head_dim for s in find_attention(model).sites if s.fused is not None}
        ed = GraphEditor(model, "spatten/evict_gqa")
        sites = [self._site(ed, node, layer, positions, sizes.get(id(node)), self.in_graph)
                 for layer, node in enumerate(nodes)]
        logger.info("evict-gqa: %d GroupQueryAttention nodes output their probabilities", len(sites))
        if self.in_graph:
            ed.commit()
            return self.evict(model, sites, {}, {}, "input", None)
        for site in sites:
            self._accumulate(ed, graph, site, positions)
        ed.forget_shapes()
        ed.commit()
        RemoveUnusedNodesPass()(model)
        model.metadata_props[RUNTIME] = json.dumps({
            "budget": self.budget, "sinks": self.sinks, "recent": self.recent, "recent_share": self.recent_share,
            "mode": self.mode, "min_keep": self.min_keep, "slack": self.slack, "layers": len(sites)})
        return PassResult(model, True)

    def _runtime_why(self) -> str | None:
        """Why the runtime's eviction could not reproduce these options, or None."""
        if self.mode not in ("layer", "head"):
            return f"--kv-evict {self.mode} is not reproduced by the runtime (layer or head)"
        if self.score != "accumulated" or self.tunable:
            return "the runtime evicts by the accumulated rule with compiled knobs only"
        return None

    def _accumulate(self, ed: GraphEditor, graph: ir.Graph, site: AttentionSite, positions: ir.Value) -> None:
        """``present_importance.l = Concat(past_importance.l, 0 per new token) + ReduceSum(P_l)`` over
        the query rows and the heads (``head``: the heads of each KV head), ``[B, n]`` or ``[B, kv, n]``."""
        i64 = lambda h, a: ed.const(h, np.array(a, np.int64))  # noqa: E731
        heads = [site.num_kv_heads] if self.mode == "head" else []
        past = ir.Value(name=f"past_importance.{site.layer}", shape=ir.Shape(["batch", *heads, "past_sequence"]),
                        type=ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(past)
        if heads:  # [B, H, q, n] -> [B, H, n] -> [B, kv, g, n] -> [B, kv, n]
            score = ed.op("ReduceSum", [site.probs, i64("ax2", [2])], keepdims=0)
            group = site.num_heads // heads[0]
            score = ed.op("ReduceSum", [ed.op("Reshape", [score, i64("grp", [0, heads[0], group, -1])]),
                                        i64("ax2", [2])], keepdims=0)
        else:
            score = ed.op("ReduceSum", [site.probs, i64("ax12", [1, 2])], keepdims=0)
        q = ed.op("Neg", [ed.op("Shape", [positions], start=1, end=2)])
        new = ed.op("Slice", [score, q, i64("end", [np.iinfo(np.int64).max]), i64("last", [-1])])
        imp = ed.op("Add", [ed.op("Concat", [past, ed.op("Mul", [new, ed.const("z", np.array(0, np.float32))])],
                                  axis=-1), score])
        imp.name, imp.type = f"present_importance.{site.layer}", ir.TensorType(ir.DataType.FLOAT)
        imp.shape = ir.Shape(["batch", *heads, "total_sequence"])
        graph.outputs.append(imp)

    @staticmethod
    def _site(ed: GraphEditor, node: ir.Node, layer: int, positions: ir.Value, head_dim: int | None,
              bias: bool) -> AttentionSite:
        """The node again with position_ids, (``bias``) a placeholder attention_bias evict-kv's ``bias_l``
        replaces, and ``qk_output=2``; the layer as the AttentionSite evict-kv rewrites."""
        attrs = {a.name: a.value for a in node.attributes.values()} | {"qk_output": 2}
        placeholder = ed.const("no_bias", np.zeros((1, 1, 1, 1), np.float32)) if bias else None
        inputs = list(node.inputs) + [None] * (POSITION_IDS - len(node.inputs))
        inputs = inputs[:POSITION_IDS] + [positions, placeholder] + inputs[ATTENTION_BIAS + 1:]
        while inputs[-1] is None:
            inputs.pop()
        outs = ed.op(OP[1], inputs, domain=OP[0], outputs=4, **attrs)
        for old, new in zip(node.outputs, outs[:3], strict=True):
            ed.replace_uses(old, new)
        fused = outs[0].producer()
        heads, kv = attrs["num_heads"], attrs["kv_num_heads"]
        for cache in (*node.inputs[PAST_K:PAST_V + 1], *outs[1:3]):
            d = cache.shape.dims if cache.shape is not None and cache.shape.rank() == 4 else None
            if d is not None and head_dim is not None:
                cache.shape = ir.Shape([d[0], kv, d[2], head_dim])
        branch = lambda i: Branch(value=outs[i], cache=KVCache(node.inputs[i + 2], fused, 2, outs[i]))  # noqa: E731
        return AttentionSite(layer=layer, softmax=None, probs=outs[3], variant={"mask": "additive"}, q=None,
                             k=branch(1), v=branch(2), num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                             mask=placeholder, mask_node=fused, fused=fused)
