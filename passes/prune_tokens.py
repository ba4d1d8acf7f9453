"""prune-tokens: SpAtten cascade token pruning that really shrinks the sequence (encoders).

Rewrite, with ``pos``/``valid``/``acc`` per-token state carried from layer to layer::

    score_l            = spatten.TokenImportance(P_l, valid_l)           # column sums, valid rows
    acc_l              = acc_{l-1} + score_l
    sel, valid_{l+1}   = spatten.TokenSelect(acc_l, valid_l, protect, k_{l+1}, k_per_sample)
    X_{l+1}            = spatten.GatherTokens(X_{l+1}, sel)               # later layers run on k tokens
    mask_{l+1}         = additive bias from valid_{l+1}                    # replaces the exporter's mask
    out                = spatten.ScatterTokens(restore_buffer, pos_L, X_L) # full length again

``k`` is ``ceil(S * ratio)`` of the padded length ``S`` (clamped to ``[min_keep, current length]``);
each sample then keeps ``ceil(len_b * ratio)`` of its own real tokens, the rest of its row is
masked like padding, so a padded batch selects what each sample would select alone. Padding scores
-inf and never outranks a real token; the first token (CLS) is protected by default.
Importance ``sum`` is the paper's column sum; ``mean`` divides each layer's sums by its number of
valid query rows so later (shorter) layers count as much as early ones; ``value`` is ``mean`` with
each head's column weighted by the key token's value norm ``||v_hj||`` (attention parked on a token
whose value is near zero - a sink - moves nothing and should not keep it). Drop-and-restore: a pruned
token's output row is its last computed hidden state (``stale``), zero, or the mean of the surviving
tokens' rows (``mean``: mean pooling over the attention mask then equals pooling over kept tokens).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import NoAttentionError, OptionError
from spatten_compiler.match import const_array, whole_slice
from spatten_compiler.pipeline import Pass, PassResult, register_pass
from spatten_compiler.schedule import check_schedule, spatten_schedule

from .attention_trace import is_weight, quantized_projection, token_source
from .find_attention import AttentionSite, find_attention, row_norm_input
from .length_cuts import full_length_cut, length_slices
from .score_sink import rebroadcast_sinks
from .site_io import coupled_site
from .spatten_ops import DOMAIN, ensure_functions
from .static_targets import rebind_token_entry
from .token_axis import flow_axis, token_axis
from .token_positions import (
    check_term,
    gather_positions,
    own_region,
    positional_inputs,
    reaches,
    shrinks_causal,
    unit_axis,
)

logger = logging.getLogger(__name__)
RESTORE = ("stale", "zero", "mean")
IMPORTANCE = {"sum": "TokenImportance", "mean": "TokenImportanceMean", "value": "TokenImportanceValue",
              "causal": "TokenImportanceCausal"}  # causal: value, each column / the rows that can read it
PROTECT = ("first", "first+last", "none")
PRUNE_POINTS = ("layer-input", "after-attention")
MASK_BIAS = -1e9
# How the mask meets the scores: an additive term, Where(masked, fill, s), Where(kept, s, fill), and
# (decoders) Where(causal, s, fill) + an additive padding mask.
MASK_FORMS = ("additive", "where", "where_scores_true", "causal+additive")
# Ops that keep a [B, S, D] value's token rows (elementwise with broadcast weights, row-wise norms):
# a shape read from their output before the in-layer gather is the layer input's full length.
ROW_OPS = frozenset({"Mul", "Add", "Sub", "Div", "Pow", "Sqrt", "Reciprocal", "ReduceMean", "Cast", "Neg",
                     "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"})


def _token_axis_op(node: ir.Node, site: AttentionSite) -> bool:
    """A Slice or Concat along the token axis of a per-head [B, H, S, Dh] (or [B, S, H, Dh]) tensor:
    the transform treats some tokens apart by position (DINOv3's rotary skips the prefix tokens)."""
    if node.op_type not in ("Slice", "Concat"):
        return False
    data = node.inputs[0]
    if data is None or data.shape is None or data.shape.rank() != 4:
        return False
    dims = data.shape.dims
    heads = {site.num_heads, site.num_kv_heads}
    token = 2 if dims[1] in heads and dims[3] == site.head_dim else 1 if dims[2] in heads else None
    if whole_slice(node):  # dynamo writes them: no token is set apart
        return False
    if node.op_type == "Concat":
        axes = [node.attributes.get_int("axis", 0)]
    else:
        a = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        axes = a.reshape(-1).tolist() if a is not None else [0]
    return token is not None and any(ax % 4 == token for ax in axes)


def _fixed_shapes(model: ir.Model) -> bool:
    """Every graph input has static dims: an export without dynamic axes (mobile / NPU deployments)."""
    ins = list(model.graph.inputs)
    return bool(ins) and all(v.shape is not None and all(isinstance(d, int) for d in v.shape.dims) for v in ins)


def _check_loads(model: ir.Model) -> None:
    """On an export with fixed input shapes onnxruntime folds the kept-token count at load time, so a
    shape the rewrite could not free (a constant holding the exported length in a form it does not
    read) fails there: refused in one line instead of written."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    base = next((v.const_value.base_dir for v in model.graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor)), None)
    if base:  # weights still in the input's files (read lazily): onnxruntime reads them from there
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base))
    try:
        ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), opts,
                             providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime's own error, shortened to its first line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OptionError("token pruning on this export with fixed input shapes writes a graph onnxruntime "
                          f"rejects ({first[:200]}); export with a dynamic sequence length, or "
                          "--no-token-pruning") from err


def _token_dim(site: AttentionSite):
    """The layer input's token dim (named or static), which a value's shape entry must equal to be read
    as the layer's length; None when the input has no shape."""
    shape = site.layer_input.shape if site.layer_input is not None else None
    return shape.dims[1] if shape is not None and shape.rank() == 3 else None


def _tokens_not_rows(x: ir.Value, graph: ir.Graph) -> str | None:
    """Why a layer's hidden state does not hold its tokens on axis 1 (a sequence-first ``[S, B, D]``:
    XLNet; a channels-first ``[B, D, S]``: SqueezeBERT), by the exporter's names or static dims
    (:func:`.token_axis.token_axis`); None when it does, or when nothing tells."""
    try:
        axis = token_axis(x, graph, aligned=1, flow=None)
    except OptionError:
        return None
    dims = list(x.shape.dims) if x.shape is not None else []
    if axis == 1 or len(dims) != 3:
        return None
    layout = "sequence-first [S, B, D]" if axis == 0 else "channels-first [B, D, S]"
    return f"'{x.name}' {[str(d) for d in dims]} is {layout}"


def _check_sites(sites: list[AttentionSite]) -> None:
    for s in sites:
        if s.fused is not None:
            raise OptionError(f"layer {s.layer}: fused {s.fused.op_type} op; run decompose-attention first")
        if s.kv_cache:
            raise OptionError(f"layer {s.layer} reads a KV cache: the token rewrite of a KV-cache decoder is "
                              "evict-kv (--kv-budget); prune-tokens prunes a prompt without a cache")
        if s.latent_past is not None:
            raise OptionError(f"layer {s.layer} reads a cache of its K/V projection's input ('{s.latent_past.name}', "
                              "multi-head latent attention): prune-tokens prunes a prompt without a cache")
        if s.own_keys is False:
            raise OptionError(f"layer {s.layer}: its keys are computed from other tokens than its queries (K reads "
                              f"'{s.k.projection.input.name}': a reduced sequence or cross-attention); token "
                              "pruning ranks a layer's own tokens as keys")
        if s.layer_input is None or s.layer_output is None:
            raise OptionError(f"layer {s.layer}: cannot locate the layer's hidden-state input/output")
        if (other := coupled_site(s, sites)) is not None:
            raise OptionError(f"layer {s.layer}: its scores and layer {other.layer}'s are terms of each other's (two "
                              "streams attending together, e.g. LiLT's text and layout); prune-tokens gathers the "
                              "tokens of one hidden state")
        if s.softmax is not None and (why := _tokens_not_rows(s.layer_input, s.softmax.graph)) is not None:
            raise OptionError(f"layer {s.layer}: the hidden state {why}; prune-tokens gathers the token rows of "
                              "a [B, S, D] hidden state")
        q_in = s.q.projection.input if s.q is not None and s.q.projection is not None else None
        aligned = _row_aligned(s.layer_input, set(), limit=256)
        read = s.q.projection.node.inputs[0] if q_in is not None else None  # what the MatMul reads: a view of
        if read is not None and _views(read, s.layer_input):  # x itself when ``input`` looked through x
            aligned.add(q_in)  # (tf2onnx: Q = Reshape(x, [-1, D]) with x = Reshape(MatMul(..), [B, S, D]))
        if q_in is not None and q_in not in aligned and token_source(q_in) not in aligned:  # MLA: q_a_proj first
            raise OptionError(f"layer {s.layer}: the attention's rows are not the layer input's tokens (Q reads "
                              f"'{q_in.name}', regrouped from them, e.g. into windows); token pruning ranks a "
                              "layer's own tokens")
        split = next((n for b in (s.q, s.k) if b is not None for n in (b.transform or []) if _token_axis_op(n, s)),
                     None)
        if split is not None:
            raise OptionError(f"layer {s.layer}: {split.op_type} '{split.name}' in the q/k transform splits the token "
                              "axis (e.g. rotary on the patch tokens only, a prefix apart): the positions it "
                              "assumes do not survive pruning; prune-tokens cannot keep them")
        form = _mask_form(s)
        if s.mask is not None and form not in MASK_FORMS:
            raise OptionError(f"layer {s.layer}: mask form {form} is not supported")
        if s.mask_kind.startswith("causal") and s.mask is None:
            raise OptionError(f"layer {s.layer}: causal attention without a mask tensor on the scores "
                              f"({form}); prune-tokens gathers the mask's rows and columns")


# Ops whose output at a position reads their inputs at that (broadcast) position only.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "CastLike", "And", "Or", "Not", "Xor", "Equal",
                         "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Neg", "Abs", "Min", "Max", "Clip",
                         "Identity"})


def _same_for_every_query(mask: ir.Value, depth: int = 32) -> bool:
    """Whether a ``[..., S_q, S_k]`` mask is provably one row broadcast over the query axis: built by
    element-wise ops and ``Expand`` from tensors whose query axis has size 1 (the SDPA export's
    ``[B, 1, 1, S]`` padding row expanded to ``[B, 1, S, S]``). DeBERTa's ``m[:, None, :, None] *
    m[:, None, None, :]`` also masks padded query rows and is not."""
    if const_array(mask, max_elements=1) is not None:  # a scalar fill (initializer or Constant)
        return True
    shape = mask.shape
    if shape is not None and (shape.rank() < 2 or shape[-2] == 1):
        return True
    node = mask.producer()
    if node is None or depth == 0:
        return False
    if node.op_type == "Expand":
        return _same_for_every_query(node.inputs[0], depth - 1)
    if _always_true(node):  # transformers' mask builders: q_idx >= 0 is the query axis of a constant
        return True
    return node.op_type in ELEMENTWISE and all(
        _same_for_every_query(i, depth - 1) for i in node.inputs if i is not None)


def _nonnegative_index(value: ir.Value, depth: int = 8) -> bool:
    """Elements of a ``Range`` from a constant start >= 0 with a constant step > 0, through ops that
    only move or pick elements (views, slices, expands) and ``Add`` of a constant >= 0 (dynamo writes
    the query index as ``arange + 0``)."""
    node = value.producer()
    if node is None or depth == 0:
        return False
    if node.op_type in ("Unsqueeze", "Reshape", "Squeeze", "Identity", "Slice", "Expand", "Transpose", "Flatten"):
        return _nonnegative_index(node.inputs[0], depth - 1)
    if node.op_type == "Add":
        consts = [const_array(i, max_elements=1) for i in node.inputs]
        others = [i for i, c in zip(node.inputs, consts) if c is None]
        return (len(others) == 1 and all(float(c.reshape(())) >= 0 for c in consts if c is not None)
                and _nonnegative_index(others[0], depth - 1))
    if node.op_type != "Range":
        return False
    start, step = (const_array(v, max_elements=1) for v in (node.inputs[0], node.inputs[2]))
    return start is not None and step is not None and float(start.reshape(())) >= 0 and float(step.reshape(())) > 0


def _always_true(node: ir.Node) -> bool:
    """``index >= c`` or ``index > c`` with c < 0 (or ``>= 0``), index a non-negative Range (or the
    mirrored ``c <= index``): true everywhere, whatever the sequence length."""
    flip = {"LessOrEqual": "GreaterOrEqual", "Less": "Greater"}
    if node.op_type in flip:
        op, (index, bound) = flip[node.op_type], (node.inputs[1], node.inputs[0])
    elif node.op_type in ("GreaterOrEqual", "Greater"):
        op, (index, bound) = node.op_type, (node.inputs[0], node.inputs[1])
    else:
        return False
    c = const_array(bound, max_elements=1)
    if c is None or not _nonnegative_index(index):
        return False
    c = float(c.reshape(()))
    return c <= 0 if op == "GreaterOrEqual" else c < 0


def _mask_form(site: AttentionSite) -> str:
    return str(site.variant.get("mask", "none")).replace("+bias", "")


def _check_serial(site: AttentionSite) -> None:
    """after-attention gathers the attention output's rows and the residual's: a parallel block (GPT-J,
    NeoX: (attn + mlp(x)) + x) also adds an MLP of the full-length input in between; Cohere writes it
    after the residual, (x + attn) + mlp(x), which the same gather leaves full length too."""
    if not any(i is site.layer_input for i in site.residual.inputs):
        raise OptionError(f"layer {site.layer}: the residual Add '{site.residual.name}' adds a projection of the "
                          "layer input (a bottleneck, MobileBERT), not the input itself; use prune point layer-input")
    value = next(i for i in site.residual.inputs if i is not site.layer_input)
    for _ in range(32):
        node = value.producer()
        if node is None or node is site.pv:
            break
        quantized = quantized_projection(value)
        if quantized is not None:  # int8 projection: its scales are computed from its input, not joined
            value = quantized.input
            continue
        data = [i for i in node.inputs if i is not None and not is_weight(i)
                and i.dtype in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)]
        normed = row_norm_input(value) if len(data) > 1 else None
        if normed is not None:  # a per-token norm on the branch (Sub-LN, a post-norm): row by row
            value = normed
            continue
        if len(data) != 1:
            raise OptionError(f"layer {site.layer}: {node.op_type} '{node.name}' joins the attention output with "
                              "another value before the residual (a parallel block); "
                              "use prune point layer-input")
        value = data[0]
    out = site.residual.outputs[0]
    readers = [u.node for u in out.uses() if u.node.op_type not in ("Shape", "Size") and u.node.domain != DOMAIN]
    if len(readers) == 1 and readers[0].op_type == "Add":
        branch = next((i for i in readers[0].inputs if i is not out), None)
        if branch is not None and not reaches(branch, out):
            raise OptionError(f"layer {site.layer}: Add '{readers[0].name}' adds a branch computed beside the "
                              "attention to the residual sum ((x + attn) + mlp(x), a parallel block); use prune "
                              "point layer-input")


def _views(value: ir.Value, target: ir.Value, limit: int = 4) -> bool:
    """``value`` is ``target`` re-viewed (Reshape/Identity producers only)."""
    for _ in range(limit):
        if value is target:
            return True
        node = value.producer()
        if node is None or node.op_type not in ("Reshape", "Identity"):
            return False
        value = node.inputs[0]
    return value is target


def _row_aligned(x: ir.Value, post: set[int], limit: int = 64) -> set[ir.Value]:
    """``x`` and the values computed from it row by row before the attention (Llama's RMSNorm output,
    whose shape the exporter reads for the head merge's ``reshape(*input_shape, -1)``)."""
    found, todo = {x}, [x]
    while todo and len(found) < limit:
        for use in todo.pop().uses():
            node = use.node
            if node.op_type in ROW_OPS and id(node) not in post:
                for out in node.outputs:
                    if out not in found:
                        found.add(out)
                        todo.append(out)
    return found


def _past_views(value: ir.Value | None, hops: int = 4) -> ir.Node | None:
    """The producer of ``value`` past Reshape/Unsqueeze/Squeeze/Cast (at most ``hops``), or None."""
    for _ in range(hops):
        node = value.producer() if value is not None else None
        if node is None or node.op_type not in ("Reshape", "Unsqueeze", "Squeeze", "Cast"):
            return node
        value = node.inputs[0]
    return None


def _reads_input_seq_len(value: ir.Value | None, sources: set[ir.Value]) -> bool:
    """True if ``value`` is dim 1 of the shape of one of ``sources`` (graph inputs, or the layer's
    own input): Shape(in)[1:2] or Gather(Shape(in), 1), possibly through Reshape/Unsqueeze/Squeeze/Cast."""
    node = _past_views(value)
    if node is None:
        return False
    if node.op_type == "Shape":
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", start + 1)
        return node.inputs[0] in sources and (start, end) == (1, 2)
    if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].producer() is not None:
        shape_node = node.inputs[0].producer()
        index = const_array(node.inputs[1])
        return (shape_node.op_type == "Shape" and shape_node.inputs[0] in sources
                and index is not None and int(index.reshape(-1)[0]) == 1
                and shape_node.attributes.get_int("start", 0) == 0)
    return False


def _flattens_tokens(value: ir.Value | None, sources: set[ir.Value], depth: int = 4) -> bool:
    """True if ``value`` is a product with a factor that is dim 1 of a source's shape (``B * S``, as
    dynamo writes a view that flattens batch and tokens; ``B * S * 96 // 48`` where it also regroups the
    features: ConvBERT's convolution), through Reshape/Unsqueeze/Squeeze/Cast."""
    node = _past_views(value)
    if node is None or depth == 0:
        return False
    if node.op_type == "Div":  # an exact division by a constant keeps the factor
        return const_array(node.inputs[1], max_elements=1) is not None and _flattens_tokens(
            node.inputs[0], sources, depth - 1)
    return node.op_type == "Mul" and any(_reads_input_seq_len(i, sources) or _flattens_tokens(i, sources, depth - 1)
                                         for i in node.inputs)


def _token_split(nodes: list[ir.Node], static: int | None) -> ir.Node | None:
    """A Split whose constant sizes add up to the export's fixed token count: it cuts the token axis
    (DINOv3's dynamo export splits [CLS + registers, patches] to rotate the patches only)."""
    if not static:
        return None
    for node in nodes:
        sizes = const_array(node.inputs[1]) if node.op_type == "Split" and len(node.inputs) > 1 else None
        if sizes is not None and sizes.size > 1 and int(sizes.sum()) == static:
            return node
    return None


def _static_len(x: ir.Value) -> int | None:
    """The layer input's token count when the export fixed it (a vision encoder's patches + CLS)."""
    dims = x.shape.dims if x.shape is not None else ()
    return dims[1] if len(dims) >= 2 and isinstance(dims[1], int) and dims[1] > 1 else None


def _unfolds_fixed_tokens(node: ir.Node, concat: ir.Node, starts: list[int], out_rank: int,
                          static: int | None) -> bool:
    """A Reshape unfolding heads from the batch (``[B*H, S, Dh] -> [B, H, S, Dh]``) whose target holds the
    export's fixed token count as a constant at axis 2 (TF Whisper's context: the frames fix S)."""
    data = node.inputs[0].shape if node.op_type == "Reshape" else None
    return (data is not None and data.rank() == 3 and out_rank == 4
            and any(start == 2 and _is_const(p, static) for start, p in zip(starts, concat.inputs)))


def _is_const(piece: ir.Value | None, value: int | None) -> bool:
    """A one-element constant shape piece equal to ``value`` (dynamo writes a fixed sequence length into
    a view's target as such a piece: DINOv2 / BEiT ``view(B, 17, -1, 16)``)."""
    a = const_array(piece) if piece is not None and value is not None else None
    return a is not None and a.size == 1 and int(a.reshape(-1)[0]) == value


def _piece_axes(concat: ir.Node) -> tuple[list[int], int]:
    """The output axis each piece of a shape ``Concat`` starts at, and the target's rank."""
    axes, at = [], 0
    for piece in concat.inputs:
        axes.append(at)
        a = const_array(piece) if piece is not None else None
        dims = piece.shape.dims if piece is not None and piece.shape is not None else ()
        at += a.size if a is not None else dims[0] if len(dims) == 1 and isinstance(dims[0], int) else 1
    return axes, at


@register_pass
@dataclasses.dataclass(frozen=True)
class PruneTokens(Pass):
    """Cascade token pruning with SpAtten's schedule (or an explicit one)."""

    name = "prune-tokens"
    keep: float = 1.0
    schedule: tuple[float, ...] = ()
    unpruned: float = 0.15
    shape: str = "linear"
    min_keep: int = 1
    protect: str = "first"
    restore: str = "stale"
    importance: str = "sum"
    emit_kept: bool = False
    prune_point: str = "layer-input"
    # after-attention where a block allows it, else layer-input with a warning (the token rule's default;
    # an explicit --token-prune-point refuses instead)
    prune_point_fallback: bool = False
    recent: float = 0.0  # decoders: this fraction of each sample's budget is its most recent tokens (kept)

    def ratios(self, layers: int) -> list[float]:
        if self.schedule:
            return check_schedule(list(self.schedule), layers)
        return spatten_schedule(layers, self.keep, self.unpruned, self.shape)

    def call(self, model: ir.Model) -> PassResult:
        for name, value, choices in (("restore", self.restore, RESTORE), ("importance", self.importance, IMPORTANCE),
                                     ("protect", self.protect, PROTECT),
                                     ("prune_point", self.prune_point, PRUNE_POINTS)):
            if value not in choices:
                raise OptionError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.min_keep < 1:
            raise OptionError(f"min_keep must be >= 1, got {self.min_keep}")
        if not 0.0 <= self.recent < 1.0:
            raise OptionError(f"recent must be in [0, 1), got {self.recent}")
        sites = find_attention(model).sites
        if not sites:
            raise NoAttentionError("no attention found: nothing to prune")
        ratios = self.ratios(len(sites))
        if all(r == 1.0 for r in ratios) and not self.emit_kept:
            return PassResult(model, False)
        _check_sites(sites)
        opts = self
        why = _after_attention_refusal(sites, ratios) if self.prune_point == "after-attention" else None
        if why is not None:
            if not self.prune_point_fallback:
                raise why
            logger.warning("prune-tokens: %s - pruning at the next layer's input instead", str(why).rsplit("; use", 1)[0])
            opts = dataclasses.replace(self, prune_point="layer-input")
        _Rewrite(model, sites, ratios, opts).run()
        if _fixed_shapes(model):
            _check_loads(model)
        logger.info("prune-tokens: %d layers keep %s of the tokens (importance %s, prune point %s, at least %d "
                    "tokens, restore %s)", len(sites), " ".join(f"{r:.2f}" for r in ratios), opts.importance,
                    opts.prune_point, opts.min_keep, opts.restore)
        return PassResult(model, True)


def _after_attention_refusal(sites: list[AttentionSite], ratios: list[float]) -> OptionError | None:
    """Why pruning right after a deciding layer's softmax cannot work on these blocks, or None."""
    folded = next((s for s in sites if s.variant.get("layout") == "folded"), None)
    if folded is not None:  # rows per sample, P per (sample, head)
        return OptionError(f"layer {folded.layer}: --token-prune-point after-attention on heads folded into the "
                           "batch axis (3-D scores [B*H, S, S]) is not supported; use layer-input")
    for site, ratio, nxt in zip(sites, ratios, [*ratios[1:], 1.0]):
        if nxt < ratio:
            try:
                _check_serial(site)
            except OptionError as e:
                return e
    return None


class _Rewrite:
    def __init__(self, model: ir.Model, sites: list[AttentionSite], ratios: list[float], opts: PruneTokens):
        self.e = GraphEditor(model, "spatten")
        self.model, self.sites, self.ratios, self.opts = model, sites, ratios, opts
        self.importance = IMPORTANCE[opts.importance]
        self.decoder = any(s.mask_kind.startswith("causal") for s in sites)
        self.site_terms = {id(v) for s in sites for v in (s.mask, *s.bias_terms, *s.sinks) if v is not None}
        ensure_functions(model, [self.importance, "TokenSelect", "GatherTokens", "ScatterTokens", "GatherRows"])

    def call(self, name: str, *inputs: ir.Value, outputs: int = 1):
        return self.e.op(name, list(inputs), domain=DOMAIN, outputs=outputs, hint=name)

    def run(self) -> None:
        e, x0 = self.e, self.sites[0].layer_input
        mask_input = next((v for v in self.model.graph.inputs if v.name == self.sites[0].mask_source), None)
        full = e.op("Shape", [x0], end=2)  # [B, S]
        ones = e.op("ConstantOfShape", [full], value=ir.tensor(np.array([1.0], np.float32)))
        valid = e.op("Cast", [mask_input], to=ir.DataType.FLOAT) if mask_input is not None else ones
        pos = e.op("Cast", [e.op("Sub", [e.op("CumSum", [ones, e.const("axis", np.int64(1))]), e.const("one", np.float32(1))])],
                   to=ir.DataType.INT64)
        seq = e.op("Cast", [e.op("Shape", [x0], start=1, end=2)], to=ir.DataType.FLOAT)
        lens = e.op("ReduceSum", [valid, e.const("axes", np.array([1], np.int64))], keepdims=0)
        self.pos, self.valid, self.seq, self.lens = pos, valid, seq, lens
        self.full = full
        self.gathered: dict[tuple[int, int], ir.Value] = {}
        self.acc: ir.Value | None = None
        self.buf: ir.Value | None = None
        self.kept_outputs: list[ir.Value] = []
        pruned = False
        after = self.opts.prune_point == "after-attention"
        for site, ratio, prev, nxt in zip(self.sites, self.ratios, [1.0, *self.ratios], [*self.ratios[1:], 1.0]):
            x = site.layer_input
            if ratio < prev and not after:
                x = self._select(x, ratio)
                e.replace_uses(site.layer_input, x, keep=e.added)
                pruned = True
            here = after and nxt < ratio  # prune inside this layer, right after its softmax
            post_nodes = self._post_attention(site) if here else []
            if pruned:
                post = set(map(id, post_nodes))
                full_region = own_region(x, site.layer_output)
                self._gather_positional(site, full_region, x)
                self._rebind_seq_shapes([n for n in full_region if id(n) not in post], x,
                                        static=_static_len(site.layer_input))
                self._replace_mask(site, self.valid, full_region, x)
                if site.sinks:
                    rebroadcast_sinks(e, site.sinks, site.sink_concat)
            elif self._compact_mask(site, mask_input):
                self._replace_mask(site, self.valid, [], x)
            if any(r < q for r, q in zip(self.ratios[site.layer + 1:], self.ratios[site.layer:])):
                # Scores are only needed while a later layer still prunes.
                values = [site.pv.inputs[1]] if self.opts.importance in ("value", "causal") else []
                score = self.call(self.importance, self._per_head(site.probs, site), self.valid,
                                  *[self._per_head(v, site) for v in values])
                self.acc = score if self.acc is None else e.op("Add", [self.acc, score])
            if here:
                _check_serial(site)
                rows = self.call("GatherRows", site.pv.inputs[0], None)  # sel filled below
                xk = self._select(x, nxt, rows_node=rows.producer())
                site.pv.replace_input_with(0, rows)
                slot = next(i for i, v in enumerate(site.residual.inputs) if v is site.layer_input or v is x)
                site.residual.replace_input_with(slot, xk)
                self._rebind_seq_shapes(post_nodes, xk, also=_row_aligned(x, set(map(id, post_nodes))),
                                        static=_static_len(site.layer_input))
                self._gather_inputs(site, post_nodes, xk)  # e.g. XLM's padding mask multiplied after the FFN
                pruned = True
        pos, valid, buf, kept_outputs = self.pos, self.valid, self.buf, self.kept_outputs
        if pruned:
            self._restore(self.sites[-1].layer_output, buf, pos, valid, full)
        if self.opts.emit_kept:
            self._emit_kept(full, pos, valid, kept_outputs)
        e.forget_shapes()
        e.commit()
        # the replaced masks' ops are dead now: left in, onnxruntime still runs them, and an exporter's
        # Expand to the scores' full-length shape fails there (XLM's per-layer mask)
        RemoveUnusedNodesPass()(self.model)

    def _compact_mask(self, site: AttentionSite, mask_input: ir.Value | None) -> bool:
        """Whether a layer before the first pruning decision takes the compact ``[B, 1, 1, S]`` mask
        the pruned layers get, in place of the exporter's: only a pure padding mask of the same 2-D
        input (no causal or window part), which the compact one equals. Exporters broadcast it to
        ``[B, 1, S, S]`` with dozens of ops and a full-size ``Where``; the compact one broadcasts (the
        exporter's mask ops, now unread, are dropped), and fold-key-mask (``--optimize``) can turn it
        into a row of the score MatMul."""
        return (not self.decoder and mask_input is not None and site.mask_kind == "padding"
                and site.mask_source == mask_input.name and _mask_form(site) in MASK_FORMS
                and _same_for_every_query(site.mask))

    def _per_head(self, value: ir.Value, site: AttentionSite) -> ir.Value:
        """Heads folded into the batch (3-D ``[B*H, S, .]``, batch-major as every folding exporter
        writes it) -> ``[B, H, S, .]`` for the per-head importance rules."""
        if site.variant.get("layout") != "folded" or (value.shape is not None and value.shape.rank() != 3):
            return value  # BLOOM's softmax runs on the [B, H, S, S] view already
        e = self.e
        shape = e.op("Concat", [e.op("Shape", [self.valid], start=0, end=1), e.const("m1", np.array([-1], np.int64)),
                                e.op("Shape", [value], start=1)], axis=0)
        return e.op("Reshape", [value, shape])

    def _select(self, x: ir.Value, ratio: float, rows_node: ir.Node | None = None) -> ir.Value:
        """TopK selection for ``ratio`` from the accumulated scores; returns x's kept rows and updates
        pos/valid/acc (and the stale-restore buffer with x's rows: the tokens' last computed state)."""
        e = self.e
        if self.buf is None:
            self.buf = x if self.opts.restore == "stale" else e.op("Mul", [x, e.const("zero", np.float32(0))])
        elif self.opts.restore == "stale":
            vcol = e.op("Unsqueeze", [e.op("Cast", [self.valid], to=ir.DataType.BOOL),
                                      e.const("axes", np.array([-1], np.int64))])
            old = self.call("GatherTokens", self.buf, self.pos)
            self.buf = self.call("ScatterTokens", self.buf, self.pos, e.op("Where", [vcol, x, old]))
        k, kper = self._budget(ratio, self.seq, self.lens, x)
        protect = self._protected(self.pos, self.lens, kper)
        sel, self.valid = self.call("TokenSelect", self.acc, self.valid, protect, k, kper, outputs=2)
        if rows_node is not None:
            rows_node.replace_input_with(1, sel)
        self.pos = e.op("GatherElements", [self.pos, sel], axis=1)
        self.acc = e.op("GatherElements", [self.acc, sel], axis=1)
        self.kept_outputs.append(self.pos)
        return self.call("GatherTokens", x, sel)

    @staticmethod
    def _post_attention(site: AttentionSite) -> list[ir.Node]:
        """The nodes of a layer after its attention probabilities: P@V, head merge, output
        projection, residual and FFN - the part that runs on kept tokens when pruning in-layer."""
        found: dict[int, ir.Node] = {id(site.pv): site.pv, id(site.residual): site.residual}
        for start in (site.pv.outputs[0], site.residual.outputs[0]):
            for node in own_region(start, site.layer_output):
                found[id(node)] = node
        return list(found.values())

    def _rebind_seq_shapes(self, nodes: list[ir.Node], x: ir.Value, also: set[ir.Value] = frozenset(),
                           static: int | None = None) -> None:
        """Dynamo exports build reshape targets from the graph inputs' shapes (TorchScript's head merge
        from the layer input's); inside a pruned layer those sequence-length pieces must read the
        current token count. The target Concat is cloned with each such piece replaced by dim 1 of
        the Reshape's own data input when it is a [B, S, ...] view (rank 3 or 4; node-local, so a walk
        that strays into a later layer stays right), else of ``x`` (a Gemm's [B*S, D] or a GQA repeat's
        [B, G, rep, S, Dh] has no token count at dim 1). ``also``: more full-length values whose
        shape is read (after-attention: the layer input and its row-wise norm). ``static``: the token
        count the export fixed (a vision encoder's), which dynamo writes into targets as a constant
        piece: one at target axis 1 is rebound the same way."""
        split = _token_split(nodes, static)
        if split is not None:
            raise OptionError(f"Split '{split.name}' cuts the export's fixed {static} tokens "
                              "into parts of constant sizes (e.g. RoPE on the patch tokens only); prune-tokens "
                              "cannot shrink them")
        sources = {*self.model.graph.inputs, *also}
        done: dict[tuple[int, int], ir.Value] = {}
        for node in nodes:
            for i, shape in enumerate(node.inputs):
                if node.op_type == "Reshape" and i == 1:
                    shape = (rebind_token_entry(self.e, node, static, lambda v: flow_axis(
                        v, sources | {x}, _reads_input_seq_len, _piece_axes))
                             or self._split_static_target(node, static))
                if node.op_type in ("Reshape", "Expand") and i == 1 and shape is not None:
                    shape = self._free_static_target(node, shape, static)
                concat = shape.producer() if shape is not None else None
                if concat is None or concat.op_type != "Concat" or (node.op_type == "Reshape" and i != 1):
                    continue
                starts, out_rank = _piece_axes(concat)
                if _unfolds_fixed_tokens(node, concat, starts, out_rank, static):
                    raise OptionError(f"Reshape '{node.name}' unfolds heads from the batch with the export's fixed "
                                      f"{static} tokens written into its target; prune-tokens cannot shrink it")
                reads = [j for j, p in enumerate(concat.inputs)
                         if _reads_input_seq_len(p, sources) or (starts[j] == 1 and _is_const(p, static))]
                flat = [j for j, p in enumerate(concat.inputs) if j not in reads and _flattens_tokens(p, sources)]
                if len(flat) == 1 and not reads and not any(_is_const(p, -1) for p in concat.inputs):
                    # dynamo's MoE experts: view(B * S, ...) with B * S from the inputs' sizes; -1 is the
                    # current B * k (the only free dim of the target)
                    pieces = [self.e.const("m1", np.array([-1], np.int64)) if j in flat else p
                              for j, p in enumerate(concat.inputs)]
                    node.replace_input_with(i, self.e.op("Concat", pieces, axis=concat.attributes["axis"].value))
                    continue
                if not reads:
                    continue
                data = node.inputs[0] if node.op_type == "Reshape" else x
                rank = data.shape.rank() if data.shape is not None else None
                flow = flow_axis(data, sources | {x}, _reads_input_seq_len, _piece_axes)
                # [B*S, D] (Gemm) or [B, G, rep, S, Dh] (GQA): x's axis; no shape: the data flow's, if it tells
                data = data if rank in (3, 4) or (rank is None and flow is not None) else x
                key = (id(concat), id(data))
                if key not in done:
                    flow = flow_axis(data, sources | {x}, _reads_input_seq_len, _piece_axes)
                    axes = {j: (token_axis(data, self.model.graph, starts[j] + rank - out_rank, flow, static)
                                if rank is not None else flow) if data is not x else 1 for j in reads}
                    pieces = [self.e.op("Shape", [data], start=axes[j], end=axes[j] + 1) if j in reads else p
                              for j, p in enumerate(concat.inputs)]
                    done[key] = self.e.op("Concat", pieces, axis=concat.attributes["axis"].value)
                node.replace_input_with(i, done[key])

    def _split_static_target(self, node: ir.Node, static: int | None) -> ir.Value:
        """A Reshape target folded to one constant (onnxslim / onnxsim on an export with a fixed token
        count: ViT's ``[-1, 17, 64]``) whose axis-1 entry is that count becomes a Concat of pieces, so the
        token piece is rebound like dynamo's constant pieces."""
        target = node.inputs[1]
        a = const_array(target) if static else None
        if a is None or a.ndim != 1 or a.size < 3 or int(a[1]) != static:
            return target
        pieces = [self.e.const("target", a[:1]), self.e.const("target", a[1:2]), self.e.const("target", a[2:])]
        new = self.e.op("Concat", pieces, axis=0)
        node.replace_input_with(1, new)
        return new

    def _free_static_target(self, node: ir.Node, target: ir.Value, static: int | None) -> ir.Value:
        """A constant Reshape/Expand target of an export with fixed shapes (``[2, 2, 2, 7, 16]``: the
        GQA repeat; ``[14, 64]``: a Gemm's flattened tokens) made length-free, exact at the exported
        shapes: an Expand entry equal to its data's aligned dim becomes 1 (broadcast keeps the data's
        dim); a Reshape's leading entries equal to the data's dims, the token axis among them, read the
        data's shape (Cohere's ``[2, 4, 7, -1]``); a token count (or batch x tokens) left elsewhere becomes
        -1 (``[2, 4, 7, 16]`` after the GQA repeat). Refused when that is ambiguous (two such entries, or
        one beside a -1): which entry is the token axis is not in the graph."""
        a = const_array(target) if static else None
        dims = node.inputs[0].shape.dims if node.inputs[0].shape is not None else None
        if a is None or a.ndim != 1 or dims is None or not all(isinstance(d, int) for d in dims):
            return target
        t = a.astype(np.int64).copy()
        if node.op_type == "Expand":
            off = len(t) - len(dims)
            for j in range(max(off, 0), len(t)):
                if t[j] == dims[j - off] and t[j] != 1:
                    t[j] = 1
            if np.array_equal(t, a):
                return target
            new = self.e.const("target", t)
        else:
            if static not in dims:
                return target
            token = dims.index(static)
            lead = 0
            while lead < min(len(t), len(dims)) and t[lead] == dims[lead] and t[lead] > 0:
                lead += 1
            copy = lead if token < lead else 0  # the token axis kept in place: read from the data
            rest = t[copy:]
            flat = int(np.prod(dims[:token + 1]))  # the tokens and the axes before them, flattened
            left = [j for j in range(len(rest)) if rest[j] == static or (rest[j] == flat and -1 not in rest)]
            if len(left) > 1 or (left and -1 in rest.tolist()):
                raise OptionError(f"{node.op_type} '{node.name}' has a target fixed at the export's {static} tokens "
                                  f"({a.tolist()}) in which the token axis is ambiguous; prune-tokens cannot "
                                  "shrink it (export with a dynamic sequence length)")
            if left:
                rest[left[0]] = -1
            if not copy and not left:
                return target
            new = self.e.const("target", rest)
            if copy:
                new = self.e.op("Concat", [self.e.op("Shape", [node.inputs[0]], start=0, end=copy), new], axis=0)
        node.replace_input_with(1, new)
        return new

    def _protected(self, pos: ir.Value, lens: ir.Value, kper: ir.Value) -> ir.Value:
        """1.0 for tokens never pruned: the first (CLS), and with first+last each sample's last real
        token (SEP), which BERT-style encoders use as an attention sink. Decoders with ``recent``: also
        each sample's last ``floor(recent * kper)`` real tokens (a causal model's column sums favour
        early tokens, every later row reads them; the next token depends most on the recent ones)."""
        e = self.e
        first = e.op("Equal", [pos, e.const("zero", np.int64(0))])
        if self.decoder and self.opts.recent > 0:
            window = e.op("Cast", [e.op("Floor", [e.op("Mul", [e.op("Cast", [kper], to=ir.DataType.FLOAT),
                                                               e.const("recent", np.float32(self.opts.recent))])])],
                          to=ir.DataType.INT64)
            start = e.op("Unsqueeze", [e.op("Sub", [e.op("Cast", [lens], to=ir.DataType.INT64), window]),
                                       e.const("axes", np.array([1], np.int64))])
            first = e.op("Or", [first, e.op("GreaterOrEqual", [pos, start])])
        if self.decoder:  # the last token (left or right padded) makes the next-token logits: always kept
            last = e.op("Sub", [e.op("Cast", [lens], to=ir.DataType.INT64), e.const("one", np.int64(1))])
            axes = e.const("axes", np.array([1], np.int64))
            end = e.op("Sub", [e.op("Cast", [self.seq], to=ir.DataType.INT64), e.const("one", np.int64(1))])
            first = e.op("Or", [first, e.op("Or", [e.op("Equal", [pos, e.op("Unsqueeze", [last, axes])]),
                                                   e.op("Equal", [pos, end])])])
        if self.opts.protect == "first+last":
            last = e.op("Sub", [e.op("Cast", [lens], to=ir.DataType.INT64), e.const("one", np.int64(1))])
            axes = e.const("axes", np.array([1], np.int64))
            first = e.op("Or", [first, e.op("Equal", [pos, e.op("Unsqueeze", [last, axes])])])
        protect = e.op("Cast", [first], to=ir.DataType.FLOAT)
        if self.opts.protect == "none":
            protect = e.op("Mul", [protect, e.const("zero", np.float32(0))])
        return protect

    def _budget(self, ratio: float, seq: ir.Value, lens: ir.Value, x_in: ir.Value) -> tuple[ir.Value, ir.Value]:
        e, r, lo = self.e, self.e.const("ratio", np.float32(ratio)), self.e.const("min_keep", np.int64(self.opts.min_keep))
        k = e.op("Cast", [e.op("Ceil", [e.op("Mul", [seq, r])])], to=ir.DataType.INT64)
        k = e.op("Min", [e.op("Max", [k, lo]), e.op("Shape", [x_in], start=1, end=2)])
        kper = e.op("Cast", [e.op("Ceil", [e.op("Mul", [lens, r])])], to=ir.DataType.INT64)
        return k, e.op("Max", [kper, lo])

    def _gather_positional(self, site: AttentionSite, region: list[ir.Node], x: ir.Value) -> None:
        """Score terms and position-indexed inputs (RoPE cos/sin) of a pruned layer, at the kept positions."""
        e = self.e
        folded = site.variant.get("layout") == "folded"
        for term, add in zip(site.bias_terms, site.bias_adds):
            for cut in length_slices(term, x, _token_dim(site)):  # MPT's ALiBi: the last k columns of a fixed table
                full_length_cut(e, cut, self.full)
            check_term(site.layer, term, region, x, "additive position term on the scores", (3, 4))
            view = term
            if term.shape.rank() == 3 and folded:  # BLOOM's ALiBi [B*H, 1, S]: gathered as [B, H, 1, S], folded back
                view = self._per_head(term, site)
                view.shape = ir.Shape([None, None, *term.shape.dims[1:]])
            elif term.shape.rank() == 3:  # MPT's ALiBi [H, 1, S] on [B, H, S, S] scores: broadcast as [1, H, 1, S]
                view = e.op("Unsqueeze", [term, e.const("axes", np.array([0], np.int64))])
                view.shape = ir.Shape([1, *term.shape.dims])
            # a key-only term (ALiBi: its query axis is 1) needs only its key columns gathered
            new = self._gathered(view, (3,) if unit_axis(view, 2) else (2, 3))
            if site.mask is None:  # the padding mask is inside the term: tokens a sample drops are masked here
                new = e.op("Add", [new, self._valid_bias()])
            if view is not term and folded:
                new = e.op("Reshape", [new, e.op("Concat", [e.const("m1", np.array([-1], np.int64)),
                                                            e.op("Shape", [new], start=2)], axis=0)])
            for i, inp in enumerate(add.inputs):
                if inp is term:
                    add.replace_input_with(i, new)
        self._gather_inputs(site, region, x)

    def _gather_inputs(self, site: AttentionSite, region: list[ir.Node], x: ir.Value) -> None:
        """Position-indexed inputs ``region`` reads (RoPE tables, XLM's ``hidden * mask[:, :, None]``),
        at the kept positions. Every site's own mask and score terms are rewritten with that site's
        kept positions (skipped here)."""
        skip = {id(v) for v in (x, site.layer_input) if v is not None} | self.site_terms
        full_len = _static_len(site.layer_input) if site.layer_input is not None else None  # fixed shapes
        for value, axes, lift in positional_inputs(site.layer, region, skip, x, self.model.graph, site.mask_source,
                                                   full_len):
            new = self._gathered(value, axes, lift)
            for node in region:
                for i, inp in enumerate(node.inputs):
                    if inp is value:
                        node.replace_input_with(i, new)

    def _gathered(self, value: ir.Value, axes: tuple[int, ...], lift: int = 0) -> ir.Value:
        key = (id(value), id(self.pos))
        if key not in self.gathered:
            self.gathered[key] = gather_positions(self.e, value, self.pos, self.full, axes, lift)
        return self.gathered[key]

    def _valid_bias(self) -> ir.Value:
        """[B, 1, 1, k]: 0 for valid kept tokens, MASK_BIAS for padding and the tokens a sample drops."""
        e = self.e
        dropped = e.op("Sub", [e.const("one", np.float32(1)), self.valid])
        bias = e.op("Mul", [dropped, e.const("bias", np.float32(MASK_BIAS))])
        return e.op("Unsqueeze", [bias, e.const("axes", np.array([1, 2], np.int64))])

    def _replace_mask(self, site: AttentionSite, valid: ir.Value, region: list[ir.Node], x: ir.Value) -> None:
        e, node = self.e, site.mask_node
        if node is None or site.mask is None:
            return
        form, axes = _mask_form(site), e.const("axes", np.array([1, 2], np.int64))
        sign = -1.0 if node.op_type == "Sub" else 1.0  # scores - mask (XLNet): the new mask is subtracted too
        if self.decoder and form == "causal+additive":  # GPT-Neo: Where(causal, scores, fill) + padding mask
            where = next(p for i in node.inputs if (p := i.producer()) is not None and p.op_type == "Where")
            cond = where.inputs[0]
            if not shrinks_causal(cond, x):
                check_term(site.layer, cond, region, x, "causal condition")
                where.replace_input_with(0, self._gathered(cond, (2, 3)))
            form = "additive"
        if self.decoder:
            # The exporter's causal(+padding, +sliding window) mask at the kept rows and columns: kept
            # tokens stay in order, so this is causal among them; plus the tokens each sample drops.
            for cut in length_slices(site.mask, x, _token_dim(site)):  # [..., :k] of the layer's own key length
                full_length_cut(e, cut, self.full)
            check_term(site.layer, site.mask, region, x, "mask")
            gathered = self._gathered(site.mask, (2, 3))
            dropped = e.op("Unsqueeze", [e.op("Equal", [valid, e.const("zero", np.float32(0))]), axes])
            new = {"additive": lambda: e.op("Add" if sign > 0 else "Sub",
                                            [gathered, e.op("CastLike", [self._valid_bias(), gathered])]),
                   "where": lambda: e.op("Or", [gathered, dropped]),
                   "where_scores_true": lambda: e.op("And", [gathered, e.op("Not", [dropped])])}[form]()
        elif form == "additive":
            # Where(bool(1 - valid[:, None, None]), bias, 0): the SDPA mask form onnxruntime's attention
            # fusion recognizes (a no-op Expand included), so --optimize fuses the layers that need no
            # importance. Its raw 2-D mask is used as is: the kept tokens need not be a prefix.
            col = e.op("Unsqueeze", [e.op("Unsqueeze", [valid, e.const("axis", np.array([1], np.int64))]),
                                     e.const("axis", np.array([2], np.int64))])
            inv = e.op("Sub", [e.const("one", np.float32(1)),
                               e.op("Expand", [col, e.const("shape", np.array([1], np.int64))])])
            new = e.op("Where", [e.op("Cast", [inv], to=ir.DataType.BOOL),
                                 e.const("bias", np.float32(sign * MASK_BIAS)), inv])
        else:  # Where(mask_is_padding, fill, scores) or Where(mask_is_kept, scores, fill)
            new = e.op("Unsqueeze", [e.op("Equal", [valid, e.const("zero", np.float32(0))]), axes])
            new = e.op("Not", [new]) if form == "where_scores_true" else new
        for i, inp in enumerate(node.inputs):
            if inp is site.mask:
                node.replace_input_with(i, new)

    def _restore(self, out: ir.Value, buf: ir.Value, pos: ir.Value, valid: ir.Value, full: ir.Value) -> None:
        e = self.e
        vcol = e.op("Unsqueeze", [e.op("Cast", [valid], to=ir.DataType.BOOL), e.const("axes", np.array([-1], np.int64))])
        if self.opts.restore == "stale":
            rows = e.op("Where", [vcol, out, self.call("GatherTokens", buf, pos)])
        elif self.opts.restore == "zero":
            rows = e.op("Mul", [out, e.op("Unsqueeze", [valid, e.const("axes", np.array([-1], np.int64))])])
        else:  # mean: every pruned row is the mean of the surviving rows of its sample
            w = e.op("Unsqueeze", [valid, e.const("axes", np.array([-1], np.int64))])
            axes = e.const("axes", np.array([1], np.int64))
            total = e.op("ReduceSum", [e.op("Mul", [out, w]), axes], keepdims=1)
            count = e.op("Max", [e.op("ReduceSum", [w, axes], keepdims=1), e.const("one", np.float32(1))])
            mean = e.op("Div", [total, count])  # [B, 1, D]
            buf = e.op("Add", [e.op("Mul", [buf, e.const("zero", np.float32(0))]), mean])
            rows = e.op("Where", [vcol, out, self.call("GatherTokens", buf, pos)])
        restored = self.call("ScatterTokens", buf, pos, rows)
        e.replace_uses(out, restored, keep=e.added)

    def _emit_kept(self, full: ir.Value, pos: ir.Value, valid: ir.Value, per_layer: list[ir.Value]) -> None:
        e = self.e
        zeros = e.op("ConstantOfShape", [full], value=ir.tensor(np.array([0.0], np.float32)))
        kept = e.op("ScatterElements", [zeros, pos, valid], axis=1)
        kept.name = "spatten_kept_mask"
        kept.type, kept.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", "sequence"])
        self.model.graph.outputs.append(kept)
        for i, p in enumerate(per_layer):
            out = e.op("Identity", [p])
            out.name = f"spatten_kept_positions.{i}"
            out.type, out.shape = ir.TensorType(ir.DataType.INT64), ir.Shape(["batch", f"kept_{i}"])
            self.model.graph.outputs.append(out)
