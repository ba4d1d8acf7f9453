"""prune-values: SpAtten local value pruning (paper §III-C), per query row, not cascaded.

Rewrite, in every decomposed attention layer::

    MatMul(P, V)  ->  MatMul(spatten.LocalValuePrune(P, keep), V)

``LocalValuePrune`` keeps, in each query row, the ``k = ceil(n * keep)`` largest probabilities
(``n`` = keys with a non-zero probability in that row, i.e. not padding / not causally masked /
not pruned by prune-tokens; at least 1) and zeroes the rest; probabilities equal to the k-th
largest are kept too. There is no renormalisation: the kept rows are exactly what SpAtten's
Prob x V unit multiplies, and zeroed entries only drop mass the softmax had already made small.

Decoders: with a KV cache a query row's keys are the cached past plus the new tokens, and ``n``
counts the ones it may attend to (causal masking gives the others probability 0); the cache itself
is not touched - which V rows are skipped is decided per row and step, nothing is evicted. After
prune-heads the probabilities are those of the kept heads only. Fused attention ops must be
decomposed first (the compile command does).

What it saves: on the accelerator the V rows of zeroed probabilities are never fetched from DRAM
(memory traffic and Prob x V work). On onnxruntime CPU it is only a mask - MatMul(P, V) is dense,
so it costs a TopK per row and saves nothing; the function call marks where the backend skips.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import NoAttentionError, OptionError
from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .find_attention import find_attention
from .spatten_ops import DOMAIN, define, ensure_functions

logger = logging.getLogger(__name__)

define("LocalValuePrune", """
<domain: "spatten", opset_import: ["" : 17]>
LocalValuePrune (probs, keep) => (pruned) {
    one = Constant <value_float = 1.0> ()
    zero = Constant <value_float = 0.0> ()
    last = Constant <value_ints = [-1]> ()
    sk = Shape <start = -1> (probs)
    skf = Cast <to = 1> (sk)
    kmax_scaled = Mul (skf, keep)
    kmax_raw = Ceil (kmax_scaled)
    kmaxf = Max (kmax_raw, one)
    kmax = Cast <to = 7> (kmaxf)
    top, top_idx = TopK <axis = -1, largest = 1, sorted = 1> (probs, kmax)
    positive = Greater (probs, zero)
    live = Cast <to = 1> (positive)
    n = ReduceSum <keepdims = 1> (live, last)
    k_scaled = Mul (n, keep)
    k_raw = Ceil (k_scaled)
    k_low = Max (k_raw, one)
    kf = Min (k_low, kmaxf)
    onei = Constant <value_int = 1> ()
    ki = Cast <to = 7> (kf)
    kth = Sub (ki, onei)
    thr = GatherElements <axis = -1> (top, kth)
    kept = GreaterOrEqual (probs, thr)
    pruned = Where (kept, probs, zero)
}""")


@register_pass
@dataclasses.dataclass(frozen=True)
class PruneValues(Pass):
    """Local value pruning: per query row only the largest probabilities reach MatMul(P, V)."""

    name = "prune-values"
    keep: float = 1.0

    def call(self, model: ir.Model) -> PassResult:
        if not 0 < self.keep <= 1:
            raise OptionError(f"prune-values keep must be in (0, 1], got {self.keep}")
        sites = find_attention(model).sites
        if not sites:
            raise NoAttentionError("no attention found: nothing to prune")
        for s in sites:
            if s.fused is not None or s.pv is None:
                raise OptionError(f"layer {s.layer}: fused {s.fused.op_type if s.fused else 'attention'} op; "
                                  "prune-values needs decomposed attention")
        if self.keep == 1.0:
            return PassResult(model, False)
        ensure_functions(model, ["LocalValuePrune"])
        e = GraphEditor(model, "spatten_values")
        keep = e.const("value_keep", np.float32(self.keep))
        for s in sites:
            probs = s.pv.inputs[0]
            pruned = e.op("LocalValuePrune", [probs, keep], domain=DOMAIN, hint="LocalValuePrune")
            pruned.type, pruned.shape = probs.type, probs.shape
            s.pv.replace_input_with(0, pruned)
        e.commit()
        logger.info("prune-values: keep %.3f of the values per query row in %d layers", self.keep, len(sites))
        return PassResult(model, True)
