"""Reference runtime: executes a (rewritten) model in NumPy and reports what SpAtten kept.

Built on ``onnx.reference.ReferenceEvaluator``; the ``spatten`` domain functions are replaced by
the plain implementations in :mod:`.spatten_ops`, so the ONNX bodies that onnxruntime runs are
checked against an independent implementation of the same rule. :mod:`.std_ops` corrects
``onnx.reference``'s own ops where they are wrong (GatherElements past 64 entries).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from . import spatten_ops, std_ops

# Modules that add NumPy implementations register them in spatten_ops.SPATTEN_OPS when imported.
for _module in ("head_ops", "quant_ops"):
    try:
        __import__(f"{__package__}.{_module}")
    except ModuleNotFoundError as e:
        if not e.name or not e.name.endswith(_module):
            raise


@dataclasses.dataclass
class LayerKeep:
    tokens_in: int
    kept_per_sample: list[int]  # real tokens kept by each sample


@dataclasses.dataclass
class RunReport:
    outputs: dict[str, np.ndarray]
    token_keep: list[LayerKeep]
    kv_fetch: list[dict] = dataclasses.field(default_factory=list)  # quant_ops.fetch_report()
    head_keep: list[list[int]] = dataclasses.field(default_factory=list)  # kept head groups, per head-pruned layer


class ReferenceRuntime:
    def __init__(self, model: str | Path | onnx.ModelProto) -> None:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        self.output_names = [o.name for o in proto.graph.output]
        self.input_names = [i.name for i in proto.graph.input]
        self.session = ReferenceEvaluator(proto, new_ops=[*std_ops.STD_OPS, *spatten_ops.SPATTEN_OPS])

    def run(self, feeds: dict[str, np.ndarray]) -> RunReport:
        spatten_ops.CURRENT = trace = spatten_ops.Trace()
        quant = sys.modules.get(f"{__package__}.quant_ops")
        if quant is not None:
            quant.reset()
        results = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})
        keeps = [LayerKeep(int(s["tokens_in"][0]), s["kept"].sum(axis=1).astype(int).tolist()) for s in trace.selections]
        heads = [h.tolist() for h in getattr(trace, "heads", [])]
        return RunReport(dict(zip(self.output_names, results)), keeps, head_keep=heads,
                         kv_fetch=quant.fetch_report() if quant is not None else [])
