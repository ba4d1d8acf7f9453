"""Shared test helpers: fixture discovery from models/*.json and onnxruntime execution."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the tests import bench/ helpers (one test file run alone too)
    sys.path.insert(0, str(ROOT))
MODELS = ROOT / "models"
DATA = ROOT.parent / "shared" / "data"


def fixture_names() -> list[str]:
    return sorted(p.stem for p in MODELS.glob("*.json") if (MODELS / f"{p.stem}.onnx").exists())


def load_meta(name: str) -> dict:
    return json.loads((MODELS / f"{name}.json").read_text())


def decode(entry: dict) -> np.ndarray:
    return np.asarray(entry["data"], dtype=entry["dtype"]).reshape(entry["shape"])


def reference_io(meta: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    ref = meta["reference"]
    return (
        {k: decode(v) for k, v in ref["inputs"].items()},
        {k: decode(v) for k, v in ref["outputs"].items()},
    )


def run_ort(path: str | Path, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def tiny_model(opset: int = 17, dim: int = 4) -> onnx.ModelProto:
    """x[B,dim] -> MatMul(w) -> Softmax: the smallest valid model with a weight."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", dim])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", dim])
    w = numpy_helper.from_array(np.arange(dim * dim, dtype=np.float32).reshape(dim, dim) / dim**2, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)],
        "tiny",
        [x],
        [y],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture
def tiny_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), path)
    return path


def write_corpus(folder: Path, names: list[str]) -> Path:
    """The named fixtures as a ``bench coverage`` corpus in ``folder``: each ``.onnx``, its reference
    inputs as ``.npz`` (attention_mask all ones, as the corpus's hold no padding) and a manifest line."""
    import shutil

    lines = []
    for name in names:
        meta = load_meta(name)
        shutil.copy(MODELS / f"{name}.onnx", folder / f"{name}.onnx")
        feeds, _ = reference_io(meta)
        if "attention_mask" in feeds:
            feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
        np.savez(folder / f"{name}.npz", **feeds)
        lines.append(json.dumps({
            "name": name, "family": meta["architecture"], "exporter": meta["exporter"],
            "kind": "decoder" if meta["kv_cache"] else "encoder", "kv_cache": bool(meta["kv_cache"]),
            "onnx": f"{name}.onnx", "num_layers": meta["num_layers"], "num_heads": meta["num_heads"],
            "num_kv_heads": meta["num_kv_heads"], "head_dim": meta["head_dim"], "status": "ok"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def assert_ops_match_numpy(model, feeds: dict[str, np.ndarray], tmp_path: Path) -> None:
    """Run ``model`` (an onnx_ir model) in onnxruntime with every spatten node's inputs and outputs
    exposed, and check each node's outputs against its NumPy oracle (``SPATTEN_OPS``) applied to
    onnxruntime's own inputs: integer and boolean outputs (selections, bit planes) exactly, floats to
    1e-5 (absolute and relative: sums of many terms, summed in another order). This is the check that holds whatever float rounding the two runtimes differ by upstream: an
    end-to-end comparison cannot, once a selection (top-k, a threshold) meets a near-tie."""
    import onnx_ir as ir
    from spatten_compiler.passes.spatten_ops import DOMAIN
    from spatten_compiler.runtime import reference  # noqa: F401  (registers every oracle)
    from spatten_compiler.runtime.spatten_ops import SPATTEN_OPS

    oracles = {cls.__name__: cls for cls in SPATTEN_OPS}
    proto = ir.serde.serialize_model(model)
    typed = onnx.shape_inference.infer_shapes(proto)
    elem = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.output]}
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    calls = [n for n in proto.graph.node if n.domain == DOMAIN]
    have = {o.name for o in proto.graph.output} | set(consts) | {i.name for i in proto.graph.input}
    for name in dict.fromkeys(x for n in calls for x in [*n.input, *n.output] if x):
        if name not in have:
            have.add(name)
            assert elem.get(name), f"no inferred type for {name}"
            proto.graph.output.append(helper.make_tensor_value_info(name, elem[name], None))
    onnx.save(proto, tmp_path / "io.onnx")
    values = {**consts, **feeds, **run_ort(tmp_path / "io.onnx", feeds)}
    assert calls, "no spatten node to check"
    for n in calls:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        expected = oracles[n.op_type]._run(None, *[values[i] for i in n.input], **attrs)
        for out, want in zip(n.output, expected, strict=False):
            if want.dtype.kind in "uib":
                np.testing.assert_array_equal(values[out], want, err_msg=f"{n.op_type} {n.name}")
            else:
                np.testing.assert_allclose(values[out], want, rtol=1e-5, atol=1e-5, err_msg=f"{n.op_type} {n.name}")
