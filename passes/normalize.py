"""normalize: put exported graphs into one canonical form before matching.

Rewrites (in order):
  onnx shape inference     -> dtypes and symbolic shapes on every value (used by the matchers)
  SequenceAt(SplitToSequence(x, sizes), i) with constant indices -> Split(x, sizes)[i]
                           (dynamo's QKV split; sizes 1-D, or a chunk size and x's split axis static;
                           a chunk c of an axis not known: Slice(x, i*c, (i+1)*c) for i >= 0).
                           onnxscript's folder does the same where x's shape is known when it runs,
                           which a saved onnxruntime model's unfused ops lose (unfuse-ort)
  onnxscript constant folding (small tensors only; not its pattern rewrites), dead-code removal
  Shape(x)[-1], x [B,H,S,Dh] with a static Dh -> Dh, folded on (SDPA exports compute the attention
                           scale 1/sqrt(Dh) from it; only that axis: pruning changes the others)
  Gather(x, [i], axis) of a float x -> Slice(x, i, i + 1, axis) (keeps the axis; the per-head slice form)
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
from onnxscript import optimizer

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import const_array
from spatten_compiler.pipeline import Pass, PassResult, register_pass
from spatten_compiler.shapes import infer_shapes

logger = logging.getLogger(__name__)


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
        end = np.iinfo(np.int64).max if i == -1 else i + 1
        bounds = [e.const(hint, np.array([v], np.int64)) for hint, v in (("start", i), ("end", end), ("axis", axis))]
        sliced = e.op("Slice", [data, *bounds])
        sliced.shape, sliced.type = node.outputs[0].shape, node.outputs[0].type
        e.replace_uses(node.outputs[0], sliced)
        model.graph.remove(node, safe=True)
        count += 1
    if count:
        e.commit()
    return count


def _part_sizes(node: ir.Node) -> np.ndarray | None:
    """A SplitToSequence's part sizes: its constant 1-D ``split``, or a constant chunk size ``c`` of a
    static split axis ``D`` (parts of ``c``, the last ``D mod c``); None if not constant."""
    sizes, x = const_array(node.inputs[1]), node.inputs[0]
    if sizes is None or sizes.ndim > 1:
        return None
    if sizes.ndim == 1:
        return sizes
    axis, dims = node.attributes.get_int("axis", 0), x.shape.dims if x is not None and x.shape is not None else ()
    d, c = (dims[axis] if -len(dims) <= axis < len(dims) else None), int(sizes)
    if not isinstance(d, int) or c <= 0:
        return None  # the part count needs the axis's size
    return np.array([c] * (d // c) + ([d % c] if d % c else []), np.int64)


def sequences_to_splits(model: ir.Model) -> int:
    """``SplitToSequence(x, split)`` read only by ``SequenceAt`` with constant indices: its part sizes
    constant (:func:`_part_sizes`) -> one ``Split`` whose outputs those reads become; a chunk size ``c``
    of an axis whose size is not known here, every index ``i >= 0`` -> ``Slice(x, i*c, (i+1)*c)`` per read
    (the last chunk's end clamps: DeBERTa's per-head ``[B, H, S, 3*Dh]``). Returns how many."""
    e = GraphEditor(model, "spatten/normalize")
    count = 0
    for node in list(model.graph):
        if node.op_type != "SplitToSequence" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        sizes, seq, axis = _part_sizes(node), node.outputs[0], node.attributes.get_int("axis", 0)
        reads = [(u.node, const_array(u.node.inputs[1]) if u.node.op_type == "SequenceAt" else None)
                 for u in seq.uses()]
        if seq.is_graph_output() or not reads or any(r.op_type != "SequenceAt" or i is None or i.size != 1
                                                     for r, i in reads):
            continue  # the sequence is read otherwise (a loop, its length, a graph output)
        index = [int(i.reshape(-1)[0]) for _, i in reads]
        chunk = const_array(node.inputs[1])
        if sizes is not None:
            parts = e.op("Split", [node.inputs[0], e.const("split", sizes.astype(np.int64))], outputs=sizes.size,
                         axis=axis)
            parts = parts if isinstance(parts, tuple) else (parts,)
            news = [parts[i % sizes.size] for i in index]
        elif chunk is not None and chunk.ndim == 0 and int(chunk) > 0 and min(index) >= 0:
            c = int(chunk)
            news = [e.op("Slice", [node.inputs[0], e.const("start", np.array([i * c], np.int64)),
                                   e.const("end", np.array([(i + 1) * c], np.int64)),
                                   e.const("axis", np.array([axis], np.int64))]) for i in index]
        else:
            continue  # sizes not constant, or a negative index of a part count not known here
        for (read, _), new in zip(reads, news, strict=True):
            e.replace_uses(read.outputs[0], new)
        count += 1
    if count:
        e.commit()
    return count


@register_pass
@dataclasses.dataclass(frozen=True)
class Normalize(Pass):
    """Constant folding + no-op removal so that attention matching sees one canonical form."""

    name = "normalize"
    fold_limit: int = 1 << 16  # largest tensor (elements) the folder may create

    def call(self, model: ir.Model) -> PassResult:
        before = len(model.graph)
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
        if sequences_to_splits(model):  # what read the sequence gets the parts' own shapes
            infer_shapes(model)
        gathers_to_slices(model)
        for _ in range(3):  # the attention scale computed from the head size folds after it; that can
            if not fold_head_sizes(model):  # make the next layer's head size static (nemotron's rotary)
                break
            optimizer.fold_constants(model, onnx_shape_inference=False, input_size_limit=self.fold_limit,
                                     output_size_limit=self.fold_limit)
            infer_shapes(model)
        removed = remove_noops(model.graph)
        _IdentityElimination()(model)
        RemoveUnusedNodesPass()(model)
        logger.debug("normalize: %d -> %d nodes (%d no-op Dropout/Cast)", before, len(model.graph), removed)
        return PassResult(model, True)
