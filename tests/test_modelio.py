"""Model I/O: external data round trips, atomic writes, the input is never modified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_ort, tiny_model

from spatten_compiler import modelio
from spatten_compiler.errors import SpattencError
from spatten_compiler.modelio import load_model, save_model


def _x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)


def test_large_model_path_writes_and_reloads_external_data(tmp_path: Path) -> None:
    src = tmp_path / "src.onnx"
    onnx.save(tiny_model(dim=16), src)  # 1 KiB weight: above onnx-ir's inline limit of 256 bytes
    model = load_model(src)
    out = tmp_path / "big.onnx"
    # threshold=0 takes the path a >1.8 GB model takes, on a model small enough for a test.
    files = save_model(model, out, threshold=0)
    assert files == [tmp_path / "big.onnx.data", out]
    proto = onnx.load(str(out), load_external_data=False)
    assert proto.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
    reloaded = load_model(out)
    assert isinstance(reloaded.graph.initializers["w"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(run_ort(out, {"x": _x()})["y"], run_ort(src, {"x": _x()})["y"])
    # External data stays external when written again (from a memory-mapped source).
    again = tmp_path / "again.onnx"
    assert save_model(reloaded, again)[0] == tmp_path / "again.onnx.data"
    np.testing.assert_array_equal(run_ort(again, {"x": _x()})["y"], run_ort(src, {"x": _x()})["y"])


def test_inline_when_small(tmp_path: Path) -> None:
    src = tmp_path / "src.onnx"
    onnx.save(tiny_model(), src)
    assert save_model(load_model(src), tmp_path / "o.onnx") == [tmp_path / "o.onnx"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.onnx"
    onnx.save(tiny_model(), src)
    model = load_model(src)

    def broken_save(m: ir.Model, path: str | Path, **kw: object) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(modelio, "write_inline", broken_save)
    with pytest.raises(SpattencError, match="disk full"):
        save_model(model, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.onnx"]


def test_overwriting_existing_output_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.onnx"
    onnx.save(tiny_model(), src)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    monkeypatch.setattr(modelio, "write_inline", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(SpattencError):
        save_model(load_model(src), out)
    assert out.read_bytes() == b"previous result"


def test_input_file_unchanged_by_compile(tmp_path: Path) -> None:
    from spatten_compiler.cli import main

    src = tmp_path / "src.onnx"
    onnx.save(tiny_model(), src)
    before = src.read_bytes()
    assert main([str(src), "-o", str(tmp_path / "o.onnx"), "-q"]) == 0
    assert src.read_bytes() == before


def test_lazy_reader_maps_inline_weights_without_copying(tmp_path: Path) -> None:
    """Large inline weights become references into the .onnx itself; values are unchanged and a
    model written from them is self-contained (no reference back to the input file)."""
    from conftest import MODELS

    from spatten_compiler.lazyproto import MIN_LAZY_BYTES, read_model

    src = MODELS / "bert_torchscript.onnx"
    lazy, eager = read_model(src), onnx.load(src)
    assert lazy.graph.node == eager.graph.node
    mapped = [t for t in lazy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert mapped and all(len(t.raw_data) == 0 for t in mapped)
    by_name = {t.name: t for t in eager.graph.initializer}
    model = load_model(src)
    for t in mapped:
        assert len(by_name[t.name].raw_data) >= MIN_LAZY_BYTES
        np.testing.assert_array_equal(model.graph.initializers[t.name].const_value.numpy(),
                                      onnx.numpy_helper.to_array(by_name[t.name]))
    out = tmp_path / "copy.onnx"
    save_model(model, out)
    written = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in written.graph.initializer)


def test_truncated_inside_a_weight_is_a_load_error(tmp_path: Path) -> None:
    from conftest import MODELS

    from spatten_compiler.errors import ModelLoadError

    data = (MODELS / "bert_torchscript.onnx").read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(bad)


def test_inline_save_while_a_pass_still_holds_a_weight_view(tmp_path: Path) -> None:
    """A pass may keep a NumPy view of a memory-mapped weight (analysis caches, slicing); writing the
    model inline must stream the weights out without closing the mapping under that view (it raised
    BufferError on gpt2_kv_dynamo with --value-keep before)."""
    from conftest import MODELS

    model = load_model(MODELS / "bert_torchscript.onnx")
    mapped = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert mapped
    held = mapped[0].const_value.numpy()
    expected = held.copy()
    out = tmp_path / "o.onnx"
    save_model(model, out, external_data=False)
    np.testing.assert_array_equal(held, expected)  # the view is still readable
    written = onnx.load(str(out))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(
        next(t for t in written.graph.initializer if t.name == mapped[0].name)), expected)


def test_nodes_out_of_topological_order_are_sorted(tmp_path: Path) -> None:
    """onnxruntime's float16 converter appends its Casts at the end of the graph: onnxruntime runs such
    a file, the ONNX checker refuses it. spattenc sorts the nodes on load (an If's outer-scope reads
    count as inputs) and compiles it."""
    import onnxruntime as ort
    from conftest import MODELS, load_meta, reference_io, run_ort

    from spatten_compiler.cli import main
    from spatten_compiler.modelio import load_model

    proto = onnx.load(MODELS / "bert_torchscript.onnx")
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))
    src = tmp_path / "unsorted.onnx"
    onnx.save(proto, src)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(onnx.load(src))
    ort.InferenceSession(str(src))  # what users run it with accepts it
    assert len(load_model(src).graph) == len(nodes)
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "--token-keep", "1.0"]) == 0
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    want = run_ort(MODELS / "bert_torchscript.onnx", feeds)["last_hidden_state"]
    np.testing.assert_allclose(run_ort(out, feeds)["last_hidden_state"], want, atol=1e-5)
