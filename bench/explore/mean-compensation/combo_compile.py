import json, onnx
from spatten_compiler.config import CompileConfig
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline
from spatten_compiler.passes.prune_heads import PruneHeads
m = onnx.load("bench/out/combo-abl/t0.25v-abl-g20.onnx", load_external_data=False)
heads = tuple(map(tuple, json.loads(next(p.value for p in m.metadata_props if p.key == "spatten.heads_kept"))))
passes = CompileConfig(token_keep=0.25).passes()
passes.insert(2, PruneHeads(rule="calibrated", heads=heads, calibration="bench/out/heads/calib-wt2-64x256.npz", compensation="mean"))
print([p.name for p in passes])
model = load_model("models/cache/minilm/model.onnx")
Pipeline(passes)(model)
save_model(model, "bench/out/mean-feas/t0.25v-abl-g20-mean.onnx")
