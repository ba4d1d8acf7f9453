"""Dense reference: embeddings (mean pool + L2) and the layer-0 cache for every split."""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from proto import *

def main():
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    tok, model = load()
    w = W(model)
    for name in SPLITS:
        p = os.path.join(CACHE, f"dense_{name}.pt")
        if os.path.exists(p):
            continue
        d = load_split(tok, name)
        embs, c0s = [], []
        t = time.time()
        with torch.inference_mode():
            for ids in d["ids"]:
                hL, c0 = dense_forward(w, ids)
                embs.append(F.normalize(hL.mean(0), dim=0))
                c0s.append(c0)
        torch.save({"emb": torch.stack(embs), "cache0": c0s}, p)
        print(name, len(embs), f"{time.time()-t:.1f}s", flush=True)

if __name__ == "__main__":
    main()
