"""length-gate: prune only inputs longer than N tokens; shorter ones run the unpruned graph.

    y = If(Shape(input_ids)[1] > N,
           then_branch = the model compiled with every option (token / head pruning ...),
           else_branch = the same model compiled without token and head pruning)

Short inputs are where pruning pays least and costs most: a 25-token SST-2 sentence keeps every
token under the usual floors, so the importance and gather ops are pure overhead, and a head set
chosen for long inputs loses more on it than pruning tokens would (docs/experiments.md, length gate).
The gate makes the choice once per run from the padded sequence length, so a batch is gated as a
whole.

Both branches read the model inputs and initializers from the outer scope: a weight the two
compiles left untouched (same tensor, or equal bytes) is stored once; weights a pass rewrote
(sliced head projections) are stored for the branch that uses them. Branch values are renamed under
``pruned/`` and ``unpruned/`` so no name shadows the outer scope. The branches must have the same
outputs; options that add outputs to one branch only (``--emit-kept``) are refused by the config.

This is a model-level composition that runs after every pass: the passes never see an ``If``.
onnxruntime's post-passes (``--optimize``, ``--weights``: ort-fusions, ort-quantize) are part of each
branch's pass list, so each branch is fused / quantized on its own, before the gate joins them (the
short branch is then exactly the same composition applied to the dense model).

Two clean-ups keep the branches as fast as the same graphs at the top level in onnxruntime (1.32),
whose graph optimizations do less inside subgraphs: common subexpressions are merged here (the
exporters' many identical Shape -> Gather -> Unsqueeze chains, which onnxruntime merges only in the
main graph), and the short branch's intermediate shapes are dropped (with them onnxruntime fuses
Add + LayerNormalization into SkipLayerNormalization, which is slower on CPU at these sizes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize

from spatten_compiler.editor import GraphEditor
from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pass, Pipeline, check_model

logger = logging.getLogger(__name__)

GATE_PREFIX = "spatten_gate"
INTEGER_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


def length_input(graph: ir.Graph) -> ir.Value:
    """The [batch, sequence] input whose dimension 1 is the gate's length: ``input_ids`` when present,
    else the first rank-2 integer input."""
    candidates = [v for v in graph.inputs
                  if v.dtype in INTEGER_TYPES and v.shape is not None and len(v.shape) == 2]
    for value in candidates:
        if value.name == "input_ids":
            return value
    if not candidates:
        raise OptionError("--prune-min-length needs a [batch, sequence] integer input (input_ids) to read the "
                          "length from; this model has none")
    return candidates[0]


def _same_tensor(a: ir.Value, b: ir.Value) -> bool:
    ta, tb = a.const_value, b.const_value
    if ta is tb:
        return True
    if ta is None or tb is None or ta.dtype != tb.dtype or tuple(ta.shape) != tuple(tb.shape):
        return False
    return bool(np.array_equal(ta.numpy(), tb.numpy()))


def _as_branch(model: ir.Model, outer: ir.Graph, prefix: str) -> ir.Graph:
    """Detach ``model.graph`` into a subgraph of ``outer``: its inputs become references to the outer
    inputs of the same name, its initializers outer initializers (shared when equal), its values and
    nodes are renamed under ``prefix``."""
    graph = model.graph
    by_name = {v.name: v for v in outer.inputs}
    for value in list(graph.inputs):
        if value.name not in by_name:
            raise OptionError(f"the {prefix} branch reads an input {value.name!r} the model does not have")
    inputs = list(graph.inputs)
    graph.inputs.clear()
    for value in inputs:
        outer_value = by_name[value.name]
        if value is not outer_value:
            value.replace_all_uses_with(outer_value)
    for name in list(graph.initializers):
        value = graph.initializers.pop(name)
        existing = outer.initializers.get(name)
        if existing is not None and _same_tensor(existing, value):
            value.replace_all_uses_with(existing)
            continue
        if existing is not None:
            value.name = f"{prefix}/{name}"
        outer.register_initializer(value)
    # A branch output must be produced inside the branch (it cannot be an outer input or weight).
    for i, out in enumerate(graph.outputs):
        if out.producer() is None or out.producer().graph is not graph:
            node = ir.Node("", "Identity", [out], num_outputs=1, name=f"{prefix}/output_{i}")
            graph.append(node)
            node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
            graph.outputs[i] = node.outputs[0]
    for node in graph:
        node.name = f"{prefix}/{node.name}" if node.name else None
        for out in node.outputs:
            if out.name:
                out.name = f"{prefix}/{out.name}"
    graph.name = prefix
    return graph


def _merge_functions(target: ir.Model, source: ir.Model) -> None:
    for key, function in source.functions.items():
        mine = target.functions.get(key)
        if mine is None:
            target.functions[key] = function
        elif mine is not function and ir.serde.serialize_function(mine) != ir.serde.serialize_function(function):
            raise OptionError(f"--prune-min-length: the two branches define function {key[0]}::{key[1]} differently")


def refuse_gated(model: ir.Model, path: object) -> None:
    """A length-gated model hides its attention inside an If; say so instead of 'no attention found'."""
    gate = model.metadata_props.get("spatten.prune_min_length")
    if gate is not None:
        raise OptionError(f"{path} was already compiled by spattenc with --prune-min-length {gate}; its attention "
                          "is inside an If - use the model it was compiled from")


def short_input_model(model: ir.Model) -> ir.Model:
    """A second model over a clone of ``model``'s graph for the short inputs. Tensors are shared, so
    the weights neither compile rewrites are held (and later stored) once."""
    return ir.Model(model.graph.clone(), ir_version=model.ir_version, producer_name=model.producer_name,
                    producer_version=model.producer_version, domain=model.domain,
                    functions=list(model.functions.values()))


def _refuse_kv_cache(model: ir.Model) -> None:
    if any(site.kv_cache for site in find_attention(model).sites):
        raise OptionError("--prune-min-length is for models without a KV cache (at a decode step input_ids "
                          "holds only the new tokens, and both branches would have to share one cache layout)")


def compile_gated(model: ir.Model, passes: Sequence[Pass], short_passes: Sequence[Pass], min_length: int,
                  **pipeline: Any) -> ir.Model:
    """Run ``passes`` on ``model`` and ``short_passes`` on a clone, then gate them by length (in place)."""
    length_input(model.graph)  # refuse unfit models before the (possibly long) passes run
    probe = short_input_model(model)
    Normalize()(probe)
    _refuse_kv_cache(probe)
    short = short_input_model(model)
    Pipeline(passes, **pipeline)(model)
    Pipeline(short_passes, **pipeline)(short)
    gate_by_length(model, short, min_length)
    if pipeline.get("check", True):
        check_model(model)
    return model


def gate_by_length(pruned: ir.Model, unpruned: ir.Model, min_length: int) -> ir.Model:
    """Turn ``pruned`` into ``If(length > min_length, pruned graph, unpruned graph)``, in place.
    :func:`compile_gated` has refused KV-cache models (checked once, before the passes)."""
    a_outs, b_outs = pruned.graph.outputs, unpruned.graph.outputs
    if [v.name for v in a_outs] != [v.name for v in b_outs]:
        raise OptionError("--prune-min-length: the pruned model's outputs "
                          f"({', '.join(v.name for v in a_outs)}) differ from the unpruned one's "
                          f"({', '.join(v.name for v in b_outs)})")
    for a, b in zip(a_outs, b_outs):
        if a.dtype != b.dtype:
            raise OptionError(f"--prune-min-length: output {a.name!r} is {a.dtype} pruned and {b.dtype} unpruned")
    names = [v.name for v in a_outs]
    meta = [(v.type, v.shape) for v in a_outs]
    for model in (pruned, unpruned):
        CommonSubexpressionEliminationPass()(model)
    GraphEditor(unpruned, GATE_PREFIX).forget_shapes()
    opsets = {**unpruned.graph.opset_imports, **pruned.graph.opset_imports}
    inputs = list(pruned.graph.inputs)
    pruned.graph.inputs.clear()  # the pruned branch then reads the very same values from the outer scope
    outer = ir.Graph(inputs, [], nodes=[], opset_imports=opsets, name=pruned.graph.name,
                     metadata_props=dict(pruned.graph.metadata_props))
    seq = length_input(outer)
    then_branch = _as_branch(pruned, outer, "pruned")
    else_branch = _as_branch(unpruned, outer, "unpruned")
    _merge_functions(pruned, unpruned)
    pruned.graph = outer
    edit = GraphEditor(pruned, GATE_PREFIX)
    length = edit.op("Shape", [seq], start=1, end=2, hint="length")
    longer = edit.op("Greater", [length, edit.const("min_length", np.array([min_length], dtype=np.int64))],
                     hint="prune")
    outs = edit.op("If", [longer], outputs=len(names), hint="If",
                   then_branch=then_branch, else_branch=else_branch)
    outs = (outs,) if isinstance(outs, ir.Value) else outs
    for value, name, (type_, shape) in zip(outs, names, meta):
        value.name, value.type, value.shape = name, type_, shape
        outer.outputs.append(value)
    pruned.metadata_props["spatten.prune_min_length"] = str(min_length)
    logger.info("length gate: inputs of at most %d tokens (%s dim 1) run unpruned", min_length, seq.name)
    return pruned
