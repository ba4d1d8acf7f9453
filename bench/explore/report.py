"""Summarize results.jsonl into markdown tables (results.md)."""
import json, os, sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
# which prune point a pooling policy needs: A = prune between layers (pruned tokens still run the
# deciding layer's FFN, so their stale state is a layer output); B = prune inside the deciding
# layer after softmax (P@V rows, out-proj and FFN of pruned tokens skipped).
VAR = {"staleA": "A", "deltaA": "A", "depthA": "A", "attr1A": "A", "attr1Ax": "A", "attr5A": "A",
       "staleB": "B", "deltaB": "B", "depthB": "B", "attr1B": "B", "attr1Bx": "B",
       "kept": "B", "fused": "B", "keptw": "B", "keptns": "B", "attr0": "B", "attr0x": "B"}


def load(tag=None):
    rows = [json.loads(l) for l in open(os.path.join(HERE, "results.jsonl"))]
    merged = defaultdict(dict)
    for r in rows:
        if tag and r["tag"] != tag:
            continue
        key = (r["tag"], r["rule"], r["accum"], r["special"], r["spread"], r["ndense"], r.get("min_keep", 4), r.get("fuse", False), r["r_avg"], r["pool"])
        merged[key].update(r)
    return list(merged.values())


def fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100*v:.2f}" if pct else f"{v:.3f}"


def table(rows, pools=None):
    base = json.load(open(os.path.join(HERE, "dense_baseline.json"))) if os.path.exists(
        os.path.join(HERE, "dense_baseline.json")) else {}
    out = ["| rule | special | spread | pool | prune pt | r_avg | FLOP x @512 | FLOP x @IMDB | IMDB cos | IMDB (a) | IMDB (b) | SST-2 cos | SST-2 (a) | SST-2 (b) | FLOP x @SST-2 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(rows, key=lambda r: (r["rule"], r.get("min_keep", 4), r["special"], r["spread"], r["pool"], r["r_avg"]))
    for r in rows:
        if pools and r["pool"] not in pools:
            continue
        v = VAR[r["pool"]]
        out.append("| " + " | ".join([
            r["rule"] + ("" if r["accum"] == "sum" else "/" + r["accum"]) + ("" if r["ndense"] == 1 else f" nd{r['ndense']}")
            + ("" if r.get("min_keep", 4) == 4 else f" mk{r['min_keep']}"),
            r["special"], str(r["spread"]), r["pool"], v, str(r["r_avg"]),
            f"{r['flop512_' + v]:.2f}", fmt(r.get("imdb_flop" + v)),
            fmt(r.get("imdb_cos")), fmt(r.get("imdb_a"), 1), fmt(r.get("imdb_b", r.get("imdb_bcv")), 1),
            fmt(r.get("sst2_cos")), fmt(r.get("sst2_a"), 1), fmt(r.get("sst2_b"), 1),
            fmt(r.get("sst2_flop" + v))]) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    tag = sys.argv[1] if len(sys.argv) > 1 else None
    pools = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    print(table(load(tag), pools))
