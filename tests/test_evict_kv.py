"""evict-kv: dense equality at a full budget, onnxruntime == reference runtime with eviction, the
kept tokens equal a NumPy computation of the rule, and properties over budgets/sinks/recent/prompts."""

from __future__ import annotations

from functools import cache
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

from spatten_compiler.decoding import DecoderSession, left_pad
from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pipeline, make_pass

DECODERS = ["gpt2_kv_dynamo", "gpt2_kv_torchscript", "llama_torchscript", "llama_dynamo", "llama_sdpa_dynamo",
            "llama_attention_op23"]
PROMPTS = [[5, 17, 33, 2, 9, 11, 40, 7, 21], [8, 3, 100, 42]]
STEPS = 16


@cache
def compiled(name: str, tmp: str, probs: bool = False, **options: object) -> Path:
    """The fixture rewritten by evict-kv (``probs``: the probabilities as extra outputs, for the NumPy rule)."""
    model = ir.load(str(MODELS / f"{name}.onnx"))
    Pipeline([make_pass("normalize"), make_pass("decompose-attention"), make_pass("evict-kv", **options)])(model)
    out = Path(tmp) / f"{name}-{'-'.join(f'{k}{v}' for k, v in sorted(options.items()))}{'-p' if probs else ''}.onnx"
    ir.save(model, str(out))
    if probs:
        proto = onnx.load(str(out))
        softmax = [n.output[0] for n in proto.graph.node if n.op_type == "Softmax"]
        proto.graph.output.extend(onnx.helper.make_tensor_value_info(s, onnx.TensorProto.FLOAT, None) for s in softmax)
        onnx.save(proto, str(out))
    return out


def _run(dense: DecoderSession, other: DecoderSession, steps: int = STEPS,
         prompts: list[list[int]] = PROMPTS) -> list[float]:
    ids, mask = left_pad(prompts)
    dense.reset(2)
    other.reset(2)
    a, b = dense.step(ids, mask), other.step(ids, mask)
    errs = [float(np.abs(a - b)[mask.astype(bool)].max())]  # padded query rows carry no meaning
    tok = a[:, -1].argmax(-1)
    for _ in range(steps):
        a, b = dense.step(tok[:, None]), other.step(tok[:, None])
        errs.append(float(np.abs(a - b).max()))
        tok = a[:, -1].argmax(-1)
    return errs


@pytest.mark.parametrize("mode", ["layer", "cascade"])
@pytest.mark.parametrize("name", DECODERS)
def test_full_budget_equals_dense(name: str, mode: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled(name, str(tmp_path_factory.getbasetemp()), budget=1.0, sinks=2, recent=2, mode=mode)
    errs = _run(DecoderSession(MODELS / f"{name}.onnx"), DecoderSession(path))
    assert len(errs) == STEPS + 1 and max(errs) <= 1e-4, errs


def spied_session(path: Path) -> tuple[DecoderSession, list[str], dict[str, np.ndarray]]:
    """A DecoderSession whose every run leaves its feeds and (as ``out:<name>``) its outputs in the
    returned dict, and the names of the probability outputs (``probs=True`` compiles)."""
    s = DecoderSession(path)
    softmax = [o for o in s.output_names if not o.startswith(("present", "logits"))]
    captured: dict[str, np.ndarray] = {}
    run = s._run

    def spy(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captured.clear()
        captured.update(feeds)
        out = run(feeds)
        captured.update({f"out:{k}": v for k, v in out.items()})
        return out

    s._run = spy  # type: ignore[method-assign]
    return s, softmax, captured


def step_ort_and_reference(path: Path, steps: int, prompts: list[list[int]] = PROMPTS) -> DecoderSession:
    """Prefill ``prompts``, then ``steps`` greedy steps in onnxruntime and the reference runtime side by
    side: logits within 1e-4 and the same kept positions at every step. Returns the onnxruntime session."""
    ort_s, ref_s = DecoderSession(path), DecoderSession(path, runtime="reference")
    ids, mask = left_pad(prompts)
    ort_s.reset(2)
    ref_s.reset(2)
    a, b = ort_s.step(ids, mask), ref_s.step(ids, mask)
    assert np.abs(a - b)[mask.astype(bool)].max() <= 1e-4
    tok = a[:, -1].argmax(-1)
    for _ in range(steps):
        a, b = ort_s.step(tok[:, None]), ref_s.step(tok[:, None])
        assert np.abs(a - b).max() <= 1e-4
        for x, y in zip(ort_s.kept_positions(), ref_s.kept_positions()):
            np.testing.assert_array_equal(x, y)
        tok = a[:, -1].argmax(-1)
    return ort_s


@pytest.mark.parametrize("name", DECODERS)
def test_ort_equals_reference_with_eviction(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled(name, str(tmp_path_factory.getbasetemp()), budget=0.3, sinks=2, recent=2, mode="cascade")
    ort_s = step_ort_and_reference(path, 8)
    assert ort_s.cache_lengths() == [budget_tokens(0.3, 9 + 8, 2, 2, 10**9)] * 4


def numpy_rule(probs: np.ndarray, past_imp: np.ndarray, past_pos: np.ndarray, new_pos: np.ndarray,
               valid_q: np.ndarray, budget: float, sinks: int, recent: int,
               above: np.ndarray | None, share: float = 0.0, decay: float = 1.0,
               norm: float = 0.0, min_keep: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The eviction rule written directly: returns (kept positions with -1 for empty, kept importance)."""
    pos = np.concatenate([past_pos, np.where(valid_q > 0, new_pos, -1)], 1)
    last = pos.max(axis=1, keepdims=True)
    w = np.float64(decay) ** (last - new_pos) * valid_q  # each query's weight: decay^(its age)
    carry = np.float64(decay) ** valid_q.sum(axis=1, keepdims=True)
    imp = np.concatenate([past_imp * carry, np.zeros_like(new_pos, np.float32)], 1)
    imp = (imp + (probs * w[:, None, :, None]).sum(axis=(1, 2))).astype(np.float32)
    ranked = imp / (last + 1.0 - pos) ** norm
    b, n = pos.shape
    k = budget_tokens(budget, int(pos.max()) + 1, sinks, recent, n, min_keep)
    recent = max(recent, int(np.floor(np.float32(share) * np.float32(k - sinks))))
    kept_pos, kept_imp = np.full((b, k), -1), np.zeros((b, k), np.float32)
    for r in range(b):
        valid = pos[r] >= 0
        rank = np.cumsum(valid)
        forced = (valid & (rank <= sinks)) | (np.arange(n) >= n - recent)
        score = np.where(forced, 1e30, ranked[r]).astype(np.float32)
        score = np.where(valid, score, -1e30)
        if above is not None:
            score = np.where(np.isin(pos[r], above[r][above[r] >= 0]), score, -1e30)
        top = np.argsort(-score, kind="stable")[:k]
        keep = np.sort(top)
        kept_pos[r] = np.where(score[keep] > -5e29, pos[r][keep], -1)
        kept_imp[r] = imp[r][keep]
    return kept_pos, kept_imp


@pytest.mark.parametrize(("mode", "share", "score"), [
    ("layer", 0.0, "accumulated"), ("cascade", 0.0, "accumulated"), ("layer", 0.5, "accumulated"),
    ("layer", 1.0, "accumulated"), *[("layer", 0.25, s) for s in SCORES if s != "accumulated"],
    ("cascade", 0.25, "mean")])
@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_kv_torchscript"])
def test_kept_tokens_equal_numpy_rule(name: str, mode: str, share: float, score: str,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    budget, sinks, recent = 0.4, 2, 1
    rule = SCORES[score]
    path = compiled(name, str(tmp_path_factory.getbasetemp()), probs=True, budget=budget, sinks=sinks,
                    recent=recent, mode=mode, recent_share=share, score=score)
    s, softmax, captured = spied_session(path)
    ids, mask = left_pad(PROMPTS)
    s.reset(2)
    valid_q = mask
    tok = ids
    for _ in range(10):
        logits = s.step(tok, valid_q)
        above = None
        for layer in range(4):
            got_pos, got_imp = captured[f"out:present_positions.{layer}"], captured[f"out:present_importance.{layer}"]
            want_pos, want_imp = numpy_rule(
                captured[f"out:{softmax[layer]}"], captured[f"past_importance.{layer}"],
                captured[f"past_positions.{layer}"], captured["position_ids"], valid_q.astype(np.float32),
                budget, sinks, recent, above if mode == "cascade" else None, share, rule.decay, rule.norm)
            np.testing.assert_array_equal(got_pos, want_pos)
            np.testing.assert_allclose(got_imp, want_imp, rtol=1e-5, atol=1e-5)
            above = got_pos
        tok = logits[:, -1].argmax(-1)[:, None]
        valid_q = np.ones_like(tok)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.sampled_from([0.125, 0.25, 0.5, 0.8, 3.0, 6.0, 12.0]), sinks=st.integers(0, 3),
       recent=st.integers(0, 3), lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       mode=st.sampled_from(["layer", "cascade"]))
def test_properties(budget: float, sinks: int, recent: int, lengths: list[int], mode: str,
                    tmp_path_factory: pytest.TempPathFactory) -> None:
    if budget > 1 and budget < sinks + recent:
        budget = float(sinks + recent)
    path = compiled("llama_dynamo", str(tmp_path_factory.getbasetemp()), budget=budget, sinks=sinks, recent=recent,
                    mode=mode)
    s = DecoderSession(path)
    rng = np.random.default_rng(sum(lengths))
    ids, mask = left_pad([list(rng.integers(1, 500, n)) for n in lengths])
    s.reset(len(lengths))
    s.step(ids, mask)
    total = ids.shape[1]
    prev = total - 1
    for step in range(6):
        lens = s.cache_lengths()
        n = lens[0]
        want = budget_tokens(budget, total, sinks, recent, prev + 1)
        assert lens == [want] * 4
        for layer, kept in enumerate(s.kept_positions()):
            for row, real in enumerate(lengths):
                got = kept[row][kept[row] >= 0]
                assert np.all(np.diff(got) > 0), "kept tokens stay in order"
                first = total - real if s.positions == "arange" else 0
                seen = np.arange(first, first + real + step)
                assert set(seen[:sinks]) <= set(got), "sinks are never evicted"
                assert set(seen[max(0, len(seen) - recent):]) <= set(got), "the recent window is never evicted"
                if mode == "layer":
                    assert len(got) == min(n, len(seen)), "a layer fills its budget with real tokens"
            if mode == "cascade" and layer:
                above = s.kept_positions()[layer - 1]
                for row in range(len(lengths)):
                    assert set(kept[row][kept[row] >= 0]) <= set(above[row][above[row] >= 0])
        prev = n
        s.step(np.full((len(lengths), 1), 7, np.int64))
        total += 1


def test_gqa_fixture_has_grouped_heads() -> None:
    meta = load_meta("llama_dynamo")
    assert meta["num_kv_heads"] < meta["num_heads"]  # the mapping rule (sum over all query heads) is exercised


def test_tunable_knobs_equal_compiled_values(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = str(tmp_path_factory.getbasetemp())
    fixed = DecoderSession(compiled("llama_dynamo", base, budget=0.3, sinks=1, recent=0, recent_share=0.5))
    tuned = DecoderSession(compiled("llama_dynamo", base, budget=0.7, sinks=4, recent=2, tunable=True))
    tuned.overrides = {"spatten.kv_budget": np.array(0.3, np.float32), "spatten.kv_sinks": np.array([1]),
                       "spatten.kv_recent": np.array([0]), "spatten.kv_recent_share": np.array(0.5, np.float32)}
    assert max(_run(fixed, tuned, steps=6)) == 0.0
    for a, b in zip(fixed.kept_positions(), tuned.kept_positions()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_kv_torchscript"])
def test_chunked_prefill_equals_dense(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Multi-token steps over a non-empty cache (a chunked prefill; one chunk is all padding)."""
    path = compiled(name, str(tmp_path_factory.getbasetemp()), budget=1.0, sinks=2, recent=2, mode="layer")
    dense, ours = DecoderSession(MODELS / f"{name}.onnx"), DecoderSession(path)
    ids, mask = left_pad([[5, 17, 33, 2, 9, 11, 40, 7, 8], [8, 3, 100, 4]])
    dense.reset(2)
    ours.reset(2)
    for i in range(0, 9, 3):
        a, b = dense.step(ids[:, i:i + 3], mask[:, i:i + 3]), ours.step(ids[:, i:i + 3], mask[:, i:i + 3])
        real = mask[:, i:i + 3].astype(bool)
        assert not real.any() or np.abs(a - b)[real].max() <= 1e-4


@pytest.mark.parametrize("mode", ["layer", "cascade"])
@pytest.mark.parametrize("name", ["llama_torchscript", "gpt2_kv_torchscript", "llama_dynamo"])
def test_per_layer_cache_lengths_differ(name: str, mode: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A schedule gives each layer its own budget: the caches differ in length, and onnxruntime and
    the reference runtime still agree step by step. Dynamo exports read one layer's cache length for
    every layer's GQA repeat shape: refused with the reason."""
    if "dynamo" in name:
        with pytest.raises(OptionError, match="reads the length of past_key_values"):
            compiled(name, str(tmp_path_factory.getbasetemp()), budget=0.6, schedule=(1.0, 0.5), mode=mode)
        return
    path = compiled(name, str(tmp_path_factory.getbasetemp()), budget=0.6, sinks=1, recent=1, mode=mode,
                    schedule=(1.0, 0.5))
    ort_s, ref_s = DecoderSession(path), DecoderSession(path, runtime="reference")
    ids, mask = left_pad(PROMPTS)
    ort_s.reset(2)
    ref_s.reset(2)
    a, b = ort_s.step(ids, mask), ref_s.step(ids, mask)
    tok = a[:, -1].argmax(-1)
    for step in range(4):
        a, b = ort_s.step(tok[:, None]), ref_s.step(tok[:, None])
        assert np.abs(a - b).max() <= 1e-4
        total = 9 + step + 1
        want = [budget_tokens(0.6, total, 1, 1, 99), *[budget_tokens(0.3, total, 1, 1, 99)] * 3]
        assert ort_s.cache_lengths() == want and want[0] > want[1]
        tok = a[:, -1].argmax(-1)


@pytest.mark.parametrize("score", [s for s in SCORES if s != "accumulated"])
def test_scores_full_budget_dense_and_ort_equals_reference(score: str,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every scoring rule: a full budget is the dense model; with eviction onnxruntime == reference."""
    base = str(tmp_path_factory.getbasetemp())
    full = compiled("llama_torchscript", base, budget=1.0, sinks=1, recent=1, score=score)
    assert max(_run(DecoderSession(MODELS / "llama_torchscript.onnx"), DecoderSession(full), steps=6)) <= 1e-4
    path = compiled("llama_torchscript", base, budget=0.3, sinks=1, recent=1, score=score, recent_share=0.25)
    ort_s, ref_s = DecoderSession(path), DecoderSession(path, runtime="reference")
    ids, mask = left_pad(PROMPTS)
    ort_s.reset(2)
    ref_s.reset(2)
    a, b = ort_s.step(ids, mask), ref_s.step(ids, mask)
    tok = a[:, -1].argmax(-1)
    for _ in range(5):
        a, b = ort_s.step(tok[:, None]), ref_s.step(tok[:, None])
        assert np.abs(a - b).max() <= 1e-4
        for x, y in zip(ort_s.kept_positions(), ref_s.kept_positions()):
            np.testing.assert_array_equal(x, y)
        tok = a[:, -1].argmax(-1)


def test_tunable_score_knobs_equal_compiled_rule(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = str(tmp_path_factory.getbasetemp())
    fixed = DecoderSession(compiled("llama_dynamo", base, budget=0.3, sinks=1, recent_share=0.25, score="ema"))
    tuned = DecoderSession(compiled("llama_dynamo", base, budget=0.3, sinks=1, recent_share=0.25, tunable=True))
    tuned.overrides = {"spatten.kv_decay": np.array(SCORES["ema"].decay, np.float32),
                       "spatten.kv_norm": np.array(SCORES["ema"].norm, np.float32)}
    assert max(_run(fixed, tuned, steps=6)) == 0.0
    for a, b in zip(fixed.kept_positions(), tuned.kept_positions()):
        np.testing.assert_array_equal(a, b)


def test_unknown_score_is_refused() -> None:
    model = ir.load(str(MODELS / "llama_dynamo.onnx"))
    with pytest.raises(OptionError, match="--kv-score must be one of"):
        Pipeline([make_pass("normalize"), make_pass("decompose-attention"),
                  make_pass("evict-kv", score="nope")])(model)


def test_cli_kv_score(tmp_path: Path) -> None:
    import subprocess
    import sys

    def spattenc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "spatten_compiler", *args], capture_output=True, text=True)

    out = tmp_path / "s.onnx"
    r = spattenc(str(MODELS / "llama_dynamo.onnx"), "-o", str(out), "--no-kv-eviction", "--kv-score", "mean")
    assert r.returncode == 2 and "needs --kv-budget" in r.stderr and not out.exists()
    r = spattenc(str(MODELS / "llama_dynamo.onnx"), "-o", str(out), "--kv-score", "mean")  # the preset's eviction
    assert r.returncode == 0, r.stderr
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert '"score": "mean"' in meta["spatten.evict_kv"] and '"min_keep": 256' in meta["spatten.evict_kv"]
    r = spattenc(str(MODELS / "llama_dynamo.onnx"), "-o", str(out), "--kv-budget", "0.5", "--kv-score", "last")
    assert r.returncode == 0, r.stderr
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert '"score": "last"' in meta["spatten.evict_kv"]
