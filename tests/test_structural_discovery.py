"""Structural discovery (issue #16) on tiny hand-built layers: per-head q/k transforms, additive
position terms, learned attention sinks (GPT-OSS), training-mode Dropout (positive and negative cases,
no torch), and the corpus
(``corpus`` marker: models/cache/corpus from models/corpus.py, skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from structural_graphs import DH, H, build, feeds

CORPUS = Path(__file__).resolve().parents[1] / "models" / "cache" / "corpus"


def _find(proto: onnx.ModelProto):
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    return find_attention(model)


def _run(proto: onnx.ModelProto) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], feeds())[0]


POSITIVE = [dict(qk="norm"), dict(qk="partial_rope"), dict(qk="interleaved_rope"), dict(bias="buckets"),
            dict(bias="alibi"), dict(bias="mpt"), dict(qk="partial_rope", bias="alibi")]


@pytest.mark.parametrize("kw", POSITIVE, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_structural_site_found(kw: dict) -> None:
    proto = build(**kw)
    assert np.isfinite(_run(proto)).all()  # the hand-built graph is valid
    report = _find(proto)
    assert len(report.sites) == 1 and not report.rejected, report.rejected
    s = report.sites[0]
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (H, H, DH)
    assert s.q.projection.weight.name == "w_q" and s.k.projection.weight.name == "w_k"
    assert s.q.projection.bias.name == "b_q"  # the bias is the projection's, sliced with it
    assert s.mask_kind == "padding" and s.out_proj is not None and s.residual is not None
    assert s.scale == pytest.approx(DH ** -0.5)
    assert bool(s.bias_terms) == (kw.get("bias", "none") != "none")
    if kw.get("qk", "plain") != "plain":
        assert s.q.transform and s.k.transform  # carried along by the rewrites


@pytest.mark.parametrize("kw", [dict(qk="norm"), dict(qk="partial_rope"), dict(qk="interleaved_rope"),
                                dict(bias="buckets"), dict(bias="alibi"), dict(bias="mpt"), dict(sink="after"),
                                dict(sink="before")],
                         ids=lambda kw: "=".join(next(iter(kw.items()))))
def test_head_slice_exact_through_transform(kw: dict, tmp_path: Path) -> None:
    """Head 0 sliced out of the weights (and out of a per-head position bias or sink column) == the
    input model with head 0's output rows zeroed."""
    from bench.coverage import heads

    path = tmp_path / "m.onnx"
    onnx.save(build(**kw), path)
    ok, why = heads(path, feeds(), tmp_path)
    assert ok, why


@pytest.mark.parametrize(("kw", "reason"), [
    (dict(negative="mix_heads"), "MatMul 'q_mixed' of two activations"),
    (dict(negative="two_projections"), "reaches 2 projections"),
    (dict(negative="gather_tokens"), "gathers from the projected values"),
    (dict(negative="tensor_scale"), "scales the scores by something other than a scalar"),
    (dict(dropout=True), "Dropout"),
    (dict(sink="after", negative="activation_sink"), "joins the scores with columns computed from activations"),
    (dict(sink="after", negative="shift_not_max"), "subtracts something other than the row max"),
    (dict(sink="after", negative="slice_keeps_sink"), "does not drop exactly the sink columns"),
])
def test_structural_refusals_name_the_reason(kw: dict, reason: str) -> None:
    report = _find(build(**kw))
    assert not report.sites
    assert len(report.rejected) == 1
    got = report.rejected[0][1]
    assert reason.split("'")[0] in got, got


@pytest.mark.parametrize("side", ["after", "before"])
def test_sink_site_found(side: str) -> None:
    """GPT-OSS: Concat(scores, sink) on the key axis, the row max subtracted, the sink column sliced off
    the probabilities. The site's P is after that slice (rows sum to < 1), the sink is recorded, and the
    output equals the same layer computed in NumPy."""
    proto = build(sink=side)
    report = _find(proto)
    assert len(report.sites) == 1 and not report.rejected, report.rejected
    s = report.sites[0]
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (H, H, DH)
    assert s.variant == {"scale": "after", "mask": "additive", "sink": side}
    assert len(s.sinks) == 1 and s.sink_concat is not None and s.to_dict()["sinks"] == [s.sinks[0].name]
    assert s.probs.name == "probs" and s.probs.producer().op_type == "Slice"
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info("probs"))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    probs = sess.run(["probs"], feeds())[0]
    sinks = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "sinks"))
    rows = probs.sum(-1)
    np.testing.assert_allclose(rows, 1 / (1 + np.exp(sinks.reshape(1, H, 1)) / _row_mass(proto)), rtol=1e-5)


def _row_mass(proto: onnx.ModelProto) -> np.ndarray:
    """sum_j exp(masked scores): the softmax denominator without the sink."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info("masked"))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.exp(sess.run(["masked"], feeds())[0].astype(np.float64)).sum(-1)


def test_token_pruning_refuses_a_transform_that_sets_tokens_apart() -> None:
    """A q/k transform that slices the token axis (DINOv3's rotary on the patch tokens only) is found,
    but token pruning refuses it: the positions it assumes do not survive pruning (the sweep's DINOv3
    export wrote a model onnxruntime could not run). A whole-axis Slice (dynamo writes them) is not
    a split."""
    from spatten_compiler.passes.prune_tokens import _token_axis_op

    def splits(proto: onnx.ModelProto) -> list[str]:
        site = _find(proto).sites[0]
        return [n.name for b in (site.q, site.k) for n in (b.transform or []) if _token_axis_op(n, site)]

    assert splits(build(negative="token_prefix")) == ["q_prefix", "q_rest", "q_tp"]
    assert splits(build(qk="interleaved_rope")) == splits(build(qk="partial_rope")) == []  # head-size slices


def test_inspect_explain_names_the_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spatten_compiler.cli import main

    path = tmp_path / "mixed.onnx"
    onnx.save(build(negative="mix_heads"), path)
    assert main(["inspect", str(path), "--explain"]) == 2
    assert "MatMul 'q_mixed' of two activations" in capsys.readouterr().err
    path = tmp_path / "norm.onnx"
    onnx.save(build(qk="norm"), path)
    assert main(["inspect", str(path), "--explain"]) == 0
    assert "every Softmax is an attention site" in capsys.readouterr().out


def test_position_terms_gathered_by_token_pruning() -> None:
    """Token pruning takes a position term (gathered to the kept tokens at rewrite time, see
    test_prune_tokens_families); head pruning slices its heads."""
    from spatten_compiler.passes import prune_heads, prune_tokens

    sites = _find(build(bias="buckets")).sites
    sites[0].layer_output = sites[0].residual.outputs[0]  # one layer: no next layer to end at
    prune_tokens._check_sites(sites)
    prune_heads._check_sites(sites)  # a per-head bias is sliced with the heads


def _corpus() -> list[dict]:
    path = CORPUS / "manifest.jsonl"
    if not path.exists():
        return []
    latest = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        latest[rec["name"]] = rec
    return [r for r in latest.values() if r.get("status") == "ok" and (CORPUS / r["onnx"]).exists()]


@pytest.mark.corpus
@pytest.mark.parametrize("rec", _corpus() or [None], ids=lambda r: r["name"] if r else "absent")
def test_corpus_model(rec: dict | None) -> None:
    """Discovery exact, or every miss a one-line refusal (never a crash or a wrong rewrite)."""
    if rec is None:
        pytest.skip("no corpus: run python models/corpus.py")
    from bench.coverage import CHECKS, evaluate

    row = evaluate(rec, CORPUS)
    for check in CHECKS:
        r = row[check]
        assert r["ok"] or r.get("refused"), f"{check}: {r['reason']}"
        assert "\n" not in r["reason"]


def test_norm_over_all_heads_found_and_head_pruned_at_the_core() -> None:
    """Found with its cross-head norm; prune-heads keeps q/k whole and gathers the kept heads at the
    core (exactness: tests/test_head_layouts.py::test_norm_over_all_heads_gathers_at_core)."""
    from spatten_compiler.passes import head_narrow, prune_heads

    sites = _find(build(qk="norm_full")).sites
    assert len(sites) == 1 and sites[0].num_heads == H and sites[0].q.cross_head is not None
    prune_heads._check_sites(sites)
    assert head_narrow.needs_rows(sites[0]) == "a norm over all heads before the head split"


@pytest.mark.parametrize("op", ["rms", "layer"])
def test_norm_before_the_output_projection_found_heads_refused(op: str) -> None:
    """BitNet's attn_sub_norm / Sub-LN between the head merge and the output projection: the output
    projection and residual are found through it (token rewrites pass it row by row:
    test_prune_tokens_families sub_norm), head pruning refuses in one line (the norm's statistics
    cover every head)."""
    from spatten_compiler.passes import prune_heads
    from test_prune_tokens_families import _sub_norm

    from spatten_compiler.errors import OptionError

    proto = _sub_norm(build(), op=op)
    assert np.isfinite(_run(proto)).all()
    sites = _find(proto).sites
    assert len(sites) == 1 and sites[0].out_norm and sites[0].out_proj.weight.name == "w_o"
    assert sites[0].residual is not None and sites[0].layer_input.name == "x"
    with pytest.raises(OptionError, match="a norm over all heads .* between the head merge and the output projection"):
        prune_heads._check_sites(sites)
    assert not _find(build()).sites[0].out_norm
