"""Explicit head keep schedules: a cascade under the paper rule (and calibrated ``cascade``
importance), taken per layer as given under the calibrated rule with ``layer`` importance - where
layer 0 may be pruned, also together with token pruning, whose deciding layer is layer 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort
from spatten_compiler.errors import OptionError
from spatten_compiler.passes.decompose_attention import DecomposeAttention
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.head_calibration import calibration_scores, choose_heads
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.prune_heads import PruneHeads, kept_groups
from spatten_compiler.passes.prune_tokens import PruneTokens
from spatten_compiler.pipeline import Pipeline
from spatten_compiler.runtime.reference import ReferenceRuntime
from spatten_compiler.schedule import check_schedule, full_schedule


def test_full_schedule_extends_with_the_last_entry() -> None:
    assert full_schedule([0.5, 1.0], 6) == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert full_schedule([0.5], 3) == [0.5, 0.5, 0.5]
    assert full_schedule([0.25, 0.5, 1.0], 3) == [0.25, 0.5, 1.0]  # no cascade: may increase
    assert full_schedule([], 2) == [1.0, 1.0]
    with pytest.raises(OptionError, match="3 entries but the model has 2"):
        full_schedule([1.0, 1.0, 1.0], 2)
    with pytest.raises(OptionError, match=r"in \(0, 1\], got 0.0"):
        full_schedule([0.0, 1.0], 2)


def test_cascade_schedule_keeps_its_checks() -> None:
    assert check_schedule([1.0, 0.5, 1.0], 4) == [1.0, 0.5, 0.5, 0.5]
    with pytest.raises(OptionError, match="first layer must keep 1.0"):
        check_schedule([0.5, 1.0], 4)
    with pytest.raises(OptionError, match=r"in \(0, 1\]"):
        check_schedule([1.0, 1.5], 4)


def test_which_rule_gets_which_schedule() -> None:
    per_layer = PruneHeads(schedule=(0.5, 1.0), rule="calibrated", calibration="c.npz")
    assert per_layer.ratios(4) == [0.5, 1.0, 1.0, 1.0]
    assert PruneHeads(schedule=(1.0, 0.25, 0.75), rule="calibrated", calibration="c.npz").ratios(4) == [
        1.0, 0.25, 0.75, 0.75]
    # SpAtten's rule and the calibrated cascade rank heads by scores of earlier layers: cascade only.
    for rule in (PruneHeads(schedule=(0.5, 1.0)),
                 PruneHeads(schedule=(0.5, 1.0), rule="calibrated", calibration="c.npz", importance="cascade")):
        with pytest.raises(OptionError, match="first layer must keep 1.0"):
            rule.ratios(4)
    assert PruneHeads(schedule=(1.0, 0.5, 1.0), rule="calibrated", calibration="c.npz",
                      importance="cascade").ratios(3) == [1.0, 0.5, 0.5]


def write_calibration(name: str, tmp: Path) -> Path:
    f, _ = reference_io(load_meta(name))
    calib = tmp / "calib.npz"
    np.savez(calib, **{k: np.concatenate([v] * 3) for k, v in f.items()})
    return calib


@pytest.mark.parametrize("args, message", [
    (["--head-keep-schedule", "0.5,1"], "first layer must keep 1.0"),
    (["--head-keep-schedule", "0.5,1", "--head-calibration", "CALIB", "--head-importance", "cascade"],
     "first layer must keep 1.0"),
    (["--head-keep-schedule", "0.5,1,1,1,1", "--head-calibration", "CALIB"], "5 entries but the model has 4"),
    (["--head-keep-schedule", "0,1", "--head-calibration", "CALIB"], "(0, 1]"),
    (["--head-keep-schedule", "1.5", "--head-calibration", "CALIB"], "(0, 1]"),
])
def test_cli_bad_schedule_one_line_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    calib = write_calibration("bert_torchscript", tmp_path)
    out = tmp_path / "out.onnx"
    args = [str(calib) if a == "CALIB" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", str(MODELS / "bert_torchscript.onnx"), "-o", str(out),
                        *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


SPATTENC_TOKENS = dict(importance="value", protect="first+last", shape="flat", restore="mean", min_keep=1)


@pytest.mark.parametrize("prune_point", ["after-attention", "layer-input"])
@pytest.mark.parametrize("name", ["bert_torchscript", "bert_dynamo", "distilbert_dynamo"])
def test_layer0_heads_with_tokens(name: str, prune_point: str, tmp_path: Path) -> None:
    """Layer 0 keeps half its heads (calibrated), later layers all; tokens are pruned after layer 0,
    whose token scores now come from its kept heads only. onnxruntime == reference runtime, and
    layer 0's Q/K/V MatMuls and probabilities really have the kept width / head count."""
    proto = onnx.load(MODELS / f"{name}.onnx")
    calib = write_calibration(name, tmp_path)
    model = ir.serde.deserialize_model(proto)
    heads = PruneHeads(schedule=(0.5, 1.0), rule="calibrated", calibration=str(calib))
    Pipeline([Normalize(), DecomposeAttention()])(model)
    scores = calibration_scores(model, find_attention(model).sites, calib)
    Pipeline([heads])(model)
    sites = find_attention(model).sites
    groups = scores.shape[1]
    counts = [kept_groups(groups, r) for r in heads.ratios(len(sites))]
    assert counts == [groups // 2] + [groups] * (len(sites) - 1)
    assert model.metadata_props["spatten.heads_kept"] == str(choose_heads(scores, counts, "layer"))
    s0 = sites[0]
    taps = [s0.q.projection.node.outputs[0], s0.k.projection.node.outputs[0], s0.v.projection.node.outputs[0],
            s0.probs, sites[1].q.projection.node.outputs[0]]
    Pipeline([PruneTokens(keep=0.5, prune_point=prune_point, **SPATTENC_TOKENS)])(model)
    model.graph.outputs.extend(t for t in taps if t not in model.graph.outputs)
    path = tmp_path / "m.onnx"
    onnx.save(ir.serde.serialize_model(model), path)
    f, _ = reference_io(load_meta(name))
    got = run_ort(path, f)
    report = ReferenceRuntime(path).run(f)
    assert report.token_keep, "no tokens were pruned"
    for k, v in got.items():
        np.testing.assert_allclose(v, report.outputs[k], atol=1e-4, rtol=0)
    n, dh, seq = counts[0], s0.head_dim, f["attention_mask"].shape[1]
    q, k, v, probs, q1 = (got[t.name] for t in taps)
    assert q.shape[-1] == k.shape[-1] == v.shape[-1] == n * dh
    assert probs.shape[1:] == (n, seq, seq)  # token scores of layer 0: the kept heads' probabilities
    assert q1.shape[-1] == groups * dh and q1.shape[-2] < seq  # layer 1: every head, fewer tokens
