"""normalize: put exported graphs into one canonical form before matching.

Rewrites (in order):
  default-domain opset 13-16 -> 17 (onnxscript's version converter, onnx's C API as its fallback;
                           tf2onnx writes opset 15 by default; spattenc's rewrites need 17). Older
                           opsets are left as they are (the rewrites refuse them in one line)
  onnx shape inference     -> dtypes and symbolic shapes on every value (used by the matchers)
  Cast(Concat(pieces), to=int64) -> Concat(Cast(piece, to=int64)) for int32/int64 1-D pieces
                           (:mod:`.shape_casts`; tf2onnx's reshape targets, assembled in int32)
  Sub(Mul(x, keep), Mul(c, Sub(1, keep))) (keep: a boolean cast to float) -> Where(keep, x, -c)
                           (:mod:`.mask_forms`; TF GPT-2's causal mask, and its Add form)
  Tile(x, reps) repeating only size-1 axes -> Expand(x, reps) (:mod:`.tile_repeat`; TF Mistral's K/V repeat)
  Add(Add(scores, m1), m2) with m1, m2 masks -> Add(scores, Add(m1, m2))   (:mod:`.mask_forms`; TF CTRL)
  SequenceAt(SplitToSequence(x, sizes), i) with constant indices -> Split(x, sizes)[i]
                           (dynamo's QKV split; sizes 1-D, or a chunk size and x's split axis static;
                           a chunk c of an axis not known: Slice(x, i*c, (i+1)*c) for i >= 0).
                           onnxscript's folder does the same where x's shape is known when it runs,
                           which a saved onnxruntime model's unfused ops lose (unfuse-ort)
  onnxscript constant folding (small tensors only; not its pattern rewrites), dead-code removal
  Conv1d with kernel 1 on [B, C, S] -> Transpose, MatMul (block-diagonal for groups), Add, Transpose
                           (:mod:`.pointwise_conv`; SqueezeBERT's projections are such convolutions), then
                           the channels-first Transposes moved down until they cancel (:mod:`.transpose_sink`)
  Einsum (a permutation, a projection by a constant, one batched product) -> Transpose / MatMul / Reshape
                           (:mod:`.einsum_lower`; XLNet's relative attention)
  Shape(x)[-1], x [B,H,S,Dh] with a static Dh -> Dh, folded on (SDPA exports compute the attention
                           scale 1/sqrt(Dh) from it; only that axis: pruning changes the others)
  Gather(x, [i], axis) of a float x -> Slice(x, i, i + 1, axis) (keeps the axis; the per-head slice form)
  RotaryEmbedding-23(x, cos, sin[, position_ids]) -> x * cos + rotate_half(x) * sin   (ONNX's own RoPE op,
                           which onnxscript fuses in torch's default opset-23 export: the RoPE ops the
                           matchers read; interleaved stays fused, logged, and find-attention names it)
  slice writes tiling an empty tensor (``k[..., :d] = a; k[..., d:] = b``) -> Concat(a, b, axis=-1)
                           (:mod:`.slice_assign`; the MLA key assembly)
  SequenceAt(SplitToSequence(x, sizes, axis), i) -> Split(x, sizes)[i], or Slice for a scalar size
                           (torch's chunk/split under dynamo; the folder does it only on a static axis)
  Dropout(x) (inference)   -> x
  Cast(x, to=dtype(x))     -> x
  Identity(x)              -> x      (again: the folds above can expose new ones; not when it makes
                                      a subgraph output of an outer-scope value)

Large weights are never folded (size limits below), so normalizing a 600 MB model does not copy its
weights. Graph outputs keep their names: a removed node that produced a graph output is kept.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    InlinePass,
    RemoveUnusedNodesPass,
)
from onnxscript import optimizer, version_converter

from spatten_compiler.editor import GraphEditor, rewrite_each
from spatten_compiler.errors import OptionError
from spatten_compiler.match import const_array
from spatten_compiler.pipeline import Pass, PassResult, register_pass
from spatten_compiler.shapes import infer_shapes

from .einsum_lower import einsums_to_matmuls
from .mask_forms import arithmetic_masks_to_where, sum_masks
from .pointwise_conv import pointwise_convs_to_matmuls
from .shape_casts import push_shape_casts
from .slice_assign import slice_writes_to_concat
from .tile_repeat import tiles_to_expands
from .unfuse_gqa import rotary_embedding_23

logger = logging.getLogger(__name__)


# Default-domain opsets normalize raises to OPSET_TARGET: ops changed little from 13 on (13: Split/Squeeze/
# ReduceSum take axes as inputs; 17 adds LayerNormalization), which onnx's adapters convert exactly.
OPSET_UPGRADE = range(13, 17)
OPSET_TARGET = 17


def upgrade_opset(model: ir.Model) -> bool:
    """Raise a default-domain opset in :data:`OPSET_UPGRADE` to :data:`OPSET_TARGET`; False (the model
    unchanged) for any other opset or when the converter cannot."""
    if model.opset_imports.get("", OPSET_TARGET) not in OPSET_UPGRADE:
        return False
    converter_log = logging.getLogger("onnxscript.version_converter")
    level = converter_log.level
    converter_log.setLevel(logging.ERROR)  # its note that it falls back to onnx's C API
    try:
        version_converter.convert_version(model, OPSET_TARGET, fallback=True)
    except Exception as e:  # noqa: BLE001 - the opset check of the rewrites then refuses in one line
        logger.info("normalize: opset %d not converted to %d: %s", model.opset_imports[""], OPSET_TARGET, e)
        return False
    finally:
        converter_log.setLevel(level)
    return model.opset_imports.get("") == OPSET_TARGET


def _is_noop(node: ir.Node) -> bool:
    if node.op_type == "Dropout" and node.domain in ("", "ai.onnx"):
        # Inference Dropout: no training_mode input, or a constant False one; the mask output unused.
        training = node.inputs[2] if len(node.inputs) > 2 else None
        if training is not None and (training.const_value is None or bool(training.const_value.numpy())):
            return False
        return len(node.outputs) < 2 or not node.outputs[1].uses()
    if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
        src, to = node.inputs[0], node.attributes.get("to")
        return src is not None and src.dtype is not None and to is not None and src.dtype == ir.DataType(to.value)
    return False


class _IdentityElimination(IdentityEliminationPass):
    """onnx-ir's pass, except for an ``Identity`` that makes a subgraph output of a value from an outer
    scope (an ``If`` branch passing a value through): without it the branch output has no producer
    inside the branch, which ONNX does not allow (DINOv3's TorchScript export)."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        src, out = (node.inputs[0] if node.inputs else None), node.outputs[0] if node.outputs else None
        if src is not None and out is not None and out.is_graph_output() and _scope(src) is not node.graph:
            return False
        return super()._try_eliminate_identity_node(node)


def _scope(value: ir.Value) -> ir.Graph | None:
    """The graph a value belongs to: its producer's, or the one it is an input or initializer of."""
    producer = value.producer()
    return producer.graph if producer is not None else value.graph


def remove_noops(graph: ir.Graph) -> int:
    """Bypass no-op Dropout and Cast nodes; return how many were removed."""
    outputs = set(graph.outputs)
    removed = 0
    for node in list(graph):
        if not _is_noop(node) or node.outputs[0] in outputs:
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
        graph.remove(node, safe=True)
        removed += 1
    return removed


def _head_size_read(node: ir.Node) -> int | None:
    """The head size a ``Slice`` / ``Gather`` of ``Shape(x)`` reads when it takes only the last axis
    of a per-head ``x`` [B, H, S, Dh] whose last dim is static (SDPA's ``1 / sqrt(q.shape[-1])``); None
    otherwise. Only that axis: token and head pruning change the others, so they stay computed."""
    if node.op_type not in ("Slice", "Gather") or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.attributes.get_int("start", 0) != 0 or (
            shape_node.attributes.get_int("end", None) is not None):
        return None
    x = shape_node.inputs[0]
    if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape.dims[3], int):
        return None
    args = [const_array(v) if v is not None else None for v in node.inputs[1:]]
    if any(a is None for a in args[:2 if node.op_type == "Slice" else 1]):
        return None
    if node.op_type == "Gather":
        idx = args[0]
        picked = idx.size == 1 and int(idx.reshape(-1)[0]) in (-1, 3)
    else:
        starts, ends = args[0], args[1]
        axes = args[2] if len(args) > 2 else None
        steps = args[3] if len(args) > 3 else None
        picked = (starts.size == 1 and int(starts.reshape(-1)[0]) in (-1, 3) and int(ends.reshape(-1)[0]) >= 4
                  and (axes is None or list(axes.reshape(-1)) == [0])
                  and (steps is None or list(steps.reshape(-1)) == [1]))
    return int(x.shape.dims[3]) if picked else None


def fold_head_sizes(model: ir.Model) -> int:
    """Reads of a per-head tensor's static head size from its Shape -> a constant; returns how many."""
    e = GraphEditor(model, "spatten/normalize")
    folded = 0
    for node in list(model.graph):
        size = _head_size_read(node)
        if size is None:
            continue
        index = node.inputs[1] if node.op_type == "Gather" else None
        gather_scalar = index is not None and index.shape is not None and index.shape.rank() == 0
        e.replace_uses(node.outputs[0], e.const("head_size", np.array(size if gather_scalar else [size], np.int64)))
        folded += 1
    return folded


def _to_slice(e: GraphEditor, node: ir.Node, data: ir.Value, start: int, end: int, axis: int,
              same_shape: bool = True) -> None:
    """``node``'s one output -> ``Slice(data, start, end, axis)`` (same type, and shape unless told not to);
    ``node`` removed."""
    bounds = [e.const(hint, np.array([v], np.int64)) for hint, v in (("start", start), ("end", end), ("axis", axis))]
    sliced = e.op("Slice", [data, *bounds])
    sliced.shape, sliced.type = node.outputs[0].shape if same_shape else None, node.outputs[0].type
    e.replace_uses(node.outputs[0], sliced)
    node.graph.remove(node, safe=True)


def gathers_to_slices(model: ir.Model) -> int:
    """``Gather(x, [i], axis)`` of a float tensor with a constant one-element 1-D index keeps the axis:
    it is ``Slice(x, i, i + 1, axis)`` (transformers 4's Falcon picks K and V out of the fused
    ``[B, S, H + 2, Dh]`` projection with ``fused[..., [-2], :]``), the per-head slice form the matchers
    read. Only along a static axis (heads, features): a dynamic one holds tokens. Integer data (shape
    arithmetic) keeps its Gathers."""
    e = GraphEditor(model, "spatten/normalize")
    count = 0
    for node in list(model.graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        data, index = node.inputs
        idx = const_array(index)
        if (idx is None or idx.ndim != 1 or idx.size != 1 or data is None or data.dtype is None
                or not data.dtype.is_floating_point() or data.shape is None):
            continue
        axis = node.attributes.get_int("axis", 0)
        if not isinstance(data.shape.dims[axis], int):
            continue  # a dynamic axis is a token axis: picking one token is not a per-head slice
        i = int(idx[0])
        _to_slice(e, node, data, i, np.iinfo(np.int64).max if i == -1 else i + 1, axis)
        count += 1
    if count:
        e.commit()
    return count


def rotary_to_ops(model: ir.Model) -> int:
    """ONNX ``RotaryEmbedding`` nodes -> rotate-half RoPE ops (:func:`.unfuse_gqa.rotary_embedding_23`);
    returns how many. One that has no such form (interleaved) stays, with the reason logged."""
    def decomposed(e: GraphEditor, node: ir.Node) -> ir.Value | None:
        try:
            (y,) = rotary_embedding_23(e, node)
        except OptionError as err:
            logger.warning("%s", err)
            return None
        return y
    return rewrite_each(model, "RotaryEmbedding", decomposed, remove=True)


def _chunk_bounds(sizes: np.ndarray, index: int) -> tuple[int, int] | None:
    """[start, end) of chunk ``index`` of ``SplitToSequence(x, size)`` with a scalar size (every chunk that
    size, the last maybe shorter: Slice clamps the end); None for a negative index (needs the count)."""
    return (int(sizes) * index, int(sizes) * (index + 1)) if index >= 0 else None


def _static_parts(x: ir.Value, sizes: np.ndarray, axis: int) -> np.ndarray:
    """A chunk size ``c`` of a static axis ``D`` as its parts' sizes (``c`` each, the last ``D mod c``):
    then a negative position reads a known part too. Sizes already a list, or an axis not known: as given."""
    dims = x.shape.dims if x.shape is not None else ()
    d = dims[axis] if sizes.ndim == 0 and -len(dims) <= axis < len(dims) else None
    if not isinstance(d, int) or int(sizes) <= 0:
        return sizes
    c = int(sizes)
    return np.array([c] * (d // c) + ([d % c] if d % c else []), np.int64)


def sequences_to_slices(model: ir.Model) -> int:
    """``SequenceAt(SplitToSequence(x, sizes, axis), i)`` with constant sizes and position -> an output of
    ``Split(x, sizes, axis)`` (a list of sizes: the form the matchers read, K/V narrower than Q in a
    multi-query packing) or ``Slice(x, i * size, (i + 1) * size, axis)`` (a scalar size, ``i >= 0``), exact
    whatever the axis length. onnxscript's folder does it only when the axis is static; onnxruntime's
    saved models (Reshape to ``[B, S, H, -1]``) leave it symbolic, and a sequence hides the packing
    (DeBERTa's ``chunk(3, dim=-1)``, GPT-2's fused QKV) from the matchers."""
    e = GraphEditor(model, "spatten/normalize")
    splits: dict[int, tuple[ir.Value, ...]] = {}
    stale: set[str] = set()
    count = 0
    for node in list(model.graph):
        if node.op_type != "SequenceAt" or node.domain not in ("", "ai.onnx"):
            continue
        split = node.inputs[0].producer()
        index = const_array(node.inputs[1])
        sizes = const_array(split.inputs[1]) if split is not None and len(split.inputs) > 1 else None
        if split is None or split.op_type != "SplitToSequence" or index is None or index.size != 1 or sizes is None:
            continue
        stale |= _symbols(node.outputs[0]) - _symbols(split.inputs[0])
        i, axis = int(index.reshape(())), split.attributes.get_int("axis", 0)
        sizes = _static_parts(split.inputs[0], sizes, axis)
        if sizes.ndim == 1 and -sizes.size <= i < sizes.size:
            if id(split) not in splits:
                parts = e.op("Split", [split.inputs[0], e.const("sizes", sizes.astype(np.int64))],
                             outputs=sizes.size, axis=axis)
                splits[id(split)] = parts if isinstance(parts, tuple) else (parts,)
            part = splits[id(split)][i]  # its shape inferred afterwards: a sequence's element shape is one for
            part.type = node.outputs[0].type  # every chunk (4, 1 and 1 heads would read as one symbolic size)
            e.replace_uses(node.outputs[0], part)
            node.graph.remove(node, safe=True)
        elif sizes.ndim == 0 and (bounds := _chunk_bounds(sizes, i)) is not None:
            _to_slice(e, node, split.inputs[0], *bounds, axis, same_shape=False)
        else:
            continue
        count += 1
    if count:
        e.commit()
        _forget_symbols(model, stale)
    return count


def _symbols(value: ir.Value) -> set[str]:
    return {str(d) for d in value.shape.dims if not isinstance(d, int)} if value.shape is not None else set()


def _forget_symbols(model: ir.Model, names: set[str]) -> None:
    """Symbolic dims inferred for a sequence's element (one for every chunk: 4, 1 and 1 heads read as one
    size ``unk``) are dropped wherever they spread, so that inference gives each chunk's own shape;
    onnxruntime plans buffers from equal symbols."""
    if not names:
        return
    for node in model.graph:
        for v in node.outputs:
            if v.shape is not None and _symbols(v) & names:
                v.shape = ir.Shape([None if not isinstance(d, int) and str(d) in names else d for d in v.shape.dims])


@register_pass
@dataclasses.dataclass(frozen=True)
class Normalize(Pass):
    """Constant folding + no-op removal so that attention matching sees one canonical form."""

    name = "normalize"
    fold_limit: int = 1 << 16  # largest tensor (elements) the folder may create

    def call(self, model: ir.Model) -> PassResult:
        before = len(model.graph)
        upgrade_opset(model)
        if model.functions:
            InlinePass()(model)
        # Constant folding only: optimize_ir's default rewrite rules cost minutes on a 30-layer
        # model (measured: 700 of 730 s on SmolLM2) and we match the patterns ourselves.
        optimizer.fold_constants(
            model,
            onnx_shape_inference=False,
            input_size_limit=self.fold_limit,
            output_size_limit=self.fold_limit,
        )
        # Types and symbolic shapes for every value: no-op Casts are only visible with dtypes known.
        infer_shapes(model)
        if (pointwise_convs_to_matmuls(model) + einsums_to_matmuls(model) + sequences_to_slices(model)
                + push_shape_casts(model) + arithmetic_masks_to_where(model) + sum_masks(model) + tiles_to_expands(model)):
            infer_shapes(model)
        gathers_to_slices(model)
        if rotary_to_ops(model):
            infer_shapes(model)
        for _ in range(3):  # the attention scale computed from the head size folds after it; that can
            if not fold_head_sizes(model):  # make the next layer's head size static (nemotron's rotary)
                break
            optimizer.fold_constants(model, onnx_shape_inference=False, input_size_limit=self.fold_limit,
                                     output_size_limit=self.fold_limit)
            infer_shapes(model)
        slice_writes_to_concat(model)  # after the head-size folds: the last-axis index is a Range to Dh
        removed = remove_noops(model.graph)
        _IdentityElimination()(model)
        RemoveUnusedNodesPass()(model)
        logger.debug("normalize: %d -> %d nodes (%d no-op Dropout/Cast)", before, len(model.graph), removed)
        return PassResult(model, True)
