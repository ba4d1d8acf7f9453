"""evict-kv's token floor (``min_keep`` / ``--kv-min-keep``): no eviction while a layer's cache holds
at most the floor, ``k = min(n, max(budget(T), sinks + recent, min_keep))`` after it. The kept set
equals the NumPy rule, properties over floors, onnxruntime == reference runtime, a floor above every
length == dense, the tunable knob == the compiled value, and bad values exit 2 in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spatten_compiler.passes.evict_kv import META_KEY, budget_tokens
from test_evict_kv import PROMPTS, STEPS, _run, compiled, numpy_rule, spied_session, step_ort_and_reference

from spatten_compiler.backend.lower_evict import EvictPlan
from spatten_compiler.cli import main
from spatten_compiler.decoding import DecoderSession, left_pad
from spatten_compiler.errors import OptionError

FLOOR = 11  # the 9-token prompt grows past it after 2 steps: first a dense cache, then eviction


def test_budget_tokens_floor() -> None:
    assert budget_tokens(0.5, 40, 4, 0, 40) == 20
    assert budget_tokens(0.5, 40, 4, 0, 40, min_keep=32) == 32
    assert budget_tokens(0.5, 40, 4, 0, 30, min_keep=64) == 30  # never more than the slots there are
    assert budget_tokens(0.5, 200, 4, 0, 200, min_keep=64) == 100  # long sequences: the budget rules
    assert budget_tokens(8.0, 40, 2, 2, 40, min_keep=16) == 16  # a token budget has the floor too


@pytest.mark.parametrize("mode", ["layer", "cascade"])
@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_kv_torchscript"])
def test_kept_tokens_equal_numpy_rule_with_floor(name: str, mode: str,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    budget, sinks, recent, share = 0.3, 1, 0, 0.5
    path = compiled(name, str(tmp_path_factory.getbasetemp()), probs=True, budget=budget, sinks=sinks,
                    recent=recent, mode=mode, recent_share=share, min_keep=FLOOR)
    s, softmax, captured = spied_session(path)
    ids, mask = left_pad(PROMPTS)
    s.reset(2)
    tok, valid_q = ids, mask
    lengths = []
    for _ in range(8):
        logits = s.step(tok, valid_q)
        above = None
        for layer in range(4):
            got_pos, got_imp = captured[f"out:present_positions.{layer}"], captured[f"out:present_importance.{layer}"]
            want_pos, want_imp = numpy_rule(
                captured[f"out:{softmax[layer]}"], captured[f"past_importance.{layer}"],
                captured[f"past_positions.{layer}"], captured["position_ids"], valid_q.astype(np.float32),
                budget, sinks, recent, above if mode == "cascade" else None, share, min_keep=FLOOR)
            np.testing.assert_array_equal(got_pos, want_pos)
            np.testing.assert_allclose(got_imp, want_imp, rtol=1e-5, atol=1e-5)
            above = got_pos
        lengths.append(s.cache_lengths()[0])
        tok = logits[:, -1].argmax(-1)[:, None]
        valid_q = np.ones_like(tok)
    assert lengths == [9, 10, 11, 11, 11, 11, 11, 11]  # whole until the floor, then held at it (0.3 T < 11)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.sampled_from([0.125, 0.5, 3.0]), sinks=st.integers(0, 2), min_keep=st.integers(0, 14),
       lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3))
def test_floor_properties(budget: float, sinks: int, min_keep: int, lengths: list[int],
                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """Cache length == the NumPy twin; while the sequence is at most the floor every real token stays."""
    budget = max(budget, float(sinks)) if budget > 1 else budget
    path = compiled("llama_dynamo", str(tmp_path_factory.getbasetemp()), budget=budget, sinks=sinks, recent=0,
                    min_keep=min_keep)
    s = DecoderSession(path)
    rng = np.random.default_rng(sum(lengths) + min_keep)
    ids, mask = left_pad([list(rng.integers(1, 500, n)) for n in lengths])
    s.reset(len(lengths))
    s.step(ids, mask)
    total, prev = ids.shape[1], ids.shape[1] - 1
    for step in range(5):
        n = s.cache_lengths()[0]
        assert s.cache_lengths() == [budget_tokens(budget, total, sinks, 0, prev + 1, min_keep)] * 4
        for kept in s.kept_positions():
            for row, real in enumerate(lengths):
                got = kept[row][kept[row] >= 0]
                if total <= min_keep:
                    assert len(got) == real + step, "nothing is evicted below the floor"
                assert len(got) >= min(min_keep, real + step) or total > n, "the floor holds real tokens"
        prev = n
        s.step(np.full((len(lengths), 1), 7, np.int64))
        total += 1


def test_ort_equals_reference_with_floor(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled("llama_torchscript", str(tmp_path_factory.getbasetemp()), budget=0.3, sinks=2, recent=1,
                    mode="cascade", min_keep=FLOOR)
    ort_s = step_ort_and_reference(path, 6)
    assert ort_s.cache_lengths() == [FLOOR] * 4


@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_kv_torchscript", "llama_attention_op23"])
def test_floor_above_every_length_equals_dense(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A short budget with a floor above prompt + steps never evicts: the dense logits at every step."""
    path = compiled(name, str(tmp_path_factory.getbasetemp()), budget=0.25, sinks=1, recent=0, min_keep=64)
    dense, ours = DecoderSession(MODELS / f"{name}.onnx"), DecoderSession(path)
    errs = _run(dense, ours)
    assert len(errs) == STEPS + 1 and max(errs) <= 1e-4, errs
    assert ours.cache_lengths() == dense.cache_lengths()


def test_tunable_floor_equals_compiled_value(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = str(tmp_path_factory.getbasetemp())
    fixed = DecoderSession(compiled("llama_dynamo", base, budget=0.3, sinks=1, recent=0, min_keep=FLOOR))
    tuned = DecoderSession(compiled("llama_dynamo", base, budget=0.3, sinks=1, recent=0, tunable=True))
    tuned.overrides = {"spatten.kv_min_keep": np.array([FLOOR], np.int64)}
    assert max(_run(fixed, tuned, steps=6)) == 0.0
    assert fixed.cache_lengths() == tuned.cache_lengths() == [FLOOR] * 4


def test_metadata_carries_the_floor_to_the_backend(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled("llama_torchscript", str(tmp_path_factory.getbasetemp()), budget=0.5, sinks=4, min_keep=32)
    plan = EvictPlan.from_model(onnx.load(str(path)))
    assert plan is not None and plan.min_keep == 32
    assert plan.keep(0, 20, 20)[0] == 20 and plan.keep(0, 40, 40)[0] == 32 and plan.keep(0, 100, 100)[0] == 50
    assert '"min_keep": 32' in next(p.value for p in onnx.load(str(path)).metadata_props if p.key == META_KEY)


def test_cli_floor(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    assert main([str(MODELS / "llama_dynamo.onnx"), "-o", str(out), "-q", "--kv-budget", "0.5",
                 "--kv-min-keep", "16", "--kv-bits", "none"]) == 0
    meta = next(p.value for p in onnx.load(str(out)).metadata_props if p.key == META_KEY)
    assert '"min_keep": 16' in meta


@pytest.mark.parametrize("flags, message", [
    (["--kv-budget", "0.5", "--kv-min-keep", "-1"], "--kv-min-keep must be a whole number of tokens >= 0, got -1"),
    (["--kv-bits", "4", "--kv-min-keep", "16"], "--kv-min-keep needs --kv-budget"),  # explicit options: no preset
    (["--pipeline", "normalize,decompose-attention,evict-kv{budget=0.5;min_keep=-3}"],
     "--kv-min-keep must be a whole number of tokens >= 0, got -3"),
])
def test_bad_floor_one_line_exit_2(flags: list[str], message: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    assert main([str(MODELS / "llama_dynamo.onnx"), "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_pass_rejects_a_non_integer_floor() -> None:
    from spatten_compiler.passes.evict_kv import EvictKV

    with pytest.raises(OptionError, match="--kv-min-keep"):
        EvictKV(budget=0.5, min_keep=2.5)._validate()  # type: ignore[arg-type]
