import csv, numpy as np, json, onnx
from pathlib import Path
from bench import common
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.decompose_attention import DecomposeAttention
from spatten_compiler.passes.prune_heads import PruneHeads
tok = common.load_tokenizer(common.find_tokenizer(Path("models/cache/minilm/model.onnx")), 256)
rows = list(csv.DictReader(open("/work/shared/data/imdb/train.tsv"), delimiter="\t", quoting=csv.QUOTE_NONE))
encs = [tok.encode(r["sentence"]) for r in rows[-64:]]
f = common.pad_encodings(encs, common.pad_id_of(tok))
np.savez("bench/out/mean-feas/calib-imdbtrain-64.npz", **f)
print({k: v.shape for k, v in f.items()}, f["attention_mask"].mean())
for src, name in [("bench/out/combo-abl/t0.25v-abl-g20.onnx", "abl-g20"), ("bench/out/heads/cal-h50.onnx", "cal-h50")]:
    m = onnx.load(src, load_external_data=False)
    heads = json.loads(next(p.value for p in m.metadata_props if p.key == "spatten.heads_kept"))
    model = load_model("models/cache/minilm/model.onnx")
    Pipeline([Normalize(), DecomposeAttention(), PruneHeads(rule="calibrated", heads=tuple(map(tuple, heads)),
              calibration="bench/out/mean-feas/calib-imdbtrain-64.npz", compensation="mean")])(model)
    save_model(model, f"bench/out/mean-feas/{name}-imdbmean.onnx")
