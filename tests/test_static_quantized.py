"""Models quantized by onnxruntime's static quantization (``quantize_static``: uint8 activations, int8
weights), in the QDQ format (Q -> DQ pairs around every op: Olive, the NPU / TensorRT / QNN toolchains)
and the QOperator format (QLinearMatMul, QLinearAdd, QLinearSoftmax...). spattenc strips the
activation pairs, compiles in float and puts them back (passes/qdq.py; QOperator kernels are unfused
into the QDQ form first, passes/unfuse_qop.py): discovery finds the float model's sites, keep 1.0
equals the input in onnxruntime, and the rewrites produce models onnxruntime runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort
from onnx import TensorProto, helper, numpy_helper
from spatten_compiler.passes.qdq import META, RestoreQdq, StripQdq, slice_dequantized

from spatten_compiler import inspect
from spatten_compiler.cli import main
from spatten_compiler.editor import GraphEditor

MODELS_QUANTIZED = {"bert_torchscript.qdq": ("bert_torchscript", "QDQ"),
                    "bert_torchscript.qop": ("bert_torchscript", "QOperator"),
                    "llama_torchscript.qdq": ("llama_torchscript", "QDQ")}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        """The reference inputs without padding: a padded mask's fill value (-3.4e38) in the scores'
        calibration range makes their quantization step 1e36 (passes/qdq.py warns)."""

        def __init__(self, feeds: dict[str, np.ndarray]):
            self.items = iter([feeds])

        def get_next(self):
            return next(self.items, None)

    folder, out = tmp_path_factory.mktemp("static"), {}
    for key, (name, fmt) in MODELS_QUANTIZED.items():
        src = folder / f"{name}.onnx"  # a copy: the quantizer writes beside its input
        shutil.copy(MODELS / f"{name}.onnx", src)
        out[key] = folder / f"{key}.onnx"
        quantize_static(src, out[key], Reader(_unpadded(name)),
                        quant_format=getattr(QuantFormat, fmt), activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    return out


def _unpadded(name: str) -> dict[str, np.ndarray]:
    """The reference inputs without padding. With padding, the input model adds its quantized key mask,
    whose calibrated range decides whether padded keys are masked at all; prune-tokens below keep 1.0
    replaces it with its own float mask, which masks them (docs/design.md, quantized inputs)."""
    return {k: np.ones_like(v) if "mask" in k else v for k, v in reference_io(load_meta(name))[0].items()}


@pytest.mark.parametrize("key", list(MODELS_QUANTIZED))
def test_discovery_and_keep_one_exact(key: str, quantized: dict[str, Path], tmp_path: Path) -> None:
    """The float model's sites; every layer after the first selects all tokens (TopK, gathers and the
    restore run) and the output equals the quantized input's exactly on the valid rows."""
    name = MODELS_QUANTIZED[key][0]
    ops = {n.op_type for n in onnx.load(quantized[key]).graph.node}
    assert ("QLinearMatMul" in ops) == key.endswith("qop") and "QuantizeLinear" in ops
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in inspect(str(quantized[key]))] == \
        [(s.num_heads, s.num_kv_heads, s.head_dim) for s in inspect(str(MODELS / f"{name}.onnx"))]
    out = tmp_path / "k1.onnx"
    tokens = ["--head-keep", "1.0", "--no-token-pruning"] if load_meta(name).get("kv_cache") else [
        "--token-keep-schedule", "1,0.999"]  # a decoder with a cache: evict-kv's job, not prune-tokens'
    assert main([str(quantized[key]), "-o", str(out), "-q", *tokens, "--kv-bits", "none"]) == 0
    feeds = _unpadded(name)
    want, got = run_ort(quantized[key], feeds), run_ort(out, feeds)
    for k, value in want.items():
        np.testing.assert_array_equal(got[k], value)
    # the restored pairs fuse into the same int8 matrix products (the score Add of a layer whose key
    # mask prune-tokens replaced by its own float one stays a float Add)
    assert _fused(out)["QLinearMatMul"] == _fused(quantized[key])["QLinearMatMul"]


def _fused(path: Path) -> dict[str, int]:
    """onnxruntime's int8 kernels in its optimized form of the model (it fuses DQ -> op -> Q)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    return {op: ops.count(op) for op in ("QLinearMatMul", "QLinearAdd", "MatMul")}


@pytest.mark.parametrize(("key", "flags"), [
    *(("bert_torchscript.qdq", f) for f in (["--token-keep", "0.5", "--token-min-keep", "2"], ["--head-keep", "0.5"],
                                            ["--kv-bits", "4"], [])),
    ("bert_torchscript.qop", ["--token-keep", "0.5", "--token-min-keep", "2", "--head-keep", "0.5"])], ids=str)
def test_rewrites_run(key: str, flags: list[str], quantized: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert main([str(quantized[key]), "-o", str(out), "-q", *flags]) == 0
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    got, want = run_ort(out, feeds), run_ort(quantized[key], feeds)
    for k, value in want.items():
        assert got[k].shape == value.shape and np.isfinite(got[k]).all()
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(out).graph.node)


def test_calibrated_head_pruning_slices_int8_weights(quantized: dict[str, Path], tmp_path: Path) -> None:
    """Heads picked at compile time: the kept heads' int8 columns are sliced (the weights stay int8
    ``DequantizeLinear`` constants); at keep 1.0 the output is the input's."""
    src = quantized["bert_torchscript.qdq"]
    feeds, _ = reference_io(load_meta("bert_torchscript"))
    np.savez(tmp_path / "cal.npz", **feeds)
    want = run_ort(src, feeds)["last_hidden_state"]
    for keep in ("1.0", "0.5"):
        out = tmp_path / f"h{keep}.onnx"
        assert main([str(src), "-o", str(out), "-q", "--head-keep", keep, "--head-calibration",
                     str(tmp_path / "cal.npz"), "--no-token-pruning", "--kv-bits", "none"]) == 0
        got = run_ort(out, feeds)["last_hidden_state"]
        if keep == "1.0":
            np.testing.assert_array_equal(got, want)
        assert got.shape == want.shape and np.isfinite(got).all()
        float_weights = sum(t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 64 * 16
                            for t in onnx.load(out).graph.initializer)
        assert float_weights == 0


def _pairs_model(scale_b: float = 0.05, axis_scale: bool = False) -> onnx.ModelProto:
    """x -> Q/DQ -> Relu -> Q/DQ (read twice) -> Add -> Q(0.1)/DQ(``scale_b``) -> y."""
    s = numpy_helper.from_array(np.array([0.1] * 4 if axis_scale else 0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array([128] * 4 if axis_scale else 128, np.uint8), "z")
    sb = numpy_helper.from_array(np.array(scale_b, np.float32), "sb")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], axis=1),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], axis=1),
             helper.make_node("Relu", ["xd"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"], axis=1),
             helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["rd1"], axis=1),
             helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["rd2"], axis=1),
             helper.make_node("Add", ["rd1", "rd2"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"], axis=1),
             helper.make_node("DequantizeLinear", ["aq", "sb", "z"], ["y"])]
    graph = helper.make_graph(nodes, "pairs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [s, z, sb])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_strip_and_restore_pairs(tmp_path: Path) -> None:
    """Pairs with one scale (one Q read by two DQs too) become their float tensor and come back; the
    last pair's scales differ (no pair): left. Restored, the model computes what it did."""
    proto = _pairs_model()
    model = ir.serde.deserialize_model(proto)
    assert StripQdq()(model).modified
    assert _ops(model) == ["Relu", "Add", "QuantizeLinear", "DequantizeLinear"] and META in model.metadata_props
    e = GraphEditor(model, "test")  # a pass gathers rows of a remembered tensor: the pair follows them
    relu = next(n for n in model.graph if n.op_type == "Relu").outputs[0]
    add = next(n for n in model.graph if n.op_type == "Add")
    add.replace_input_with(1, e.op("Gather", [relu, e.const("rows", np.array([1, 0], np.int64))]))
    RestoreQdq()(model)
    assert _ops(model).count("QuantizeLinear") == 4 and META not in model.metadata_props  # 3 and the Gather's
    onnx.save(ir.serde.serialize_model(model), tmp_path / "restored.onnx")
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32) * 3
    want = run_ort_proto(proto, x, rows=[1, 0])
    np.testing.assert_array_equal(run_ort(tmp_path / "restored.onnx", {"x": x})["y"], want)


def run_ort_proto(proto: onnx.ModelProto, x: np.ndarray, rows: list[int]) -> np.ndarray:
    """The hand-built model with the second Add input's rows gathered (what the test's pass did)."""
    import onnxruntime as ort

    node = next(n for n in proto.graph.node if n.op_type == "Add")
    node.input[1] = "g"
    proto.graph.initializer.append(numpy_helper.from_array(np.array(rows, np.int64), "rows"))
    proto.graph.node.insert(6, helper.make_node("Gather", ["rd2", "rows"], ["g"]))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_per_axis_activation_quantization_is_refused(tmp_path: Path, capsys) -> None:
    src = tmp_path / "axis.onnx"
    onnx.save(_pairs_model(axis_scale=True), src)
    assert main([str(src), "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "per-axis quantization of the activation" in err


@pytest.mark.parametrize("axis", [None, 1, 0])
def test_slice_dequantized_weight(axis: int | None) -> None:
    """Kept columns of ``DQ(W_q, s, z)``: the int8 constant sliced, a per-axis scale and zero point
    with it; equal to slicing the dequantized float weight."""
    rng = np.random.default_rng(0)
    wq = rng.integers(-128, 127, (6, 8)).astype(np.int8)
    size = 1 if axis is None else wq.shape[axis]
    s = rng.uniform(0.01, 0.1, size).astype(np.float32).reshape(() if axis is None else (size,))
    z = rng.integers(-3, 3, size).astype(np.int8).reshape(s.shape)
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 21}), ir_version=10)
    e = GraphEditor(model, "t")
    w = e.op("DequantizeLinear", [e.const("wq", wq), e.const("s", s), e.const("z", z)],
             **({} if axis is None else {"axis": axis}))
    take = lambda a: np.take(a.reshape(6, 2, 4), [1], axis=1).reshape(6, 4)  # noqa: E731 (a head's columns)
    dq = slice_dequantized(e, w, take).producer()
    q, scale, zp = (i.const_value.numpy() for i in dq.inputs)
    shape = [1, 1] if axis is None else [-1 if i == axis else 1 for i in range(2)]
    got = (q.astype(np.float32) - zp.reshape(shape)) * scale.reshape(shape)
    full = (wq.astype(np.float32) - z.reshape(shape)) * s.reshape(shape)
    np.testing.assert_array_equal(got, take(full))
