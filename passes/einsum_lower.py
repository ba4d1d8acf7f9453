"""Einsums as the Transpose / Reshape / MatMul the attention finder reads (XLNet's relative attention).

Three forms, each exact; any other einsum stays (nothing reads through it):

    Einsum("ijbn->bnij", x)                   -> Transpose(x, perm)                  # a permutation
    Einsum("ibh,hnd->ibnd", x, W)  W constant -> Reshape(MatMul(x', W'), [0.., n, d]) # a projection
        x' = x with its kept axes first and its contracted axes merged last; W' = W as [prod(K), prod(N)]
    Einsum("ibnd,jbnd->bnij", a, b)           -> Transpose(MatMul(a', b'), perm)      # scores, P @ V
        a' = [batch.., m, k], b' = [batch.., k, n]: one free axis each, one contracted axis

so a projection is a ``MatMul`` with a constant weight followed by its head split, and scores are a
``MatMul`` of two activations: the structure every pattern and rewrite already knows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spatten_compiler.editor import GraphEditor, rewrite_each
from spatten_compiler.match import NoMatch, const_array

MAX_WEIGHT = 1 << 26


def _parse(equation: str, count: int) -> tuple[list[str], str] | NoMatch:
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return NoMatch("implicit output or ellipsis")
    ins, out = eq.split("->")
    terms = ins.split(",")
    if len(terms) != count or any(len(set(t)) != len(t) for t in (*terms, out)):
        return NoMatch("repeated index within one operand (a trace or diagonal)")
    if set(out) - set("".join(terms)):
        return NoMatch("an output index no input has")
    return terms, out


def _perm(src: str, dst: str) -> list[int]:
    return [src.index(c) for c in dst]


def _transpose(e: GraphEditor, x: ir.Value, src: str, dst: str) -> ir.Value:
    perm = _perm(src, dst)
    return x if perm == list(range(len(perm))) else e.op("Transpose", [x], perm=perm, hint="einsum_perm")


def _projection(e: GraphEditor, x: ir.Value, a: str, w: np.ndarray, b: str, out: str) -> ir.Value | NoMatch:
    keep = [c for c in a if c in out]
    contract = [c for c in a if c not in out]
    free = [c for c in b if c in out]
    if set(contract) != {c for c in b if c not in out} or set(keep) & set(b) or set(out) != set(keep) | set(free):
        return NoMatch("not a projection: the weight shares a kept axis or sums one the input lacks")
    if not contract:
        return NoMatch("nothing contracted")
    y = _transpose(e, x, a, "".join(keep + contract))
    if len(contract) > 1:  # merge the contracted axes: [kept.., K1, K2] -> [kept.., K1*K2]
        y = e.op("Reshape", [y, e.const("einsum_merge", np.array([0] * len(keep) + [-1], np.int64))])
    wt = np.ascontiguousarray(np.transpose(w, _perm(b, "".join(contract + free))))
    k = int(np.prod([w.shape[b.index(c)] for c in contract]))
    dims = [w.shape[b.index(c)] for c in free]
    y = e.op("MatMul", [y, e.const("einsum_weight", wt.reshape(k, int(np.prod(dims))))], hint="einsum_proj")
    if len(free) != 1:  # [kept.., N1*N2] -> [kept.., N1, N2]: the head split
        y = e.op("Reshape", [y, e.const("einsum_split", np.array([0] * len(keep) + dims, np.int64))])
    return _transpose(e, y, "".join(keep + free), out)


def _batched(e: GraphEditor, x: ir.Value, a: str, y: ir.Value, b: str, out: str) -> ir.Value | NoMatch:
    batch = [c for c in out if c in a and c in b]
    m, n = [c for c in a if c in out and c not in b], [c for c in b if c in out and c not in a]
    k = [c for c in a if c in b and c not in out]
    if len(m) != 1 or len(n) != 1 or len(k) != 1 or set(a) | set(b) != set(out) | set(k):
        return NoMatch("not one batched product (one free axis per side, one contracted axis)")
    bs = "".join(batch)
    prod = e.op("MatMul", [_transpose(e, x, a, bs + m[0] + k[0]), _transpose(e, y, b, bs + k[0] + n[0])],
                hint="einsum_matmul")
    return _transpose(e, prod, bs + m[0] + n[0], out)


def lower(e: GraphEditor, node: ir.Node) -> ir.Value | NoMatch:
    """The replacement of one Einsum's output, or why it stays."""
    parsed = _parse(node.attributes.get_string("equation", ""), len(node.inputs))
    if isinstance(parsed, NoMatch):
        return parsed
    terms, out = parsed
    if len(terms) == 1:
        if set(terms[0]) != set(out):
            return NoMatch("a reduction")
        return e.op("Transpose", [node.inputs[0]], perm=_perm(terms[0], out), hint="einsum_perm")
    if len(terms) != 2:
        return NoMatch("more than two operands")
    (a, b), (x, y) = terms, node.inputs
    wx, wy = const_array(x, max_elements=MAX_WEIGHT), const_array(y, max_elements=MAX_WEIGHT)
    if wy is not None and wx is None:
        return _projection(e, x, a, wy, b, out)
    if wx is not None and wy is None:
        return _projection(e, y, b, wx, a, out)
    return _batched(e, x, a, y, b, out) if wx is None else NoMatch("two constants")


def einsums_to_matmuls(model: ir.Model) -> int:
    """Every Einsum of a form :func:`lower` knows -> its MatMul form; returns how many."""
    def lowered(e: GraphEditor, node: ir.Node) -> ir.Value | None:
        new = lower(e, node)  # every refusal is decided before a node is built
        if isinstance(new, NoMatch):
            return None
        new.type = node.outputs[0].type
        return new
    return rewrite_each(model, "Einsum", lowered, remove=True)
