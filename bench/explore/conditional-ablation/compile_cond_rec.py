"""Experiment: head reconstruction fitted on the contexts of a token-pruned model (what the kept
heads see once tokens are pruned) instead of the dense model's.

    python bench/explore/conditional-ablation/compile_cond_rec.py TOKEN_PRUNED.onnx HEADS.json OUT.onnx token_keep [ridge] [min_keep]
"""
import json
import sys

from spatten_compiler.config import CompileConfig
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.passes import head_calibration as hc
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.prune_heads import PruneHeads
from spatten_compiler.pipeline import Pipeline

pruned_path, heads_path, out, tk = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ridge = float(sys.argv[5]) if len(sys.argv) > 5 else 0.3
mk = int(sys.argv[6]) if len(sys.argv) > 6 else None
calib = "bench/out/heads/calib-wt2-64x256.npz"
token_pruned = load_model(pruned_path)
orig = hc.context_stats


def conditional_stats(model, sites, path, layers):  # calibration windows have no padding: every row is valid
    return orig(token_pruned, find_attention(token_pruned).sites, path, layers)


hc.context_stats = conditional_stats
heads = tuple(map(tuple, json.load(open(heads_path))))
passes = CompileConfig(token_keep=tk, token_min_keep=mk).passes()
passes.insert(2, PruneHeads(rule="calibrated", heads=heads, calibration=calib, reconstruct=True, ridge=ridge))
model = load_model("models/cache/minilm/model.onnx")
Pipeline(passes)(model)
save_model(model, out)
