"""The one place passes edit graphs: build nodes, add constants, redirect uses, re-sort.

Passes describe what to insert through :class:`GraphEditor`; it names new values and nodes under a
prefix (so rewritten graphs are readable and new names never collide), appends nodes, and restores
topological order in :meth:`commit`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass


class GraphEditor:
    def __init__(self, model: ir.Model, prefix: str) -> None:
        self.model = model
        self.graph = model.graph
        self.prefix = prefix
        self.added: list[ir.Node] = []
        self._count = 0
        self._taken: set[str] | None = None

    def _name(self, hint: str) -> str:
        if self._taken is None:  # names already in the graph (a pass run again on its own output: normalize)
            self._taken = {v.name for v in self.graph.initializers.values()} | {
                o.name for n in self.graph for o in n.outputs if o.name and o.name.startswith(self.prefix)}
        while True:
            self._count += 1
            name = f"{self.prefix}/{hint}_{self._count}"
            if name not in self._taken:
                return name

    def const(self, hint: str, array: np.ndarray | float | int | Sequence) -> ir.Value:
        tensor = ir.tensor(np.asarray(array), name=self._name(hint))
        value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        *,
        domain: str = "",
        outputs: int = 1,
        hint: str | None = None,
        **attrs: object,
    ) -> ir.Value | tuple[ir.Value, ...]:
        name = self._name(hint or op_type)
        node = ir.Node(
            domain,
            op_type,
            inputs,
            attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
            num_outputs=outputs,
            name=name,
        )
        for i, out in enumerate(node.outputs):
            out.name = f"{name}:{i}" if outputs > 1 else name
        self.graph.append(node)
        self.added.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def set_attr(self, node: ir.Node, name: str, value: object) -> None:
        """Set (or replace) one attribute of an existing node (a sliced weight's recorded width)."""
        node.attributes[name] = ir.convenience.convert_attribute(name, value)

    def replace_uses(self, old: ir.Value, new: ir.Value, *, keep: Sequence[ir.Node] = ()) -> None:
        """Point every consumer of ``old`` (except ``keep``) and graph-output slot at ``new``."""
        skip = {id(n) for n in keep}
        for use in list(old.uses()):
            if id(use.node) not in skip:
                use.node.replace_input_with(use.idx, new)
        for i, out in enumerate(self.graph.outputs):
            if out is old:
                # Keep the model's output name: the new value takes it, the old one is renamed.
                name = old.name
                old.name = self._name("replaced")
                new.name, new.type, new.shape = name, old.type, old.shape
                self.graph.outputs[i] = new

    def forget_shapes(self) -> None:
        """Drop the recorded shapes of intermediate values. After a rewrite that changes a dimension
        (pruned tokens, pruned heads) the exporter's symbolic shapes are wrong, and onnxruntime's
        memory planner trusts them: it would try to reuse full-length buffers for pruned tensors on
        every run (slow, and a warning per layer). onnxruntime infers the true shapes itself."""
        keep = {*self.graph.inputs, *self.graph.outputs}
        for node in self.graph:
            for out in node.outputs:
                if out not in keep:
                    out.shape = None

    def commit(self) -> None:
        TopologicalSortPass()(self.model)


def rewrite_each(model: ir.Model, op_type: str, rewrite: Callable[[GraphEditor, ir.Node], ir.Value | None],
                 *, remove: bool = False, log: logging.Logger | None = None, what: str = "") -> int:
    """The normalize sub-steps' loop: for every default-domain ``op_type`` node of the main graph (a
    snapshot), ``rewrite(e, node)`` builds the value that replaces its output, or returns None to leave
    the node alone; the uses are rewired (and the node removed with ``remove``), the new nodes committed
    once at the end. Returns how many nodes were replaced (``log`` says so at debug level, ``what`` naming
    them)."""
    e = GraphEditor(model, "spatten/normalize")
    done = 0
    for node in list(model.graph):
        if node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            continue
        new = rewrite(e, node)
        if new is None:
            continue
        e.replace_uses(node.outputs[0], new)
        if remove:
            model.graph.remove(node, safe=True)
        done += 1
    if done:
        e.commit()
        if log is not None:
            log.debug("normalize: %d %s", done, what)
    return done
