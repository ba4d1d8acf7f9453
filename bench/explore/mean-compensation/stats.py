import numpy as np, json, onnx, tempfile
from spatten_compiler.modelio import load_model
from spatten_compiler.pipeline import Pipeline
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.decompose_attention import DecomposeAttention
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.head_calibration import _session, load_calibration
model = load_model("models/cache/minilm/model.onnx")
Pipeline([Normalize(), DecomposeAttention()])(model)
sites = find_attention(model).sites
taps = [s.pv.outputs[0] for s in sites]
with tempfile.TemporaryDirectory() as tmp:
    sess = _session(model, tmp, taps)
def stats(path):
    f = load_calibration(path); S1 = 0; S2 = 0; N = 0
    for st in range(0, len(f["input_ids"]), 8):
        b = {k: v[st:st+8] for k, v in f.items()}
        es = np.stack(sess.run([t.name for t in taps], b)).astype(np.float64)  # L,B,H,S,D
        w = b["attention_mask"].astype(np.float64)
        S1 = S1 + np.einsum("lbhsd,bs->lhd", es, w); S2 = S2 + np.einsum("lbhsd,bs->lh", es**2, w); N += w.sum()
    m = S1 / N; return m, (m**2).sum(-1) / (S2 / N)
mw, rw = stats("bench/out/heads/calib-wt2-64x256.npz")
mi, ri = stats("bench/out/mean-feas/calib-imdbtrain-64.npz")
for name, src in [("abl", "bench/out/combo-abl/t0.25v-abl-g20.onnx"), ("h50", "bench/out/heads/cal-h50.onnx")]:
    m = onnx.load(src, load_external_data=False)
    heads = json.loads(next(p.value for p in m.metadata_props if p.key == "spatten.heads_kept"))
    print(name)
    for l in range(6):
        for h in range(12):
            if h not in heads[l]:
                cos = (mw[l,h]*mi[l,h]).sum()/np.linalg.norm(mw[l,h])/np.linalg.norm(mi[l,h])
                print(f"  L{l}h{h}: constancy wt2 {rw[l,h]:.2f} imdb {ri[l,h]:.2f}  |mean| wt2 {np.linalg.norm(mw[l,h]):.3f} imdb {np.linalg.norm(mi[l,h]):.3f} cos(wt2,imdb) {cos:+.2f}")
