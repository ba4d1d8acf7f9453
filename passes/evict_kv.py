"""evict-kv: keep each decoder layer's KV cache within a budget, by accumulated attention (H2O /
SpAtten token importance carried across generation steps).

Rewrite of each attention site ``l`` of a decoder with ``past.*``/``present.*`` cache tensors
(``P_l`` = the probabilities ``[B, H, q, n]``, ``n = L_l + q`` = this layer's kept cache + new tokens)::

    pos_l   = Concat(past_positions.l, Where(valid_new, position_ids, -1))      [B, n] int64, -1 = empty
    bias_l  = Concat(Where(past_positions.l < 0, MIN, 0), causal+padding of the q new tokens)
    scores  = MatMul(Q, K^T) * s + bias_l            (replaces the exporter's mask: cache lengths differ)
    w_q     = decay ^ (last_l - position of query q)  (0 for padding)    last_l = max(pos_l) per row
    imp_l   = Concat(past_importance.l * decay ^ (#new queries), 0) + ReduceSum(P_l * w_q, axes=[heads, queries])
    s_l     = imp_l / (last_l + 1 - pos_l) ^ norm     (the queries that could see each token)
    s_l     = Where(sink | recent, +BIG, s_l);  Where(pos_l < 0, -BIG, s_l)
              cascade: Where(pos_l in kept_{l-1}, s_l, -BIG)   (dropped above = dropped here)
    k       = min(n, max(budget(T), sinks + recent, min_keep))   T = max(new positions) + 1: the length so far
    keep    = Sort(TopK(s_l, k).indices)                 kept tokens stay in order
    present.l.key/value     = Gather(Reshape(present, [B*H*n, Dh]), (b*H + h)*n + keep)   (row gather)
    present_importance.l    = Gather(imp_l, keep);  present_positions.l = Gather(pos_l, keep) (-1 if -BIG)

``decay``/``norm`` come from the scoring rule (``SCORES``): ``accumulated`` (decay 1, norm 0: H2O's and
SpAtten's sum), ``mean`` (norm 1: attention per query that could see the token, without H2O's bias
toward old tokens), ``ema`` (an exponential moving average: old attention fades), ``last`` (decay
0: the newest query alone, TOVA). decay 1 and norm 0 are exact identities (``1^x``, ``x^0``): compiled (not tunable), they emit no ops.
``budget(T)`` is ``ceil(b * T)`` for a fraction ``b <= 1`` or ``b`` tokens. ``min_keep`` is a floor
for short sequences: nothing is evicted until a layer holds more than ``min_keep`` tokens, so a
fractional budget does not halve a short chat prompt at prefill (the floor is independent of how
tokens are scored). Sinks are the first
``sinks`` real tokens (rank among the valid slots, so left padding does not take their place); the
recent window is the last ``recent`` slots. GQA, ``layer``/``cascade``: the query heads' probabilities
are summed over all heads, so every KV head of a layer keeps the same tokens (one decision per layer,
like SpAtten's token pruning). ``head`` (H2O's own per-head rule): each KV head ``j`` keeps its own
top-``k`` tokens, scored by the probabilities of the query heads that read it,
``h in [j * g, (j + 1) * g)`` with ``g = H / H_kv`` (the exporters' ``repeat_kv``: Unsqueeze at axis 2,
Expand, Reshape - KV head major); the state is ``[B, H_kv, n]``, ``k`` is the same for every head (the
cache stays one ``[B, H_kv, k, Dh]`` tensor), the row Gather takes the ``[B, H_kv, k]`` index as it is,
and the mask becomes per query head (``bias_l``: ``[B, H, q, n]``). RoPE: the cache holds
post-RoPE keys and the caller feeds true absolute ``position_ids``; a model that computes its
positions from the cache length (GPT-2's learned positions) gets a ``position_ids`` input wired into
its position-embedding Gather. Per-layer cache lengths may differ (``schedule``), so the exporter's
mask (built for one cache length) is replaced by ``bias_l``; ``attention_mask``'s last ``q`` columns
still give the new tokens' padding.

Sliding-window caches (Mistral, Gemma 2/3: transformers' ``DynamicSlidingWindowLayer``): the exporter's
mask compares ``kv > q - W`` next to its causal ``kv <= q`` (``WINDOW_FORMS``; ``W`` read from that
comparison, per layer, so Gemma's alternating global layers get none) and the present output keeps
the last ``W - 1`` slots of the past + new concat (``Slice(concat, -(W - 1))``, checked against ``W``).
evict-kv takes the window over: ``bias_l`` also hides a key whose *original* position is ``W`` or more
before the query's, a slot no later query can see (position ``<= last_l + 1 - W``) is evicted first
(score ``-BIG``), ``k <= W - 1``, and the present outputs are the kept slots of the full concat (the
exporter's slot-based slices of past and present are bypassed: with evicted caches slot != position).
At budget 1.0 that is the exporter's own cache (its last ``W - 1`` slots) and its own mask.
GPT-Neo's mask form (``causal+additive``: a causal ``Where`` over a constant band before the additive
mask, ``MASK_FORMS``): the Where is bypassed and its band rebuilt from positions - ``tril`` is the
causal part of ``bias_l``, ``tril`` minus ``tril(-W)`` (local attention) a window ``W`` as above
(``causal_band``; any other constant is refused). A mask that is a ``Where``'s condition (MPT's
``masked_fill``: ``Where(mask, MIN, scores + alibi)``) becomes the condition ``bias_l`` describes
(``bias_l < 0``: hidden); the registry ``MASK_FORMS`` says per form where ``bias_l`` goes. Score terms
indexed by key (``+bias``) are rebuilt at the kept slots' original positions by their form
(:mod:`.evict_terms`): BLOOM's ALiBi over the mask's positions is recomputed from them, MPT's
``table[..., C - n:]`` (``n`` = the cache length) is the table gathered at column ``C - 1 - (last - pos)``
(per KV head too); any other score term is refused, and so is per-KV-head eviction with BLOOM's.

Multi-head latent attention (transformers 5's DeepSeek) caches the compressed latent ahead of ``kv_b_proj``
and the RoPE key piece shared by every head instead of K/V: those are the site's caches
(``AttentionSite.caches``), gathered at the same kept slots; with one cached head the per-KV-head rule is
the layer's.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import NoAttentionError, OptionError
from spatten_compiler.match import const_array
from spatten_compiler.pipeline import Pass, PassResult, register_pass

from .evict_block import defer_eviction, over_budget
from .evict_terms import TERM_FORMS, Slots, term_form
from .find_attention import AttentionSite, find_attention
from .positions_input import wire_positions
from .site_io import _ancestors

logger = logging.getLogger(__name__)
MIN = float(np.finfo(np.float32).min)
BIG = 1e30
MODES = ("layer", "cascade", "head")


@dataclasses.dataclass(frozen=True)
class MaskForm:
    """How evict-kv's ``bias_l`` (0 or MIN per query and key: the kept slots' validity, causal, padding,
    window) takes the place of an exporter's mask, built for one cache length. ``hides``: the mask is a
    Where's condition, true where it hides the key (``True``; the scores are its else-branch) or where it
    lets the key through (``False``), or ``None``: the mask is added. ``band``: a causal Where over a
    constant band before the mask, bypassed and rebuilt from positions (:func:`causal_band`)."""

    hides: bool | None
    band: bool
    why: str

    def mask(self, ed: GraphEditor, bias: ir.Value) -> ir.Value:
        """What takes the exporter's mask's place: ``bias_l`` itself, or the condition it describes."""
        if self.hides is None:
            return bias
        hidden = ed.op("Less", [bias, ed.const("z", np.array(0, np.float32))])
        return hidden if self.hides else ed.op("Not", [hidden])


# the mask forms of score_chain / the attention patterns (a "+bias" suffix: score terms, TERM_FORMS)
MASK_FORMS: dict[str, MaskForm] = {
    "additive": MaskForm(None, False, "Add(scores, mask)"),
    "causal+additive": MaskForm(None, True, "GPT-Neo: Add(Where(band, scores, fill), mask)"),
    "where": MaskForm(True, False, "MPT's masked_fill: Where(mask, fill, scores)"),
    "where_scores_true": MaskForm(False, False, "Where(mask, scores, fill)"),
}


def mask_form(site: AttentionSite) -> MaskForm | None:
    """The site's :data:`MASK_FORMS` entry (its score terms aside), or None."""
    return MASK_FORMS.get(str(site.variant.get("mask")).removesuffix("+bias"))


@dataclasses.dataclass(frozen=True)
class ScoreRule:
    """How a token's importance is accumulated (``decay`` per query) and ranked (``/ seen^norm``)."""

    decay: float
    norm: float
    why: str


SCORES: dict[str, ScoreRule] = {
    "accumulated": ScoreRule(1.0, 0.0, "H2O / SpAtten: all attention a token has received (favours old tokens)"),
    "mean": ScoreRule(1.0, 1.0, "accumulated / the queries that could see it: no bias toward old tokens"),
    "sqrt": ScoreRule(1.0, 0.5, "accumulated / sqrt(queries that could see it): between sum and mean"),
    "ema": ScoreRule(0.95, 0.0, "exponential moving average of attention: old attention fades"),
    "last": ScoreRule(0.0, 0.0, "TOVA: the newest query's attention alone"),
}
META_KEY = "spatten.evict_kv"


# The sliding-window comparison an exporter builds into its mask beside the causal ``LessOrEqual(kv, q)``:
# op -> (the input that is the key index, the input that is ``Sub(q, W)``) (transformers'
# ``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``).
WINDOW_FORMS: dict[str, tuple[int, int]] = {"Greater": (0, 1), "Less": (1, 0)}
FAR_END = 1 << 62  # a Slice end at or past this is "to the end" (INT64_MAX in the exports)


def mask_window(mask: ir.Value | None) -> int | None:
    """The window ``W`` of an exporter's sliding-window mask (``kv > q - W`` on the same key/query
    indices as its causal ``kv <= q``), or None."""
    if mask is None:
        return None
    nodes, _ = _ancestors(mask, limit=400)
    causal = {(id(n.inputs[0]), id(n.inputs[1])) for n in nodes if n.op_type == "LessOrEqual"}
    found = set()
    for node in nodes:
        form = WINDOW_FORMS.get(node.op_type)
        if form is None or len(node.inputs) != 2:
            continue
        kv, lower = node.inputs[form[0]], node.inputs[form[1]]
        sub = lower.producer() if lower is not None else None
        w = const_array(sub.inputs[1]) if sub is not None and sub.op_type == "Sub" else None
        if w is not None and w.size == 1 and (id(kv), id(sub.inputs[0])) in causal:
            found.add(int(w.reshape(())))
    if len(found) > 1:
        raise OptionError(f"the mask {mask.name} compares keys against {len(found)} sliding windows "
                          f"({sorted(found)}); evict-kv takes one window per layer")
    return found.pop() if found else None


def _slice_steps(node: ir.Node) -> list[tuple[int, int, int, int]] | None:
    """(start, end, axis, step) of a Slice with constant operands, or None."""
    parts = [const_array(v) if v is not None else None for v in node.inputs[1:5]]
    if len(parts) < 3 or any(p is None for p in parts[:3]) or (len(parts) > 3 and parts[3] is None):
        return None
    starts, ends, axes = (p.reshape(-1).tolist() for p in parts[:3])
    steps = parts[3].reshape(-1).tolist() if len(parts) > 3 else [1] * len(starts)
    return list(zip(starts, ends, axes, steps, strict=True))


def sliced_present(cache, graph: ir.Graph) -> tuple[ir.Value, int] | None:
    """A graph output that is the cache concat sliced to its last ``c`` slots on the cache axis
    (through no-op Slices): ``(output, c)``, or None."""
    full, axis = cache.concat.outputs[0], cache.axis % 4
    for out in graph.outputs:
        value, kept = out, None
        for _ in range(4):
            node = value.producer()
            steps = _slice_steps(node) if node is not None and node.op_type == "Slice" else None
            if steps is None:
                break
            for start, end, ax, step in steps:
                if start == 0 and end >= FAR_END and step == 1:
                    continue  # a no-op slice (the dynamo export's [0:] on the batch axis)
                if ax % 4 == axis and start < 0 and end >= FAR_END and step == 1 and kept is None:
                    kept = -start
                    continue
                steps = None
                break
            if steps is None:
                break
            value = node.inputs[0]
            if value is full:
                return (out, kept) if kept is not None else None
    return None


def _take_over_window(sites: list[AttentionSite], graph: ir.Graph) -> dict[int, int]:
    """Each layer's sliding window ``W`` (from its mask); a present output the exporter slices to the
    last ``W - 1`` slots becomes the full past + new concat (evict-kv keeps the window itself), and the
    past's slot slice before the concat is bypassed. Refuses a sliced cache the mask does not explain."""
    windows: dict[int, int] = {}
    for site in sites:
        caches = site.caches
        if not caches:
            continue
        window = mask_window(site.mask)
        sliced = [(c, found) for c in caches if c.present is None and (found := sliced_present(c, graph))]
        if window is not None and window < 2:
            raise OptionError(f"layer {site.layer}: sliding window {window} < 2 keys")
        for cache, (out, kept) in sliced:
            if window is None or kept != window - 1:
                raise OptionError(f"layer {site.layer}: the present cache keeps the last {kept} slots (a sliding-"
                                  f"window cache) but the mask " + ("has no window comparison kv > q - W"
                                  if window is None else f"has window {window}, not {kept + 1}")
                                  + "; evict-kv cannot tell which keys a query sees")
            full = cache.concat.outputs[0]
            full.type = full.type or out.type
            full.shape = full.shape or (ir.Shape(out.shape.dims) if out.shape is not None else None)
            graph.outputs[next(i for i, o in enumerate(graph.outputs) if o is out)] = full
            full.name, out.name = out.name, f"{out.name}.window_slice"
            cache.present = full
            for i, piece in enumerate(cache.concat.inputs):  # Slice(past, -(W - 1)): slot-based, bypassed
                if piece is not cache.past and piece is not None and _reaches(piece, cache.past):
                    cache.concat.replace_input_with(i, cache.past)
        if window is not None:
            windows[site.layer] = window
    return windows


def causal_band(site: AttentionSite) -> tuple[ir.Node, int | None]:
    """GPT-Neo's ``causal+additive`` mask: ``Add(Where(cond, scores, fill), mask)``, ``cond`` sliced from
    a constant ``[.., M, M]`` band - ``tril`` (causal) or ``tril`` minus ``tril(-W)`` (a local window
    ``W``). Returns (the Where, W or None); anything else is refused (evict-kv replaces the causal part
    by positions, so it must know exactly what the constant allowed)."""
    where = next((v.producer() for v in site.mask_node.inputs if v is not site.mask and v is not None), None)
    if where is None or where.op_type != "Where":
        raise OptionError(f"layer {site.layer}: the causal part of the mask is not a Where on the scores")
    cond = where.inputs[0]
    for _ in range(6):  # the data input through the exporter's slices to the current lengths
        node = cond.producer() if cond is not None else None
        if node is None or node.op_type not in ("Slice", "Cast", "Unsqueeze", "Expand"):
            break
        cond = node.inputs[0]
    band = const_array(cond, max_elements=1 << 24) if cond is not None else None
    if band is None or band.ndim < 2 or band.shape[-1] != band.shape[-2] or int(np.prod(band.shape[:-2])) != 1:
        raise OptionError(f"layer {site.layer}: the causal Where's condition is not sliced from one constant "
                          "[M, M] band; evict-kv cannot tell which keys it allows")
    b = band.reshape(band.shape[-2:]).astype(bool)
    ones = np.ones_like(b)
    w = int(b[:, 0].sum())
    if not np.array_equal(b, np.tril(ones) & ~np.tril(ones, -w)):
        raise OptionError(f"layer {site.layer}: the causal Where's constant is neither a lower triangle nor a "
                          "band (tril minus tril(-W)); evict-kv cannot tell which keys it allows")
    return where, (w if w < b.shape[0] else None)


def _reaches(value: ir.Value, past: ir.Value) -> bool:
    """``value`` is ``past`` through Slices only."""
    for _ in range(4):
        node = value.producer()
        if node is None or node.op_type != "Slice":
            return False
        value = node.inputs[0]
        if value is past:
            return True
    return False


def budget_tokens(budget: float, total: int, sinks: int, recent: int, n: int, min_keep: int = 0) -> int:
    """The number of cache slots a layer keeps (NumPy twin of the graph's arithmetic)."""
    want = int(np.ceil(np.float32(budget) * np.float32(total))) if budget <= 1 else int(budget)
    return min(n, max(want, sinks + recent, min_keep))


def _check(sites: list[AttentionSite], positions_why: str | None = None) -> None:
    if not sites:
        raise NoAttentionError("evict-kv: no attention site found")
    for s in sites:
        if s.fused is not None:
            raise OptionError(f"layer {s.layer}: fused {s.fused.op_type}; run decompose-attention first")
        caches = s.caches  # K's and V's, or (multi-head latent attention) the caches ahead of them
        if caches and any(c.present is None for c in caches) and any(o.name.startswith("present") for o in
                                                                      s.softmax.graph.outputs):
            raise OptionError(f"layer {s.layer}: the present cache output is neither the past + new concat nor "
                              "its last W - 1 slots under a sliding-window mask (kv > q - W); evict-kv does not "
                              "rewrite it")
        if len(caches) < 2 or any(c.present is None for c in caches):
            raise OptionError(f"layer {s.layer} has no KV cache (past/present inputs and outputs): "
                              "--kv-budget applies to decoders exported with a KV cache")
        if s.mask_node is None or mask_form(s) is None:
            raise OptionError(f"layer {s.layer}: mask form {s.variant.get('mask')} is not supported by evict-kv")
        for term in s.bias_terms:
            term_form(s, term)  # refuses a term no form can rebuild at the kept slots
        if s.rope and s.rope_source and "position" not in s.rope_source:
            raise OptionError(f"layer {s.layer}: RoPE positions are computed from the cache length"
                              f"{f' ({positions_why})' if positions_why else ''}; evict-kv needs a position_ids input")


def _shares_cache_length(sites: list[AttentionSite]) -> str | None:
    """A K/V view (GQA repeat, head merge) whose target shape reads another layer's cache length
    (dynamo exports dedupe the symbolic length): per-layer lengths would break it."""
    for site in sites:
        for node in (*site.k.views, *site.v.views):
            for shape in node.inputs[1:]:
                _, inputs = _ancestors(shape, limit=60, through_shapes=True) if shape is not None else ([], [])
                for v in inputs:
                    parts = (v.name or "").split(".")
                    if v.name.startswith("past_key_values.") and parts[1] != str(site.layer):
                        return f"layer {site.layer}'s {node.op_type} reads the length of {v.name}"
    return None


def row_index(ed: GraphEditor, cache: ir.Value, keep: ir.Value) -> ir.Value:
    """Flat row indices ``[B, H, k]`` of the kept slots ``keep [B, k]`` (or per head, ``[B, H, k]``) in
    ``cache [B, H, n, D]`` viewed as ``[B * H * n, D]``: ``(b * H + h) * n + keep[b, (h,) j]``. B * H * k
    int64s, not the ``[B, H, k, D]`` index GatherElements needs (which cost as much as the gather itself)."""
    i64 = lambda h, a: ed.const(h, np.array(a, np.int64))  # noqa: E731
    bh = ed.op("ReduceProd", [ed.op("Shape", [cache], start=0, end=2)], keepdims=0)
    n = ed.op("Shape", [cache], start=2, end=3)
    base = ed.op("Mul", [ed.op("Range", [i64("r0", 0), bh, i64("r1", 1)]), n])  # [B * H]
    base = ed.op("Reshape", [base, ed.op("Concat", [ed.op("Shape", [cache], start=0, end=2), i64("one", [1])],
                                         axis=0)])  # [B, H, 1]
    per_head = len(_dims(keep)) == 3
    return ed.op("Add", [base, keep if per_head else ed.op("Unsqueeze", [keep, i64("a1", [1])])])


def gather_rows(ed: GraphEditor, cache: ir.Value, keep: ir.Value, rows: ir.Value | None = None) -> ir.Value:
    """``cache [B, H, n, D]`` -> its kept slots ``[B, H, k, D]``, in order: one row Gather over the
    cache viewed as ``[B * H * n, D]`` (contiguous D-element rows; a free Reshape)."""
    rows = row_index(ed, cache, keep) if rows is None else rows
    dh = _dims(cache)[3] if len(_dims(cache)) == 4 else None
    shape = (ed.const("flat", np.array([-1, dh], np.int64)) if isinstance(dh, int) else
             ed.op("Concat", [ed.const("m1", np.array([-1], np.int64)), ed.op("Shape", [cache], start=3, end=4)],
                   axis=0))
    flat = ed.op("Reshape", [cache, shape])
    return ed.op("Gather", [flat, rows], axis=0)


def _once(memo: dict, key: str, build):
    """``memo[key]``, built on first use: one node shared by every layer."""
    if key not in memo:
        memo[key] = build()
    return memo[key]


def _dims(v: ir.Value) -> tuple:
    return tuple(v.shape.dims) if v.shape is not None else ()


def kv_heads(site: AttentionSite) -> tuple[int, int]:
    """(KV heads, query heads per KV head) of a site, for per-head eviction: static counts, and a GQA
    repeat that is KV-head major (query head ``h`` reads KV head ``h // g``), or the reason it is not."""
    fused = getattr(site, "fused", None)  # (tests hand in stand-ins with only the fields a rule reads)
    if fused is not None and fused.op_type == "GroupQueryAttention":  # evict-gqa: the kernel's own mapping,
        return site.num_kv_heads, site.num_heads // site.num_kv_heads  # query head h reads KV head h // g
    if site.variant.get("layout") == "folded":
        raise OptionError(f"layer {site.layer}: --kv-evict head scores each head's keys from [B, H, q, n] "
                          "probabilities; this export folds the heads into the batch ([B*H, q, n]); use "
                          "--kv-evict layer")
    hk, hv = (_dims(c.present)[1] if len(_dims(c.present)) == 4 else None for c in site.caches[:2])
    hq = site.num_heads or next((d for d in _dims(site.probs)[1:2] if isinstance(d, int)), None)
    if not isinstance(hk, int) or hk != hv or not hq or hq % hk:
        raise OptionError(f"layer {site.layer}: --kv-evict head needs static, equal K/V head counts dividing the "
                          f"query heads (K {hk}, V {hv}, queries {hq})")
    # one cached head (multi-query, MLA's latent) is read by every query head, however it is repeated
    if hq > hk > 1:  # repeat_kv: [B, Hkv, n, D] -> Unsqueeze(2) -> Expand [B, Hkv, g, n, D] -> Reshape
        ups = [n for n in site.k.views if n.op_type == "Unsqueeze"]
        axes = [n.inputs[1].const_value.numpy().tolist() if len(n.inputs) > 1 and n.inputs[1].const_value is not None
                else None for n in ups]
        if not any(a in ([2], 2) for a in axes) or not any(n.op_type == "Expand" for n in site.k.views):
            raise OptionError(f"layer {site.layer}: the GQA repeat of K is not Unsqueeze(axis 2) + Expand "
                              "(KV-head major); --kv-evict head cannot map query heads to KV heads")
    return hk, hq // hk


def _position_gather(graph: ir.Graph) -> ir.Node | None:
    """GPT-2 style learned positions: Gather(table, f(Range(past_len, past_len + q)))."""
    for node in graph:
        if node.op_type != "Gather" or node.inputs[0].const_value is None:
            continue
        nodes, inputs = _ancestors(node.inputs[1], limit=60, through_shapes=True)
        if any(n.op_type == "Range" for n in nodes) and any("past" in (v.name or "") for v in inputs):
            return node
    return None


@register_pass
@dataclasses.dataclass(frozen=True)
class EvictKV(Pass):
    """Options: ``budget`` (fraction <= 1 or tokens), ``sinks``, ``recent`` (tokens), ``recent_share``
    (the recent window also spans this share of the kept slots after the sinks: 1.0 = StreamingLLM),
    ``mode`` layer|cascade|head (head: one kept set per KV head), ``score`` (a rule of ``SCORES``), ``schedule`` (per-layer budget
    multipliers, missing entries repeat the last; cascade: non-increasing), ``min_keep`` (tokens: no
    eviction below this cache length, the floor for short prompts), ``slack`` (tokens: a layer's cache
    may exceed its budget by this much; the step that would pass it evicts every layer back to its
    budget, the others only append - 0, the default, evicts at every step), ``tunable``
    (budget/sinks/recent/share/min_keep/decay/norm as overridable inputs)."""

    name = "evict-kv"
    budget: float = 0.25
    sinks: int = 4
    recent: int = 0
    recent_share: float = 0.5  # H2O's split: half the budget is the recent window (bench/decode.py: best)
    mode: str = "layer"
    score: str = "accumulated"
    schedule: tuple[float, ...] = ()
    min_keep: int = 0
    slack: int = 0  # block eviction (passes/evict_block.py): grow to budget + slack, then evict; 0 = every step
    tunable: bool = False

    def layer_budget(self, layer: int) -> float:
        if not self.schedule:
            return self.budget
        m = self.schedule[min(layer, len(self.schedule) - 1)]
        return self.budget * m if self.budget <= 1 else float(max(1, round(self.budget * m)))

    def _validate(self) -> None:
        if self.mode not in MODES:
            raise OptionError(f"--kv-evict must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.score not in SCORES:
            raise OptionError(f"--kv-score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.budget <= 0 or (self.budget > 1 and self.budget != int(self.budget)):
            raise OptionError(f"--kv-budget must be a fraction in (0, 1] or a whole number of tokens, "
                              f"got {self.budget}")
        if not 0 <= self.recent_share <= 1:
            raise OptionError(f"the recent share must be in [0, 1], got {self.recent_share}")
        if self.sinks < 0 or self.recent < 0:
            raise OptionError("--kv-sinks and --kv-recent must be >= 0")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int) or self.min_keep < 0:
            raise OptionError(f"--kv-min-keep must be a whole number of tokens >= 0, got {self.min_keep!r}")
        if isinstance(self.slack, bool) or not isinstance(self.slack, int) or self.slack < 0:
            raise OptionError(f"--kv-slack must be a whole number of tokens >= 0, got {self.slack!r}")
        if self.budget > 1 and self.budget < self.sinks + self.recent:
            raise OptionError(f"--kv-budget {int(self.budget)} is below --kv-sinks + --kv-recent "
                              f"({self.sinks} + {self.recent}): the budget could never be kept")
        if self.mode == "cascade" and any(b > a for a, b in zip(self.schedule, self.schedule[1:])):
            raise OptionError("cascade eviction: deeper layers keep no more than shallower ones "
                              "(the schedule must not increase)")

    def call(self, model: ir.Model) -> PassResult:
        self._validate()
        wired, positions_why = wire_positions(model)  # positions from the cache length -> a position_ids input
        sites = find_attention(model).sites
        windows = _take_over_window(sites, model.graph)
        _check(sites, positions_why)
        bands = {s.layer: causal_band(s) for s in sites if mask_form(s).band}
        for layer, (_, w) in bands.items():
            if w is not None:
                windows[layer] = min(w, windows.get(layer, w))
        if len({self.layer_budget(s.layer) for s in sites}) > 1 and (why := _shares_cache_length(sites)):
            raise OptionError(f"per-layer budgets need per-layer cache lengths, but {why} "
                              "(a dynamo export); use one budget for all layers or a TorchScript export")
        return self.evict(model, sites, windows, bands, wired, positions_why)

    def evict(self, model: ir.Model, sites: list[AttentionSite], windows: dict[int, int], bands: dict,
              wired: str | None, positions_why: str | None) -> PassResult:
        """The rewrite of every (checked) site, the block deferral, and the eviction metadata."""
        graph = model.graph
        ed = GraphEditor(model, "spatten/evict")
        names = {v.name: v for v in graph.inputs}
        amask = names.get("attention_mask")
        if amask is None:
            raise OptionError("evict-kv needs an attention_mask input (it gives the new tokens' padding)")
        positions, convention = names.get("position_ids"), wired or "input"
        if positions is None:
            gather = _position_gather(graph)
            if gather is None:
                raise OptionError("evict-kv: the model has no position_ids input and no learned position table"
                                  + (f" ({positions_why})" if positions_why else ""))
            positions = ir.Value(name="position_ids", shape=ir.Shape(["batch", "sequence"]),
                                 type=ir.TensorType(ir.DataType.INT64))
            graph.inputs.append(positions)
            gather.replace_input_with(1, positions)
            convention = "arange"  # GPT-2's own default: past length + arange(q), padding included
        new_mask = ed.op("Slice", [amask, ed.op("Sub", [ed.op("Shape", [amask], start=1, end=2),
                                                        ed.op("Shape", [positions], start=1, end=2)]),
                                   ed.op("Shape", [amask], start=1, end=2), ed.const("ax1", np.array([1], np.int64))])
        valid_new = ed.op("Cast", [new_mask], to=ir.DataType.BOOL)  # [B, q]
        new_pos = ed.op("Where", [valid_new, positions, ed.const("m1", np.array(-1, np.int64))])
        causal = self._new_block(ed, positions, valid_new)  # [B, 1, q, q] additive
        knobs = self._knobs(ed, graph)
        prev_kept: ir.Value | None = None
        layers = []
        block: list[tuple] = []  # per layer: (slots n, budget k, [(evicted output, appended value)])
        for site in sites:
            if site.layer in bands:  # bias_l carries the causal part (and the band's window)
                where = bands[site.layer][0]
                site.mask_node.replace_input_with(next(i for i, v in enumerate(site.mask_node.inputs)
                                                       if v is where.outputs[0]), where.inputs[1])
            prev_kept = self._rewrite(ed, graph, site, new_pos, valid_new, causal, prev_kept, knobs, block,
                                      windows.get(site.layer))
            layers.append(site.layer)
        if self.slack:
            cond = over_budget(ed, [b[0] for b in block], [b[1] for b in block], self.slack)
            defer_eviction(ed, graph, cond, [p for b in block for p in b[2]])
        ed.forget_shapes()
        ed.commit()
        RemoveUnusedNodesPass()(model)
        ShapeInferencePass()(model)  # fresh shapes from the per-layer cache lengths (later passes read heads)
        model.metadata_props[META_KEY] = json.dumps({
            "budget": self.budget, "sinks": self.sinks, "recent": self.recent, "mode": self.mode,
            "recent_share": self.recent_share, "min_keep": self.min_keep, "score": self.score, "slack": self.slack,
            "schedule": list(self.schedule), "layers": len(layers), "positions": convention,
            "windows": {str(k): v for k, v in windows.items()},
            "state": {"importance": "past_importance.{layer}", "positions": "past_positions.{layer}"}})
        logger.info("evict-kv: %d layers, budget %s, sinks %d, recent %d tokens / %.0f%% of the budget, "
                    "at least %d tokens, %s, %s", len(layers), self.budget, self.sinks, self.recent,
                    100 * self.recent_share, self.min_keep, self.mode, self.score)
        return PassResult(model, True)

    def _knobs(self, ed: GraphEditor, graph: ir.Graph) -> dict[str, ir.Value]:
        """budget, sinks, recent, recent_share, min_keep, decay, norm as constants, or (``tunable``) as graph
        initializers are the compiled values: a benchmark overrides them per run, one model for all."""
        values = {"budget": np.array(self.budget if self.budget <= 1 else 1.0, np.float32),
                  "sinks": np.array([self.sinks], np.int64), "recent": np.array([self.recent], np.int64),
                  "recent_share": np.array(self.recent_share, np.float32),
                  "min_keep": np.array([self.min_keep], np.int64),
                  "decay": np.array(SCORES[self.score].decay, np.float32),
                  "norm": np.array(SCORES[self.score].norm, np.float32)}
        knobs = {k: ed.const(k, v) for k, v in values.items()}
        if self.tunable:
            for key, value in knobs.items():
                value.name = f"spatten.kv_{key}"
                graph.inputs.append(value)
        return knobs

    @staticmethod
    def _new_block(ed: GraphEditor, positions: ir.Value, valid_new: ir.Value) -> ir.Value:
        q = ed.op("Squeeze", [ed.op("Shape", [positions], start=1, end=2)])
        r = ed.op("Range", [ed.const("r0", np.array(0, np.int64)), q, ed.const("r1", np.array(1, np.int64))])
        tri = ed.op("LessOrEqual", [ed.op("Unsqueeze", [r, ed.const("a0", np.array([0], np.int64))]),
                                    ed.op("Unsqueeze", [r, ed.const("a1", np.array([1], np.int64))])])  # [q, q]: j <= i
        keys = ed.op("Unsqueeze", [valid_new, ed.const("a12", np.array([1, 2], np.int64))])  # [B, 1, 1, q]
        ok = ed.op("And", [tri, keys])
        return ed.op("Where", [ok, ed.const("z", np.array(0, np.float32)), ed.const("min", np.array(MIN, np.float32))])

    def _rewrite(self, ed: GraphEditor, graph: ir.Graph, site: AttentionSite, new_pos: ir.Value,
                 valid_new: ir.Value, causal: ir.Value, prev_kept: ir.Value | None,
                 knobs: dict[str, ir.Value], block: list[tuple], sliding: int | None = None) -> ir.Value:
        layer = site.layer
        caches = site.caches
        # the state: [B, n] per layer, or [B, Hkv, n] per KV head (``ax``: its slot axis)
        hkv, group = kv_heads(site) if self.mode == "head" else (None, 1)
        ax = 1 if hkv is None else 2
        heads = [] if hkv is None else [hkv]
        past_imp = ir.Value(name=f"past_importance.{layer}", shape=ir.Shape(["batch", *heads, f"past_sequence.{layer}"]),
                            type=ir.TensorType(ir.DataType.FLOAT))
        past_pos = ir.Value(name=f"past_positions.{layer}", shape=ir.Shape(["batch", *heads, f"past_sequence.{layer}"]),
                            type=ir.TensorType(ir.DataType.INT64))
        graph.inputs.extend([past_imp, past_pos])
        for cache in caches:  # each layer's cache has its own length now
            d = cache.past.shape.dims if cache.past.shape is not None else None
            if d is not None and len(d) == 4:
                cache.past.shape = ir.Shape([d[0], d[1], f"past_sequence.{layer}", d[3]])
        i64 = lambda h, a: ed.const(h, np.array(a, np.int64))  # noqa: E731
        f32 = lambda h, a: ed.const(h, np.array(a, np.float32))  # noqa: E731
        per_head = lambda key, v, axes: v if hkv is None else _once(knobs, f"{key}{hkv}", lambda: ed.op(  # noqa: E731
            "Unsqueeze", [v, i64("a1", axes)]))  # a per-layer value, broadcast over the KV heads
        spread = lambda key, v: v if hkv is None else _once(knobs, f"{key}{hkv}", lambda: ed.op(  # noqa: E731
            "Expand", [ed.op("Unsqueeze", [v, i64("a1", [1])]), i64("hk", [1, hkv, 1])]))  # [B, q] -> [B, Hkv, q]
        # mask for this layer's own cache length (per query head when each KV head keeps its own tokens)
        past_bias = ed.op("Where", [ed.op("Less", [past_pos, i64("z", 0)]), f32("min", MIN), f32("z", 0.0)])
        if hkv is None:
            past_bias = ed.op("Unsqueeze", [past_bias, i64("a12", [1, 2])])  # [B, 1, 1, L]
        else:  # [B, Hkv, L] -> [B, H, 1, L]: query head h reads KV head h // g
            past_bias = ed.op("Unsqueeze", [ed.op("Gather", [past_bias, i64("kvh", np.arange(hkv * group) // group)],
                                                  axis=1), i64("a2", [2])])
            causal = _once(knobs, f"causal{hkv * group}", lambda: ed.op("Expand", [causal, i64(
                "hq", [1, hkv * group, 1, 1])]))  # [B, H, q, q]
        rows = _once(knobs, "rows", lambda: ed.op("Concat", [i64("one", [1, 1]), ed.op("Shape", [causal], start=2, end=3),
                                                             i64("one", [1])], axis=0))  # [1, 1, q, 1]: every layer's
        past_bias = ed.op("Expand", [past_bias, rows])
        bias = ed.op("Concat", [past_bias, causal], axis=-1)  # [B, 1 or H, q, L + q]
        pos = ed.op("Concat", [past_pos, spread("new_pos", new_pos)], axis=ax)
        if sliding is not None:  # a query at position t sees keys at original positions > t - W
            qpos = _once(knobs, "qpos", lambda: ed.op("Unsqueeze", [new_pos, i64("a13", [1, 3])]))  # [B, 1, q, 1]
            far = ed.op("GreaterOrEqual", [ed.op("Sub", [qpos, ed.op("Unsqueeze", [pos, i64(
                "a12" if hkv is None else "a2", [1, 2] if hkv is None else [2])])]), i64("w", sliding)])
            if hkv is not None:  # [B, Hkv, q, n] -> [B, H, q, n]
                far = ed.op("Gather", [far, i64("kvh", np.arange(hkv * group) // group)], axis=1)
            bias = ed.op("Where", [far, f32("min", MIN), bias])
        mask_slot = next(i for i, v in enumerate(site.mask_node.inputs) if v is site.mask)
        site.mask_node.replace_input_with(mask_slot, mask_form(site).mask(ed, bias))
        last = _once(knobs, "last", lambda: ed.op("TopK", [ed.op("Cast", [new_pos], to=ir.DataType.FLOAT),
                                                          i64("one", [1])], outputs=2, axis=1)[0])  # [B, 1]
        for term, add in zip(site.bias_terms, site.bias_adds, strict=True):  # ALiBi at the kept slots' positions
            name, plan = term_form(site, term)
            if hkv is not None and not TERM_FORMS[name].per_head:
                raise OptionError(f"layer {layer}: --kv-evict head with a position term on the scores ({term.name}, "
                                  f"{name}) is not supported; use --kv-evict layer")
            newest = _once(knobs, f"last_i{hkv}", lambda: ed.op("Cast", [per_head("last", last, [1])],
                                                               to=ir.DataType.INT64))
            kvh = None if hkv is None else i64("kvh", np.arange(hkv * group) // group)
            moved = TERM_FORMS[name].build(ed, graph, plan, Slots(pos, newest, kvh))
            add.replace_input_with(next(i for i, v in enumerate(add.inputs) if v is term), moved)
        # importance
        posf = ed.op("Cast", [pos], to=ir.DataType.FLOAT)
        # values every layer computes alike are built once (one op per step, not one per layer);
        # each row's newest position is its newest new token's (every row has one, as in T below)
        vq = _once(knobs, "vq", lambda: ed.op("Cast", [valid_new], to=ir.DataType.FLOAT))  # [B, q]
        zeros = _once(knobs, "zeros", lambda: ed.op("Mul", [vq, f32("z", 0.0)]))
        w_q = _once(knobs, "w_q", lambda: ed.op("Unsqueeze", [ed.op("Mul", [ed.op("Pow", [knobs["decay"], ed.op(
            "Sub", [last, ed.op("Cast", [new_pos], to=ir.DataType.FLOAT)])]), vq]), i64("a13", [1, 3])]))  # decay^age
        weighted = ed.op("Mul", [site.probs, w_q])
        if hkv is None:
            score = ed.op("ReduceSum", [weighted, i64("ax", [1, 2])], keepdims=0)  # [B, n]
        else:  # [B, H, q, n] -> [B, H, n] -> [B, Hkv, g, n] -> [B, Hkv, n]: a KV head's query group
            score = ed.op("ReduceSum", [weighted, i64("ax2", [2])], keepdims=0)
            score = ed.op("ReduceSum", [ed.op("Reshape", [score, i64("grp", [0, hkv, group, -1])]), i64("ax2", [2])],
                          keepdims=0)
        # a compiled (not tunable) decay 1 / norm 0 are identities: x * 1^n = x, x / s^0 = x - no ops emitted
        rule = SCORES[self.score]
        if rule.decay == 1 and not self.tunable:
            kept = past_imp
        else:
            carry = _once(knobs, "carry", lambda: ed.op("Pow", [knobs["decay"], ed.op(
                "ReduceSum", [vq, i64("ax1", [1])], keepdims=1)]))  # [B, 1]
            kept = ed.op("Mul", [past_imp, per_head("carry", carry, [1])])
        imp = ed.op("Add", [ed.op("Concat", [kept, spread("zeros", zeros)], axis=ax), score])
        if rule.norm == 0 and not self.tunable:
            rank_by = imp
        else:
            posf = ed.op("Cast", [pos], to=ir.DataType.FLOAT)
            seen = ed.op("Sub", [ed.op("Add", [per_head("last", last, [1]), f32("one", 1.0)]), posf])  # queries that saw it
            rank_by = ed.op("Div", [imp, ed.op("Pow", [seen, knobs["norm"]])])
        valid = ed.op("GreaterOrEqual", [pos, i64("z", 0)])
        n = ed.op("Shape", [pos], start=ax, end=ax + 1)
        # k = min(n, max(budget(T), sinks + recent, min_keep)); the recent window also covers share * (k - sinks)
        sinks, recent, share = knobs["sinks"], knobs["recent"], knobs["recent_share"]
        if self.budget <= 1:
            # T = the newest token's position + 1 (the new tokens are the latest of every sample)
            total = _once(knobs, "total", lambda: ed.op("Cast", [ed.op("Add", [
                ed.op("ReduceMax", [new_pos], keepdims=0), i64("one", 1)])], to=ir.DataType.FLOAT))
            mult = self.layer_budget(layer) / self.budget
            frac = knobs["budget"] if mult == 1 else ed.op("Mul", [knobs["budget"], f32("m", mult)])
            want = _once(knobs, f"want{mult}", lambda: ed.op("Reshape", [ed.op("Cast", [ed.op("Ceil", [
                ed.op("Mul", [total, frac])])], to=ir.DataType.INT64), i64("r", [1])]))
        else:
            want = i64("b", [int(self.layer_budget(layer))])
        forced = _once(knobs, "forced", lambda: ed.op("Max", [ed.op("Add", [sinks, recent]), knobs["min_keep"]]))
        k_budget = _once(knobs, f"k_budget{id(want)}", lambda: ed.op("Max", [want, forced]))
        if sliding is not None:  # no later query sees more than W - 1 cached keys (block eviction: its trigger too)
            k_budget = ed.op("Min", [k_budget, i64("wk", [sliding - 1])])
        k = ed.op("Min", [n, k_budget])
        by_share = ed.op("Cast", [ed.op("Floor", [ed.op("Mul", [share, ed.op("Cast", [ed.op("Sub", [k, sinks])],
                                                                            to=ir.DataType.FLOAT)])])],
                         to=ir.DataType.INT64)
        window = ed.op("Squeeze", [ed.op("Max", [recent, by_share])])
        # forced: sinks (first real tokens) and the recent window (last slots)
        rank = ed.op("CumSum", [ed.op("Cast", [valid], to=ir.DataType.INT64), i64(f"ax{ax}", ax)])
        sink = ed.op("And", [valid, ed.op("LessOrEqual", [rank, ed.op("Squeeze", [sinks])])])
        slot = ed.op("Range", [i64("r0", 0), ed.op("Squeeze", [n]), i64("r1", 1)])
        in_window = ed.op("GreaterOrEqual", [slot, ed.op("Sub", [ed.op("Squeeze", [n]), window])])
        s = ed.op("Where", [ed.op("Or", [sink, in_window]), f32("big", BIG), rank_by])
        s = ed.op("Where", [valid, s, f32("nbig", -BIG)])
        if sliding is not None:  # out of every later query's window (position <= last + 1 - W): evicted first
            live = ed.op("Greater", [posf, ed.op("Sub", [per_head("last", last, [1]), f32("w1", sliding - 1)])])
            s = ed.op("Where", [live, s, f32("nbig", -BIG)])
        if self.mode == "cascade" and prev_kept is not None:
            eq = ed.op("Equal", [ed.op("Unsqueeze", [pos, i64("a2", [2])]),
                                 ed.op("Unsqueeze", [prev_kept, i64("a1", [1])])])
            hits = ed.op("ReduceSum", [ed.op("Cast", [eq], to=ir.DataType.INT32), i64("ax2", [2])], keepdims=0)
            member = ed.op("Greater", [hits, ed.const("z32", np.array(0, np.int32))])  # axes input: opset 13+
            s = ed.op("Where", [member, s, f32("nbig", -BIG)])
        top_s, top_i = ed.op("TopK", [s, k], outputs=2, largest=1, sorted=1)
        keep, order = ed.op("TopK", [top_i, k], outputs=2, largest=0, sorted=1)
        keep.shape = ir.Shape(["batch", *heads, "kept"])  # row_index reads the rank
        kept_s = ed.op("GatherElements", [top_s, order], axis=ax)
        kept_pos = ed.op("Where", [ed.op("Greater", [kept_s, f32("thr", -BIG / 2)]),
                                   ed.op("GatherElements", [pos, keep], axis=ax), i64("m1", -1)])
        kept_imp = ed.op("GatherElements", [imp, keep], axis=ax)
        rows = row_index(ed, caches[0].present, keep)  # K and V: the same [B, H, n] layout
        appended = []
        for cache in caches:
            dk, dv = _dims(caches[0].present), _dims(cache.present)  # same heads: same rows (lengths are equal)
            same = len(dk) == len(dv) == 4 and isinstance(dk[1], int) and dk[1] == dv[1]
            pruned = gather_rows(ed, cache.present, keep, rows if same else None)
            appended.append((pruned, cache.present))
            self._swap_output(ed, graph, cache.present, pruned)
        block.append((n, k_budget, [*appended, (kept_imp, imp), (kept_pos, pos)]))
        for value, name, dtype in ((kept_imp, f"present_importance.{layer}", ir.DataType.FLOAT),
                                   (kept_pos, f"present_positions.{layer}", ir.DataType.INT64)):
            value.name, value.type, value.shape = name, ir.TensorType(dtype), ir.Shape(["batch", *heads, f"kept.{layer}"])
            graph.outputs.append(value)
        return kept_pos

    @staticmethod
    def _swap_output(ed: GraphEditor, graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
        i = next(i for i, o in enumerate(graph.outputs) if o is old)
        name = old.name
        old.name = ed._name("full_cache")
        new.name, new.type = name, old.type
        new.shape = ir.Shape([old.shape.dims[0], old.shape.dims[1], "kept", old.shape.dims[3]]) if old.shape else None
        graph.outputs[i] = new
