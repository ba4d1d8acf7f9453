"""Cascade head pruning: keep 1.0 is the identity, kept heads equal a NumPy computation of SpAtten's
rule, onnxruntime == reference runtime, the Q/K/V MatMuls really shrink, and what is refused."""

from __future__ import annotations

import math
from pathlib import Path

import attention_graphs
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from attention_graphs import DH, build, feeds
from conftest import MODELS, fixture_names, load_meta, reference_io, run_ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.prune_heads import PruneHeads, kept_groups
from spatten_compiler.passes.prune_tokens import PruneTokens
from spatten_compiler.passes.prune_values import PruneValues
from spatten_compiler.runtime.reference import ReferenceRuntime

from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pipeline

SUPPORTED = [n for n in fixture_names()
             if not load_meta(n)["fused_attention"] and not n.startswith(("gpt2_kv", "llama"))]
REFUSED = {n: "fused" if load_meta(n)["fused_attention"] else "KV cache"
           for n in fixture_names() if n not in SUPPORTED}


def stack(layers: int = 4, heads: int = attention_graphs.H, **kw) -> onnx.ModelProto:
    """``layers`` tiny attention layers in a row (y of one is x of the next), one shared mask."""
    old = attention_graphs.H
    attention_graphs.H = heads
    try:
        kw.setdefault("kv_heads", heads)  # build's default was bound to the module's H at import
        parts = [onnx.compose.add_prefix(build(seed=i, **kw), f"l{i}_") for i in range(layers)]
    finally:
        attention_graphs.H = old
    model = parts[0]
    for i, part in enumerate(parts[1:], 1):
        model = onnx.compose.merge_models(model, part, io_map=[(f"l{i - 1}_y", f"l{i}_x")])
    for node in model.graph.node:
        for j, name in enumerate(node.input):
            if name.endswith("_mask") and name != "l0_mask":
                node.input[j] = "l0_mask"
    keep = [i for i in model.graph.input if i.name in ("l0_x", "l0_mask")]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def tiny_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    f = feeds(build(), batch=2, seq=6, seed=seed)
    return {"l0_x": f["x"], "l0_mask": f["mask"]}


def compile_ir(proto: onnx.ModelProto, *passes) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    Pipeline([Normalize(), *passes])(model)
    return model


def with_taps(model: ir.Model) -> tuple[onnx.ModelProto, list[dict[str, str]]]:
    """The model with each layer's E = MatMul(P, V) and Q/K/V projection outputs as graph outputs."""
    taps = []
    for site in find_attention(model).sites:
        names = {}
        for key, value in (("e", site.pv.outputs[0]), ("q", site.q.projection.node.outputs[0]),
                           ("k", site.k.projection.node.outputs[0]), ("v", site.v.projection.node.outputs[0])):
            if value not in model.graph.outputs:
                model.graph.outputs.append(value)
            names[key] = value.name
        taps.append(names)
    return ir.serde.serialize_model(model), taps


def expected_heads(es: list[np.ndarray], valid: np.ndarray, ratios: list[float], groups: int,
                   g: int) -> list[list[int]]:
    """SpAtten's rule in NumPy: acc += per-group sum of |E| over valid rows and dims; top-k of the kept."""
    acc, sel, kept = np.zeros(groups), np.arange(groups), []
    for e, r in zip(es, ratios):
        n = kept_groups(groups, r)
        if n < groups:
            order = np.argsort(-acc[sel], kind="stable")[:n]
            sel = sel[np.sort(order)]
            kept.append(sel.tolist())
        assert e.shape[1] == len(sel) * g
        score = np.einsum("bhid,bi->h", np.abs(e.astype(np.float64)), valid).reshape(len(sel), g).sum(1)
        acc[sel] += score
    return kept


def save(proto: onnx.ModelProto, tmp: Path) -> Path:
    path = tmp / "m.onnx"
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("kw", [{}, {"packed": True}, {"mask": "where"}, {"rope": True}, {"mask": "causal+additive"}],
                         ids=str)
def test_keep_one_is_identity(kw: dict, tmp_path: Path) -> None:
    proto = stack(3, **kw)
    model = ir.serde.deserialize_model(proto)
    Normalize()(model)
    assert not PruneHeads(keep=1.0)(model).modified
    f = tiny_feeds(proto)
    before = run_ort(save(proto, tmp_path), f)["l2_y"]
    after = run_ort(save(ir.serde.serialize_model(model), tmp_path), f)["l2_y"]
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(heads=4), dict(heads=4, packed=True), dict(heads=4, kv_heads=2),
                                dict(heads=4, rope=True, mask="causal+additive"), dict(heads=4, mask="where")], ids=str)
def test_tiny_rule_width_and_runtimes(kw: dict, tmp_path: Path) -> None:
    proto = stack(4, **kw)
    schedule = (1.0, 0.75, 0.5, 0.25)
    model = compile_ir(proto, PruneHeads(schedule=schedule))
    tapped, taps = with_taps(model)
    path = save(tapped, tmp_path)
    f = tiny_feeds(proto)
    got = run_ort(path, f)
    report = ReferenceRuntime(path).run(f)
    for name, value in got.items():
        np.testing.assert_allclose(value, report.outputs[name], atol=1e-4, rtol=0)
    heads, groups = kw["heads"], kw.get("kv_heads", kw["heads"])
    g = heads // groups
    es = [got[t["e"]] for t in taps]
    assert report.head_keep == expected_heads(es, f["l0_mask"].astype(np.float64), list(schedule), groups, g)
    for t, r in zip(taps, schedule):  # the projections really are narrower
        n = kept_groups(groups, r)
        if kw.get("packed"):
            assert got[t["q"]].shape[-1] == 3 * n * DH
        else:
            assert (got[t["q"]].shape[-1], got[t["k"]].shape[-1], got[t["v"]].shape[-1]) == (n * g * DH, n * DH, n * DH)


@pytest.mark.parametrize("name", SUPPORTED)
def test_fixture_rule_width_and_runtimes(name: str, tmp_path: Path) -> None:
    model = compile_ir(onnx.load(MODELS / f"{name}.onnx"), PruneHeads(keep=0.5))
    sites = find_attention(model).sites
    ratios = PruneHeads(keep=0.5).ratios(len(sites))
    tapped, taps = with_taps(model)
    path = save(tapped, tmp_path)
    f, _ = reference_io(load_meta(name))
    got = run_ort(path, f)
    report = ReferenceRuntime(path).run(f)
    for out in tapped.graph.output:
        np.testing.assert_allclose(got[out.name], report.outputs[out.name], atol=1e-4, rtol=0)
    h = sites[0].num_heads
    assert report.head_keep == expected_heads([got[t["e"]] for t in taps], f["attention_mask"].astype(np.float64),
                                              ratios, h, 1)
    last = got[taps[-1]["q"]]
    assert last.shape[-1] in (kept_groups(h, ratios[-1]) * 16, 3 * kept_groups(h, ratios[-1]) * 16)


@pytest.mark.parametrize("name", ["bert_torchscript", "bert_dynamo", "distilbert_dynamo"])
def test_composes_with_tokens_and_values(name: str, tmp_path: Path) -> None:
    model = compile_ir(onnx.load(MODELS / f"{name}.onnx"), PruneHeads(keep=0.75), PruneTokens(keep=0.6),
                       PruneValues(keep=0.5))
    path = save(ir.serde.serialize_model(model), tmp_path)
    f, ref = reference_io(load_meta(name))
    got = run_ort(path, f)
    report = ReferenceRuntime(path).run(f)
    assert report.head_keep and report.token_keep
    for k in ref:
        np.testing.assert_allclose(got[k], report.outputs[k], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_with_a_clear_error(name: str) -> None:
    model = ir.load(MODELS / f"{name}.onnx")
    Normalize()(model)
    with pytest.raises(OptionError, match=REFUSED[name]):
        PruneHeads(keep=0.5)(model)


def test_bad_options() -> None:
    model = ir.serde.deserialize_model(stack(2, heads=4))
    Normalize()(model)
    with pytest.raises(OptionError, match="first layer"):
        PruneHeads(schedule=(0.5,))(model)
    with pytest.raises(OptionError, match="min_keep"):
        PruneHeads(keep=0.5, min_keep=0)(model)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3), seed=st.integers(0, 3))
def test_random_schedules(tail: list[float], seed: int, tmp_path: Path) -> None:
    proto = stack(4, heads=4)
    schedule = (1.0, *tail)
    model = compile_ir(proto, PruneHeads(schedule=schedule))
    tapped, taps = with_taps(model)
    path = save(tapped, tmp_path)
    f = tiny_feeds(proto, seed)
    got = run_ort(path, f)
    report = ReferenceRuntime(path).run(f)
    np.testing.assert_allclose(got["l3_y"], report.outputs["l3_y"], atol=1e-4, rtol=0)
    ratios = PruneHeads(schedule=schedule).ratios(4)
    kept = expected_heads([got[t["e"]] for t in taps], f["l0_mask"].astype(np.float64), ratios, 4, 1)
    assert report.head_keep == kept
    assert all(set(b) <= set(a) for a, b in zip(kept, kept[1:]))  # a pruned head stays pruned
    assert [len(k) for k in kept] == [n for n in (kept_groups(4, r) for r in ratios) if n < 4]
    assert all(len(k) >= 1 and len(k) == max(1, math.ceil(round(4 * r, 6))) for k, r in
               zip(kept, [r for r in ratios if kept_groups(4, r) < 4]))
