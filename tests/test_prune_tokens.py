"""Cascade token pruning: contract, scheduled lengths, onnxruntime == reference runtime, and the kept
tokens equal an independent NumPy computation of SpAtten's rule."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, fixture_names, load_meta, reference_io, run_ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.prune_tokens import PruneTokens
from spatten_compiler.runtime.reference import ReferenceRuntime

from spatten_compiler.cli import main
from spatten_compiler.schedule import spatten_schedule

ENCODERS = [n for n in fixture_names() if load_meta(n)["kind"] == "encoder" and not load_meta(n)["fused_attention"]
            and not load_meta(n).get("extra_softmax")]
DECODERS = [n for n in fixture_names() if load_meta(n)["kind"] == "decoder"]


def compile_model(name: str, tmp: Path, **opts) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    model = ir.load(MODELS / f"{name}.onnx")
    Normalize()(model)
    PruneTokens(**opts)(model)
    out = tmp / f"{name}.pruned.onnx"
    ir.save(model, out)
    return out


def test_encoder_fixtures_exist() -> None:
    assert {"bert_torchscript", "bert_dynamo", "distilbert_torchscript", "distilbert_dynamo"} <= set(ENCODERS)


@pytest.mark.parametrize("name", ENCODERS)
def test_keep_one_equals_input(name: str, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    assert main([str(MODELS / f"{name}.onnx"), "-o", str(out), "--token-keep", "1.0", "-q"]) == 0
    feeds, _ = reference_io(load_meta(name))
    got, ref = run_ort(out, feeds), run_ort(MODELS / f"{name}.onnx", feeds)
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("keep, point", [(0.5, "layer-input"), (0.3, "layer-input"), (0.3, "after-attention")])
def test_pruned_lengths_ort_equals_reference(name: str, keep: float, point: str, tmp_path: Path) -> None:
    path = compile_model(name, tmp_path, keep=keep, emit_kept=True, prune_point=point)
    meta = load_meta(name)
    feeds, ref = reference_io(meta)
    got = run_ort(path, feeds)
    # Output contract: same names first, full length, same dtype.
    assert list(got)[: len(meta["outputs"])] == meta["outputs"]
    assert got["last_hidden_state"].shape == ref["last_hidden_state"].shape
    # Each pruning layer's kept positions have the scheduled length k = ceil(S * ratio).
    seq = feeds["input_ids"].shape[1]
    ratios = spatten_schedule(meta["num_layers"], keep)
    steps = [r for r, prev in zip(ratios, [1.0, *ratios]) if r < prev]
    lengths = [got[f"spatten_kept_positions.{i}"].shape[1] for i in range(len(steps))]
    assert lengths == [max(1, min(seq, math.ceil(seq * r))) for r in steps]
    report = ReferenceRuntime(path).run(feeds)
    assert [k.tokens_in for k in report.token_keep] == [seq, *lengths[:-1]]
    for k, v in got.items():
        np.testing.assert_allclose(report.outputs[k], v, atol=1e-4, rtol=0, err_msg=k)
    # Kept tokens: valid, CLS always kept, each sample keeps ceil(len * ratio) of its own.
    mask = feeds["attention_mask"]
    kept = got["spatten_kept_mask"]
    assert np.all(kept <= mask) and np.all(kept[:, 0] == 1)
    assert kept.sum(1).tolist() == [max(1, math.ceil(int(n) * ratios[-1])) for n in mask.sum(1)]


def _rule_in_numpy(probs: list[np.ndarray], mask: np.ndarray, ratios: list[float], importance: str = "sum",
                   protect: str = "first", values: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """SpAtten's rule written independently: column sums over heads and valid rows (divided by the
    number of valid rows for ``mean``), accumulated; top-k by score (ties: lower position), CLS (and
    with first+last the last real token) protected, kept in original order."""
    b_size, seq = mask.shape
    out = []
    for b in range(b_size):
        n = int(mask[b].sum())
        pos = np.arange(seq)
        valid = mask[b].astype(bool)
        acc = np.zeros(seq)
        kept_positions = []
        for layer in range(len(ratios)):
            # Layers after the last pruning step compute no scores (nothing reads them).
            p = probs[layer][b] if layer < len(probs) else None  # [H, S_l, S_l]
            if layer > 0 and ratios[layer] < ratios[layer - 1]:
                k = min(len(pos), max(1, math.ceil(seq * ratios[layer])))
                budget = max(1, math.ceil(n * ratios[layer]))
                prio = np.where(valid, acc, -np.inf)
                guard = (pos == 0) | ((pos == n - 1) if protect == "first+last" else False)
                prio = np.where(valid & guard, np.inf, prio)
                order = np.argsort(-prio, kind="stable")[:k]
                ok = (np.arange(k) < budget) & np.isfinite(prio[order]) | (prio[order] == np.inf)
                keep = np.sort(order)
                valid = np.isin(keep, order[ok]) & (np.arange(k) >= 0)
                valid = np.array([o in set(order[ok & (np.arange(k) < budget)]) for o in keep])
                pos, acc = pos[keep], acc[keep]
                kept_positions.append(pos[valid])
            if p is not None:
                colsum = (p * valid[None, :, None]).sum(axis=1)  # [H, S_l]
                if importance == "value":  # weighted by each key's value norm per head
                    colsum = colsum * np.sqrt((values[layer][b] ** 2).sum(-1))
                score = colsum.sum(0)
                acc = acc + (score if importance == "sum" else score / max(1, valid.sum()))
        out.append(kept_positions)
    return out


@pytest.mark.parametrize("name", ["bert_torchscript", "distilbert_dynamo"])
@pytest.mark.parametrize("importance, protect, point", [("sum", "first", "layer-input"),
                                                        ("mean", "first+last", "after-attention"),
                                                        ("value", "first+last", "after-attention")])
def test_kept_tokens_equal_numpy_rule(name: str, importance: str, protect: str, point: str, tmp_path: Path) -> None:
    path = compile_model(name, tmp_path, keep=0.4, emit_kept=True, importance=importance, protect=protect,
                         prune_point=point)
    proto = onnx.load(path)
    calls = [n for n in proto.graph.node if n.op_type.startswith("TokenImportance")]
    probs = [n.input[0] for n in calls]
    values = [n.input[2] for n in calls if len(n.input) > 2]
    for p in [*probs, *values]:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(p))
    onnx.save(proto, tmp_path / "probe.onnx")
    meta = load_meta(name)
    feeds, _ = reference_io(meta)
    got = run_ort(tmp_path / "probe.onnx", feeds)
    ratios = spatten_schedule(meta["num_layers"], 0.4)
    expected = _rule_in_numpy([got[p] for p in probs], feeds["attention_mask"], ratios, importance, protect,
                              [got[v] for v in values])
    steps = sum(1 for r, prev in zip(ratios, [1.0, *ratios]) if r < prev)
    for b in range(feeds["attention_mask"].shape[0]):
        kept_final = np.flatnonzero(got["spatten_kept_mask"][b])
        np.testing.assert_array_equal(kept_final, expected[b][-1])
        for i in range(steps):
            assert set(expected[b][i]) <= set(got[f"spatten_kept_positions.{i}"][b].tolist())
    # The reference runtime's NumPy ops agree with the ONNX function bodies for every rule.
    reference = ReferenceRuntime(path).run(feeds).outputs
    for k, v in run_ort(path, feeds).items():
        np.testing.assert_allclose(reference[k], v, atol=1e-4, rtol=0, err_msg=k)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    schedule=st.lists(st.sampled_from([1.0, 0.9, 0.7, 0.5, 0.3, 0.1]), min_size=0, max_size=3),
    batch=st.integers(1, 3),
    seq=st.integers(1, 12),
    point=st.sampled_from(["layer-input", "after-attention"]),
    data=st.data(),
)
def test_property_random_schedules_and_padding(schedule, batch, seq, point, data, tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    path = compile_model("bert_dynamo", tmp, schedule=(1.0, *schedule), emit_kept=True, prune_point=point)
    lens = data.draw(st.lists(st.integers(1, seq), min_size=batch, max_size=batch))
    mask = (np.arange(seq)[None, :] < np.array(lens)[:, None]).astype(np.int64)
    rng = np.random.default_rng(seq)
    feeds = {"input_ids": rng.integers(0, 100, (batch, seq)), "attention_mask": mask,
             "token_type_ids": np.zeros((batch, seq), np.int64)}
    out = run_ort(path, feeds)
    assert out["last_hidden_state"].shape == (batch, seq, 64)
    assert out["last_hidden_state"].dtype == np.float32
    assert np.isfinite(out["last_hidden_state"]).all()
    assert np.all(out["spatten_kept_mask"] <= mask)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--token-keep", "0"], "must be in (0, 1]"),
        (["--token-keep", "1.5"], "must be in (0, 1]"),
        (["--token-keep-schedule", "1,1,1,1,0.5"], "model has 4 attention layers"),
        (["--token-keep-schedule", "1,x"], "comma-separated"),
        (["--token-keep-schedule", "0.5,0.5"], "first layer must keep 1.0"),
        (["--token-keep", "0.5", "--token-keep-schedule", "1,0.5"], "not both"),
    ],
)
def test_bad_options_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", str(MODELS / "bert_torchscript.onnx"), "-o",
                        str(out), *args], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", ["gpt2_dynamo", "gpt2_torchscript", "gpt2_kv_dynamo"])
def test_decoder_prompt_pruned_kv_cache_refused(name: str, tmp_path: Path) -> None:
    """A decoder without a KV cache: its prompt is pruned (onnxruntime == reference runtime, each sample's
    last token kept); with a KV cache the token rewrite is evict-kv: one-line refusal naming it."""
    out = tmp_path / "o.onnx"
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", str(MODELS / f"{name}.onnx"), "-o",
                        str(out), "--token-keep", "0.5", "-q"], capture_output=True, text=True)
    if load_meta(name)["kv_cache"]:
        assert r.returncode == 2 and "evict-kv" in r.stderr and "Traceback" not in r.stderr
        return
    assert r.returncode == 0, r.stderr
    path = compile_model(name, tmp_path, keep=0.5, emit_kept=True)
    feeds, _ = reference_io(load_meta(name))
    got = run_ort(path, feeds)
    reference = ReferenceRuntime(path).run(feeds).outputs
    for k, v in got.items():
        np.testing.assert_allclose(reference[k], v, atol=1e-4, rtol=0, err_msg=k)
    last = feeds["attention_mask"].sum(1) - 1
    assert all(got["spatten_kept_mask"][b, n] == 1 for b, n in enumerate(last))


def test_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "spatten.json"
    cfg.write_text('{"token_keep": 0.5, "emit_kept": true}')
    out = tmp_path / "o.onnx"
    assert main([str(MODELS / "bert_torchscript.onnx"), "-o", str(out), "--config", str(cfg), "-q"]) == 0
    assert "spatten_kept_mask" in [o.name for o in onnx.load(out).graph.output]
    cfg.write_text('{"token_kep": 0.5}')
    assert main([str(MODELS / "bert_torchscript.onnx"), "-o", str(out), "--config", str(cfg), "-q"]) == 2


REAL_MINILM = MODELS / "cache" / "minilm" / "model.onnx"


@pytest.mark.real
def test_real_minilm_keep_one_and_pruned(tmp_path: Path) -> None:
    if not REAL_MINILM.exists():
        pytest.skip("python models/export.py --real minilm")
    import json

    meta = json.loads(REAL_MINILM.with_suffix(".json").read_text())
    feeds, _ = reference_io(meta)
    out = tmp_path / "o.onnx"
    assert main([str(REAL_MINILM), "-o", str(out), "--token-keep", "1.0", "-q"]) == 0
    # Rows of padding tokens are meaningless (their queries see only masked keys) and move by ~3e-5
    # under constant folding; the contract is on real tokens.
    real = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(run_ort(out, feeds)["last_hidden_state"][real],
                               run_ort(REAL_MINILM, feeds)["last_hidden_state"][real], atol=1e-5, rtol=0)
    assert main([str(REAL_MINILM), "-o", str(out), "--token-keep", "0.5", "--token-min-keep", "4", "-q"]) == 0
    report = ReferenceRuntime(out).run(feeds)
    np.testing.assert_allclose(report.outputs["last_hidden_state"], run_ort(out, feeds)["last_hidden_state"],
                               atol=1e-4, rtol=0)


def test_compile_report_flop_ratio(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    out = tmp_path / "o.onnx"
    assert main([str(MODELS / "bert_torchscript.onnx"), "-o", str(out), "--token-keep", "0.5", "--report",
                 str(report), "--token-rule", "paper", "-q"]) == 0
    import json

    data = json.loads(report.read_text())
    assert data["token_schedule"] == spatten_schedule(4, 0.5)
    # Linear layers dominate at these sizes: the ratio approaches 1 / mean(schedule) from below/above.
    mean = sum(data["token_schedule"]) / 4
    for n in ("128", "256", "512"):
        assert 1.0 < data["flop_ratio"][n] <= 1 / min(data["token_schedule"])
        assert abs(data["flop_ratio"][n] - 1 / mean) < 0.35


@pytest.mark.parametrize("name", ["bert_torchscript", "bert_dynamo"])
def test_restore_mean_makes_mask_pooling_equal_kept_pooling(name: str, tmp_path: Path) -> None:
    path = compile_model(name, tmp_path, keep=0.4, restore="mean", emit_kept=True, shape="flat")
    feeds, _ = reference_io(load_meta(name))
    got = run_ort(path, feeds)
    h, mask, kept = got["last_hidden_state"], feeds["attention_mask"][..., None], got["spatten_kept_mask"][..., None]
    pooled_mask = (h * mask).sum(1) / mask.sum(1)
    pooled_kept = (h * kept).sum(1) / kept.sum(1)
    np.testing.assert_allclose(pooled_mask, pooled_kept, atol=1e-5)
    assert (kept.sum(1) < mask.sum(1)).all()  # something was pruned
    report = ReferenceRuntime(path).run(feeds)
    np.testing.assert_allclose(report.outputs["last_hidden_state"], h, atol=1e-4, rtol=0)


def test_presets_expand_to_options() -> None:
    from spatten_compiler.config import CompileConfig

    assert CompileConfig().token_rule == "spattenc"  # the default: it wins on the MiniLM benchmark
    paper = CompileConfig(token_keep=0.5, token_rule="paper").passes()[-1]
    ours = CompileConfig(token_keep=0.5, token_rule="spattenc", restore="stale").passes()[-1]
    assert (paper.importance, paper.protect, paper.shape, paper.restore) == ("sum", "first", "linear", "stale")
    assert (ours.importance, ours.protect, ours.shape, ours.restore) == ("value", "first+last", "flat", "stale")


def test_no_stale_full_length_shapes_after_pruning(tmp_path: Path) -> None:
    """The exporter's symbolic shapes are wrong after pruning; onnxruntime's memory planner would
    trust them (buffer-reuse misses on every run). Intermediate values keep no recorded shape."""
    path = compile_model("bert_dynamo", tmp_path, keep=0.5)
    proto = onnx.load(path)
    graph_io = {v.name for v in [*proto.graph.input, *proto.graph.output, *proto.graph.initializer]}
    assert not [v.name for v in proto.graph.value_info
                if v.name not in graph_io and v.type.tensor_type.HasField("shape")]


def test_spattenc_preset_leaves_short_inputs_whole(tmp_path: Path) -> None:
    """min_keep 64 in the spattenc preset: a 7-token input is not pruned at all."""
    out = tmp_path / "o.onnx"
    assert main([str(MODELS / "bert_torchscript.onnx"), "-o", str(out), "--token-keep", "0.3", "--token-rule",
                 "spattenc", "--emit-kept", "-q"]) == 0
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    got = run_ort(out, feeds)
    np.testing.assert_array_equal(got["spatten_kept_mask"], feeds["attention_mask"])
    real = feeds["attention_mask"].astype(bool)
    dense = run_ort(MODELS / "bert_torchscript.onnx", feeds)["last_hidden_state"]
    np.testing.assert_allclose(got["last_hidden_state"][real], dense[real], atol=1e-5)


@pytest.mark.parametrize("name", ["bert_torchscript", "distilbert_dynamo"])
def test_pruning_after_attention_keeps_outputs_of_kept_tokens(name: str, tmp_path: Path) -> None:
    """In-layer pruning only skips work for tokens that are dropped anyway: same kept set, same outputs."""
    feeds, _ = reference_io(load_meta(name))
    opts = dict(keep=0.4, emit_kept=True, restore="mean", shape="flat")
    a = run_ort(compile_model(name, tmp_path / "a", **opts), feeds)
    b = run_ort(compile_model(name, tmp_path / "b", prune_point="after-attention", **opts), feeds)
    np.testing.assert_array_equal(a["spatten_kept_mask"], b["spatten_kept_mask"])
    np.testing.assert_allclose(a["last_hidden_state"], b["last_hidden_state"], atol=1e-5)


@pytest.mark.parametrize("name", ["bert_torchscript", "bert_dynamo"])
def test_reference_runtime_beyond_64_tokens(name: str, tmp_path: Path) -> None:
    """onnx.reference's GatherElements is wrong when the gathered axis is longer than 64 (np.choose's
    limit, then a fallback that reads one element per row); the reference runtime replaces it. Real
    inputs (a 113-token review on MiniLM) failed before."""
    path = compile_model(name, tmp_path, keep=0.3, emit_kept=True, prune_point="after-attention")
    ids = np.random.default_rng(1).integers(5, 90, (2, 100))
    mask = np.ones_like(ids)
    mask[1, 70:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = run_ort(path, feeds)
    report = ReferenceRuntime(path).run(feeds)
    for k, v in got.items():
        np.testing.assert_allclose(report.outputs[k], v, atol=1e-4, rtol=0, err_msg=k)
