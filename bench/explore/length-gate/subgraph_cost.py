"""What the length gate's two branch clean-ups buy in onnxruntime (passes/length_gate.py docstring).

    python bench/explore/length-gate/subgraph_cost.py OUT_DIR

Writes to OUT_DIR, from all-MiniLM-L6-v2 with tokens 0.15, floor 32, gate 32:
  gated.onnx        the shipped gate (CSE on both branches, short branch without intermediate shapes)
  gated-first.onnx  the first version: no CSE, the short branch normalized (shapes inferred)
  dense-inferred.onnx  the dense model with onnx shape inference's shapes stored
and prints the node counts of onnxruntime's optimized graph (each If branch, and the ungated
token-pruned model for comparison). Time them with bench/latency.py.
"""
import collections
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import spatten_compiler.passes.length_gate as gate
from spatten_compiler.passes.normalize import Normalize

from spatten_compiler.config import CompileConfig
from spatten_compiler.editor import GraphEditor
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline

DENSE = "models/cache/minilm/model.onnx"
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
config = CompileConfig(token_keep=0.15, token_min_keep=32, prune_min_length=32)


def compile_to(path: Path, short_passes: list) -> None:
    model = load_model(DENSE)
    gate.compile_gated(model, config.passes(), short_passes, 32)
    save_model(model, path)


class KeepShapes(GraphEditor):
    def forget_shapes(self) -> None:
        pass


compile_to(out / "gated.onnx", config.unpruned().passes())
shipped = (gate.CommonSubexpressionEliminationPass, gate.GraphEditor)
gate.CommonSubexpressionEliminationPass, gate.GraphEditor = (lambda: (lambda model: None)), KeepShapes
try:
    compile_to(out / "gated-first.onnx", [Normalize()])
finally:
    gate.CommonSubexpressionEliminationPass, gate.GraphEditor = shipped
ungated = load_model(DENSE)
Pipeline(config.passes())(ungated)
save_model(ungated, out / "ungated.onnx")
onnx.save(onnx.shape_inference.infer_shapes(onnx.load(DENSE)), out / "dense-inferred.onnx")


def optimized(path: Path) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = f"{tmp}/opt.onnx"
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(f"{tmp}/opt.onnx", load_external_data=False)


def counts(nodes) -> str:
    c = collections.Counter(n.op_type for n in nodes)
    return (f"{sum(c.values())} nodes (Concat {c['Concat']}, Unsqueeze {c['Unsqueeze']}, "
            f"LayerNormalization {c['LayerNormalization']}, SkipLayerNormalization {c['SkipLayerNormalization']})")


print("onnxruntime", ort.__version__, "optimized graphs (default level):")
for name in ("ungated.onnx", "dense-inferred.onnx", "gated.onnx", "gated-first.onnx"):
    proto = optimized(out / name)
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    if not ifs:
        print(f"  {name}: {counts(proto.graph.node)}")
    for a in (ifs[0].attribute if ifs else []):
        print(f"  {name} {a.name}: {counts(a.g.node)}")
print(f"  {DENSE}: {counts(optimized(Path(DENSE)).graph.node)}")
