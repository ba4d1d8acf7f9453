"""Cascade head pruning: keep 1.0 is the identity, kept heads equal a NumPy computation of SpAtten's
rule (run time) or of the calibrated rule (compile time), onnxruntime == reference runtime on every
encoder and decoder fixture, the Q/K/V MatMuls really shrink (K/V stay whole under a KV cache, and
the cache outputs are unchanged), and what is refused."""

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
from onnx_ir.passes.common import ShapeInferencePass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spatten_compiler.passes.decompose_attention import DecomposeAttention
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.head_calibration import calibration_scores, choose_heads
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.prune_heads import PruneHeads, kept_groups
from spatten_compiler.passes.prune_tokens import PruneTokens
from spatten_compiler.passes.prune_values import PruneValues
from spatten_compiler.runtime.reference import ReferenceRuntime

from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pipeline

ALL = fixture_names()  # encoders and decoders (GPT-2 / Llama with GQA and KV cache); fused ones decomposed first
FUSED = [n for n in ALL if load_meta(n)["fused_attention"]]


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
    Pipeline([Normalize(), DecomposeAttention(), *passes])(model)
    return model


def dense_sites(proto: onnx.ModelProto):
    """Sites of the normalized, decomposed input model, with inferred shapes (a decomposed fused GQA
    op tells its KV head count only through shapes, as prune-heads sees it)."""
    model = compile_ir(proto)
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return find_attention(model).sites


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


def expected_heads(es: list[np.ndarray], valid: np.ndarray | None, ratios: list[float], groups: int,
                   g: int) -> list[list[int]]:
    """SpAtten's rule in NumPy: acc += per-group sum of |E| over valid rows and dims; top-k of the kept.
    ``valid`` None: every query row counts (a KV-cache step)."""
    acc, sel, kept = np.zeros(groups), np.arange(groups), []
    for e, r in zip(es, ratios):
        if valid is None:
            valid = np.ones((e.shape[0], e.shape[2]))
        n = kept_groups(groups, r)
        if n < groups:
            order = np.argsort(-acc[sel], kind="stable")[:n]
            sel = sel[np.sort(order)]
            kept.append(sel.tolist())
        assert e.shape[1] == len(sel) * g
        score = np.einsum("bhid,bi->h", np.abs(e.astype(np.float64)), valid).reshape(len(sel), g).sum(1)
        acc[sel] += score
    return kept


def save(proto: onnx.ModelProto, tmp: Path, name: str = "m.onnx") -> Path:
    path = tmp / name
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


def check_cache(got: dict, dense: dict, counts: list[int], groups: int) -> None:
    """A KV cache stays complete: ``present.<layer>.*`` has every head, and up to the first pruned
    layer (whose input is still the dense model's) it equals the dense model's cache exactly."""
    first = next((i for i, n in enumerate(counts) if n < groups), len(counts))
    for k in dense:
        if k.startswith("present"):
            assert got[k].shape == dense[k].shape
            if int(k.split(".")[1]) <= first:
                np.testing.assert_allclose(got[k], dense[k], atol=1e-4, rtol=0)  # dense = PyTorch's outputs


def check_widths(got: dict, taps: list[dict], sites, counts: list[int]) -> None:
    """Q (and without a KV cache K, V) projection outputs have the kept width at run time."""
    for t, site, n in zip(taps, sites, counts):
        G, H, dh = site.num_kv_heads, site.num_heads, site.head_dim
        g = H // G
        q, k, v = (got[t[x]].shape[-1] for x in "qkv")
        if site.q.packed is not None:
            assert q == (n * g * dh + 2 * G * dh if site.kv_cache else 3 * n * dh)
        elif site.kv_cache:
            assert (q, k, v) == (n * g * dh, G * dh, G * dh)
        else:
            assert (q, k, v) == (n * g * dh, n * dh, n * dh)


@pytest.mark.parametrize("name", ALL)
def test_fixture_rule_width_and_runtimes(name: str, tmp_path: Path) -> None:
    proto = onnx.load(MODELS / f"{name}.onnx")
    sites_ = dense_sites(proto)
    model = compile_ir(proto, PruneHeads(keep=0.5))
    ratios = PruneHeads(keep=0.5).ratios(len(sites_))
    tapped, taps = with_taps(model)
    path = save(tapped, tmp_path)
    f, dense = reference_io(load_meta(name))
    got = run_ort(path, f)
    report = ReferenceRuntime(path).run(f)
    for out in tapped.graph.output:
        np.testing.assert_allclose(got[out.name], report.outputs[out.name], atol=1e-4, rtol=0)
    site = sites_[0]
    groups, g = site.num_kv_heads, site.num_heads // site.num_kv_heads
    valid = None if site.kv_cache else f["attention_mask"].astype(np.float64)
    assert report.head_keep == expected_heads([got[t["e"]] for t in taps], valid, ratios, groups, g)
    assert report.head_keep, "nothing was pruned"
    check_widths(got, taps, sites_, [kept_groups(groups, r) for r in ratios])
    check_cache(got, dense, [kept_groups(groups, r) for r in ratios], groups)


@pytest.mark.parametrize("name", ALL)
def test_keep_one_is_identity_on_fixtures(name: str, tmp_path: Path) -> None:
    """Keep 1.0 (heads and values, either head rule) leaves the model as the passes received it."""
    proto = onnx.load(MODELS / f"{name}.onnx")
    f, _ = reference_io(load_meta(name))
    before = run_ort(save(ir.serde.serialize_model(compile_ir(proto)), tmp_path, "in.onnx"), f)
    for passes in ([PruneHeads(keep=1.0)], [PruneHeads(keep=1.0), PruneValues(keep=1.0)],
                   [PruneHeads(rule="calibrated", heads=((),) * len(dense_sites(proto)))]):
        model = compile_ir(proto, *passes)
        got = run_ort(save(ir.serde.serialize_model(model), tmp_path), f)
        for k in before:
            np.testing.assert_allclose(got[k], before[k], atol=1e-5, rtol=0)


def random_heads(rng: np.random.Generator, layers: int, groups: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(sorted(rng.choice(groups, rng.integers(1, groups + 1), replace=False).tolist()))
                 for _ in range(layers))


def zero_pruned_heads(proto: onnx.ModelProto, heads: tuple[tuple[int, ...], ...]) -> onnx.ModelProto:
    """The dense model with the output-projection rows of pruned heads set to zero: what a model
    without those heads computes (encoders: a head only reaches the output through W_o)."""
    model = compile_ir(proto)
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    for site, kept in zip(find_attention(model).sites, heads):
        w = site.out_proj.weight.const_value.numpy().copy()
        dh = site.head_dim * site.num_heads // site.num_kv_heads
        for h in set(range(site.num_kv_heads)) - set(kept):
            if site.out_proj.transposed_weight:
                w[:, h * dh:(h + 1) * dh] = 0
            else:
                w[h * dh:(h + 1) * dh] = 0
        site.out_proj.weight.const_value = ir.tensor(w)
    return ir.serde.serialize_model(model)


@pytest.mark.parametrize("name", ALL)
def test_calibrated_heads_are_sliced_at_compile_time(name: str, tmp_path: Path) -> None:
    proto = onnx.load(MODELS / f"{name}.onnx")
    sites = dense_sites(proto)
    heads = random_heads(np.random.default_rng(len(name)), len(sites), sites[0].num_kv_heads)
    model = compile_ir(proto, PruneHeads(rule="calibrated", heads=heads))
    assert model.metadata_props["spatten.heads_kept"] == str([list(h) for h in heads]).replace("'", "")
    # Nothing is added at run time, except (KV cache) picking the kept heads out of the complete cache.
    assert {n.op_type for n in model.graph if n.domain == "spatten"} <= ({"KeptHeads"} if sites[0].kv_cache else set())
    tapped, taps = with_taps(model)
    path = save(tapped, tmp_path)
    f, dense = reference_io(load_meta(name))
    got = run_ort(path, f)
    ref = ReferenceRuntime(path).run(f).outputs
    for out in tapped.graph.output:
        np.testing.assert_allclose(got[out.name], ref[out.name], atol=1e-4, rtol=0)
    check_widths(got, taps, sites, [len(h) for h in heads])
    # Independent oracle: the dense model with the pruned heads' W_o rows zeroed computes the same.
    zeroed = run_ort(save(zero_pruned_heads(proto, heads), tmp_path, "zeroed.onnx"), f)
    for k in dense:
        np.testing.assert_allclose(got[k], zeroed[k], atol=1e-4, rtol=0)
    check_cache(got, dense, [len(h) for h in heads], sites[0].num_kv_heads)


@pytest.mark.parametrize("name", ["bert_torchscript", "llama_dynamo"])
@pytest.mark.parametrize("importance", ["layer", "cascade"])
def test_calibration_scores_and_choice(name: str, importance: str, tmp_path: Path) -> None:
    proto = onnx.load(MODELS / f"{name}.onnx")
    f, _ = reference_io(load_meta(name))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: np.concatenate([v] * 5) for k, v in f.items()})  # 5 copies: more than one batch
    model = compile_ir(proto)
    sites = find_attention(model).sites
    tapped, taps = with_taps(model)
    got = run_ort(save(tapped, tmp_path), f)
    groups, g = sites[0].num_kv_heads, sites[0].num_heads // sites[0].num_kv_heads
    mask = f["attention_mask"].astype(np.float64)
    want = np.stack([5 * np.einsum("bhid,bi->h", np.abs(got[t["e"]].astype(np.float64)),
                                   mask[:, -got[t["e"]].shape[2]:]).reshape(groups, g).sum(1) for t in taps])
    fresh = compile_ir(proto)
    scores = calibration_scores(fresh, find_attention(fresh).sites, calib)
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    counts = [groups, groups, 1, 1]
    kept = choose_heads(scores, counts, importance)
    if importance == "layer":
        assert kept == [sorted(np.argsort(-s, kind="stable")[:n].tolist()) for s, n in zip(scores, counts)]
    else:
        acc, sel = np.zeros(groups), np.arange(groups)
        for s, n, k in zip(scores, counts, kept):
            sel = sel[np.sort(np.argsort(-acc[sel], kind="stable")[:n])]
            assert k == sel.tolist()
            acc[sel] += s[sel]
    compiled = compile_ir(proto, PruneHeads(schedule=(1.0, 1.0, 0.25), rule="calibrated", calibration=str(calib),
                                            importance=importance))
    assert compiled.metadata_props["spatten.heads_kept"] == str(
        choose_heads(scores, [kept_groups(groups, r) for r in (1.0, 1.0, 0.25, 0.25)], importance))


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


@pytest.mark.parametrize("name", FUSED)
def test_fused_refused_until_decomposed(name: str) -> None:
    model = ir.load(MODELS / f"{name}.onnx")
    Normalize()(model)
    with pytest.raises(OptionError, match="fused"):
        PruneHeads(keep=0.5)(model)


def test_bad_options() -> None:
    model = ir.serde.deserialize_model(stack(2, heads=4))
    Normalize()(model)
    with pytest.raises(OptionError, match="first layer"):
        PruneHeads(schedule=(0.5,))(model)
    with pytest.raises(OptionError, match="min_keep"):
        PruneHeads(keep=0.5, min_keep=0)(model)
    with pytest.raises(OptionError, match="calibration"):
        PruneHeads(keep=0.5, rule="calibrated")(model)
    with pytest.raises(OptionError, match="distinct"):
        PruneHeads(rule="calibrated", heads=((0, 0), ()))(model)
    with pytest.raises(OptionError, match="layers"):
        PruneHeads(rule="calibrated", heads=((0,),))(model)
    with pytest.raises(OptionError, match="rule"):
        PruneHeads(keep=0.5, rule="magic")(model)


@pytest.mark.parametrize("args, message", [
    (["--head-keep", "0.5", "--head-calibration", "missing.npz"], "no such file"),
    (["--head-keep", "0.5", "--head-rule", "calibrated"], "needs --head-calibration"),
    (["--head-keep", "0.5", "--head-calibration", "BAD"], "cannot read"),
])
def test_cli_bad_calibration_one_line_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.npz"
    bad.write_text("not an npz")
    out = tmp_path / "out.onnx"
    args = [str(bad) if a == "BAD" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", str(MODELS / "bert_torchscript.onnx"), "-o", str(out),
                        *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


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


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["gpt2_kv_torchscript", "gpt2_kv_dynamo", "llama_dynamo", "llama_sdpa_dynamo"]),
       tail=st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3), seed=st.integers(0, 99))
def test_random_schedules_on_kv_cache_decoders(name: str, tail: list[float], seed: int, tmp_path: Path) -> None:
    proto = onnx.load(MODELS / f"{name}.onnx")
    sites = dense_sites(proto)
    groups, g = sites[0].num_kv_heads, sites[0].num_heads // sites[0].num_kv_heads
    f, dense = reference_io(load_meta(name))
    schedule = (1.0, *tail)
    ratios = PruneHeads(schedule=schedule).ratios(len(sites))
    heads = random_heads(np.random.default_rng(seed), len(sites), groups)
    for passes, counts in (([PruneHeads(schedule=schedule)], [kept_groups(groups, r) for r in ratios]),
                           ([PruneHeads(rule="calibrated", heads=heads), PruneValues(keep=0.5)], [len(h) for h in heads])):
        tapped, taps = with_taps(compile_ir(proto, *passes))
        path = save(tapped, tmp_path)
        got = run_ort(path, f)
        report = ReferenceRuntime(path).run(f)
        for out in tapped.graph.output:
            np.testing.assert_allclose(got[out.name], report.outputs[out.name], atol=1e-4, rtol=0)
        if passes[0].rule == "paper":
            assert report.head_keep == expected_heads([got[t["e"]] for t in taps], None, ratios, groups, g)
        check_widths(got, taps, sites, counts)
        # prune-values changes every layer's output: then only layer 0's cache (from the embeddings) is exact
        check_cache(got, dense, counts if len(passes) == 1 else [0] * len(counts), groups)


# Exporter forms that spell the head count (or a length equal to it) outside the Q/K/V views: found in
# the sweep of 57 more families (Swin, XLM/FlauBERT under dynamo, ModernBERT-decoder's sliding cache).
SPELLED = {
    "mask expanded to [B, H, S, S]": dict(mask="expand_heads"),  # XLM/FlauBERT dynamo: expand_as(scores)
    "position table, no mask": dict(mask="none", bias="table"),  # Swin: read as a mask before
    "position table and mask": dict(bias="table"),
    "window of S = H tokens": dict(literal_seq=4),  # Swin's head-split [0, 4, 4, Dh]: 4 tokens, 4 heads
}


@pytest.mark.parametrize("kw", SPELLED.values(), ids=SPELLED.keys())
def test_heads_pruned_where_the_export_spells_the_head_count(kw: dict, tmp_path: Path) -> None:
    proto = stack(3, heads=4, **kw)
    f = feeds(build(**kw), batch=2, seq=kw.get("literal_seq", 6))
    f = {"l0_x": f["x"], "l0_mask": f["mask"]}
    model = compile_ir(proto, PruneHeads(schedule=(1.0, 0.5, 0.25)))
    path = save(ir.serde.serialize_model(model), tmp_path)
    got, report = run_ort(path, f), ReferenceRuntime(path).run(f)
    np.testing.assert_allclose(got["l2_y"], report.outputs["l2_y"], atol=1e-4, rtol=0)
    assert report.head_keep and [len(k) for k in report.head_keep] == [2, 1]


def test_position_table_is_a_bias_term_not_a_mask() -> None:
    site = dense_sites(build(mask="none", bias="table"))[0]
    assert site.mask is None and site.mask_kind == "none"
    assert [t.name for t in site.bias_terms] == ["pos_bias"] and site.variant["mask"] == "none+bias"


def test_sliding_window_cache_keeps_every_head(tmp_path: Path) -> None:
    """present = the last W positions of the cache (ModernBERT-decoder): a cache write, not a read of the
    core, so it keeps every head while the core reads the kept one."""
    proto = build(cache=True, cache_window=4, mask="none")
    f = feeds(proto, seq=3, past=3)
    model = compile_ir(proto, PruneHeads(rule="calibrated", heads=((1,),)))
    path = save(ir.serde.serialize_model(model), tmp_path)
    got, dense = run_ort(path, f), run_ort(save(proto, tmp_path, "dense.onnx"), f)
    for t in "kv":
        assert got[f"present_{t}"].shape == (2, 2, 4, DH)
        np.testing.assert_array_equal(got[f"present_{t}"], dense[f"present_{t}"])
    np.testing.assert_allclose(got["y"], ReferenceRuntime(path).run(f).outputs["y"], atol=1e-5, rtol=0)
