"""Run pruned variants and score them.

python run.py --rules plain,norm --special cls --ravg 0.4 --spread 0.5 [--splits imdb,sst2]
Appends one JSON line per (config, pooling policy) to results.jsonl.
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from proto import *

OUT = os.path.join(HERE, "results.jsonl")
PAIRS = {"imdb": ("imdb_train", "imdb_test"), "sst2": ("sst2_train", "sst2_dev")}
_dense = {}
FUSE = False


def dense(name):
    if name not in _dense:
        _dense[name] = torch.load(os.path.join(CACHE, f"dense_{name}.pt"), weights_only=False)
    return _dense[name]


def probe(Xtr, ytr):
    return LogisticRegression(C=1.0, max_iter=2000).fit(Xtr, ytr)


def run_split(w, tok, name, rule, special, ks_fn, nd):
    d = load_split(tok, name)
    c0 = dense(name)["cache0"]
    pools = {p: [] for p in POOLS}
    fl_dense = fl_A = fl_B = 0
    with torch.inference_mode():
        for ids, cache0 in zip(d["ids"], c0):
            L = len(ids)
            ks = ks_fn(L)
            out, _ = pruned_forward(w, ids, rule, ks, special, cache0, fuse=FUSE)
            for p in POOLS:
                pools[p].append(F.normalize(out[p], dim=0))
            fl_dense += flops([L] * NL)
            fl_A += flops(ks, "A")
            fl_B += flops(ks, "B")
    return {p: torch.stack(v).numpy() for p, v in pools.items()}, fl_dense / fl_A, fl_dense / fl_B


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default="plain")
    ap.add_argument("--accum", default="sum")
    ap.add_argument("--special", default="cls")
    ap.add_argument("--ravg", default="0.4")
    ap.add_argument("--spread", default="0.5")
    ap.add_argument("--ndense", type=int, default=1)
    ap.add_argument("--min-keep", type=int, default=4)
    ap.add_argument("--splits", default="imdb,sst2")
    ap.add_argument("--tag", default="")
    ap.add_argument("--fuse", action="store_true", help="fuse pruned tokens into one extra token")
    ap.add_argument("--screen", action="store_true",
                    help="test split only; (b) replaced by 5-fold CV of the probe on pruned test embeddings")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    global FUSE
    FUSE = a.fuse
    tok, model = load()
    w = W(model)
    for rname in a.rules.split(","):
        for special in a.special.split(","):
            for spread in map(float, a.spread.split(",")):
                for r in map(float, a.ravg.split(",")):
                    rule = Rule(rname, a.accum)
                    sched = schedule(r, n_dense=a.ndense, spread=spread)
                    ks_fn = lambda L: keep_counts(L, sched, a.min_keep)
                    cfg = dict(rule=rname, accum=a.accum, special=special, r_avg=r, spread=spread,
                               ndense=a.ndense, min_keep=a.min_keep, fuse=a.fuse, sched=[round(x, 4) for x in sched],
                               flop512_A=flop_ratio(512, sched, "A", a.min_keep),
                               flop512_B=flop_ratio(512, sched, "B", a.min_keep), tag=a.tag)
                    t0 = time.time()
                    res = {}
                    for ds in a.splits.split(","):
                        tr, te = PAIRS[ds]
                        # --screen: test split only, (b) as 5-fold CV of the probe on the pruned test embeddings
                        Ptr = None if a.screen else run_split(w, tok, tr, rule, special, ks_fn, a.ndense)[0]
                        Pte, fA, fB = run_split(w, tok, te, rule, special, ks_fn, a.ndense)
                        Dtr, Dte = dense(tr)["emb"].numpy(), dense(te)["emb"].numpy()
                        ytr, yte = load_split(tok, tr)["labels"], load_split(tok, te)["labels"]
                        clf_d = probe(Dtr, ytr)
                        for p in POOLS:
                            res.setdefault(p, {})
                            res[p][f"{ds}_cos"] = float((Pte[p] * Dte).sum(1).mean())
                            res[p][f"{ds}_a"] = float(clf_d.score(Pte[p], yte))
                            if a.screen:
                                res[p][f"{ds}_bcv"] = float(cross_val_score(
                                    LogisticRegression(C=1.0, max_iter=2000), Pte[p], yte,
                                    cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean())
                            else:
                                res[p][f"{ds}_b"] = float(probe(Ptr[p], ytr).score(Pte[p], yte))
                            res[p][f"{ds}_flopA"] = fA
                            res[p][f"{ds}_flopB"] = fB
                    with open(OUT, "a") as f:
                        for p in POOLS:
                            f.write(json.dumps({**cfg, "pool": p, **res[p]}) + "\n")
                    print(rname, special, spread, r, f"{time.time()-t0:.0f}s",
                          " ".join(f"{p}:{res[p]['imdb_cos']:.3f}/{res[p]['imdb_a']:.4f}/{res[p].get('imdb_b', res[p].get('imdb_bcv', 0)):.4f}" for p in ["staleA", "kept", "attr5A"] if "imdb_cos" in res[p]),
                          flush=True)


if __name__ == "__main__":
    main()
