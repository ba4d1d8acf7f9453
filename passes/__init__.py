"""spattenc passes (installed as ``spatten_compiler.passes``). One pass per module; importing this
package registers them all in :data:`spatten_compiler.pipeline.PASSES`."""

from __future__ import annotations

# Register every pass (import order is irrelevant; each module registers itself).
from . import (  # noqa: E402,F401  # noqa: E402,F401  (head and value pruning)  # noqa: E402,F401  (unfuse_ort: onnxruntime optimizer ops -> standard ops)  # noqa: E402,F401  (static quantization: QDQ pairs stripped, compiled in float, restored)
    decompose_attention,
    evict_kv,  # noqa: E402,F401  (decoder KV-cache eviction)
    find_attention,
    float16,  # noqa: E402,F401  (float16 models: rewritten in float32, converted back)
    key_mask_fold,  # noqa: E402,F401  (--optimize: key masks of the importance layers into their score MatMul)
    normalize,
    ort_fusions,
    ort_quantize,
    pack_kv,  # noqa: E402,F401  (decoder cache stored as packed planes)
    prune_heads,
    prune_tokens,
    prune_values,
    qdq,
    quantize_kv,
    unfuse_ort,
    unfuse_qop,
    unmerge_decoder,  # noqa: E402,F401  (optimum's merged decoders: the with-past branch as the model)
)
