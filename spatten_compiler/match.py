"""A small declarative matcher over onnx-ir values, in the spirit of the onnxscript rewriter.

Patterns are data::

    Op("Softmax", OneOf("mask", [("additive", Op("Add", SCORES, Var("mask"))), ("none", SCORES)]))

* :class:`Var` matches any value and binds it by name; :class:`Const` matches a constant.
* :class:`Op` matches the producer of a value by op type (several allowed), optional attribute
  predicates, and inputs; ``Add`` and ``Mul`` are tried in both input orders.
* :class:`OneOf` tries alternatives in order and records which one matched under its tag - the
  exporter variants live here instead of in if/elif ladders.

:func:`match` returns the bindings, or a :class:`NoMatch` whose ``reason`` describes the deepest
failure (the closest the candidate came), which the attention finder reports as a near-miss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

COMMUTATIVE = frozenset({"Add", "Mul"})
Bindings = dict[str, Any]


def is_const(value: ir.Value | None) -> bool:
    """True for an initializer or a Constant output, without reading its data."""
    if value is None:
        return False
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def const_array(value: ir.Value | None, max_elements: int | None = None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant node), or None.

    ``max_elements`` skips larger constants without reading them (weights are memory-mapped or
    inline; materializing one just to look at it costs milliseconds each on a 600 MB model).
    """
    if value is None:
        return None
    if max_elements is not None and value.const_value is not None and value.const_value.size > max_elements:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


class Pattern:
    def walk(self, value: ir.Value | None, b: Bindings, fail: _Failures, depth: int) -> Iterator[Bindings]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Var(Pattern):
    name: str

    def walk(self, value, b, fail, depth):
        if value is None:
            fail.note(depth, f"{self.name}: missing input")
            return
        bound = b.get(self.name)
        if bound is not None and bound is not value:
            fail.note(depth, f"{self.name}: bound to a different tensor")
            return
        yield {**b, self.name: value}


@dataclasses.dataclass(frozen=True)
class Const(Pattern):
    name: str
    check: Callable[[np.ndarray], bool] | None = None

    def walk(self, value, b, fail, depth):
        array = const_array(value)
        if array is None:
            fail.note(depth, f"{self.name}: expected a constant, got {_describe(value)}")
            return
        if self.check is not None and not self.check(array):
            fail.note(depth, f"{self.name}: constant {array.tolist() if array.size < 8 else array.shape} rejected")
            return
        yield {**b, self.name: value, f"{self.name}:value": array}


@dataclasses.dataclass(frozen=True)
class Op(Pattern):
    types: str | tuple[str, ...]
    inputs: tuple[Pattern, ...] = ()
    name: str | None = None
    attrs: dict[str, Callable[[Any], bool]] = dataclasses.field(default_factory=dict)

    def __init__(self, types, *inputs: Pattern, name: str | None = None, attrs=None):
        object.__setattr__(self, "types", (types,) if isinstance(types, str) else tuple(types))
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "attrs", attrs or {})

    def walk(self, value, b, fail, depth):
        node = value.producer() if value is not None else None
        label = self.name or "|".join(self.types)
        if node is None or node.op_type not in self.types or node.domain not in ("", "ai.onnx"):
            fail.note(depth, f"{label}: expected {'|'.join(self.types)}, got {_describe(value)}")
            return
        for key, predicate in self.attrs.items():
            attr = node.attributes.get(key)
            if not predicate(None if attr is None else attr.value):
                fail.note(depth, f"{label}: attribute {key}={None if attr is None else attr.value} rejected")
                return
        if len(node.inputs) < len(self.inputs):
            fail.note(depth, f"{label}: has {len(node.inputs)} inputs, pattern needs {len(self.inputs)}")
            return
        if self.name:
            bound = b.get(self.name)
            if bound is not None and bound is not node:
                return
            b = {**b, self.name: node}
        orders = [list(node.inputs[: len(self.inputs)])]
        if node.op_type in COMMUTATIVE and len(self.inputs) == 2:
            orders.append(orders[0][::-1])
        for values in orders:
            yield from _walk_all(self.inputs, values, b, fail, depth + 1)


@dataclasses.dataclass(frozen=True)
class OneOf(Pattern):
    tag: str
    options: tuple[tuple[str, Pattern], ...]

    def walk(self, value, b, fail, depth):
        for label, pattern in self.options:
            for found in pattern.walk(value, b, fail, depth):
                yield {**found, self.tag: label}


def _walk_all(patterns, values, b, fail, depth) -> Iterator[Bindings]:
    if not patterns:
        yield b
        return
    for found in patterns[0].walk(values[0], b, fail, depth):
        yield from _walk_all(patterns[1:], values[1:], found, fail, depth)


def _describe(value: ir.Value | None) -> str:
    if value is None:
        return "nothing"
    node = value.producer()
    if node is None:
        return "a constant" if value.const_value is not None else f"graph input '{value.name}'"
    return f"{node.op_type} ('{node.name}')"


class _Failures:
    def __init__(self) -> None:
        self.depth, self.reason = -1, "no match"

    def note(self, depth: int, reason: str) -> None:
        if depth > self.depth:
            self.depth, self.reason = depth, reason


@dataclasses.dataclass(frozen=True)
class NoMatch:
    reason: str

    def __bool__(self) -> bool:
        return False


def match(pattern: Pattern, value: ir.Value) -> Bindings | NoMatch:
    """First binding of ``pattern`` rooted at ``value``, or NoMatch with the deepest failure."""
    fail = _Failures()
    for found in pattern.walk(value, {}, fail, 0):
        return found
    return NoMatch(fail.reason)


def whole_slice(node: ir.Node) -> bool:
    """A Slice that keeps everything (dynamo writes ``x[:, :, :]`` as Slice(0, INT64_MAX)): a view."""
    if node.op_type != "Slice":
        return False
    consts = [v.const_value.numpy() if v is not None and v.const_value is not None else None for v in node.inputs[1:]]
    if len(consts) < 2 or any(c is None for c in consts):
        return False
    starts, ends, steps = consts[0], consts[1], consts[3] if len(consts) > 3 else np.ones_like(consts[0])
    return bool((starts == 0).all() and (ends >= 2**62).all() and (steps == 1).all())
