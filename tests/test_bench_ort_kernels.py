"""bench/ort_kernels: each case times two models that compute the same values (else its ratio would
compare different work)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from bench.ort_kernels import CASES


@pytest.mark.parametrize("case", list(CASES))
def test_both_sides_of_a_case_compute_the_same(case: str) -> None:
    build = CASES[case][0]
    pair = build(16, 32 if case == "skip-layer-norm" else 4, np.random.default_rng(0))
    flat = []
    for model, feeds in pair:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        flat.append(np.concatenate([o.ravel() for o in sess.run(None, feeds)]))
    if case == "softmax-range":  # the same op on clipped scores: the point is the speed, not the values
        assert flat[0].shape == flat[1].shape
    else:
        np.testing.assert_allclose(flat[0], flat[1], rtol=1e-4, atol=1e-5)
