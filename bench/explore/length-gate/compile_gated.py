"""Compile MiniLM with explicit calibrated heads + token pruning behind a length gate.

    python bench/explore/length-gate/compile_gated.py HEADS.json OUT.onnx TOKEN_KEEP MIN_KEEP GATE

HEADS.json: kept heads per layer (bench/explore/conditional-ablation/heads-abl-*.json, the sets the
ablation rule picked); gives the same model as the CLI's ``--head-importance ablation`` with the
matching ``--head-keep-schedule`` plus ``--prune-min-length GATE``, without the 4-minute ablation.
"""
import json
import sys

from spatten_compiler.passes.length_gate import compile_gated
from spatten_compiler.passes.prune_heads import PruneHeads

from spatten_compiler.config import CompileConfig
from spatten_compiler.modelio import load_model, save_model

heads_file, out = sys.argv[1], sys.argv[2]
token_keep, min_keep, gate = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
heads = tuple(map(tuple, json.load(open(heads_file))))
config = CompileConfig(token_keep=token_keep, token_min_keep=min_keep, prune_min_length=gate)
passes = config.passes()
passes.insert(2, PruneHeads(rule="calibrated", heads=heads, calibration="bench/out/heads/calib-wt2-64x256.npz"))
print([p.name for p in passes], [len(h) for h in heads], "gate", gate)
model = load_model("models/cache/minilm/model.onnx")
compile_gated(model, passes, config.unpruned().passes(), gate)
save_model(model, out)
