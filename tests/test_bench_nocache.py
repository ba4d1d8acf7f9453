"""bench/nocache.py: the paired next-token metrics, the window split, and one configuration compiled by
the CLI and run on a no-cache decoder fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import MODELS, ROOT

sys.path.insert(0, str(ROOT))
from bench.nocache import (  # noqa: E402
    compare,
    compile_config,
    kv_bytes,
    last_logits,
    parse_configs,
    report_of,
    window_starts,
)


def test_compare_is_paired_and_zero_against_itself() -> None:
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(40, 11))
    targets = rng.integers(0, 11, 40)
    same = compare(dense, dense, targets)
    assert same["change"] == 0 and same["lo"] == 0 and same["hi"] == 0 and same["top1_agree"] == 1
    assert abs(same["kl"]) < 1e-12
    worse = dense.copy()
    worse[np.arange(40), targets] -= 1.0  # every target logit lower: a higher nll everywhere
    r = compare(dense, worse, targets)
    assert r["change"] > 0 and r["lo"] > 0 and r["kl"] > 0 and r["ppl"] > same["ppl"]


def test_window_split_is_disjoint() -> None:
    test, tune = window_starts(10_000, 512, 8, "test"), window_starts(10_000, 512, 8, "tune")
    assert len(test) == 8 and test[0] == 0 and max(tune) + 513 <= 10_000
    assert not set(test) & set(tune)


def test_parse_configs() -> None:
    assert parse_configs("t0.5=--token-keep 0.5 --kv-bits none; kv=--kv-bits 4+1 ;") == {
        "t0.5": ["--token-keep", "0.5", "--kv-bits", "none"], "kv": ["--kv-bits", "4+1"]}


def test_one_config_on_a_fixture(tmp_path: Path) -> None:
    """A pruned no-cache decoder's last-position logits: same shape as dense, cached by options."""
    src = MODELS / "gpt2_torchscript.onnx"
    out = compile_config(src, "t0.5", ["--token-keep", "0.5", "-q"], tmp_path)
    stamp = out.stat().st_mtime_ns
    assert compile_config(src, "t0.5", ["--token-keep", "0.5", "-q"], tmp_path).stat().st_mtime_ns == stamp
    ids = np.random.default_rng(1).integers(5, 400, (3, 100))
    dense, none = last_logits(ort.InferenceSession(str(src)), ids, batch=2)
    pruned, _ = last_logits(ort.InferenceSession(str(out)), ids, batch=2)
    assert dense.shape == pruned.shape == (3, 512) and np.isfinite(pruned).all() and none is None
    assert not np.allclose(dense, pruned)  # 100 tokens > the 64-token floor: tokens really dropped
    r = kv_bytes(report_of(out), 512, None)  # pruned tokens hold fewer K/V bytes; no LSB plane
    assert r["kv_bytes_msb"] == r["kv_bytes_all"] > 1 and "lsb_fraction" not in r


def test_kv_config_reports_bytes_at_the_measured_lsb_share(tmp_path: Path) -> None:
    """A K/V configuration with --kv-stats: the share of rows that re-read the LSB plane is read from
    the model, and the K/V byte ratio at that share lies between the report's MSB-only and all-rows
    ratios (bytes = MSB + share x LSB)."""
    src = MODELS / "gpt2_torchscript.onnx"
    out = compile_config(src, "kv6+4", ["--kv-bits", "6+4", "--no-token-pruning", "--kv-stats", "-q"], tmp_path)
    ids = np.random.default_rng(1).integers(5, 400, (3, 100))
    _, share = last_logits(ort.InferenceSession(str(out)), ids, batch=2)
    assert 0 < share < 1
    r = kv_bytes(report_of(out), 512, share)
    assert r["kv_bytes_all"] < r["kv_bytes"] < r["kv_bytes_msb"] and r["lsb_fraction"] == share
    msb, full = 1 / r["kv_bytes_msb"], 1 / r["kv_bytes_all"]
    assert 1 / r["kv_bytes"] == pytest.approx(msb + share * (full - msb))


def test_decode_bench_runs_a_floor_pair(tmp_path: Path) -> None:
    """bench/decode.py: a (method, budget, floor) pair runs through the shared prefill (its config is
    named <method>-f<N>, which is no METHODS key) and the floor holds: nothing evicted under it."""
    from bench.decode import compiled, run_context

    from spatten_compiler.decoding import DecoderSession

    src = MODELS / "llama_torchscript.onnx"
    sessions = {"dense": DecoderSession(src), "layer": DecoderSession(compiled("layer", tmp_path, src))}
    windows = np.random.default_rng(2).integers(5, 200, (2, 40))
    rows = run_context(sessions, windows, 40, 8, [0.5], [], pairs=[("layer-s4-r50", 0.5, 64),
                                                                   ("layer-s4-r50", 0.5, 0)])
    by = {r["method"]: r for r in rows}
    assert set(by) == {"dense", "layer-s4-r50-f64", "layer-s4-r50-f0"}
    assert by["layer-s4-r50-f64"]["cache_len"] == 39 and by["layer-s4-r50-f0"]["cache_len"] < 39
    assert abs(by["layer-s4-r50-f64"]["nll"] - by["dense"]["nll"]) < 1e-4  # under the floor: dense
