"""evict-kv ``mode=head`` (``--kv-evict head``): each KV head keeps its own tokens, scored by the query
heads that read it (GQA: query head h -> KV head h // g). Full budget == dense on every KV decoder
fixture, onnxruntime == reference runtime step by step, kept sets == the layer rule in NumPy applied to
each KV head's query group, hypothesis properties, tunable knobs, the packed cache, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import spatten_compiler.passes  # noqa: F401  (registers the passes)
from conftest import MODELS, load_meta
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spatten_compiler.passes.evict_kv import SCORES, budget_tokens
from test_evict_kv import DECODERS, PROMPTS, STEPS, _run, compiled, numpy_rule, spied_session, step_ort_and_reference

from spatten_compiler.decoding import DecoderSession, left_pad
from spatten_compiler.pipeline import Pipeline, make_pass


def kv_heads(name: str) -> tuple[int, int]:
    meta = load_meta(name)
    proto = onnx.load(str(MODELS / f"{name}.onnx"), load_external_data=False)
    hkv = next(i for i in proto.graph.input if i.name.startswith("past_key_values.")).type.tensor_type.shape.dim[1]
    return hkv.dim_value, meta["num_heads"] // hkv.dim_value


@pytest.mark.parametrize("name", DECODERS)
def test_full_budget_equals_dense(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled(name, str(tmp_path_factory.getbasetemp()), budget=1.0, sinks=2, recent=2, mode="head")
    errs = _run(DecoderSession(MODELS / f"{name}.onnx"), DecoderSession(path))
    assert len(errs) == STEPS + 1 and max(errs) <= 1e-4, errs


@pytest.mark.parametrize("name", DECODERS)
def test_ort_equals_reference_with_eviction(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled(name, str(tmp_path_factory.getbasetemp()), budget=0.3, sinks=1, recent=1, mode="head")
    s = step_ort_and_reference(path, 8)
    hkv, _ = kv_heads(name)
    assert s.cache_lengths() == [budget_tokens(0.3, 9 + 8, 1, 1, 10**9)] * 4
    kept = s.kept_positions()
    assert all(k.shape[:2] == (2, hkv) for k in kept)
    if hkv > 1:  # the point of the mode: KV heads of a layer keep different tokens
        assert any(not np.array_equal(k[:, 0], k[:, j]) for k in kept for j in range(1, hkv))


@pytest.mark.parametrize(("name", "share", "score"), [
    ("llama_dynamo", 0.0, "accumulated"), ("llama_dynamo", 0.5, "accumulated"), ("llama_dynamo", 0.25, "sqrt"),
    ("llama_attention_op23", 0.5, "accumulated"), ("llama_torchscript", 0.25, "ema"),
    ("gpt2_kv_torchscript", 0.5, "accumulated")])
def test_kept_tokens_equal_numpy_rule_per_kv_head(name: str, share: float, score: str,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """KV head j's kept set is the layer rule of test_evict_kv.numpy_rule over query heads [j*g, (j+1)*g)."""
    budget, sinks, recent = 0.4, 2, 1
    rule = SCORES[score]
    hkv, g = kv_heads(name)
    path = compiled(name, str(tmp_path_factory.getbasetemp()), probs=True, budget=budget, sinks=sinks,
                    recent=recent, mode="head", recent_share=share, score=score)
    s, softmax, captured = spied_session(path)
    ids, mask = left_pad(PROMPTS)
    s.reset(2)
    valid_q, tok = mask, ids
    for _ in range(10):
        logits = s.step(tok, valid_q)
        for layer in range(4):
            probs = captured[f"out:{softmax[layer]}"]
            for j in range(hkv):
                want_pos, want_imp = numpy_rule(
                    probs[:, j * g:(j + 1) * g], captured[f"past_importance.{layer}"][:, j],
                    captured[f"past_positions.{layer}"][:, j], captured["position_ids"], valid_q.astype(np.float32),
                    budget, sinks, recent, None, share, rule.decay, rule.norm)
                np.testing.assert_array_equal(captured[f"out:present_positions.{layer}"][:, j], want_pos)
                np.testing.assert_allclose(captured[f"out:present_importance.{layer}"][:, j], want_imp,
                                           rtol=1e-5, atol=1e-5)
        tok = logits[:, -1].argmax(-1)[:, None]
        valid_q = np.ones_like(tok)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.sampled_from([0.125, 0.25, 0.5, 0.8, 3.0, 6.0, 12.0]), sinks=st.integers(0, 3),
       recent=st.integers(0, 3), lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3))
def test_properties(budget: float, sinks: int, recent: int, lengths: list[int],
                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every KV head of every layer: the cache length of the NumPy twin, order, sinks and window kept,
    the budget filled with real tokens."""
    if budget > 1 and budget < sinks + recent:
        budget = float(sinks + recent)
    path = compiled("llama_dynamo", str(tmp_path_factory.getbasetemp()), budget=budget, sinks=sinks, recent=recent,
                    mode="head")
    s = DecoderSession(path)
    rng = np.random.default_rng(sum(lengths))
    ids, mask = left_pad([list(rng.integers(1, 500, n)) for n in lengths])
    s.reset(len(lengths))
    s.step(ids, mask)
    total, prev = ids.shape[1], ids.shape[1] - 1
    for step in range(5):
        lens = s.cache_lengths()
        n = lens[0]
        assert lens == [budget_tokens(budget, total, sinks, recent, prev + 1)] * 4
        for kept in s.kept_positions():
            assert kept.shape == (len(lengths), 2, n)
            for row, real in enumerate(lengths):
                seen = np.arange(real + step)
                for head in kept[row]:
                    got = head[head >= 0]
                    assert np.all(np.diff(got) > 0), "kept tokens stay in order"
                    assert set(seen[:sinks]) <= set(got), "sinks are never evicted"
                    assert set(seen[max(0, len(seen) - recent):]) <= set(got), "the recent window is never evicted"
                    assert len(got) == min(n, len(seen)), "every head fills its budget with real tokens"
        prev = n
        s.step(np.full((len(lengths), 1), 7, np.int64))
        total += 1


def test_tunable_knobs_equal_compiled_values(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = str(tmp_path_factory.getbasetemp())
    fixed = DecoderSession(compiled("llama_torchscript", base, budget=0.3, sinks=1, recent_share=0.25, score="sqrt",
                                    mode="head"))
    tuned = DecoderSession(compiled("llama_torchscript", base, budget=0.7, sinks=4, tunable=True, mode="head"))
    tuned.overrides = {"spatten.kv_budget": np.array(0.3, np.float32), "spatten.kv_sinks": np.array([1]),
                       "spatten.kv_recent_share": np.array(0.25, np.float32),
                       "spatten.kv_norm": np.array(SCORES["sqrt"].norm, np.float32)}
    assert max(_run(fixed, tuned, steps=6)) == 0.0
    for a, b in zip(fixed.kept_positions(), tuned.kept_positions()):
        np.testing.assert_array_equal(a, b)


def test_per_layer_schedule(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled("llama_torchscript", str(tmp_path_factory.getbasetemp()), budget=0.6, sinks=1, recent=1,
                    mode="head", schedule=(1.0, 0.5))
    s = step_ort_and_reference(path, 4)
    total = 9 + 4
    assert s.cache_lengths() == [budget_tokens(0.6, total, 1, 1, 99), *[budget_tokens(0.3, total, 1, 1, 99)] * 3]


def test_packed_cache_equals_float_cache(tmp_path: Path) -> None:
    """pack-kv-cache reuses the [B, Hkv, k] row index: the packed 4+4 cache == quantize-kv over floats."""
    paths = {}
    for packed in (False, True):
        model = ir.load(str(MODELS / "llama_dynamo.onnx"))
        extra = [make_pass("pack-kv-cache", bits="4+4")] if packed else []
        Pipeline([make_pass("normalize"), make_pass("decompose-attention"),
                  make_pass("evict-kv", budget=0.4, sinks=1, mode="head"), make_pass("quantize-kv", bits="4+4"),
                  *extra])(model)
        paths[packed] = tmp_path / f"q{packed}.onnx"
        ir.save(model, str(paths[packed]))
    assert max(_run(DecoderSession(paths[False]), DecoderSession(paths[True]), steps=8)) == 0.0


def test_cli_and_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spatten_compiler.cli import main as spattenc

    out = tmp_path / "h.onnx"
    assert spattenc(["compile", str(MODELS / "llama_dynamo.onnx"), "-o", str(out), "-q", "--kv-budget", "0.5",
                     "--kv-evict", "head", "--kv-bits", "none"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert '"mode": "head"' in meta["spatten.evict_kv"]
    state = DecoderSession(out).state
    assert "past_importance.0" in state and state["past_importance.0"][1][1] == 2
    capsys.readouterr()
    # the backend lowers per-KV-head eviction (one K/V list, accumulator and top-k per K/V head) since
    # issue #15's last round; emit used to refuse it
    assert spattenc(["emit", str(out), "--prompt-len", "8", "--gen-steps", "2", "-o", str(tmp_path / "h.spbin")]) == 0
    assert (tmp_path / "h.spbin").exists()
