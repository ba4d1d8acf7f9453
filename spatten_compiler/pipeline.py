"""Pass infrastructure: named passes with frozen options, a registry, and a checked pipeline.

A pass is an onnx-ir in-place pass written as a frozen dataclass: its fields are its options and
``name`` is its kebab-case registry key (``prune-tokens``), so a pipeline can be written as text::

    normalize,prune-tokens{keep=0.5;min_keep=4}

:class:`Pipeline` runs passes in order and, after each one, checks the model with
``onnx.checker`` in full-check mode (which includes strict shape inference). A failure names the
pass that broke the model instead of surfacing later in onnxruntime.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass

from spatten_compiler.errors import OptionError, PassCheckError, SpattencError

logger = logging.getLogger(__name__)

PassResult = ir.passes.PassResult


@dataclasses.dataclass(frozen=True)
class Pass(ir.passes.InPlacePass):
    """Base of every spattenc pass. Subclasses are frozen dataclasses with a ``name``."""

    name: ClassVar[str] = ""

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        """The pass in ``--pipeline`` syntax (tuples as ``a:b``, as :func:`_coerce` reads them back)."""
        opts = ";".join(f"{k}={':'.join(map(str, v)) if isinstance(v, tuple) else v}"
                        for k, v in self.options().items())
        return f"{self.name}{{{opts}}}" if opts else self.name


PASSES: dict[str, type[Pass]] = {}
P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: make a pass available by its ``name`` in pipelines and the CLI."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise TypeError(f"two passes are named {cls.name!r}")
    PASSES[cls.name] = cls
    return cls


def _coerce(field: dataclasses.Field, text: str) -> Any:
    """Convert option text to the field's type using its default as the guide."""
    default = field.default if field.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, tuple):
        return tuple(float(x) for x in text.split(":") if x)
    return text


def make_pass(name: str, **options: Any) -> Pass:
    """Instantiate a registered pass, with a one-line error for unknown names or options."""
    cls = PASSES.get(name)
    if cls is None:
        raise OptionError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES)) or 'none'}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(options) - set(fields)
    if unknown:
        raise OptionError(f"pass {name!r} has no option {sorted(unknown)[0]!r}; options: {', '.join(fields)}")
    try:
        return cls(**{k: _coerce(fields[k], v) if isinstance(v, str) else v for k, v in options.items()})
    except (TypeError, ValueError) as e:
        raise OptionError(f"pass {name!r}: {e}") from e


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``name{opt=v;opt=v},name`` into pass instances."""
    passes: list[Pass] = []
    depth, start = 0, 0
    items: list[str] = []
    for i, ch in enumerate(text):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    for item in (s.strip() for s in items):
        if not item:
            continue
        name, _, rest = item.partition("{")
        opts: dict[str, str] = {}
        for kv in filter(None, rest.rstrip("}").split(";")):
            key, sep, value = kv.partition("=")
            if not sep:
                raise OptionError(f"pipeline item {item!r}: option {kv!r} needs key=value")
            opts[key.strip()] = value.strip()
        passes.append(make_pass(name.strip(), **opts))
    return passes


def check_model(model: ir.Model) -> None:
    """onnx.checker (full check: strict shape inference included) without serializing weights."""
    CheckerPass(full_check=True)(model)


@dataclasses.dataclass
class Pipeline:
    """Run passes in order; check the model after each and name the pass that broke it."""

    passes: Sequence[Pass]
    check: bool = True
    on_pass: Callable[[Pass, float], None] | None = None  # progress hook: (pass, seconds)
    on_start: Callable[[Pass], None] | None = None  # progress hook: the pass about to run

    def __call__(self, model: ir.Model) -> PassResult:
        modified = False
        for p in self.passes:
            t0 = time.perf_counter()
            logger.info("running pass %s", p.describe())
            if self.on_start:
                self.on_start(p)
            try:
                result = p(model)
            except SpattencError:
                raise
            except ir.passes.InvariantError as e:
                cause = e.__cause__ or e
                if isinstance(cause, SpattencError):
                    raise cause from e
                raise PassCheckError(p.name, str(cause)) from e
            modified |= result.modified
            if self.check and result.modified:
                try:
                    check_model(model)
                except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                    raise PassCheckError(p.name, str(e).strip().splitlines()[0]) from e
            if self.on_pass:
                self.on_pass(p, time.perf_counter() - t0)
        return PassResult(model, modified)
