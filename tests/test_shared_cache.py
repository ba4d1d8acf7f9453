"""evict-gqa{in_graph=false} + SharedCacheSession (spatten_compiler/shared_cache.py): the cache in one
shared buffer per layer, evicted in place by the session, keeps the same slots as evict-gqa's in-graph
eviction with the same options (as position sets: the slot order differs) and gives its logits, on the
committed tiny builder Llamas."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS

from spatten_compiler.decoding import DecoderSession
from spatten_compiler.errors import OptionError
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline, make_pass
from spatten_compiler.shared_cache import SharedCacheSession, keep_slots, refill

IDS = np.random.default_rng(4).integers(3, 48, 24).astype(np.int64)
PROMPT = 8


def _compile(tmp_path, name: str, **options):
    model = load_model(MODELS / "builder" / "llama_fp32.onnx")
    Pipeline([make_pass("evict-gqa", **options)], check=True)(model)
    save_model(model, tmp_path / name, external_data=False)
    return tmp_path / name


def _steps(session) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    logits, kept = [session.step(IDS[None, :PROMPT])], [session.kept_positions()]
    for j in range(PROMPT, len(IDS)):
        logits.append(session.step(IDS[None, j:j + 1]))
        kept.append(session.kept_positions())
    return logits, kept


@pytest.mark.parametrize("options", [{"budget": 0.5}, {"budget": 0.5, "mode": "head"},
                                     {"budget": 0.5, "mode": "head", "slack": 3}, {"budget": 6, "slack": 2},
                                     {"budget": 1.0}])
def test_shared_buffer_keeps_what_the_graph_keeps(tmp_path, options) -> None:
    shared = SharedCacheSession(_compile(tmp_path, "shared.onnx", in_graph=False, **options))
    got, got_kept = _steps(shared)
    want, want_kept = _steps(DecoderSession(_compile(tmp_path, "graph.onnx", **options)))
    for step, (a, b) in enumerate(zip(got_kept, want_kept, strict=True)):
        for layer, (x, y) in enumerate(zip(a, b, strict=True)):
            np.testing.assert_array_equal(np.sort(x, axis=-1), y, err_msg=f"step {step} layer {layer}")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert (got_kept[-1][0].shape[-1] < len(IDS)) == (options["budget"] != 1.0)  # evicted in place


def test_refill_moves_only_rows_above_k() -> None:
    keep = keep_slots(np.array([5, 1, 9, 0, 7, 3], np.float32), np.array([0, 1, 2, 3, 4, 5]), 3, 0, 0)
    assert sorted(keep.tolist()) == [0, 2, 4]
    dst, src = refill(keep, 3)
    assert dst.tolist() == [1] and src.tolist() == [4]


def test_other_rules_are_refused(tmp_path) -> None:
    with pytest.raises(OptionError, match="accumulated rule"):
        _compile(tmp_path, "x.onnx", in_graph=False, budget=0.5, score="mean")
    with pytest.raises(OptionError, match="not compiled by evict-gqa"):
        SharedCacheSession(_compile(tmp_path, "y.onnx", budget=0.5))


def test_generate_steps_the_shared_form(tmp_path) -> None:
    """``spattenc generate`` (generate.open_session) picks SharedCacheSession for an in_graph=false model:
    the same greedy tokens as the in-graph eviction model; the reference runtime is refused."""
    from test_generate import make_tokenizer

    from spatten_compiler.generate import generate, generate_ids, open_session

    options = {"budget": 0.5, "mode": "head", "slack": 2}
    shared, graph = _compile(tmp_path, "s.onnx", in_graph=False, **options), _compile(tmp_path, "g.onnx", **options)
    prompt = [5, 17, 33, 2, 9, 11, 40, 3, 8, 21]
    ours = list(generate_ids(open_session(shared), prompt, 16))
    assert len(ours) == 16 and ours == list(generate_ids(open_session(graph), prompt, 16))
    tok = make_tokenizer(tmp_path / "tok", size=48)
    assert generate(shared, tok, "w3 w5 w7 w9 w11", 8) == generate(graph, tok, "w3 w5 w7 w9 w11", 8)
    with pytest.raises(OptionError, match="onnxruntime only"):
        open_session(shared, runtime="reference")
