"""Assemble README.md from README_head.md, generated tables, README_defs.md and README_tail.md."""
import os
from report import load, table, HERE

def sel(rows, **kw):
    out = []
    for r in rows:
        if all((r.get(k) in v) if isinstance(v, (list, tuple, set)) else r.get(k, 4 if k == "min_keep" else None) == v
               for k, v in kw.items()):
            out.append(r)
    return out

full = load("full")
screen = load("screen")
parts = [open(os.path.join(HERE, "README_head.md")).read()]
parts.append("## Results\n\nFLOP x = dense/pruned FLOPs for the prune point the policy needs (A or B, see definitions). "
             "Accuracies in %, dense reference IMDB 77.75, SST-2 78.56. min_keep = 4 unless marked `mk32`.\n")
parts.append("### 1. Recommended family: `norm`, force [CLS]+[SEP], flat schedule (spread 0)\n")
parts.append(table(sel(full, rule="norm", special="clssep", spread=0.0, min_keep=4),
                   ["kept", "attr0x", "staleA", "staleB", "depthA", "deltaA", "attr5A"]))
parts.append("\n### 2. Paper-style baseline: `plain`, force [CLS], ramp 1.5r → 0.5r (spread 0.5)\n")
parts.append(table(sel(full, rule="plain", special="cls", spread=0.5),
                   ["kept", "attr0x", "staleA", "staleB", "depthA", "deltaA", "attr5A"]))
parts.append("\n### 3. Same rule, the two schedules side by side, and other rules (full protocol)\n")
parts.append(table([r for r in sel(full, min_keep=4)
                        if not (r["rule"] == "plain" and r["special"] == "cls" and r["spread"] == 0.5)
                        and not (r["rule"] == "norm" and r["special"] == "clssep" and r["spread"] == 0.0)],
                   ["kept", "staleA"]))
parts.append("\n### 4. Short inputs: SST-2 with min_keep = 32 (sequences ≤ 32 tokens unpruned)\n")
parts.append(table(sel(full, min_keep=32), ["kept", "staleA", "depthA"]))
parts.append("\n### 5. Rule / special-token screen (IMDB test only, r_avg 0.4, ramp spread 0.5)\n\n"
             "Here the `(b)` column is **5-fold cross-validated refit accuracy on the 400 pruned test "
             "embeddings** (dense: 73.0), not the train-split protocol.\n")
parts.append(table(screen, ["kept", "staleA", "depthA", "attr5A"]))
parts.append("\n" + open(os.path.join(HERE, "README_defs.md")).read())
parts.append(open(os.path.join(HERE, "README_tail.md")).read())
open(os.path.join(HERE, "README.md"), "w").write("\n".join(parts))
with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("# All results (tag full)\n\n" + table(full) + "\n\n# Screen (IMDB test only; (b) = 5-fold CV)\n\n" + table(screen) + "\n")
print("ok")
