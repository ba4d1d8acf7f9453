"""A 0/1 mask applied by arithmetic -> the ``Where`` it computes (a normalize step).

  Sub(Mul(x, keep), Mul(c, Sub(1, keep)))  -> Where(Cast(keep, to=bool), x, -c)   (TF GPT-2: w*b - 1e4*(1-b))
  Add(Mul(x, keep), Mul(c, Sub(1, keep)))  -> Where(Cast(keep, to=bool), x, c)    (TF OpenAI GPT: w*b + -1e4*(1-b))

where ``keep`` is 0 or 1 by construction: a float Cast of a boolean (a comparison), through views
(:data:`VIEWS`), and ``c`` a scalar constant. Keras/TF code masks scores this way (it has no masked
fill); tf2onnx exports the arithmetic as written. Both sides are equal element for element (keep 1:
``x*1 - c*0 = x``; keep 0: ``x*0 - c*1 = -c`` for finite x), so the rewrite is exact, and the result is
the ``Where`` form the attention matcher reads as a causal mask (``causal+additive``, GPT-2's).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import Const, NoMatch, OneOf, Op, Var, match

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
