"""bench/latency.py's timing schedules: every model is timed `repeats` times per input, in the stated
order (the protocol the recorded results name)."""

from __future__ import annotations

import collections

import pytest

from bench.latency import CYCLE_BLOCK, ORDERS


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
