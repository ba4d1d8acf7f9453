"""evict-kv block eviction (``slack``): the kept set equals the NumPy rule at the steps that evict and
the appended state at the others, onnxruntime == reference runtime, properties of the cache length,
full budget == dense, ``slack=0`` emits no If, bad values exit 2 in one line, emit lowers it (not
under a sliding window)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import MODELS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spatten_compiler.passes.evict_kv import budget_tokens
from test_evict_kv import PROMPTS, _run, compiled, numpy_rule, spied_session, step_ort_and_reference

from spatten_compiler.decoding import DecoderSession, left_pad
from spatten_compiler.errors import OptionError


def _evicts(lengths: list[int], total: int, budget: float, sinks: int, recent: int, slack: int) -> bool:
    """The block rule: some layer holds more than its budget + slack slots after the append."""
    return any(n > budget_tokens(budget, total, sinks, recent, 10**9) + slack for n in lengths)


@pytest.mark.parametrize("mode", ["layer", "cascade"])
@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_kv_torchscript"])
def test_kept_tokens_equal_numpy_rule_or_append(name: str, mode: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    budget, sinks, recent, share, slack = 0.4, 2, 1, 0.5, 3
    path = compiled(name, str(tmp_path_factory.getbasetemp()), probs=True, budget=budget, sinks=sinks,
                    recent=recent, mode=mode, recent_share=share, slack=slack)
    s, softmax, captured = spied_session(path)
    ids, mask = left_pad(PROMPTS)
    s.reset(2)
    valid_q, tok = mask, ids
    evictions = appends = 0
    for _ in range(14):
        logits = s.step(tok, valid_q)
        q = tok.shape[1]
        n = [captured[f"past_positions.{layer}"].shape[1] + q for layer in range(4)]
        total = int(captured["position_ids"].max()) + 1
        evict = _evicts(n, total, budget, sinks, recent, slack)
        evictions, appends = evictions + evict, appends + (not evict)
        above = None
        for layer in range(4):
            got_pos, got_imp = captured[f"out:present_positions.{layer}"], captured[f"out:present_importance.{layer}"]
            want_pos, want_imp = numpy_rule(  # not evicting = the rule with a budget as long as the cache
                captured[f"out:{softmax[layer]}"], captured[f"past_importance.{layer}"],
                captured[f"past_positions.{layer}"], captured["position_ids"], valid_q.astype(np.float32),
                budget if evict else 10.0**9, sinks, recent, above if mode == "cascade" and evict else None, share)
            np.testing.assert_array_equal(got_pos, want_pos)
            np.testing.assert_allclose(got_imp, want_imp, rtol=1e-5, atol=1e-5)
            past = captured[f"past_key_values.{layer}.key"]
            if not evict:  # the appended cache itself, not a gathered copy of it
                np.testing.assert_array_equal(captured[f"out:present.{layer}.key"][:, :, :past.shape[2]], past)
            above = got_pos
        tok = logits[:, -1].argmax(-1)[:, None]
        valid_q = np.ones_like(tok)
    assert evictions >= 2 and appends >= 4, (evictions, appends)


@pytest.mark.parametrize("name", ["llama_torchscript", "gpt2_kv_dynamo", "llama_attention_op23"])
def test_ort_equals_reference_with_block_eviction(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled(name, str(tmp_path_factory.getbasetemp()), budget=0.3, sinks=2, recent=2, mode="cascade", slack=3)
    ort_s = step_ort_and_reference(path, 8)
    assert ort_s.cache_lengths() == [8] * 4  # evicted to 4 at 13 tokens, then 4 appends (k(17) = 6, 8 <= 6 + 3)


def test_per_kv_head_block_eviction_ort_equals_reference(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled("llama_torchscript", str(tmp_path_factory.getbasetemp()), budget=0.3, sinks=2, recent=2,
                    mode="head", slack=2)
    step_ort_and_reference(path, 6)


@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_kv_torchscript"])
def test_full_budget_with_slack_equals_dense(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = compiled(name, str(tmp_path_factory.getbasetemp()), budget=1.0, sinks=2, recent=2, slack=4)
    errs = _run(DecoderSession(MODELS / f"{name}.onnx"), DecoderSession(path))
    assert max(errs) <= 1e-4, errs


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.sampled_from([0.125, 0.25, 0.5, 3.0, 6.0]), sinks=st.integers(0, 2), slack=st.integers(1, 5),
       lengths=st.lists(st.integers(1, 12), min_size=1, max_size=2))
def test_block_properties(budget: float, sinks: int, slack: int, lengths: list[int],
                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every layer's length is exactly what the block rule gives: after an eviction its budget, else
    one more slot per step; never above budget + slack."""
    budget = max(budget, float(sinks)) if budget > 1 else budget
    path = compiled("llama_dynamo", str(tmp_path_factory.getbasetemp()), budget=budget, sinks=sinks, slack=slack)
    s = DecoderSession(path)
    rng = np.random.default_rng(sum(lengths))
    ids, mask = left_pad([list(rng.integers(1, 500, n)) for n in lengths])
    s.reset(len(lengths))
    s.step(ids, mask)
    total, n = ids.shape[1], ids.shape[1]
    for _ in range(10):
        k = budget_tokens(budget, total, sinks, 0, 10**9)
        n = min(n, k) if n > k + slack else n
        assert s.cache_lengths() == [n] * 4
        assert n <= k + slack
        s.step(np.full((len(lengths), 1), 7, np.int64))
        total, n = total + 1, n + 1


def test_slack_zero_emits_no_if_and_slack_one_if(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = str(tmp_path_factory.getbasetemp())
    plain = ir.load(str(compiled("llama_dynamo", tmp, budget=0.5, sinks=2)))
    block = ir.load(str(compiled("llama_dynamo", tmp, budget=0.5, sinks=2, slack=8)))
    assert not [n for n in plain.graph if n.op_type == "If"]
    ifs = [n for n in block.graph if n.op_type == "If"]
    assert len(ifs) == 1
    body = {n.op_type for n in ifs[0].attributes["then_branch"].value}
    assert {"TopK", "Gather"} <= body
    # outside the If: only the step's newest position (one TopK over the new tokens, shared by all layers)
    assert len([n for n in block.graph if n.op_type == "TopK"]) == 1


def test_pass_rejects_a_bad_slack() -> None:
    from spatten_compiler.passes.evict_kv import EvictKV

    for bad in (-1, 1.5, True):
        with pytest.raises(OptionError, match="--kv-slack"):
            EvictKV(budget=0.5, slack=bad)._validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("flags, message", [(["--kv-budget", "0.5", "--kv-slack", "-2"], "--kv-slack must be"),
                                            (["--kv-bits", "4", "--kv-slack", "8"], "--kv-slack needs --kv-budget")])
def test_bad_slack_one_line_exit_2(flags: list[str], message: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from spatten_compiler.cli import main

    out = tmp_path / "x.onnx"
    assert main([str(MODELS / "llama_dynamo.onnx"), "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_cli_slack(tmp_path: Path) -> None:
    from spatten_compiler.cli import main

    out = tmp_path / "x.onnx"
    assert main([str(MODELS / "llama_dynamo.onnx"), "-o", str(out), "-q", "--kv-budget", "0.5", "--kv-slack", "4",
                 "--kv-bits", "none"]) == 0
    s = DecoderSession(out)
    assert s.evict["slack"] == 4


def test_backend_lowers_block_eviction_but_not_under_a_window(tmp_path_factory: pytest.TempPathFactory) -> None:
    """emit lowers --kv-slack (tests/test_sim_block_eviction.py: equal to the reference runtime); a sliding
    window caps the graph's budget, not the stream's: refused in one line naming the option."""
    import json

    import onnx
    from spatten_compiler.passes.evict_kv import META_KEY

    from spatten_compiler.backend.emitter import LoweringError
    from spatten_compiler.backend.lower import emit_model

    tmp = tmp_path_factory.getbasetemp()
    path = compiled("llama_dynamo", str(tmp), budget=0.5, sinks=2, slack=4)
    assert emit_model(path, 16, gen_steps=2).mix()["topk"] == 4 * 3
    model = onnx.load(str(path))
    meta = next(p for p in model.metadata_props if p.key == META_KEY)
    meta.value = json.dumps({**json.loads(meta.value), "windows": {"0": 8}})
    onnx.save(model, str(tmp / "windowed-slack.onnx"))
    with pytest.raises(LoweringError, match="--kv-slack") as e:
        emit_model(tmp / "windowed-slack.onnx", 16, gen_steps=2)
    assert "\n" not in str(e.value)


def test_profile_decode_times_a_whole_block_cycle(tmp_path_factory: pytest.TempPathFactory) -> None:
    """bench/profile_decode: a block-eviction model's timed run is one cycle, from the freshly evicted
    cache (budget) through the appends to the step that evicts (budget + slack + 1 slots -> budget)."""
    import onnxruntime as ort

    from bench.profile_decode import _Meta, cycle, state_feeds

    path = compiled("llama_dynamo", str(tmp_path_factory.getbasetemp()), budget=8.0, sinks=2, slack=3)
    meta, sess = _Meta(str(path)), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {**state_feeds(meta, 40, 8.0, np.random.default_rng(0)), "input_ids": np.array([[7]], np.int64)}
    steps = cycle(sess, feeds)
    assert [f["past_key_values.0.key"].shape[2] for f in steps] == [8, 9, 10, 11]
    assert [int(f["position_ids"][0, 0]) for f in steps] == [39, 40, 41, 42]


@pytest.mark.parametrize("idle_spin", [True, False])
def test_decoder_session_stops_spinning_on_request(idle_spin: bool) -> None:
    # benchmarks step several sessions in one process: an idle one must not keep its threads spinning
    s = DecoderSession(MODELS / "gpt2_kv_torchscript.onnx", threads=2, idle_spin=idle_spin)
    try:
        stop = s._ort.get_session_options().get_session_config_entry("session.force_spinning_stop")
    except RuntimeError:  # not set: onnxruntime's default
        stop = ""
    assert stop == ("" if idle_spin else "1")
    assert s.fork()._ort is s._ort  # lockstep forks share the session and its setting
