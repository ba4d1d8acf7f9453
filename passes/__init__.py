"""spattenc passes (installed as ``spatten_compiler.passes``). One pass per module; importing this
package registers them all in :data:`spatten_compiler.pipeline.PASSES`."""

from __future__ import annotations

# Register every pass (import order is irrelevant; each module registers itself):
# decompose_attention / unfuse_ort / unfuse_qop (fused and QOperator ops -> standard ones), find_attention,
# normalize, the SpAtten rewrites (prune_tokens, prune_heads, prune_values, quantize_kv, evict_kv, pack_kv),
# onnxruntime's own tools after them (ort_fusions, ort_quantize, key_mask_fold for --optimize), and the
# format wrappers (float16, qdq for static quantization, unmerge_decoder for optimum's merged decoders).
from . import (  # noqa: E402,F401
    decompose_attention,
    evict_gqa,
    evict_kv,
    find_attention,
    float16,
    key_mask_fold,
    normalize,
    ort_fusions,
    ort_quantize,
    pack_kv,
    prune_heads,
    prune_tokens,
    prune_values,
    qdq,
    quantize_kv,
    unfuse_ort,
    unfuse_qop,
    unmerge_decoder,
)
