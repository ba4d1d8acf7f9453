"""Dense probe accuracies (the reference every variant is compared with)."""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from proto import *

out = {}
for ds, (tr, te) in {"imdb": ("imdb_train", "imdb_test"), "sst2": ("sst2_train", "sst2_dev")}.items():
    Dtr = torch.load(os.path.join(CACHE, f"dense_{tr}.pt"), weights_only=False)["emb"].numpy()
    Dte = torch.load(os.path.join(CACHE, f"dense_{te}.pt"), weights_only=False)["emb"].numpy()
    ytr = torch.load(os.path.join(CACHE, f"ids_{tr}.pt"), weights_only=False)["labels"]
    yte = torch.load(os.path.join(CACHE, f"ids_{te}.pt"), weights_only=False)["labels"]
    out[f"{ds}_acc"] = LogisticRegression(C=1.0, max_iter=2000).fit(Dtr, ytr).score(Dte, yte)
    out[f"{ds}_bcv"] = cross_val_score(LogisticRegression(C=1.0, max_iter=2000), Dte, yte,
                                       cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean()
print(json.dumps(out))
json.dump(out, open(os.path.join(HERE, "dense_baseline.json"), "w"), indent=1)
