"""spattenc passes (installed as ``spatten_compiler.passes``). One pass per module; importing this
package registers them all in :data:`spatten_compiler.pipeline.PASSES`."""

from __future__ import annotations

# Register every pass (import order is irrelevant; each module registers itself).
from . import decompose_attention, find_attention, normalize, prune_tokens  # noqa: E402,F401
from . import prune_heads, prune_values  # noqa: E402,F401  (head and value pruning)
from . import ort_fusions, ort_quantize, quantize_kv, unfuse_ort  # noqa: E402,F401  (unfuse_ort: onnxruntime optimizer ops -> standard ops)
from . import key_mask_fold  # noqa: E402,F401  (--optimize: key masks of the importance layers into their score MatMul)
from . import evict_kv  # noqa: E402,F401  (decoder KV-cache eviction)
from . import pack_kv  # noqa: E402,F401  (decoder cache stored as packed planes)
from . import float16  # noqa: E402,F401  (float16 models: rewritten in float32, converted back)
from . import unmerge_decoder  # noqa: E402,F401  (optimum's merged decoders: the with-past branch as the model)
