"""Head ablation costs scored on a token-pruned model (heads' cost given that tokens are pruned).

    python bench/explore/conditional-ablation/score.py TOKEN_PRUNED.onnx OUT.npz [CALIB.npz]
"""
import sys
import logging
import numpy as np
from spatten_compiler.modelio import load_model
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.head_calibration import ablation_scores

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
src, out = sys.argv[1], sys.argv[2]
calib = sys.argv[3] if len(sys.argv) > 3 else "bench/out/heads/calib-wt2-64x256.npz"
model = load_model(src)
sites = find_attention(model).sites
cost = ablation_scores(model, sites, calib)
np.savez(out, cost=cost)
np.set_printoptions(precision=2, suppress=True, linewidth=200)
print(1e3 * cost)
