"""Compile MiniLM with explicit calibrated heads (+ optional token keep), with and without reconstruction.

    python bench/explore/conditional-ablation/compile_heads.py HEADS_SOURCE.onnx|HEADS.json OUT.onnx [token_keep] [reconstruct] [ridge] [min_keep]

HEADS_SOURCE: a compiled model whose spatten.heads_kept metadata gives the heads, or a JSON list of
kept heads per layer; the token options are the default rule's, with ``min_keep`` if given.
"""
import json, sys, onnx
from spatten_compiler.config import CompileConfig
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline
from spatten_compiler.passes.prune_heads import PruneHeads

src, out = sys.argv[1], sys.argv[2]
tk = float(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
rec = len(sys.argv) > 4 and sys.argv[4] == "1"
ridge = float(sys.argv[5]) if len(sys.argv) > 5 else 0.01
if src.endswith(".json"):
    heads = tuple(map(tuple, json.load(open(src))))
else:
    m = onnx.load(src, load_external_data=False)
    heads = tuple(map(tuple, json.loads(next(p.value for p in m.metadata_props if p.key == "spatten.heads_kept"))))
mk = int(sys.argv[6]) if len(sys.argv) > 6 else None
passes = CompileConfig(token_keep=tk, token_min_keep=mk).passes() if tk else CompileConfig(head_keep=0.5).passes()[:2]
passes.insert(2, PruneHeads(rule="calibrated", heads=heads, calibration="bench/out/heads/calib-wt2-64x256.npz",
                            reconstruct=rec, ridge=ridge))
print([p.name for p in passes], [len(h) for h in heads])
model = load_model("models/cache/minilm/model.onnx")
Pipeline(passes)(model)
save_model(model, out)
