"""What onnxruntime's com.microsoft GroupQueryAttention CPU kernel offers KV eviction (docs/decoders.md,
"Fused GroupQueryAttention and eviction (session 20)"), pinned so an onnxruntime upgrade that changes
it is caught. One tiny GQA node (4 query heads, 2 KV heads, head size 16: the CPU kernel wants a
multiple of 16) against a numpy reference (non-interleaved rotary, causal softmax attention):

* ``position_ids`` (input 9) rotates the new token at its true position even when the past cache is
  shorter than that position (an evicted cache); without it the position is the cache length.
* ``qk_output=2`` (output 3) gives the softmax probabilities ``[B, num_heads, S, total_sequence_length]``;
  ``qk_output=1`` the scaled scores before softmax.
* ``past_present_share_buffer``: past and present bound (IOBinding) to the same ``[B, kv, max, Dh]``
  OrtValue; the new row is written in place at row ``seqlens_k``, rows after it are untouched, and
  ``output_qk`` still covers only ``total_sequence_length`` columns.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

B, N, KV, H, MAXPOS = 1, 4, 2, 16, 64
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
PAST, POSITION, CAPACITY = 5, 20, 32  # an evicted cache of 5 rows; the new token is the 21st


def _gqa(qk_output: int = 0, position_ids: bool = True, cache: str = "P") -> onnx.ModelProto:
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    ins = [helper.make_tensor_value_info(n, f, [B, "S", w * H]) for n, w in (("q", N), ("k", KV), ("v", KV))]
    ins += [helper.make_tensor_value_info(n, f, [B, KV, cache, H]) for n in ("past_key", "past_value")]
    ins += [helper.make_tensor_value_info("seqlens_k", i32, [B]), helper.make_tensor_value_info("total", i32, []),
            helper.make_tensor_value_info("cos", f, [MAXPOS, H // 2]),
            helper.make_tensor_value_info("sin", f, [MAXPOS, H // 2])]
    names = [i.name for i in ins]
    if position_ids:
        ins.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, "S"]))
        names.append("position_ids")
    outs = ["out", "present_key", "present_value"] + (["qk"] if qk_output else [])
    attrs = {"num_heads": N, "kv_num_heads": KV, "do_rotary": 1} | ({"qk_output": qk_output} if qk_output else {})
    node = helper.make_node("GroupQueryAttention", names, outs, domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "gqa", ins, [helper.make_tensor_value_info(o, f, None) for o in outs])
    return helper.make_model(graph, opset_imports=OPSETS)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


ANGLES = np.outer(np.arange(MAXPOS), 1.0 / 10000 ** (np.arange(0, H, 2) / H))
COS, SIN = np.cos(ANGLES).astype(np.float32), np.sin(ANGLES).astype(np.float32)


def _rotate(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    c, s, x1, x2 = COS[pos], SIN[pos], x[..., :H // 2], x[..., H // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _reference(f: dict, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(output, present_key, scaled scores, probabilities) of one decode step at position ``pos``."""
    heads = lambda x, n: x.reshape(B, -1, n, H).transpose(0, 2, 1, 3)  # noqa: E731
    q, k = _rotate(heads(f["q"], N), pos), _rotate(heads(f["k"], KV), pos)
    keys = np.concatenate([f["past_key"], k], 2)
    values = np.concatenate([f["past_value"], heads(f["v"], KV)], 2)
    scores = q @ np.repeat(keys, N // KV, 1).transpose(0, 1, 3, 2) / np.sqrt(H)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ np.repeat(values, N // KV, 1)).transpose(0, 2, 1, 3).reshape(B, 1, N * H)
    return out, keys, scores, p


@pytest.fixture()
def feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"q": r(B, 1, N * H), "k": r(B, 1, KV * H), "v": r(B, 1, KV * H),
            "past_key": r(B, KV, PAST, H), "past_value": r(B, KV, PAST, H),
            "seqlens_k": np.array([PAST], np.int32), "total": np.array(PAST + 1, np.int32), "cos": COS, "sin": SIN,
            "position_ids": np.array([[POSITION]], np.int64)}


def test_position_ids_rotate_at_the_true_position_past_an_evicted_cache(feeds):
    out, present, _ = _session(_gqa()).run(None, feeds)
    ref_out, ref_keys, _, _ = _reference(feeds, np.array([POSITION]))
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(present, ref_keys, atol=1e-5)  # the new key row is stored rotated at POSITION


def test_without_position_ids_the_position_is_the_cache_length(feeds):
    feeds.pop("position_ids")
    out = _session(_gqa(position_ids=False)).run(None, feeds)[0]
    np.testing.assert_allclose(out, _reference(feeds, np.array([PAST]))[0], atol=1e-5)
    assert np.abs(out - _reference(feeds, np.array([POSITION]))[0]).max() > 1e-2


@pytest.mark.parametrize("qk_output, column", [(1, 2), (2, 3)])  # 1: scaled scores; 2: probabilities
def test_output_qk(feeds, qk_output, column):
    qk = _session(_gqa(qk_output)).run(None, feeds)[3]
    expected = _reference(feeds, np.array([POSITION]))[column]
    assert qk.shape == (B, N, 1, PAST + 1)  # [B, num_heads, S, total_sequence_length]
    np.testing.assert_allclose(qk, expected, atol=1e-5)


def test_share_buffer_under_iobinding_writes_in_place(feeds):
    sess = _session(_gqa(qk_output=2, cache="M"))
    buffers = {}
    for name in ("key", "value"):
        buf = np.full((B, KV, CAPACITY, H), 99.0, np.float32)  # rows past the cache hold garbage
        buf[:, :, :PAST] = feeds[f"past_{name}"]
        buffers[name] = ort.OrtValue.ortvalue_from_numpy(buf)
    io = sess.io_binding()
    for name, value in feeds.items():
        if not name.startswith("past_"):
            io.bind_cpu_input(name, value)
    for name, value in buffers.items():
        io.bind_ortvalue_input(f"past_{name}", value)
        io.bind_ortvalue_output(f"present_{name}", value)
    io.bind_output("out")
    io.bind_output("qk")
    pointer = buffers["key"].data_ptr()
    sess.run_with_iobinding(io)
    present_key, _, out, qk = io.get_outputs()
    assert present_key.data_ptr() == pointer and present_key.shape() == [B, KV, CAPACITY, H]
    ref_out, ref_keys, _, ref_p = _reference(feeds, np.array([POSITION]))
    key = buffers["key"].numpy()
    np.testing.assert_allclose(out.numpy(), ref_out, atol=1e-5)
    np.testing.assert_allclose(key[:, :, :PAST + 1], ref_keys, atol=1e-5)
    assert (key[:, :, PAST + 1:] == 99.0).all()
    assert qk.shape() == [B, N, 1, PAST + 1]
    np.testing.assert_allclose(qk.numpy(), ref_p, atol=1e-5)
