"""Every command on a model with external data, run from a working directory other than the model's,
at a path with spaces and non-ASCII characters (issue #16: the checker looked for the data file
relative to the working directory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort

FOLDERS = ("elsewhere", "dir with späces/ünï ćode")

# (fixture, flags): one compile per option family, each at a setting that keeps the model exact.
CASES = [
    ("bert_dynamo", ["--no-token-pruning", "--kv-bits", "none"]),  # the identity (no options = the preset)
    ("bert_dynamo", ["--token-keep", "1.0"]),
    ("bert_dynamo", ["--head-keep", "1.0"]),
    ("bert_dynamo", ["--value-keep", "1.0"]),
    ("bert_dynamo", ["--token-keep", "1.0", "--prune-min-length", "4"]),
    ("bert_dynamo", ["--kv-bits", "8+4", "--lsb-threshold", "0"]),
    ("llama_dynamo", ["--head-keep", "1.0"]),
]


def _spattenc(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spatten_compiler", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _external_copy(name: str, folder: Path) -> Path:
    """The fixture saved as onnx.save does it for a user: every tensor in a data file beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name} ü.onnx"
    onnx.save(onnx.load(str(MODELS / f"{name}.onnx")), path, save_as_external_data=True, size_threshold=0)
    assert [p for p in folder.iterdir() if p.suffix != ".onnx"], "no external data file was written"
    return path


@pytest.mark.parametrize("folder", FOLDERS)
def test_inspect_from_another_directory(folder: str, tmp_path: Path) -> None:
    model = _external_copy("bert_dynamo", tmp_path / folder)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = _spattenc(cwd, "inspect", str(model), "--explain")
    assert r.returncode == 0, r.stderr
    assert "4 attention sites" in r.stdout
    # A relative path from yet another directory works too.
    r = _spattenc(model.parent.parent, "inspect", str(Path(model.parent.name) / model.name), "--json")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize(("name", "flags"), CASES, ids=[f"{n}:{' '.join(f) or 'identity'}" for n, f in CASES])
def test_compile_from_another_directory(name: str, flags: list[str], folder: str, tmp_path: Path) -> None:
    model = _external_copy(name, tmp_path / folder)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / folder / "out put ö.onnx"
    r = _spattenc(cwd, str(model), "-o", str(out), "-q", *flags)
    assert r.returncode == 0, r.stderr
    feeds, _ = reference_io(load_meta(name))
    before, after = run_ort(MODELS / f"{name}.onnx", feeds), run_ort(out, feeds)
    quantized = "--kv-bits" in flags and flags[flags.index("--kv-bits") + 1] != "none"
    atol = 1e-2 if quantized else 1e-5  # quantized K/V is close, not exact
    for key, want in before.items():
        np.testing.assert_allclose(after[key], want, atol=atol, rtol=0)


def test_head_calibration_from_another_directory(tmp_path: Path) -> None:
    model = _external_copy("bert_dynamo", tmp_path / FOLDERS[1])
    feeds, _ = reference_io(load_meta("bert_dynamo"))
    calib = tmp_path / FOLDERS[1] / "calib ü.npz"
    np.savez(calib, **feeds)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / FOLDERS[1] / "calibrated.onnx"
    r = _spattenc(cwd, str(model), "-o", str(out), "-q", "--head-keep-schedule", "1", "--head-calibration", str(calib))
    assert r.returncode == 0, r.stderr
    before, after = run_ort(MODELS / "bert_dynamo.onnx", feeds), run_ort(out, feeds)
    for key, want in before.items():
        np.testing.assert_allclose(after[key], want, atol=1e-5, rtol=0)
