"""Where do [CLS], [SEP] and punctuation rank under the layer-0..5 column sums? (IMDB test, N reviews)"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from proto import *

torch.set_num_threads(1)
N = int(os.environ.get("N", "30"))
tok, model = load(); w = W(model)
d = load_split(tok, "imdb_test")
punct = set(tok.convert_tokens_to_ids([".", ",", "!", "?", "'", '"', "-", "(", ")", ":", ";"]))
res = {l: {"cls": [], "sep": [], "punct_share_top10pct": [], "sink_mass": []} for l in range(NL)}
with torch.inference_mode():
    for ids in d["ids"][:N]:
        L = len(ids)
        sp = (ids == CLS_ID) | (ids == SEP_ID)
        x = embed(w, ids)
        for l, lw in enumerate(w.layers):
            h1, st = attention(lw, x, sp)
            x = ffn(lw, h1)
            s = st["colsum"].sum(0)
            rank = torch.argsort(torch.argsort(-s))  # 0 = most attended
            res[l]["cls"].append(rank[0].item() / L)
            res[l]["sep"].append(rank[L - 1].item() / L)
            top = torch.topk(s, max(1, L // 10)).indices
            res[l]["punct_share_top10pct"].append(sum(int(ids[i]) in punct for i in top) / len(top))
            res[l]["sink_mass"].append((s[0] + s[L - 1]).item() / s.sum().item())
for l in range(NL):
    print(l, {k: round(sum(v) / len(v), 3) for k, v in res[l].items()})
print("punctuation share of all tokens:", round(sum(sum(int(t) in punct for t in ids) / len(ids) for ids in d["ids"][:N]) / N, 3))
