import numpy as np, json, onnx, sys
from pathlib import Path
from bench import common
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.decompose_attention import DecomposeAttention
from spatten_compiler.passes.prune_heads import PruneHeads
n, maxlen = int(sys.argv[1]), int(sys.argv[2])
tok = common.load_tokenizer(common.find_tokenizer(Path("models/cache/minilm/model.onnx")), maxlen)
lines = [l.strip() for l in open("/work/shared/data/wikitext2/test.txt")]
paras = [l for l in lines[2000:] if l and not l.startswith("=") and len(l) > 200][:n]
encs = tok.encode_batch(paras)
f = common.pad_encodings(encs, common.pad_id_of(tok))
out = f"bench/out/mean-feas/calib-wt2para-{n}x{maxlen}.npz"
np.savez(out, **f)
print({k: v.shape for k, v in f.items()}, f["attention_mask"].sum(1).mean())
for src, name in [("bench/out/combo-abl/t0.25v-abl-g20.onnx", "abl-g20"), ("bench/out/heads/cal-h50.onnx", "cal-h50")]:
    m = onnx.load(src, load_external_data=False)
    heads = json.loads(next(p.value for p in m.metadata_props if p.key == "spatten.heads_kept"))
    model = load_model("models/cache/minilm/model.onnx")
    Pipeline([Normalize(), DecomposeAttention(), PruneHeads(rule="calibrated", heads=tuple(map(tuple, heads)),
              calibration=out, compensation="mean")])(model)
    save_model(model, f"bench/out/mean-feas/{name}-wtpara.onnx")
