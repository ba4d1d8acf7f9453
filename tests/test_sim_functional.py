"""Functional mode == the reference runtime's SpAtten ops on the same Q, K, V: kept tokens, kept
heads, LSB refetch rows exactly; attention outputs within 1e-4. The expected side is built from
``spatten_compiler.runtime`` (TokenImportance, TokenSelect, HeadImportance, HeadSelect,
LowConfidence, DequantizeMSB / DequantizeSplit, LocalValuePrune)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from spatten_compiler.runtime import head_ops, quant_ops, spatten_ops

from spatten_compiler.backend.opcodes import FIXED
from spatten_compiler.sim.engine import simulate
from spatten_compiler.sim.functional import AttentionData, Functional, quantize_planes
from spatten_compiler.sim.workload import Quant, Workload, attention_stream

H, D = 4, 8


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _fixed(x: float) -> float:
    return math.ceil(x * FIXED) / FIXED


def reference(data: list[AttentionData], w: Workload, past: int) -> dict:
    """The same pass with the runtime's op implementations (one pass, cascade over layers)."""
    q_rows = w.query_rows[0]
    live = np.arange(q_rows)  # query rows
    keys = np.arange(w.context[0])
    heads = np.arange(H)
    token_acc, head_acc = np.zeros(w.context[0], np.float32), np.zeros(H, np.float32)
    out = {"tokens": [], "heads": [], "lsb": [], "outputs": []}
    thr = np.float32(_fixed(w.quant.threshold))
    for layer, d in enumerate(data):
        k_keep, h_keep = w.keys[0][layer], w.kept_heads[0][layer]
        pool = keys if q_rows < w.context[0] else live
        if k_keep < pool.size:
            sel, _ = spatten_ops.TokenSelect._run(None, token_acc[pool][None], np.ones((1, pool.size)),
                                                  np.zeros((1, pool.size)), np.array([k_keep]), np.array([k_keep]))
            pool = pool[sel[0]]
            out["tokens"].append(pool)
            if q_rows < w.context[0]:
                keys = pool
            else:
                live = keys = pool
        elif q_rows == w.context[0]:
            keys = live
        if h_keep < heads.size:
            heads = head_ops.HeadSelect._run(None, head_acc, heads, np.array([h_keep]))[0]
            out["heads"].append(heads)
        kp = quantize_planes(d.k, w.quant.k_msb, w.quant.k_lsb)
        vp = quantize_planes(d.v, w.quant.v_bits, 0)
        o = np.zeros_like(d.q)
        for h in heads:
            s_, step = kp.scale[h], np.float32(kp.step)
            k_msb = quant_ops.dequantize_msb(kp.msb[keys, h], s_, step)
            k_full = quant_ops.DequantizeSplit._run(None, kp.msb[keys, h], kp.lsb[keys, h], s_, step)[0]
            v = quant_ops.Dequantize._run(None, vp.msb[keys, h], vp.scale[h])[0]
            q = d.q[live, h]
            mask = keys[None, :] > (past + live)[:, None]
            p_msb = _softmax(np.where(mask, -np.inf, q @ k_msb.T / np.float32(np.sqrt(D))))
            p_full = _softmax(np.where(mask, -np.inf, q @ k_full.T / np.float32(np.sqrt(D))))
            low = quant_ops.LowConfidence._run(None, p_msb.astype(np.float32), thr)[0][:, 0]
            out["lsb"].append((layer, int(h), int(low.sum())))
            p = np.where(low[:, None], p_full, p_msb).astype(np.float32)
            token_acc[keys] += spatten_ops.TokenImportance._run(None, p[None, None], np.ones((1, live.size)))[0][0]
            if w.value_keep < 1:
                p = head_ops.LocalValuePrune._run(None, p, np.float32(_fixed(w.value_keep)))[0]
            o[live, h] = p @ v
            head_acc[h] += np.abs(o[live, h]).sum()
        out["outputs"].append(o)
    return out


def run_both(w: Workload, seed: int) -> tuple[Functional, dict]:
    rng = np.random.default_rng(seed)
    t, rows = w.context[0], w.query_rows[0]
    data = [AttentionData(2 * rng.standard_normal((rows, H, D)).astype(np.float32),
                          2 * rng.standard_normal((t, H, D)).astype(np.float32),
                          rng.standard_normal((t, H, D)).astype(np.float32)) for _ in range(w.layers)]
    f = Functional(data)
    simulate(attention_stream(w), decide=f)
    return f, reference(data, w, t - rows)


@pytest.mark.parametrize("seed", range(4))
def test_prompt_cascade_tokens_heads_and_lsb_match_the_runtime(seed: int) -> None:
    w = Workload("f", 3, H, D, [24], [24], [[24, 12, 6]], [[4, 3, 2]], 1.0, Quant(6, 4, 6, 16, 0.3, True), 24)
    f, ref = run_both(w, seed)
    assert [k.tolist() for k in f.kept_tokens] == [k.tolist() for k in ref["tokens"]]
    assert [k.tolist() for k in f.kept_heads] == [k.tolist() for k in ref["heads"]]
    assert f.lsb_log == ref["lsb"]
    assert sum(n for *_, n in f.lsb_log) > 0  # the threshold makes some rows refetch
    for layer, expect in enumerate(ref["outputs"]):
        np.testing.assert_allclose(f.out[layer], expect, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_generation_step_with_local_value_pruning_matches_the_runtime(seed: int) -> None:
    w = Workload("g", 2, H, D, [40], [1], [[30, 10]], [[4, 2]], 0.5, Quant(6, 4, 6, 16, 0.3, True), 40)
    f, ref = run_both(w, seed)
    assert [k.tolist() for k in f.kept_tokens] == [k.tolist() for k in ref["tokens"]]
    assert [k.tolist() for k in f.kept_heads] == [k.tolist() for k in ref["heads"]]
    assert f.lsb_log == ref["lsb"]
    for layer, expect in enumerate(ref["outputs"]):
        np.testing.assert_allclose(f.out[layer], expect, atol=1e-4)


def test_functional_decisions_drive_the_timing() -> None:
    w = Workload("g", 2, H, D, [40], [1], [[30, 10]], [[4, 2]], 0.5, Quant(6, 4, 6, 16, 1.0, True), 40)
    rng = np.random.default_rng(0)
    data = [AttentionData(*(rng.standard_normal((n, H, D)).astype(np.float32) for n in (1, 40, 40)))
            for _ in range(2)]
    f = Functional(data)
    r = simulate(attention_stream(w), decide=f)
    # threshold 1.0: every row refetches LSBs, whatever the default fraction says
    assert r.counters["rows_lsb"] == r.counters["rows"] == 4 + 2
    assert r.counters["rows_k_lsb"] == 4 * 30 + 2 * 10
