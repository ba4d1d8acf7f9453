"""A 0/1 mask applied by arithmetic -> the ``Where`` it computes (a normalize step).

  Sub(Mul(x, keep), Mul(c, Sub(1, keep)))  -> Where(Cast(keep, to=bool), x, -c)   (TF GPT-2: w*b - 1e4*(1-b))
  Add(Mul(x, keep), Mul(c, Sub(1, keep)))  -> Where(Cast(keep, to=bool), x, c)    (TF OpenAI GPT: w*b + -1e4*(1-b))

where ``keep`` is 0 or 1 by construction: a float Cast of a boolean (a comparison), through views
(:data:`VIEWS`), and ``c`` a scalar constant. Keras/TF code masks scores this way (it has no masked
fill); tf2onnx exports the arithmetic as written. Both sides are equal element for element (keep 1:
``x*1 - c*0 = x``; keep 0: ``x*0 - c*1 = -c`` for finite x), so the rewrite is exact, and the result is
the ``Where`` form the attention matcher reads as a causal mask (``causal+additive``, GPT-2's).

  Add(Add(scores, m1), m2) -> Add(scores, Add(m1, m2))    (m1, m2 masks: TF CTRL adds its causal mask
                                                            and then the padding mask to the scores)

The sum of two masks is one mask (what the matcher and the token rewrite read). Where both are 0 the
scores are unchanged bit for bit; elsewhere the entry is masked either way (-1e4 or less: its
probability is 0 in float32 unless a whole row is masked).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor, rewrite_each
from spatten_compiler.match import Const, NoMatch, OneOf, Op, Var, _Failures, const_array, match

from .score_chain import _reaches_scores, is_mask_term

logger = logging.getLogger(__name__)


def _scalar(a: np.ndarray) -> bool:
    return a.size == 1


def _one(a: np.ndarray) -> bool:
    return a.size == 1 and float(a.reshape(())) == 1.0


_GATE = Op("Mul", Var("x"), Var("keep"), name="gate")
_REST = Op("Mul", Const("fill", _scalar), Op("Sub", Const("one", _one), Var("keep")), name="rest")
# form -> (pattern, sign of the fill in the Where)
FORMS: dict[str, tuple[Op, float]] = {
    "sub": (Op("Sub", _GATE, _REST, name="root"), -1.0),
    "add": (Op("Add", _GATE, _REST, name="root"), 1.0),
}
MULTIPLICATIVE = OneOf("mask_form", tuple((form, pattern) for form, (pattern, _) in FORMS.items()))
# ops between the boolean Cast and the mask's use that keep its values 0/1
VIEWS = ("Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity", "Transpose", "Slice")


def zero_one(value: ir.Value, limit: int = 8) -> str | None:
    """None when ``value`` is a float Cast of a boolean through :data:`VIEWS`; else why it may not be 0/1."""
    for _ in range(limit):
        node = value.producer()
        if node is None:
            return f"{value.name} is not computed (a graph input or a constant)"
        if node.op_type == "Cast":
            src = node.inputs[0].dtype
            return None if src == ir.DataType.BOOL else f"Cast '{node.name}' casts {src}, not a boolean"
        if node.op_type not in VIEWS:
            return f"{node.op_type} '{node.name}' may give values other than 0 and 1"
        value = node.inputs[0]
    return f"no boolean Cast within {limit} views"


def arithmetic_masks_to_where(model: ir.Model) -> int:
    """Rewrite every :data:`FORMS` match in the main graph whose ``keep`` is 0/1; return how many."""
    e = GraphEditor(model, "spatten/normalize")
    done = 0
    for node in list(model.graph):
        if node.op_type not in ("Sub", "Add") or node.domain not in ("", "ai.onnx"):
            continue
        found = match(MULTIPLICATIVE, node.outputs[0])
        if isinstance(found, NoMatch):
            continue
        x, keep = found["x"], found["keep"]
        why = zero_one(keep)
        if why is not None or x is keep or x.dtype is None:
            logger.debug("normalize: %s '%s' kept: %s", node.op_type, node.name, why or "x unknown")
            continue
        fill = FORMS[found["mask_form"]][1] * float(found["fill:value"].reshape(()))
        cond = e.op("Cast", [keep], to=ir.DataType.BOOL, hint="keep")
        fill_value = e.const("mask_fill", np.array(fill, dtype=x.dtype.numpy()))
        e.replace_uses(node.outputs[0], e.op("Where", [cond, x, fill_value], hint="masked"))
        done += 1
    if done:
        e.commit()
        logger.debug("normalize: %d arithmetic masks -> Where", done)
    return done


TWO_MASKS = Op("Add", Op("Add", Var("scores"), Var("m1"), name="inner"), Var("m2"), name="outer")


def _summable(found: dict) -> bool:
    scores, m1, m2 = found["scores"], found["m1"], found["m2"]
    if any((a := const_array(m, max_elements=1)) is not None and a.size == 1 for m in (m1, m2)):
        return False  # a scalar shift of every score (stable_softmax's 1e-9): score_chain carries it along
    return (len(found["inner"].outputs[0].uses()) == 1 and _reaches_scores(scores)
            and not _reaches_scores(m1) and not _reaches_scores(m2) and is_mask_term(m1) and is_mask_term(m2))


def sum_masks(model: ir.Model) -> int:
    """Rewrite every :data:`TWO_MASKS` on attention scores in the main graph; return how many."""
    def summed(e: GraphEditor, node: ir.Node) -> ir.Value | None:
        found = next((b for b in _bindings(node) if _summable(b)), None)
        if found is None:
            return None
        both = e.op("Add", [found["m1"], found["m2"]], hint="masks")
        return e.op("Add", [found["scores"], both], hint="masked")
    return rewrite_each(model, "Add", summed, log=logger, what="pairs of masks summed")


def _bindings(node: ir.Node) -> list[dict]:
    """Every way :data:`TWO_MASKS` binds at ``node`` (Add is tried in both input orders)."""
    return list(TWO_MASKS.walk(node.outputs[0], {}, _Failures(), 0))
