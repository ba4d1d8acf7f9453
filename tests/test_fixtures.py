"""Every committed fixture loads, passes onnx.checker, and reproduces its torch reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, fixture_names, load_meta, reference_io, run_ort

from spatten_compiler.modelio import load_model


def test_there_are_fixtures() -> None:
    assert len(fixture_names()) >= 8


@pytest.mark.parametrize("name", fixture_names())
def test_fixture_matches_torch_reference(name: str) -> None:
    path = MODELS / f"{name}.onnx"
    assert path.stat().st_size < 2_500_000, "fixtures stay small"
    onnx.checker.check_model(str(path), full_check=True)
    load_model(path)
    meta = load_meta(name)
    feeds, expected = reference_io(meta)
    got = run_ort(path, feeds)
    assert set(meta["outputs"]) <= set(got)
    for key, want in expected.items():
        np.testing.assert_allclose(got[key], want, atol=1e-4, rtol=0, err_msg=f"{name}:{key}")
