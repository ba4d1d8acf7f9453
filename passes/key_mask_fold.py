"""fold-key-mask (``--optimize``): a key mask enters the score MatMul as one more contraction row.

    scores = MatMul(Q, Kt) * s + bias                     bias [B, 1, 1, S]: 0 or a large negative per key
 -> scores = MatMul(Concat(Q, 1), Concat(Kt, bias)) * s   Q [B, H, S, Dh+1], Kt [B, H, Dh+1, S]

``q . k + 1 * bias_j`` is ``q . k`` for a kept key (adding 0 is exact) and ``q . k + bias_j`` for a
masked one, whose probability is exactly 0 either way. It runs on the layers whose probabilities are
read by more than ``P @ V`` (the token importance): onnxruntime cannot fuse those, and there the mask
``Add`` over ``[B, H, S, S]`` was the largest element-wise op of the pruned model (MiniLM at 512
tokens, docs/optimize.md 4i); one contraction row more (Dh 32 -> 33) costs less. It only runs for
onnxruntime (``--optimize``, before ort-fusions): the layers it leaves alone are the ones the fusion can
take, and the graph the other passes and the accelerator backend read keeps its plain mask.

Not folded (the reason is logged): a mask that is not known to be one row for all heads and queries
(``[B, 1, 1, S]`` by shape inference: prune-tokens' compact padding mask is), anything but positive
scalar scales (``Mul``/``Div``) between the MatMul and the ``Add`` - a soft-cap (``Tanh``) would bound
the bias, a clamp could lift it - or scores of known rank other than 4 (heads folded into the batch).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import NoMatch, const_array, is_const
from spatten_compiler.pipeline import Pass, PassResult, register_pass
from spatten_compiler.shapes import infer_shapes

from .find_attention import AttentionSite, find_attention

logger = logging.getLogger(__name__)

SCALES = frozenset({"Mul", "Div"})


def _scalar(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(the non-constant input, the constant scalar) of a Mul/Div by one constant, else None."""
    consts = [(i, a) for i, v in enumerate(node.inputs) if (a := const_array(v, max_elements=1)) is not None]
    if len(consts) != 1 or consts[0][1].size != 1 or (node.op_type == "Div" and consts[0][0] != 1):
        return None
    return node.inputs[1 - consts[0][0]], float(consts[0][1].reshape(()))


def score_matmul(add: ir.Node, bias: ir.Value) -> ir.Node | NoMatch:
    """The MatMul of two activations whose scores ``add`` adds ``bias`` to, through positive scales."""
    value = next((v for v in add.inputs if v is not bias), None)
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return NoMatch("the scores are not computed from a MatMul")
        if node.op_type == "MatMul" and not is_const(node.inputs[0]) and not is_const(node.inputs[1]):
            rank = node.outputs[0].shape.rank() if node.outputs[0].shape is not None else 4
            return node if rank == 4 else NoMatch(f"scores of rank {rank}, not [B, H, S, S]")
        scaled = _scalar(node) if node.op_type in SCALES else None
        if scaled is None or not scaled[1] > 0:
            return NoMatch(f"{node.op_type} '{node.name}' between the score MatMul and the mask is not a "
                           "positive scalar scale")
        value = scaled[0]
    return NoMatch("no score MatMul within 8 scales")


def fold_key_mask(e: GraphEditor, add: ir.Node, bias: ir.Value) -> NoMatch | None:
    """Fold ``bias`` (``[B, 1, 1, S]``, added by ``add``) into the score MatMul and drop the ``Add``;
    or the reason it was left as it is."""
    qk = score_matmul(add, bias)
    if isinstance(qk, NoMatch):
        return qk
    q, kt = qk.inputs[0], qk.inputs[1]
    one = e.const("one", np.array([1], np.int64))
    ones = e.op("Expand", [e.op("CastLike", [e.const("one", np.array(1.0, np.float32)), q]),
                           e.op("Concat", [e.op("Shape", [q], end=-1), one], axis=0)])
    row_shape = e.op("Concat", [e.op("Shape", [kt], end=-2), one, e.op("Shape", [kt], start=-1)], axis=0)
    row = e.op("Expand", [e.op("CastLike", [bias, kt]), row_shape])
    qk.replace_input_with(0, e.op("Concat", [q, ones], axis=-1))
    qk.replace_input_with(1, e.op("Concat", [kt, row], axis=-2))
    e.replace_uses(add.outputs[0], next(v for v in add.inputs if v is not bias))
    return None


def _key_row(value: ir.Value) -> bool:
    """A ``[B, 1, 1, S]`` value: one row of key terms shared by every head and query."""
    shape = value.shape
    return shape is not None and shape.rank() == 4 and shape[1] == 1 and shape[2] == 1


def foldable(site: AttentionSite) -> NoMatch | None:
    """Why the site's mask stays an ``Add`` (or None: fold it)."""
    if site.mask is None or site.mask_node is None or site.mask_node.op_type != "Add":
        return NoMatch("no additive mask")
    if site.pv is None or site.probs is None or all(u.node is site.pv for u in site.probs.uses()):
        return NoMatch("only P @ V reads the probabilities: onnxruntime's attention fusion can take the layer")
    if not _key_row(site.mask):
        return NoMatch("the mask is not known to be one [B, 1, 1, S] row of key terms")
    return None


@register_pass
@dataclasses.dataclass(frozen=True)
class FoldKeyMask(Pass):
    """Key masks of the layers onnxruntime cannot fuse, as a row of their score MatMul."""

    name = "fold-key-mask"

    def call(self, model: ir.Model) -> PassResult:
        values = [v for g in model.graphs() for n in g for v in n.outputs]
        saved = [(v, v.shape, v.type) for v in values]
        infer_shapes(model)  # to tell key rows from [B, 1, S, S] masks; the graph's own shapes come back below
        plans = []
        for site in find_attention(model).sites:
            why = foldable(site)
            if why is None:
                plans.append(site)
            else:
                logger.debug("fold-key-mask: layer %d: %s", site.layer, why.reason)
        for v, shape, type_ in saved:
            v.shape, v.type = shape, type_
        e = GraphEditor(model, "spatten")
        layers = []
        for site in plans:
            why = fold_key_mask(e, site.mask_node, site.mask)
            if why is None:
                layers.append(site.layer)
            else:
                logger.debug("fold-key-mask: layer %d: %s", site.layer, why.reason)
        if not layers:
            return PassResult(model, False)
        e.commit()
        logger.info("fold-key-mask: key mask of layer%s %s folded into the score MatMul",
                    "s" if len(layers) > 1 else "", ", ".join(map(str, layers)))
        return PassResult(model, True)
