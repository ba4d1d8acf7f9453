"""prune-heads on every Q/K/V packing (issue #16): row maps evaluated on column indices
(:mod:`spatten_compiler.passes.head_rows`), projections narrowed or kept whole with the kept heads
gathered at the core (:mod:`spatten_compiler.passes.head_narrow`); hand-built layouts, a norm over
all heads (OLMo 2), and the corpus families these layouts come from (``corpus`` marker)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.compose
import onnx_ir as ir
import packed_graphs
import pytest
import structural_graphs
from packed_graphs import LAYOUTS, build, columns, feeds
from spatten_compiler.passes import head_rows
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.runtime.reference import ReferenceRuntime

from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline, make_pass

CORPUS = Path(__file__).resolve().parents[1] / "models" / "cache" / "corpus"
NARROWED = {"neox": 36, "falcon": 16, "stacked": 36, "split_gqa": 16}  # projection width after removing group 0


def _site(proto: onnx.ModelProto):
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    report = find_attention(model)
    assert len(report.sites) == 1, report.rejected
    return model, report.sites[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_map(layout: str) -> None:
    """The columns each head reads at the core, from the view chain alone."""
    _, s = _site(build(layout))
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (packed_graphs.H, packed_graphs.kv_heads(layout),
                                                         packed_graphs.DH)
    _, cores = head_rows.evaluate(s.q.projection.node, [s.q.value, s.k.value, s.v.value])
    want = columns(layout)
    for name, core in zip("qkv", cores):
        assert [c.tolist() for c in head_rows.head_columns(core)] == want[name], name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_removed_exact(layout: str, tmp_path: Path) -> None:
    """keep 1.0 is the input model; group 0 removed == its output-projection rows zeroed (onnxruntime),
    and the reference runtime computes the same as onnxruntime."""
    from bench.coverage import heads

    path = tmp_path / "m.onnx"
    onnx.save(build(layout), path)
    ok, why = heads(path, feeds(), tmp_path)
    assert ok, why
    out = tmp_path / "out.onnx"
    kept = (tuple(range(1, packed_graphs.kv_heads(layout))),)
    model = load_model(path)
    Pipeline([make_pass("normalize"), make_pass("prune-heads", rule="calibrated", heads=kept)], check=True)(model)
    save_model(model, out, external_data=False)
    import onnxruntime as ort

    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["y"], feeds())[0]
    ref = ReferenceRuntime(out).run(feeds()).outputs["y"]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    widths = {int(n.inputs[1].shape.dims[-1]) for n in model.graph if n.op_type == "MatMul"
              and n.inputs[0].name == "x"}
    if layout in NARROWED:  # the packed projection itself is narrowed, not gathered after
        assert widths == {NARROWED[layout]}, widths
    else:  # heads folded with B*H computed from the shape: kept whole, the core reads the kept heads
        assert widths == {3 * packed_graphs.H * packed_graphs.DH}
        assert any(n.op_type == "Gather" and n.attributes.get_int("axis", 0) == 1 for n in model.graph)


@pytest.mark.parametrize("layout", ["neox", "falcon"])
def test_value_read_outside_the_core_keeps_the_projection_whole(layout: str, tmp_path: Path) -> None:
    """A view of the packed projection that is also a graph output must not lose columns: the
    narrowing is refused (its reason) and the kept heads are gathered at the core instead; exact."""
    from bench.coverage import heads

    _, s = _site(build(layout, escape=True))
    cores = [s.q.value, s.k.value, s.v.value]
    with pytest.raises(head_rows.RowMapError, match="read outside the attention core"):
        head_rows.narrow(s.q.projection.node, cores, [np.array([1, 2, 3])] * 3, np.arange(12, 48))
    path = tmp_path / "m.onnx"
    onnx.save(build(layout, escape=True), path)
    ok, why = heads(path, feeds(), tmp_path)
    assert ok, why


def test_norm_over_all_heads_gathers_at_core(tmp_path: Path) -> None:
    """OLMo 2's q/k norm over all heads: q and k stay whole (the norm sees every head), v is narrowed."""
    from bench.coverage import heads

    path = tmp_path / "m.onnx"
    onnx.save(structural_graphs.build(qk="norm_full"), path)
    ok, why = heads(path, structural_graphs.feeds(), tmp_path)
    assert ok, why


def test_narrowing_refused_when_a_reduction_mixes_heads() -> None:
    _, s = _site(structural_graphs.build(qk="norm_full"))
    with pytest.raises(head_rows.RowMapError, match="reduces over kept and removed heads"):
        head_rows.narrow(s.q.projection.node, [s.q.value], [np.array([1])], np.arange(4, 8))


def _two_layers(layout: str) -> onnx.ModelProto:
    one = build(layout)
    return onnx.compose.merge_models(one, onnx.compose.add_prefix(one, "l1_"), io_map=[("y", "l1_x")])


@pytest.mark.parametrize("layout", ["neox", "falcon", "stacked", "folded"])
def test_paper_rule_gathers_at_the_core(layout: str, tmp_path: Path) -> None:
    """The run-time rule on a packed layout: the second layer's kept heads (chosen from the first
    layer's scores) are gathered at the core; onnxruntime == reference runtime, which reports the
    heads it kept. ``folded`` (heads folded into the batch, 3-D probabilities and P @ V) was refused in one
    line before session 20; its head scores now read both unfolded (exactness against the zeroed heads:
    tests/test_folded_terms.py::test_paper_rule_on_a_folded_core_with_3d_products)."""
    import onnxruntime as ort

    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(_two_layers(layout), path)
    model = load_model(path)
    Pipeline([make_pass("normalize"), make_pass("prune-heads", schedule=(1.0, 0.5))], check=True)(model)
    save_model(model, out, external_data=False)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["l1_y"], feeds())[0]
    report = ReferenceRuntime(out).run(feeds())
    np.testing.assert_allclose(got, report.outputs["l1_y"], atol=1e-5, rtol=0)
    assert report.head_keep


def _corpus(families: tuple[str, ...]) -> list[dict]:
    path = CORPUS / "manifest.jsonl"
    if not path.exists():
        return []
    latest = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        latest[rec["name"]] = rec
    return [r for r in latest.values() if r.get("status") == "ok" and r["family"] in families
            and (CORPUS / r["onnx"]).exists()]


FIXED = ("gpt_neox", "codegen", "persimmon", "falcon", "modernbert", "gpt_bigcode", "phi3", "olmo2", "bloom", "xglm")


@pytest.mark.corpus
@pytest.mark.parametrize("rec", _corpus(FIXED) or [None], ids=lambda r: r["name"] if r else "absent")
def test_corpus_heads_exact(rec: dict | None, tmp_path: Path) -> None:
    """The families whose layouts were refused before: exact at keep 1.0 and with group 0 removed."""
    if rec is None:
        pytest.skip("no corpus: run python models/corpus.py")
    from bench.coverage import heads

    ok, why = heads(CORPUS / rec["onnx"], dict(np.load(CORPUS / f"{rec['name']}.npz")), tmp_path)
    assert ok, why


@pytest.mark.parametrize("bits", ["8+4", "6"])
def test_quantize_kv_on_folded_heads(bits: str, tmp_path: Path) -> None:
    """quantize-kv on a 3-D core (heads folded into the batch): runs, onnxruntime == reference
    runtime, and at threshold 1.0 (every row MSB + LSB) it is static 12-bit quantization: close."""
    path, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(build("folded"), path)
    model = load_model(path)
    quantize = make_pass("quantize-kv", bits=bits, rule="fixed", threshold=1.0)
    Pipeline([make_pass("normalize"), quantize], check=True)(model)
    save_model(model, out, external_data=False)
    import onnxruntime as ort

    dense = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], feeds())[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["y"], feeds())[0]
    ref = ReferenceRuntime(out).run(feeds()).outputs["y"]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert np.abs(got - dense).max() < (2e-3 if bits == "8+4" else 5e-2)


def test_stacked_heads_spelled_minus_one_found_after_shapes_are_forgotten(tmp_path: Path) -> None:
    """ModernBERT's view(B, -1, 3, -1, Dh) of the packed QKV: once a pass has dropped the value shapes
    (prune-tokens does, for onnxruntime's sake), the heads come from the projection weight's width,
    so the default preset's K/V pass after prune-tokens still finds every layer."""
    from spatten_compiler.editor import GraphEditor

    proto = build("stacked")
    for t in proto.graph.initializer:
        if t.name == "s5":
            t.CopyFrom(onnx.numpy_helper.from_array(np.array([0, 0, 3, -1, packed_graphs.DH], np.int64), "s5"))
    model, _ = _site(proto)
    GraphEditor(model, "test").forget_shapes()
    sites = find_attention(model).sites
    assert [(s.num_heads, s.head_dim) for s in sites] == [(packed_graphs.H, packed_graphs.DH)]
    out = tmp_path / "out.onnx"
    save_model(model, tmp_path / "in.onnx", external_data=False)
    from spatten_compiler.cli import main

    assert main([str(tmp_path / "in.onnx"), "-o", str(out), "--token-keep", "0.5", "--token-min-keep", "1",
                 "--kv-bits", "8+4"]) == 0
