"""bench/latency.py's timing schedules: every model is timed `repeats` times per input, in the stated
order (the protocol the recorded results name), and how the benchmark sessions spin."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bench import common
from bench.latency import CYCLE_BLOCK, ORDERS, build_parser, spin_text


@pytest.mark.parametrize("order", list(ORDERS))
def test_every_model_timed_repeats_times(order: str) -> None:
    for i in range(4):
        runs = list(ORDERS[order](3, 5, i))
        timed = collections.Counter(j for j, _, t in runs if t)
        assert timed == {0: 5, 1: 5, 2: 5}
        assert all(sorted(r for j2, r, t in runs if t and j2 == j) == list(range(5)) for j in range(3))


def test_interleaved_never_runs_a_model_twice_in_a_row() -> None:
    runs = [j for j, _, _ in ORDERS["interleaved"](3, 4, 1)]
    assert all(a != b for a, b in zip(runs, runs[1:]))


def test_blocked_warms_each_model_then_runs_it_back_to_back() -> None:
    runs = list(ORDERS["blocked"](3, 2, 1))
    assert runs == [(1, -1, False), (1, 0, True), (1, 1, True), (2, -1, False), (2, 0, True), (2, 1, True),
                    (0, -1, False), (0, 0, True), (0, 1, True)]


def test_cycled_visits_each_model_in_short_warm_blocks() -> None:
    runs = list(ORDERS["cycled"](2, 4, 0))  # CYCLE_BLOCK = 3: visits of 3, then 1
    assert CYCLE_BLOCK == 3
    assert runs == [(0, -1, False), (0, 0, True), (0, 1, True), (0, 2, True), (1, -1, False), (1, 0, True),
                    (1, 1, True), (1, 2, True), (1, -1, False), (1, 3, True), (0, -1, False), (0, 3, True)]


def _identity(tmp_path) -> str:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


@pytest.mark.parametrize(("spin", "spin_idle", "allow", "stop"), [
    (False, False, "0", ""),   # no spinning at all
    (True, False, "", "1"),    # --spin: spin during a run, stop when it returns
    (True, True, "", ""),      # --spin --spin-idle: onnxruntime's default (idle sessions keep spinning)
])
def test_sessions_spin_only_while_they_run(tmp_path, spin, spin_idle, allow, stop) -> None:
    sess = common.make_session(_identity(tmp_path), 2, spin=spin, spin_idle=spin_idle)
    so = sess.get_session_options()

    def entry(key: str) -> str:  # "" for a key the options do not set
        try:
            return so.get_session_config_entry(key)
        except RuntimeError:
            return ""

    assert entry("session.intra_op.allow_spinning") == allow
    assert entry("session.force_spinning_stop") == stop


def test_spin_protocol_is_named_in_results() -> None:
    args = build_parser().parse_args(["--dense", "d.onnx", "--spin"])
    assert (args.spin, args.spin_idle) == (True, False)
    assert spin_text({"spin": True, "spin_idle": False}) == "spinning during runs (stopped when a run returns)"
    assert spin_text({"spin": True}).startswith("spinning during and between runs")  # results before spin_idle
    assert spin_text({"spin": False, "spin_idle": True}) == "no spinning"


def test_run_paired_speedup_is_the_ratio_under_common_drift() -> None:
    from bench.latency import paired_runs

    # model 1 is 3x faster; the machine's speed drifts run by run (both models' r-th runs alike), and
    # one of model 1's runs is preempted
    drift = np.array([1.0, 1.3, 2.0, 1.1, 0.9, 1.6, 1.0])
    times = np.stack([30.0 * drift, 10.0 * drift])[:, None, :]
    times[1, 0, 2] *= 5
    assert paired_runs(times, 0, 1) == pytest.approx(3.0)
    assert paired_runs(times, 1, 0) == pytest.approx(1 / 3.0)


def test_vs_ort_pairs_each_composition_with_its_own_dense_run_by_run() -> None:
    from bench.vs_ort import _pairs

    labels = ["dense-raw", "pruned-raw", "dense-optimized", "pruned-optimized"]
    base = np.array([[40.0, 80.0], [20.0, 40.0], [36.0, 72.0], [12.0, 24.0]])  # 1 input x 2 repeats each
    res = {"models": [{"label": a, "median_ms": float(np.median(t)), "flop_ratio": 3.0 if a == "pruned-raw" else None}
                      for a, t in zip(labels, base, strict=True)],
           "times_ms": base[:, None, :].tolist()}
    pairs, ratio = _pairs(res, ["raw", "optimized"])
    assert ratio == 3.0
    opt = pairs[1]
    assert opt["run_paired"]["speedup_vs_own_dense"] == pytest.approx(3.0)
    assert opt["run_paired"]["fraction_of_ideal"] == pytest.approx(1.0)
    assert opt["run_paired"]["pruned_vs_raw_fp32"] == pytest.approx(40.0 / 12.0)
    assert opt["speedup_vs_own_dense"] == pytest.approx(54.0 / 18.0)
