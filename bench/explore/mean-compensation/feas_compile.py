import json, sys, onnx, onnx_ir as ir
from spatten_compiler.modelio import save_model
from spatten_compiler.modelio import load_model
from spatten_compiler.pipeline import Pipeline
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.decompose_attention import DecomposeAttention
from spatten_compiler.passes.prune_heads import PruneHeads
calib = "bench/out/heads/calib-wt2-64x256.npz"
for src, name in [("bench/out/combo-abl/t0.25v-abl-g20.onnx", "abl-g20"), ("bench/out/heads/cal-h50.onnx", "cal-h50")]:
    m = onnx.load(src, load_external_data=False)
    heads = json.loads(next(p.value for p in m.metadata_props if p.key == "spatten.heads_kept"))
    for comp in ("none", "mean"):
        model = load_model("models/cache/minilm/model.onnx")
        Pipeline([Normalize(), DecomposeAttention(), PruneHeads(rule="calibrated", heads=tuple(map(tuple, heads)),
                  calibration=calib, compensation=comp)])(model)
        save_model(model, f"bench/out/mean-feas/{name}-{comp}.onnx")
        print(name, comp, flush=True)
