"""Models exported by Hugging Face Optimum (optimum-onnx), the exporter users run most.

Committed fixtures (``models/optimum/``, tiny random weights, made with ``models/_optimum.py
--fixture`` under optimum-onnx 0.1.0 / transformers 4.57, each checked against torch): the legacy
merged decoders (``decoder_model_merged.onnx``: one ``If`` on ``use_cache_branch``) of GPT-2 and
Llama, Llama without a cache, a BERT feature-extraction ``model.onnx``, CLIP's vision tower, and GPT-OSS
(learned attention sinks, MoE, a sliding window of 4) without and with a cache.
``<merged>.npz`` feeds the cache branch (a 3-token past), ``<merged>.prompt.npz`` the first-step
branch (empty past).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from spatten_compiler import inspect
from spatten_compiler.cli import main
from spatten_compiler.decoding import DecoderSession

OPTIMUM = Path(__file__).resolve().parent.parent / "models" / "optimum"
MERGED = ["gpt2_optimum_merged_kv", "llama_optimum_merged_kv"]
SITES = {"gpt2_optimum_merged_kv": (4, 4, 16), "llama_optimum_merged_kv": (4, 2, 16), "bert_optimum": (4, 4, 16),
         "cohere_optimum": (4, 2, 16), "nemotron_optimum": (4, 2, 16), "llama_optimum": (4, 2, 16)}


def run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    outputs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    return dict(zip([o.name for o in sess.get_outputs()], outputs))


@pytest.mark.parametrize("name", [*MERGED, "bert_optimum", "llama_optimum", "cohere_optimum", "nemotron_optimum"])
def test_discovery(name: str) -> None:
    """Cohere's interleaved rotary tables come from repeat_interleave (NonZero, GatherND) and
    Nemotron's from a long position chain: parameters of the per-head transform, not its data."""
    sites = inspect(str(OPTIMUM / f"{name}.onnx"))
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites] == [SITES[name]] * 2
    assert all(bool(s.kv_cache) == name.endswith("_kv") for s in sites)


@pytest.mark.parametrize("name", MERGED)
def test_unmerged_model_computes_both_branches(name: str, tmp_path: Path) -> None:
    """The with-past branch as the model, fed an empty past on the first step, equals the merged model
    on both of its branches (use_cache_branch False and True)."""
    out = tmp_path / "unmerged.onnx"
    assert main([str(OPTIMUM / f"{name}.onnx"), "-o", str(out), "--pipeline", "unmerge-decoder,normalize", "-q"]) == 0
    assert "use_cache_branch" not in {i.name for i in ort.InferenceSession(str(out)).get_inputs()}
    for feeds_file in (f"{name}.prompt.npz", f"{name}.npz"):
        feeds = dict(np.load(OPTIMUM / feeds_file))
        want, got = run(OPTIMUM / f"{name}.onnx", feeds), run(out, feeds)
        assert want.keys() == got.keys()
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, atol=1e-5, err_msg=f"{feeds_file}: {key}")


@pytest.mark.parametrize("name", MERGED)
def test_merged_decoder_generates_with_its_compiled_cache(name: str, tmp_path: Path) -> None:
    """The default preset compiles the merged file; 8-bit K/V planes cross the steps and stay close to
    the dense merged model, which DecoderSession also runs as it is (feeding use_cache_branch)."""
    preset, kv8 = tmp_path / "preset.onnx", tmp_path / "kv8.onnx"
    assert main([str(OPTIMUM / f"{name}.onnx"), "-o", str(preset), "-q"]) == 0
    assert main([str(OPTIMUM / f"{name}.onnx"), "-o", str(kv8), "--kv-bits", "8", "-q"]) == 0
    prompt, mask = np.array([[5, 9, 13, 2, 7, 11, 3], [0, 0, 8, 6, 4, 10, 12]]), np.ones((2, 7), np.int64)
    mask[1, :2] = 0

    def generate(path: Path) -> list[np.ndarray]:
        session = DecoderSession(path)
        session.reset(2)
        logits = [session.step(prompt, mask)]
        for _ in range(3):
            logits.append(session.step(np.argmax(logits[-1][:, -1], -1)[:, None]))
        return logits

    dense, quantized, pruned = generate(OPTIMUM / f"{name}.onnx"), generate(kv8), generate(preset)
    for d, q, p in zip(dense, quantized, pruned):
        rows = mask[:, -d.shape[1]:, None].astype(bool) if d.shape[1] == 7 else True
        assert np.abs(np.where(rows, q - d, 0)).max() < 0.1 * np.abs(d).max()
        assert p.shape == d.shape and np.isfinite(p).all()


def test_bert_feature_extraction_export(tmp_path: Path) -> None:
    """Token pruning at keep 1.0 equals the export on its valid rows; the default preset runs."""
    src, feeds = OPTIMUM / "bert_optimum.onnx", dict(np.load(OPTIMUM / "bert_optimum.npz"))
    k1, preset = tmp_path / "k1.onnx", tmp_path / "preset.onnx"
    assert main([str(src), "-o", str(k1), "--token-keep-schedule", "1,0.999", "--kv-bits", "none", "-q"]) == 0
    assert main([str(src), "-o", str(preset), "-q"]) == 0
    want, got = run(src, feeds), run(k1, feeds)
    rows = feeds["attention_mask"][..., None].astype(bool)
    np.testing.assert_allclose(np.where(rows, got["last_hidden_state"], 0),
                               np.where(rows, want["last_hidden_state"], 0), atol=1e-5)
    out = run(preset, feeds)["last_hidden_state"]
    assert out.shape == want["last_hidden_state"].shape and np.isfinite(out).all()


def test_clip_vision_heads_merge_width_read_from_a_shape(tmp_path: Path) -> None:
    """CLIP's vision tower under transformers 4 merges heads with Reshape(ctx, [B, S, hidden]) where
    hidden is read from the layer input's shape: head pruning writes the kept heads' width there.
    Keep 1.0 (every head through the rewrite) is exact; at 0.5 the model runs."""
    src, feeds = OPTIMUM / "clip_vision_model_optimum.onnx", dict(np.load(OPTIMUM / "clip_vision_model_optimum.npz"))
    want = run(src, feeds)
    for keep in ("1.0", "0.5"):
        out = tmp_path / f"h{keep}.onnx"
        assert main([str(src), "-o", str(out), "--head-keep", keep, "--no-token-pruning", "--kv-bits", "none",
                     "-q"]) == 0
        got = run(out, feeds)
        for key, value in want.items():
            if keep == "1.0":
                np.testing.assert_allclose(got[key], value, atol=1e-5)
            else:
                assert got[key].shape == value.shape and np.isfinite(got[key]).all()


def test_decoder_prompt_mask_sliced_to_the_key_length(tmp_path: Path) -> None:
    """Transformers 4 (optimum's Llama without a cache) slices the causal mask to each layer's key
    length, read from the layer's own K: the slice is the whole axis, so the full-length mask is
    gathered at the kept positions. Keep 1.0 is exact on the valid rows of a left-padded batch; at
    0.5 the model runs."""
    src = OPTIMUM / "llama_optimum.onnx"
    feeds = dict(np.load(OPTIMUM / "llama_optimum.npz"))
    feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
    feeds["attention_mask"][1, :2] = 0
    feeds["position_ids"] = np.clip(np.cumsum(feeds["attention_mask"], 1) - 1, 0, None)
    want = run(src, feeds)["logits"]
    rows = feeds["attention_mask"][..., None].astype(bool)
    for schedule in ("1,0.999", "1,0.5"):
        out = tmp_path / "out.onnx"
        assert main([str(src), "-o", str(out), "--token-keep-schedule", schedule, "--token-min-keep", "1",
                     "--kv-bits", "none", "-q"]) == 0
        got = run(out, feeds)["logits"]
        assert got.shape == want.shape and np.isfinite(got).all()
        if schedule == "1,0.999":
            np.testing.assert_allclose(np.where(rows, got, 0), np.where(rows, want, 0), atol=1e-5)


@pytest.mark.parametrize("name", ["cohere_optimum", "nemotron_optimum"])
def test_rotary_tables_computed_from_positions(name: str, tmp_path: Path) -> None:
    """Token and head pruning at keep 1.0 are exact on the decoders whose rotary tables transformers 4
    computes with repeat_interleave (Cohere) or a longer position chain (Nemotron)."""
    src, feeds = OPTIMUM / f"{name}.onnx", dict(np.load(OPTIMUM / f"{name}.npz"))
    want = run(src, feeds)["logits"]
    for flags in (["--token-keep-schedule", "1,0.999", "--token-min-keep", "1"],
                  ["--head-keep", "1.0", "--no-token-pruning"]):
        out = tmp_path / "out.onnx"
        assert main([str(src), "-o", str(out), "--kv-bits", "none", "-q", *flags]) == 0
        np.testing.assert_allclose(run(out, feeds)["logits"], want, atol=1e-5)


def test_gpt_oss_sinks_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """GPT-OSS (transformers 4.57, MoE, sliding window 4, learned sinks): each layer's sink column is
    found beside the scores (the router's Softmax is not taken); token pruning re-broadcasts the sink to
    the kept tokens and ranks them by P after the sink slice; head pruning slices the per-head sinks.
    Keep 1.0 / all tokens selected are exact; at 0.5 onnxruntime equals the reference runtime."""
    from spatten_compiler.runtime.reference import ReferenceRuntime

    src, feeds = OPTIMUM / "gpt_oss_optimum.onnx", dict(np.load(OPTIMUM / "gpt_oss_optimum.npz"))
    sites = inspect(str(src))
    assert [(s.num_heads, s.num_kv_heads, s.head_dim, s.variant.get("sink")) for s in sites] == [
        (4, 2, 16, "after")] * 2
    assert main(["inspect", str(src)]) == 0 and capsys.readouterr().out.count("after/additive +sink") == 2
    want = run(src, feeds)["logits"]
    for args in (["--token-keep-schedule", "1,0.999"], ["--head-keep", "1.0"], ["--token-keep-schedule", "1,0.5"],
                 ["--head-keep", "0.5"]):
        out = tmp_path / "out.onnx"
        assert main([str(src), "-o", str(out), *args, "--token-min-keep", "1", "--kv-bits", "none", "-q"]) == 0
        got = run(out, feeds)["logits"]
        if args[1] in ("1,0.999", "1.0"):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(args))
        elif args[1] == "1,0.5":
            np.testing.assert_allclose(ReferenceRuntime(str(out)).run(feeds).outputs["logits"], got, atol=1e-4)
        assert got.shape == want.shape and np.isfinite(got).all()


def test_gpt_oss_sinks_cache(tmp_path: Path) -> None:
    """The with-past export: evict-kv at budget 1.0 equals it (the sliding layer's cache keeps its last
    W - 1 slots, which the export's full present holds), K/V quantization and the preset run."""
    from bench.coverage import evict_full, kv

    src, feeds = OPTIMUM / "gpt_oss_optimum_kv.onnx", dict(np.load(OPTIMUM / "gpt_oss_optimum_kv.npz"))
    ok, why = evict_full(src, feeds, tmp_path)
    assert ok and "windowed presents" in why, why
    ok, why = kv(src, feeds, tmp_path)
    assert ok, why
