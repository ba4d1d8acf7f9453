"""ort-fusions: onnxruntime's own transformer fusions on everything spattenc did not rewrite.

    LayerNormalization / Add + LayerNormalization  -> SkipLayerNormalization (bias folded in)
    Gather + Gather (+ Gather) + LayerNormalization -> EmbedLayerNormalization (mask -> lengths)
    MatMul + Add(bias) + erf/tanh GELU              -> BiasGelu / FastGelu
    an untouched attention core (dense layers)      -> com.microsoft Attention

Runs ``onnxruntime.transformers.optimizer.optimize_model`` (its python fusions only, ``opt_level=0``:
the session's own graph optimizations still run when the model is loaded). A pruned attention core
is not fused: its probabilities feed spattenc's importance/selection ops, and the optimizer only fuses
subgraphs whose intermediate values have no other reader. Fused attention would hard-code one head
count for every layer, so it is switched off when heads are pruned (per-layer head counts differ).

Add + LayerNormalization is left unfused by default (``skip_layer_norm=false``): onnxruntime's CPU
``SkipLayerNormalization`` kernel measured 2.6-6.0x slower than the Add + Add + LayerNormalization it
replaces (154 and 512 rows x 384, 1 and 2 threads: ``python -m bench ort_kernels``), so fusing it made
every ``--optimize`` model slower (docs/optimize.md section 4g). ``ort-fusions{skip_layer_norm=true}`` in
``--pipeline`` restores it (e.g. for a GPU session, whose kernel is fast).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .find_attention import find_attention
from .unfuse_ort import trust_initializer_shapes

logger = logging.getLogger(__name__)
MODES = ("all", "no-attention")


def replace_model(model: ir.Model, proto: onnx.ModelProto) -> None:
    """Make ``model`` (in place: the pipeline keeps its object) the model ``proto`` describes."""
    new = ir.serde.deserialize_model(proto)
    domains = {n.domain for n in new.graph.all_nodes()} - {"", "ai.onnx", *new.opset_imports}
    for domain in domains:  # the optimizer writes com.microsoft ops without importing the domain
        new.opset_imports[domain] = 1
    trust_initializer_shapes(new.graph)
    model.graph = new.graph
    model.ir_version = new.ir_version
    model._functions = dict(new.functions)  # noqa: SLF001 (no public setter)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as one in-memory proto (onnxruntime's tools cannot follow spattenc's lazy weight
    references into the input file)."""
    ir.external_data.load_to_model(model)
    return ir.serde.serialize_model(model)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence onnxruntime's python tools' warnings (they log through module-named loggers)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _model_shape(model: ir.Model) -> tuple[int, int, bool]:
    """(num_heads, hidden_size, decoder?) from the attention sites; 0 = let onnxruntime detect it."""
    sites = find_attention(model).sites
    heads = {s.num_heads for s in sites if s.num_heads}
    hidden = {s.num_heads * s.head_dim for s in sites if s.num_heads and s.head_dim}
    causal = any(s.mask_kind.startswith("causal") or s.kv_cache for s in sites)
    return (heads.pop() if len(heads) == 1 else 0), (hidden.pop() if len(hidden) == 1 else 0), causal


@register_pass
@dataclasses.dataclass(frozen=True)
class OrtFusions(Pass):
    """onnxruntime.transformers fusions (layer norms, GELU, embeddings, dense attention) after the rewrites."""

    name = "ort-fusions"
    attention: str = "all"  # all | no-attention (set when head counts differ between layers)
    skip_layer_norm: bool = False  # fuse Add + LayerNormalization (slower on CPU, see the module docstring)

    def call(self, model: ir.Model) -> PassResult:
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions

        from spatten_compiler.errors import OptionError

        if self.attention not in MODES:
            raise OptionError(f"ort-fusions: attention must be one of {', '.join(MODES)}, got {self.attention!r}")
        heads, hidden, decoder = _model_shape(model)
        options = FusionOptions("bert")
        # Decoders: the bert attention fusion knows no causal mask or KV cache; norms and GELU still fuse.
        options.enable_attention = self.attention == "all" and not decoder and heads > 0
        options.enable_embed_layer_norm = not decoder
        options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = self.skip_layer_norm
        # A raw [batch, key] 0/1 mask, not lengths: after token pruning the kept tokens of a padded
        # sample are not a prefix, and lengths would assume they are.
        options.use_raw_attention_mask(True)
        proto = to_proto(model)

        def run() -> object:
            # the optimizer warns (on its own top-level loggers) for every pattern it does not fuse, and
            # prints "failed in shape inference" when a graph holds spattenc's functions
            with quiet(), contextlib.redirect_stdout(io.StringIO()):
                return optimizer.optimize_model(proto, model_type="bert", num_heads=heads, hidden_size=hidden,
                                                optimization_options=options, opt_level=0)

        try:
            optimized = run()
        except RuntimeError as e:
            # onnxruntime's attention fusion does not check that the probabilities have no other reader;
            # when importance reads them at a layer the fusion does match (--token-prune-point
            # layer-input), the fused graph has a cycle. Fuse everything else.
            if not options.enable_attention or "not a DAG" not in str(e):
                raise
            logger.warning("ort-fusions: onnxruntime's attention fusion also fused a layer whose probabilities "
                           "feed the token importance (its graph had a cycle); fused without attention")
            logger.debug("ort-fusions: %s", e)
            options.enable_attention = False
            proto = to_proto(model)
            optimized = run()
        fused = optimized.get_fused_operator_statistics()
        logger.info("ort-fusions: %s", {k: v for k, v in fused.items() if v})
        replace_model(model, optimized.model)
        return PassResult(model, True)
