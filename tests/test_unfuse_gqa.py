"""unfuse-ort on onnxruntime-genai's model-builder ops: GroupQueryAttention and RotaryEmbedding
decomposed into standard ops, equal to onnxruntime's kernels; the builder's models (committed tiny
Llama from a real builder run, models/builder/) discovered, evicted and quantized."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, run_ort
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.unfuse_ort import UnfuseOrt

from spatten_compiler.errors import OptionError
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline, make_pass

BUILDER = MODELS / "builder"
N, KV, H, MAXPOS = 4, 2, 16, 32  # GroupQueryAttention's CPU kernel: head size % 16 == 0
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
SHAPES = [(2, 0, 5), (1, 3, 1), (2, 4, 1), (1, 4, 3)]  # (batch, past, new): GQA wants batch 1 for S > 1 with past


def _gqa_model(packed: bool = True, rotary: int = H, softcap: float = 0.0, window: int = -1, past: bool = True,
               interleaved: int = 0, h: int = H, sink: str = "") -> onnx.ModelProto:
    """``sink``: "" | head_sink (a per-head sink logit, GPT-OSS) | smooth (smooth_softmax: sink 0)."""
    H = h  # noqa: N806 - the head size of this model
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    ins = ([helper.make_tensor_value_info("qkv", f, ["B", "S", (N + 2 * KV) * H])] if packed else
           [helper.make_tensor_value_info(n, f, ["B", "S", w * H]) for n, w in (("q", N), ("k", KV), ("v", KV))])
    if past:
        ins += [helper.make_tensor_value_info(n, f, ["B", KV, "P", H]) for n in ("past_k", "past_v")]
    ins += [helper.make_tensor_value_info("seqlens_k", i32, ["B"]), helper.make_tensor_value_info("total", i32, [])]
    rng = np.random.default_rng(1)
    inits, rot = [], []
    if rotary:
        angles = np.arange(MAXPOS)[:, None] * rng.uniform(0.1, 1.0, rotary // 2)[None]
        inits = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
                 numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
        rot = ["cos", "sin"]
    node = helper.make_node(
        "GroupQueryAttention", ["qkv", "", ""] if packed else ["q", "k", "v"], ["y", "present_k", "present_v"],
        domain="com.microsoft", num_heads=N, kv_num_heads=KV, do_rotary=int(bool(rotary)), softcap=softcap,
        local_window_size=window, rotary_interleaved=interleaved, smooth_softmax=int(sink == "smooth"))
    node.input.extend(["past_k", "past_v"] if past else ["", ""])
    node.input.extend(["seqlens_k", "total", *rot])
    if sink == "head_sink":
        node.input.extend([""] * (11 - len(node.input)) + ["head_sink"])
        inits.append(numpy_helper.from_array(np.array([0.5, -1.0, 2.0, 0.0], np.float32), "head_sink"))
    outs = [helper.make_tensor_value_info("y", f, ["B", "S", N * H]),
            helper.make_tensor_value_info("present_k", f, ["B", KV, "T", H]),
            helper.make_tensor_value_info("present_v", f, ["B", KV, "T", H])]
    graph = helper.make_graph([node], "gqa", ins, outs, inits)
    return helper.make_model(graph, opset_imports=OPSETS)


def _feeds(b: int, p: int, s: int, packed: bool = True, h: int = H) -> dict[str, np.ndarray]:
    H = h  # noqa: N806
    rng = np.random.default_rng(b * 100 + p * 10 + s)
    feeds = ({"qkv": rng.standard_normal((b, s, (N + 2 * KV) * H)).astype(np.float32)} if packed else
             {n: rng.standard_normal((b, s, w * H)).astype(np.float32) for n, w in (("q", N), ("k", KV), ("v", KV))})
    feeds.update(past_k=rng.standard_normal((b, KV, p, H)).astype(np.float32),
                 past_v=rng.standard_normal((b, KV, p, H)).astype(np.float32),
                 seqlens_k=np.full(b, p + s - 1, np.int32), total=np.array(p + s, np.int32),
                 position_ids=np.tile(np.arange(p, p + s), (b, 1)).astype(np.int64))
    return feeds


def _unfused(proto: onnx.ModelProto, tmp_path, name: str = "unfused.onnx"):
    src = tmp_path / "src.onnx"
    onnx.save(proto, str(src))
    model = load_model(src)
    Pipeline([make_pass("unfuse-ort")], check=True)(model)
    out = tmp_path / name
    save_model(model, out, external_data=False)
    return src, out, model


def _assert_same(src, out, feeds, atol=1e-5):
    want, got = run_ort(src, feeds), run_ort(out, feeds)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=atol, rtol=0, err_msg=k)


@pytest.mark.parametrize("variant", [
    {}, {"packed": False}, {"rotary": 16, "h": 32}, {"rotary": 0}, {"softcap": 5.0}, {"sink": "head_sink"},
    {"sink": "smooth"}])
def test_gqa_decomposed_equals_onnxruntime(tmp_path, variant) -> None:
    """head_sink / smooth_softmax become a sink column beside the scores (GPT-OSS's form): found as such."""
    src, out, model = _unfused(_gqa_model(**variant), tmp_path)
    assert not any(n.domain == "com.microsoft" for n in model.graph)
    if "sink" in variant:
        Normalize()(model)
        assert [s.variant.get("sink") for s in find_attention(model).sites] == ["after"]
    for b, p, s in SHAPES:
        _assert_same(src, out, _feeds(b, p, s, variant.get("packed", True), variant.get("h", H)))


def test_gqa_local_window_without_past(tmp_path) -> None:
    src, out, _ = _unfused(_gqa_model(window=2, past=False), tmp_path)
    for b, s in ((1, 6), (2, 3)):
        feeds = _feeds(b, 0, s)
        _assert_same(src, out, {k: v for k, v in feeds.items() if not k.startswith("past")})


@pytest.mark.parametrize(("variant", "why"), [({"interleaved": 1}, "interleaved rotary"),
                                              ({"window": 4}, "local window")])
def test_gqa_refusals_name_the_reason(tmp_path, variant, why) -> None:
    with pytest.raises(OptionError, match=why) as e:
        _unfused(_gqa_model(**variant), tmp_path)
    assert "\n" not in str(e.value)


def _rotary_model(rank: int, offset: bool) -> onnx.ModelProto:
    f = TensorProto.FLOAT
    shape = ["B", "S", N * H] if rank == 3 else ["B", N, "S", H]
    pos = helper.make_tensor_value_info("pos", TensorProto.INT64, [1] if offset else ["B", "S"])
    rng = np.random.default_rng(2)
    angles = np.arange(MAXPOS)[:, None] * rng.uniform(0.1, 1.0, H // 2)[None]
    inits = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain="com.microsoft",
                            **({"num_heads": N} if rank == 3 else {}))
    graph = helper.make_graph([node], "rope", [helper.make_tensor_value_info("x", f, shape), pos],
                              [helper.make_tensor_value_info("y", f, shape)], inits)
    return helper.make_model(graph, opset_imports=OPSETS)


@pytest.mark.parametrize(("rank", "offset"), [(3, False), (3, True), (4, False)])
def test_rotary_embedding_decomposed_equals_onnxruntime(tmp_path, rank, offset) -> None:
    src, out, _ = _unfused(_rotary_model(rank, offset), tmp_path)
    rng = np.random.default_rng(3)
    b, s = 2, 5
    x = rng.standard_normal((b, s, N * H) if rank == 3 else (b, N, s, H)).astype(np.float32)
    pos = np.array([3], np.int64) if offset else rng.integers(0, MAXPOS, (b, s)).astype(np.int64)
    _assert_same(src, out, {"x": x, "pos": pos})


def _builder(precision: str):
    path = BUILDER / f"llama_{precision}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not generated (python models/_genai.py fixtures)")
    return path


def _decode_ref(path, ids: np.ndarray, prefill: int, layers: int = 2) -> list[np.ndarray]:
    """The builder's model stepped with a concatenated cache (attention_mask all ones)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    cache = {f"past_key_values.{i}.{t}": np.zeros((1, KV, 0, H), np.float32)
             for i in range(layers) for t in ("key", "value")}
    logits, n = [], 0
    for chunk in [ids[:prefill], *[ids[j:j + 1] for j in range(prefill, len(ids))]]:
        n += len(chunk)
        feeds = {"input_ids": chunk[None], "attention_mask": np.ones((1, n), np.int64), **cache}
        out = dict(zip(names, sess.run(None, feeds)))
        cache = {k: out[k.replace("past_key_values", "present")] for k in cache}
        logits.append(out["logits"])
    return logits


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_builder_model_discovered(precision) -> None:
    model = load_model(_builder(precision))
    UnfuseOrt()(model)
    Normalize()(model)
    sites = find_attention(model).sites
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites] == [(N, KV, H)] * 2
    assert all(s.k.cache is not None and s.k.cache.present is not None and s.rope for s in sites)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_builder_model_as_written(precision) -> None:
    """The builder's own file, not decomposed: its fused GroupQueryAttention reads one packed QKV
    input, so the head size is width / (heads + 2 KV heads); its cache inputs leave the head size
    symbolic (``kv_cache_dim``), and a DecoderSession takes it from those sites and runs the model."""
    from spatten_compiler.decoding import DecoderSession

    sites = find_attention(load_model(_builder(precision))).sites
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites] == [(N, KV, H)] * 2
    d = DecoderSession(_builder(precision))
    assert all(dims[1:] == [KV, None, H] for _, dims in d.state.values())
    ids = np.random.default_rng(4).integers(3, 48, 10).astype(np.int64)
    want = _decode_ref(_builder(precision), ids, 6)
    got = [d.step(ids[None, :6])] + [d.step(ids[None, j:j + 1]) for j in range(6, len(ids))]
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_builder_model_gets_the_decoder_preset(tmp_path, precision, capsys) -> None:
    """``spattenc builder.onnx -o out.onnx``: the fused GroupQueryAttention is a KV-cache decoder, so the
    no-option compile applies the decoder preset (it was taken for an encoder and refused)."""
    from spatten_compiler.cli import main

    out = tmp_path / "out.onnx"
    assert main([str(_builder(precision)), "-o", str(out)]) == 0
    assert "preset default for a decoder (KV cache)" in capsys.readouterr().err
    inputs = {i.name for i in onnx.load(str(out), load_external_data=False).graph.input}
    assert {"past_importance.0", "past_positions.0", "position_ids"} <= inputs


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_builder_model_eviction(tmp_path, precision) -> None:
    """--kv-budget 1.0 on the builder's model gives its logits at every step; 0.5 keeps half and
    onnxruntime agrees with the reference runtime (fp32)."""
    from bench.coverage import float_activations  # int4: float activations isolate the decomposition
    from spatten_compiler.decoding import DecoderSession

    path = float_activations(_builder(precision), tmp_path)
    ids = np.random.default_rng(4).integers(3, 48, 14).astype(np.int64)
    want = _decode_ref(path, ids, 8)
    for budget in (1.0, 0.5):
        model = load_model(path)
        Pipeline([make_pass("unfuse-ort"), make_pass("normalize"), make_pass("decompose-attention"),
                  make_pass("evict-kv", budget=budget)], check=True)(model)
        out = tmp_path / f"evict{budget}.onnx"
        save_model(model, out, external_data=False)
        runtimes = ("ort", "reference") if budget < 1 and precision == "fp32" else ("ort",)
        got = {}
        for rt in runtimes:
            d = DecoderSession(out, runtime=rt)
            got[rt] = [d.step(ids[None, :8])] + [d.step(ids[None, j:j + 1]) for j in range(8, len(ids))]
            if budget == 1.0:
                for a, b in zip(want, got[rt]):
                    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
            else:
                assert d.cache_lengths() == [int(np.ceil(0.5 * len(ids)))] * 2
        if "reference" in got:
            for a, b in zip(got["ort"], got["reference"]):
                np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


def test_builder_int4_head_pruning_runs(tmp_path) -> None:
    """Refused until session 15 (MatMulNBits projections); now the kept heads' int4 blocks are sliced
    (exactness and refusals: tests/test_prune_heads_nbits.py)."""
    model = load_model(_builder("int4"))
    Pipeline([make_pass("unfuse-ort"), make_pass("normalize"), make_pass("decompose-attention"),
              make_pass("prune-heads", keep=0.5, unpruned=0.0, rule="paper")], check=True)(model)
    save_model(model, tmp_path / "heads.onnx", external_data=False)
    rng = np.random.default_rng(5)
    feeds = {"input_ids": rng.integers(3, 48, (1, 4)).astype(np.int64), "attention_mask": np.ones((1, 7), np.int64),
             "position_ids": np.arange(3, 7)[None].astype(np.int64),
             **{f"past_key_values.{i}.{t}": rng.standard_normal((1, KV, 3, H)).astype(np.float32)
                for i in range(2) for t in ("key", "value")}}
    got = run_ort(tmp_path / "heads.onnx", feeds)
    assert got["logits"].shape == (1, 4, 48) and np.isfinite(got["logits"]).all()


def test_builder_fp32_heads_and_kv_bits_exact_at_keep_1(tmp_path) -> None:
    path = _builder("fp32")
    rng = np.random.default_rng(5)
    feeds = {"input_ids": rng.integers(3, 48, (1, 4)).astype(np.int64), "attention_mask": np.ones((1, 7), np.int64),
             "position_ids": np.arange(3, 7)[None].astype(np.int64),
             **{f"past_key_values.{i}.{t}": rng.standard_normal((1, KV, 3, H)).astype(np.float32)
                for i in range(2) for t in ("key", "value")}}
    model = load_model(path)
    Pipeline([make_pass("unfuse-ort"), make_pass("normalize"), make_pass("decompose-attention"),
              make_pass("prune-heads", keep=1.0)], check=True)(model)
    out = tmp_path / "heads.onnx"
    save_model(model, out, external_data=False)
    _assert_same(path, out, feeds)
