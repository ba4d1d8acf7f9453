"""Bounded memory: a compile never holds two copies of a weight (issue #19).

With a small size threshold (as the > 2 GB path test does with ``threshold=0``), every weight of a
fixture is memory-mapped from the input file instead of parsed into memory; the test then checks
that no weight's bytes are ever copied into Python memory (``ExternalTensor.tobytes``), that every
weight that reaches the output unchanged is copied file to file (``ExternalTensor.tofile``), and
that the output still computes what the input computed. A second test measures it: the peak
resident memory of a real ``spattenc`` process on a model with 128 MB of weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort
from onnx import TensorProto, helper, numpy_helper

from spatten_compiler import lazyproto, weightio
from spatten_compiler.cli import main

IDENTITY = ["--no-token-pruning", "--kv-bits", "none"]  # no options at all = the default preset
CASES = [
    ("bert_torchscript", []),
    ("bert_torchscript", IDENTITY),
    ("bert_torchscript", ["--token-keep", "0.5"]),
    ("bert_torchscript", ["--head-keep", "0.5"]),
    ("bert_torchscript", ["--kv-bits", "4+4"]),
    ("llama_torchscript", ["--head-keep", "0.5"]),
    ("llama_torchscript", ["--kv-bits", "4+4"]),
]


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}{''.join(o)}" for n, o in CASES])
def test_compile_never_copies_a_weight(name: str, options: list[str], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazyproto, "MIN_LAZY_BYTES", 1024)  # above the checker's 1000-byte limit
    monkeypatch.setattr(weightio, "MIN_STREAM_BYTES", 1024)
    copied: list[str] = []
    streamed: list[str] = []
    real_tofile = ir.ExternalTensor.tofile

    def tobytes(self: ir.ExternalTensor) -> bytes:
        copied.append(self.name)
        raise AssertionError(f"weight {self.name!r} copied into memory")

    def tofile(self: ir.ExternalTensor, file: object) -> None:
        streamed.append(self.name)
        real_tofile(self, file)

    monkeypatch.setattr(ir.ExternalTensor, "tobytes", tobytes)
    monkeypatch.setattr(ir.ExternalTensor, "tofile", tofile)
    out = tmp_path / "out.onnx"
    assert main([str(MODELS / f"{name}.onnx"), "-o", str(out), "-q", *options]) == 0
    assert copied == []
    written = onnx.load(str(out), load_external_data=False)
    source = {t.name: t for t in onnx.load(str(MODELS / f"{name}.onnx")).graph.initializer}
    large_unchanged = [t.name for t in written.graph.initializer
                       if t.name in source and len(source[t.name].raw_data) >= 1024]
    assert large_unchanged, "the fixture has weights above the threshold"
    # Every large weight that survived the compile went from the input file to the output by the kernel.
    assert sorted(set(streamed)) == sorted(large_unchanged)
    for t in written.graph.initializer:
        if t.name in large_unchanged:
            assert t.raw_data == source[t.name].raw_data
    feeds, expected = reference_io(load_meta(name))
    if options == IDENTITY:  # the identity compile computes exactly what the input did
        got = run_ort(out, feeds)
        for k, v in expected.items():
            np.testing.assert_allclose(got[k], v, atol=1e-4)


def _big_model(path: Path, layers: int = 4, dim: int = 2048) -> int:
    """x @ W1 @ ... @ Wn with n dim x dim float32 weights, written inline; return the weight bytes."""
    rng = np.random.default_rng(0)
    ws = [numpy_helper.from_array(rng.standard_normal((dim, dim), dtype=np.float32) / dim, f"w{i}")
          for i in range(layers)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(layers)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", dim])],
                              [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, ["B", dim])], ws)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return layers * dim * dim * 4


def _peak_rss(args: list[str]) -> int:
    code = ("import resource, sys\nfrom spatten_compiler.cli import main\nrc = main(sys.argv[1:])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1])


@pytest.mark.parametrize("external", ["no", "yes"])
def test_peak_memory_of_a_compile_is_not_a_copy_of_the_weights(tmp_path: Path, external: str) -> None:
    """Before streaming, writing a model inline peaked at ~3x its weights above the interpreter."""
    src = tmp_path / "big.onnx"
    weights = _big_model(src)
    base = int(subprocess.run([sys.executable, "-c", "import resource, spatten_compiler.cli, "
                               "spatten_compiler.commands.compile\n"
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"],
                              capture_output=True, text=True, check=True).stdout.split()[-1])
    peak = _peak_rss([str(src), "-o", str(tmp_path / "out.onnx"), "-q", "--external-data", external])
    assert peak - base < 0.5 * weights, f"peak {peak / 1e6:.0f} MB, imports {base / 1e6:.0f} MB, " \
                                        f"weights {weights / 1e6:.0f} MB"
    x = np.ones((1, 2048), np.float32)
    np.testing.assert_allclose(run_ort(tmp_path / "out.onnx", {"x": x})["h4"], run_ort(src, {"x": x})["h4"], rtol=1e-5)


def test_streamed_inline_file_round_trips_every_dtype(tmp_path: Path) -> None:
    """Hand-written protobuf: large tensors of every common dtype (and small ones, and an in-memory
    new tensor) read back bit-exact with onnx.load, and the file passes the checker."""
    from spatten_compiler.modelio import load_model, save_model

    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((64, 80)).astype(np.float32),
        "f16": rng.standard_normal((300, 7)).astype(np.float16),
        "f64": rng.standard_normal(2000),
        "i64": rng.integers(-5, 5, (3000,)),
        "i8": rng.integers(-100, 100, (70000,)).astype(np.int8),
        "b": rng.integers(0, 2, (5000,)).astype(bool),
        "small": np.arange(3, dtype=np.float32),
    }
    nodes = [helper.make_node("Identity", [k], [f"o_{k}"]) for k in arrays]
    outs = [helper.make_tensor_value_info(f"o_{k}", helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for k, a in arrays.items()]
    graph = helper.make_graph(nodes, "dtypes", [], outs, [numpy_helper.from_array(a, k) for k, a in arrays.items()])
    src = tmp_path / "src.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    model = load_model(src)
    new = rng.standard_normal((64, 80)).astype(np.float32)  # a tensor a pass created in memory
    model.graph.initializers["f32"].const_value = ir.Tensor(new, name="f32")
    out = tmp_path / "out.onnx"
    save_model(model, out, external_data=False)
    onnx.checker.check_model(str(out), full_check=True)
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for k, a in {**arrays, "f32": new}.items():
        np.testing.assert_array_equal(got[k], a)
        assert got[k].dtype == a.dtype


def test_in_place_rewrite_streams_from_the_file_it_replaces(tmp_path: Path) -> None:
    """--in-place: the weights are copied out of the input (inline, then its own .data file) before
    the finished output replaces it; the model computes the same after each rewrite."""
    src = tmp_path / "big.onnx"
    _big_model(src, layers=3, dim=256)  # 256 KB weights: above the lazy reader's threshold
    x = np.ones((1, 256), np.float32)
    expected = run_ort(src, {"x": x})["h3"]
    for external in ("yes", "yes", "no"):  # inline -> external, external -> same .data name, -> inline
        assert main([str(src), "-o", str(src), "--in-place", "-q", "--external-data", external]) == 0
        np.testing.assert_array_equal(run_ort(src, {"x": x})["h3"], expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".spattenc-")]  # no temporary folder left


def test_hard_linked_models(tmp_path: Path) -> None:
    """onnx-ir will not map a file with several hard links: a hard-linked model is read into memory
    (and compiles); hard-linked external data is a one-line load error, not an internal error."""
    import os

    from spatten_compiler.errors import ModelLoadError
    from spatten_compiler.modelio import load_model

    src = tmp_path / "big.onnx"
    _big_model(src, layers=2, dim=256)
    os.link(src, tmp_path / "link.onnx")
    x = np.ones((1, 256), np.float32)
    assert main([str(tmp_path / "link.onnx"), "-o", str(tmp_path / "out.onnx"), "-q", "--external-data", "yes"]) == 0
    np.testing.assert_array_equal(run_ort(tmp_path / "out.onnx", {"x": x})["h2"], run_ort(src, {"x": x})["h2"])
    os.link(tmp_path / "out.onnx.data", tmp_path / "second.data")
    with pytest.raises(ModelLoadError, match="hard links"):
        load_model(tmp_path / "out.onnx")
