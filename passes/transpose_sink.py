"""Channels-first Transposes moved down through element-wise ops until they cancel in pairs.

    T(T(x))         -> x             T = Transpose(., [0, 2, 1]) of a rank-3 value: its own inverse
    f(T(x))         -> T(f(x))       f element-wise (Erf, Relu, Cast, ...), or with a scalar constant
    T(x) op T(y)    -> T(x op y)     op element-wise (Add, Sub, Mul, Div, Pow)

The pointwise Conv1d rewrite (:mod:`.pointwise_conv`) leaves every projection of a channels-first model
(SqueezeBERT: ``[B, D, S]`` between its convolutions) between two such Transposes; moved down, they meet
their inverses at the next projection or norm (``Transpose -> LayerNormalization -> Transpose``), and the
residual stream is ``[B, S, D]``: the layout token pruning gathers rows of. Run only after that rewrite
changed something, so other models' Transposes stay where their exporters wrote them.
"""

from __future__ import annotations

import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import const_array

# Element-wise ops a channels-first Transpose moves through: unary, or binary with a scalar constant or
# with another such Transpose (their results are the same values transposed).
UNARY = frozenset({"Erf", "Tanh", "Relu", "Sigmoid", "Neg", "Sqrt", "Cast", "Identity", "Gelu", "Exp", "Abs"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})


def _swap(value: ir.Value | None) -> ir.Value | None:
    """``x`` when ``value`` is ``Transpose(x, [0, 2, 1])`` of a rank-3 ``x`` (a channels-first view)."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Transpose" or list(node.attributes.get_ints("perm", [])) != [0, 2, 1]:
        return None
    return node.inputs[0]


def _scalar(value: ir.Value | None) -> bool:
    return const_array(value, max_elements=1) is not None


def _moved(node: ir.Node) -> list[ir.Value] | None:
    """The inputs ``node`` reads with the channels-first Transposes taken off, if it can run before them."""
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op_type in UNARY and (x := _swap(node.inputs[0])) is not None:
        return [x, *node.inputs[1:]]
    if node.op_type in BINARY and len(node.inputs) == 2:
        inner = [_swap(i) for i in node.inputs]
        if all(x is not None for x in inner):
            return inner
        if any(x is not None for x in inner) and any(_scalar(i) for i in node.inputs):
            return [x if x is not None else i for x, i in zip(inner, node.inputs)]
    return None


def sink_channel_transposes(model: ir.Model, rounds: int = 64) -> int:
    """Move the channels-first Transposes the pointwise rewrite wrote down through element-wise ops and
    cancel pairs: ``T(T(x)) -> x``, ``f(T(x)) -> T(f(x))``, ``T(x) + T(y) -> T(x + y)``. A model whose
    layers run channels-first between convolutions (SqueezeBERT) then carries its hidden state as
    [B, S, D], the layout token pruning gathers; returns how many ops moved or pairs cancelled."""
    e = GraphEditor(model, "spatten/normalize")
    outputs = set(model.graph.outputs)
    done = 0
    for _ in range(rounds):
        changed = 0
        for node in list(model.graph):
            if node.graph is None:
                continue
            out = node.outputs[0] if node.outputs else None
            if out is None:
                continue
            if node.op_type == "Transpose" and (x := _swap(node.inputs[0])) is not None and _swap(out) is not None and (
                    out not in outputs or (x.producer() is not None and x not in outputs)):
                e.replace_uses(out, x)  # T(T(x)) = x (a graph output keeps its name: x takes it)
                changed += 1
                continue
            if out in outputs:
                continue
            inputs = _moved(node)
            if inputs is None:
                continue
            inner = e.op(node.op_type, inputs, **{k: a.value for k, a in node.attributes.items()},
                         hint=f"cl_{node.op_type}")
            inner.type = out.type
            e.replace_uses(out, e.op("Transpose", [inner], perm=[0, 2, 1], hint="channels_first"))
            node.graph.remove(node, safe=True)
            changed += 1
        done += changed
        if not changed:
            break
        e.commit()
    return done
