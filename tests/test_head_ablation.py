"""prune-heads' ``ablation`` importance: a head's score is how much the mean-pooled output changes
when only that head is removed; each layer keeps its costliest heads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort
from spatten_compiler.passes.decompose_attention import DecomposeAttention
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.head_calibration import ablation_scores
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.prune_heads import PruneHeads

from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pipeline


def compiled(proto: onnx.ModelProto, *passes) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    Pipeline([Normalize(), DecomposeAttention(), *passes])(model)
    return model


def pooled(out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """NumPy oracle: mean over the valid (last ``S``) mask positions of a [B, S, D] output."""
    w = mask[:, -out.shape[1]:].astype(np.float64)[..., None]
    return (out.astype(np.float64) * w).sum(1) / w.sum(1)


@pytest.mark.parametrize("name", ["bert_torchscript", "llama_dynamo"])  # MHA encoder; GQA decoder with KV cache
def test_ablation_scores_are_the_output_change_of_each_pruned_model(name: str, tmp_path: Path) -> None:
    proto, f = onnx.load(MODELS / f"{name}.onnx"), reference_io(load_meta(name))[0]
    calib = tmp_path / "calib.npz"  # 5 copies of the fixture's inputs: more than one batch
    np.savez(calib, **{k: np.concatenate([v] * 5) for k, v in f.items()})
    model = compiled(proto)
    sites = find_attention(model).sites
    layers, groups = len(sites), sites[0].num_kv_heads
    before = ir.serde.serialize_model(model).SerializeToString()
    scores = ablation_scores(model, sites, calib)
    assert ir.serde.serialize_model(model).SerializeToString() == before  # the model is left as it was
    # Oracle: really prune each head alone (explicit heads: sliced weights) and compare outputs in NumPy.
    first = proto.graph.output[0].name
    dense = pooled(run_ort(MODELS / f"{name}.onnx", f)[first], f["attention_mask"])
    want = np.zeros((layers, groups))
    for layer in range(layers):
        for g in range(groups):
            heads = tuple(tuple(h for h in range(groups) if i != layer or h != g) for i in range(layers))
            path = tmp_path / "ablated.onnx"
            ir.save(compiled(proto, PruneHeads(rule="calibrated", heads=heads)), path)
            got = pooled(run_ort(path, f)[first], f["attention_mask"])
            cos = (got * dense).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(dense, axis=1)
            want[layer, g] = (1 - cos).mean()
    np.testing.assert_allclose(scores, want, atol=1e-6, rtol=1e-3)
    assert (want > 1e-7).any()  # removing a head changes something: the test can tell heads apart
    part = ablation_scores(model, sites, calib, [1])  # only the layers to be pruned are ablated
    np.testing.assert_array_equal(part[1], scores[1])
    assert not np.delete(part, 1, axis=0).any()
    # Each layer keeping all but one head prunes the head whose removal changes the output least.
    kept = compiled(proto, PruneHeads(schedule=((groups - 1) / groups,), rule="calibrated", calibration=str(calib),
                                      importance="ablation")).metadata_props["spatten.heads_kept"]
    cheapest = [int(np.argmin(w)) for w in want]
    assert kept == str([[h for h in range(groups) if h != c] for c in cheapest])


def test_ablation_takes_a_per_layer_schedule_as_given() -> None:
    rule = PruneHeads(schedule=(0.5, 1.0), rule="calibrated", calibration="c.npz", importance="ablation")
    assert rule.ratios(3) == [0.5, 1.0, 1.0]  # layer 0 may be pruned: each layer ranks its own heads


@pytest.mark.parametrize("args, message", [
    (["--head-keep", "0.5", "--head-importance", "ablation"], "--head-importance ablation needs --head-calibration"),
    (["--head-keep", "0.5", "--head-importance", "cascade"], "--head-importance cascade needs --head-calibration"),
])
def test_cli_importance_without_calibration_one_line_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", str(MODELS / "bert_torchscript.onnx"), "-o", str(out),
                        *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_bad_importance() -> None:
    model = compiled(onnx.load(MODELS / "bert_torchscript.onnx"))
    with pytest.raises(OptionError, match="layer, cascade or ablation"):
        PruneHeads(keep=0.5, rule="calibrated", calibration="c.npz", importance="loss")(model)
