"""Decompose the cosine loss of kept-token pooling on IMDB test (first N reviews):
  subset  = cos(mean of DENSE final states over the kept set S, dense embedding)  -> pooling-subset error
  pruned  = cos(mean of PRUNED final states over S, dense embedding)              -> + lost-context error
  random  = same as subset for a random S of the same size (CLS kept)
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from proto import *

torch.set_num_threads(1)
N = int(os.environ.get("N", "40"))
tok, model = load(); w = W(model)
d = load_split(tok, "imdb_test")
g = torch.Generator().manual_seed(0)
for r, spread in [(0.4, 0.5), (0.4, 0.0)]:
    for rule in ["plain", "vonorm"]:
        acc = {"subset": [], "pruned": [], "random": [], "staleA": []}
        with torch.inference_mode():
            for ids in d["ids"][:N]:
                hL, c0 = dense_forward(w, ids)
                e = F.normalize(hL.mean(0), dim=0)
                ks = keep_counts(len(ids), schedule(r, spread=spread))
                out, idx = pruned_forward(w, ids, Rule(rule), ks, "cls", c0)
                cos = lambda v: F.cosine_similarity(v, e, dim=0).item()
                acc["subset"].append(cos(hL[idx].mean(0)))
                acc["pruned"].append(cos(out["kept"]))
                acc["staleA"].append(cos(out["staleA"]))
                perm = torch.randperm(len(ids) - 1, generator=g)[: len(idx) - 1] + 1
                ridx = torch.cat([torch.tensor([0]), perm])
                acc["random"].append(cos(hL[ridx].mean(0)))
        print(r, spread, rule, {k: round(sum(v) / len(v), 3) for k, v in acc.items()}, flush=True)
