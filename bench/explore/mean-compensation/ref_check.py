import json, numpy as np, onnx, onnx_ir as ir, tempfile, onnxruntime as ort
from spatten_compiler.modelio import load_model
from spatten_compiler.pipeline import Pipeline
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.decompose_attention import DecomposeAttention
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.head_calibration import context_means, load_calibration
calib = "bench/out/heads/calib-wt2-64x256.npz"
m = onnx.load("bench/out/mean-feas/cal-h50-mean.onnx", load_external_data=False)
heads = json.loads(next(p.value for p in m.metadata_props if p.key == "spatten.heads_kept"))
model = load_model("models/cache/minilm/model.onnx")
Pipeline([Normalize(), DecomposeAttention()])(model)
sites = find_attention(model).sites
print("out transposed", sites[0].out_proj.transposed_weight, sites[0].out_proj.weight.shape, sites[0].pv.outputs[0].shape)
means = context_means(model, sites, calib)
g = model.graph
for i, s in enumerate(sites):
    e = s.pv.outputs[0]; H = s.num_heads
    keep = np.zeros((1, H, 1, 1), np.float32); keep[0, heads[i]] = 1
    off = (means[i] * (1 - keep[0, :, 0, 0])[:, None])[None, :, None, :].astype(np.float32)
    uses = list(e.uses())
    kc = ir.Value(name=f"k{i}", const_value=ir.tensor(keep, name=f"k{i}")); g.register_initializer(kc)
    oc = ir.Value(name=f"o{i}", const_value=ir.tensor(off, name=f"o{i}")); g.register_initializer(oc)
    mul = ir.node("Mul", [e, kc]); g.insert_after(e.producer(), mul)
    add = ir.node("Add", [mul.outputs[0], oc]); g.insert_after(mul, add)
    for u in uses: u.node.replace_input_with(u.idx, add.outputs[0])
from spatten_compiler.modelio import save_model
save_model(model, "bench/out/mean-feas/ref-h50-mean.onnx")
feeds = load_calibration(calib); b = {k: v[:4] for k, v in feeds.items()}
so = ort.SessionOptions(); so.log_severity_level = 3
r = ort.InferenceSession("bench/out/mean-feas/ref-h50-mean.onnx", so).run(None, b)[0]
c = ort.InferenceSession("bench/out/mean-feas/cal-h50-mean.onnx", so).run(None, b)[0]
n = ort.InferenceSession("bench/out/mean-feas/cal-h50-none.onnx", so).run(None, b)[0]
d = ort.InferenceSession("models/cache/minilm/model.onnx", so).run(None, b)[0]
print("ref vs comp", np.abs(r - c).max(), "ref vs none", np.abs(r - n).max())
pool = lambda x: x.mean(1)
cos = lambda a, b: ((pool(a) * pool(b)).sum(1) / np.linalg.norm(pool(a), axis=1) / np.linalg.norm(pool(b), axis=1))
print("calib cos to dense: mean", cos(c, d), "none", cos(n, d))
