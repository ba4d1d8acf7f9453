"""Pass infrastructure: registry, pipeline text, and the check that names a breaking pass."""

from __future__ import annotations

import dataclasses

import onnx
import onnx_ir as ir
import pytest
from conftest import tiny_model

from spatten_compiler.errors import OptionError, PassCheckError
from spatten_compiler.pipeline import PASSES, Pass, PassResult, Pipeline, parse_pipeline, register_pass


@register_pass
@dataclasses.dataclass(frozen=True)
class _Noop(Pass):
    name = "test-noop"
    ratio: float = 1.0
    flag: bool = False

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, False)


@register_pass
@dataclasses.dataclass(frozen=True)
class _Breaks(Pass):
    """Rewires MatMul to a tensor that does not exist: onnx.checker must reject the result."""

    name = "test-breaks"

    def call(self, model: ir.Model) -> PassResult:
        node = next(n for n in model.graph if n.op_type == "MatMul")
        node.outputs[0].name = "y"
        model.graph.outputs[0].name = "h"  # now 'h' is an output that nothing produces
        model.graph.remove(next(n for n in model.graph if n.op_type == "Softmax"))
        return PassResult(model, True)


def _model() -> ir.Model:
    return ir.serde.deserialize_model(tiny_model())


def test_registry_and_pipeline_text() -> None:
    assert PASSES["test-noop"] is _Noop
    (p,) = parse_pipeline("test-noop{ratio=0.5;flag=true}")
    assert p == _Noop(ratio=0.5, flag=True)
    assert p.describe() == "test-noop{ratio=0.5;flag=True}"


def test_a_compile_reports_its_passes_as_a_pipeline_that_reruns_it(tmp_path) -> None:
    """The report's pass list (``--report``) is ``--pipeline`` text: tuples (schedules) round-trip."""
    from conftest import MODELS

    from spatten_compiler.api import compile as sc_compile

    first = sc_compile(MODELS / "bert_torchscript.onnx", token_keep_schedule=(1.0, 0.5), token_min_keep=2)
    again = parse_pipeline(",".join(first.report["passes"]))
    assert [p.describe() for p in again] == first.report["passes"]
    assert any("schedule=1.0:0.5" in p for p in first.report["passes"])


@pytest.mark.parametrize(
    "text, message",
    [("nope", "unknown pass"), ("test-noop{bad=1}", "no option 'bad'"), ("test-noop{ratio}", "key=value"),
     ("test-noop{ratio=abc}", "test-noop")],
)
def test_bad_pipeline_text(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_pipeline(text)


def test_pipeline_names_the_pass_that_broke_the_model() -> None:
    with pytest.raises(PassCheckError, match="pass 'test-breaks' produced an invalid model"):
        Pipeline([_Noop(), _Breaks()])(_model())


def test_identity_pipeline_keeps_model_valid() -> None:
    model = _model()
    result = Pipeline([_Noop()])(model)
    assert not result.modified
    onnx.checker.check_model(ir.serde.serialize_model(model))
