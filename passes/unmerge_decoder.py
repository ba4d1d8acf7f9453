"""unmerge-decoder: a merged decoder's with-past branch becomes the main graph.

Optimum's ``decoder_model_merged.onnx`` (and the transformers.js / onnx-community files made from
it) holds two whole decoders in the branches of one ``If`` on a boolean graph input
(``use_cache_branch``): one for the first step, one that reads ``past_key_values.*``. spattenc's
passes rewrite the main graph, so it first makes the merged model the with-past decoder::

    If(use_cache_branch) {then: decoder reading past_*, else: decoder without past} -> outputs
      =>  the with-past branch's nodes in the main graph -> the same outputs (names kept);
          the condition input is removed

The with-past branch is the one that reads graph inputs the other does not (the cache); the match
is structural, not by names. An empty past (length 0) takes the first step, as in the single
with-past ``model.onnx`` that current exporters write and :class:`~spatten_compiler.decoding.DecoderSession`
feeds, so one graph serves every step. The input is gone rather than ignored: onnxruntime requires
every graph input to be fed, and runtimes that feed ``use_cache_branch`` (optimum, transformers.js)
look for it in the session's inputs first.

Not a match (the model is left as it is, and discovery names the ``If``): a condition computed in
the graph, branches with the same graph inputs, attention in only one branch, outputs the If does
not produce, or more than one such ``If``.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import NoMatch
from spatten_compiler.pipeline import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Merged:
    """A merged decoder's ``If``, the branch that reads the cache, and its condition input."""

    node: ir.Node
    branch: ir.Graph
    condition: ir.Value


def _softmaxes(graph: ir.Graph) -> int:
    return sum(n.op_type == "Softmax" for n in ir.traversal.RecursiveGraphIterator(graph))


def _graph_inputs_read(graph: ir.Graph, inputs: frozenset[ir.Value]) -> frozenset[ir.Value]:
    """The main graph's inputs that ``graph`` (at any depth) reads."""
    return frozenset(v for n in ir.traversal.RecursiveGraphIterator(graph) for v in n.inputs if v in inputs)


def _branches(node: ir.Node) -> tuple[ir.Graph, ir.Graph] | None:
    if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
        return None
    then_b, else_b = (node.attributes.get(b) for b in ("then_branch", "else_branch"))
    return (then_b.value, else_b.value) if then_b is not None and else_b is not None else None


def match_merged(model: ir.Model) -> Merged | NoMatch | None:
    """The merged-decoder ``If`` of ``model``'s main graph; None when no If holds attention."""
    graph = model.graph
    holders = [n for n in graph if (b := _branches(n)) is not None and any(map(_softmaxes, b))]
    if not holders:
        return None
    if len(holders) > 1:
        return NoMatch(f"{len(holders)} If ops hold attention (a merged decoder has one)")
    node = holders[0]
    then_b, else_b = _branches(node)
    if not (_softmaxes(then_b) and _softmaxes(else_b)):
        return NoMatch(f"If '{node.name}': attention in one branch only")
    cond = node.inputs[0]
    if cond is None or cond not in graph.inputs:
        return NoMatch(f"If '{node.name}': its condition is computed in the graph, not a graph input such as "
                       "use_cache_branch")
    if not any(out in graph.outputs for out in node.outputs):
        return NoMatch(f"If '{node.name}': produces none of the graph's outputs")
    inputs = frozenset(graph.inputs) - {cond}
    reads = {b: _graph_inputs_read(g, inputs) for b, g in (("then", then_b), ("else", else_b))}
    if reads["then"] > reads["else"]:
        return Merged(node, then_b, cond)
    if reads["else"] > reads["then"]:
        return Merged(node, else_b, cond)
    return NoMatch(f"If '{node.name}': neither branch reads graph inputs the other does not (no cache branch)")


def _inline(model: ir.Model, merged: Merged) -> None:
    """Move the branch's initializers and nodes before the If, rebind its outputs, drop the If."""
    graph, node, branch = model.graph, merged.node, merged.branch
    e = GraphEditor(model, "spatten/unmerge")
    for name, value in list(branch.initializers.items()):
        branch.initializers.pop(name)
        if name in graph.initializers:  # a branch-local constant shadowing an outer one
            value.name = e._name(name)
        graph.register_initializer(value)
    for inner in list(branch):
        branch.remove(inner)
        graph.insert_before(node, inner)
    results = list(branch.outputs)
    branch.outputs.clear()
    for out, result in zip(node.outputs, results):
        if result.producer() is None and out in graph.outputs:  # an outer value or input passed through
            result = e.op("Identity", [result], hint="passthrough")
        e.replace_uses(out, result)
    graph.remove(node, safe=True)
    graph.inputs.remove(merged.condition)
    e.commit()


@register_pass
@dataclasses.dataclass(frozen=True)
class UnmergeDecoder(Pass):
    """A merged decoder (one If on use_cache_branch over two decoders) -> its with-past decoder."""

    name = "unmerge-decoder"

    def call(self, model: ir.Model) -> PassResult:
        merged = match_merged(model)
        if merged is None:
            return PassResult(model, False)
        if isinstance(merged, NoMatch):
            logger.debug("unmerge-decoder: %s", merged.reason)
            return PassResult(model, False)
        cond = merged.condition.name
        _inline(model, merged)
        logger.info("unmerge-decoder: merged decoder (If on '%s'): its with-past branch is the model now; an empty "
                    "past takes the first step, and the '%s' input is gone", cond, cond)
        return PassResult(model, True)
