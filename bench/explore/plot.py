"""IMDB quality vs FLOP ratio at 512 tokens (results.jsonl, tag=full) -> tradeoff.png."""
import os, json
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from report import load, VAR, HERE

rows = [r for r in load("full") if "imdb_b" in r]
base = json.load(open(os.path.join(HERE, "dense_baseline.json")))
pools = ["kept", "staleA", "depthA", "attr5A"]
fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
groups = {}
for r in rows:
    if r["pool"] not in pools or r.get("min_keep", 4) != 4:
        continue
    if not ((r["rule"], r["special"], r["spread"]) in [("norm", "clssep", 0.0), ("plain", "cls", 0.5)]):
        continue
    k = (r["rule"], r["special"], r["spread"], r["pool"])
    groups.setdefault(k, []).append(r)
for k, rs in sorted(groups.items()):
    rs.sort(key=lambda r: r["r_avg"])
    v = VAR[k[3]]
    xs = [r["flop512_" + v] for r in rs]
    lab = f"{k[0]} {'flat' if k[2] == 0.0 else 'ramp'} {k[3]} ({v})"
    st = "o-" if k[2] == 0.0 else "s--"
    col = {"kept": "C3", "staleA": "C0", "depthA": "C2", "attr5A": "C1"}[k[3]]
    ax[0].plot(xs, [100 * r["imdb_b"] for r in rs], st, color=col, label=lab, ms=4)
    ax[1].plot(xs, [r["imdb_cos"] for r in rs], st, color=col, label=lab, ms=4)
ax[0].axhline(100 * base["imdb_acc"], color="k", ls="--", lw=1)
ax[0].axhline(100 * base["imdb_acc"] - 0.5, color="r", ls=":", lw=1)
ax[0].axvline(2.0, color="r", ls=":", lw=1)
ax[0].set_xlabel("FLOP ratio at 512 tokens"); ax[0].set_ylabel("IMDB acc, protocol (b) refit [%]")
ax[1].set_xlabel("FLOP ratio at 512 tokens"); ax[1].set_ylabel("IMDB mean cosine to dense")
ax[1].legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(HERE, "tradeoff.png"), dpi=110)
print("wrote tradeoff.png")
