"""The Python API: :func:`compile` and :func:`inspect`, the two things the CLI does, for notebooks
and scripts. The ``spattenc`` command calls these functions.

Options are the fields of :class:`~spatten_compiler.config.CompileConfig`, with the flags' names in
snake case and the same defaults (``--token-keep 0.5`` is ``token_keep=0.5``). Bad input raises the
same one-line :class:`~spatten_compiler.errors.SpattencError` the CLI prints.

>>> import spatten_compiler as sc
>>> sites = sc.inspect("models/bert_torchscript.onnx")
>>> len(sites), sites[0].num_heads, sites[0].mask_kind
(4, 4, 'padding')
>>> result = sc.compile("models/bert_torchscript.onnx", token_keep=0.5)
>>> result.report["token_schedule"]
[1.0, 0.5, 0.5, 0.5]
>>> files = result.save("bert.spatten.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass

from spatten_compiler.config import CompileConfig, check_types
from spatten_compiler.errors import ModelLoadError, NoAttentionError, OptionError
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.passes.find_attention import AttentionReport, AttentionSite, find_attention
from spatten_compiler.passes.float16 import DowncastFloat16, UpcastFloat16, is_float16
from spatten_compiler.passes.length_gate import compile_gated, refuse_gated, short_input_model
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.qdq import RestoreQdq, StripQdq, has_qdq
from spatten_compiler.passes.qdq_constants import FoldQdqConstants
from spatten_compiler.passes.unfuse_ort import UnfuseOrt
from spatten_compiler.passes.unfuse_qop import UnfuseQop
from spatten_compiler.passes.unmerge_decoder import UnmergeDecoder
from spatten_compiler.pipeline import Pass, Pipeline, parse_pipeline
from spatten_compiler.plan import run_quietly

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model


@dataclasses.dataclass
class CompileResult:
    """The rewritten model and the compile report (passes, layers, the token and head schedules
    chosen and the ideal FLOP ratio at 128/256/512 tokens; ``None`` if ``report=False``)."""

    model: ir.Model
    report: dict[str, Any] | None
    summary: list[str] = dataclasses.field(default_factory=list)  # what was applied, how to change it

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
        """Write the model atomically (``external_data=None``: external data only when the input had
        it or the weights exceed 1.8 GB); return the files written."""
        return save_model(self.model, path, external_data=external_data)

    def to_proto(self) -> onnx.ModelProto:
        """The model as an ``onnx.ModelProto`` (e.g. for ``onnxruntime.InferenceSession(p.SerializeToString())``)."""
        return ir.serde.serialize_model(self.model)


def as_model(model: ModelLike, *, copy: bool = False) -> tuple[ir.Model, str]:
    """``model`` as a checked ``ir.Model`` and a name for messages. A path is loaded (external data
    beside it is followed); a ``ModelProto`` is converted (the proto itself is never changed); an
    ``ir.Model`` is used as is, or cloned (sharing its weights) when ``copy``."""
    if isinstance(model, ir.Model):
        return (short_input_model(model) if copy else model), "model"
    if isinstance(model, onnx.ModelProto):
        converted = ir.serde.deserialize_model(model)
        try:
            CheckerPass(full_check=False)(converted)
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"model: invalid ONNX graph: {first}") from e
        return converted, "model"
    if isinstance(model, (str, os.PathLike)):
        return load_model(model), str(model)
    raise OptionError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def make_config(config: CompileConfig | None = None, **options: Any) -> CompileConfig:
    """``config`` (default: all defaults) with ``options`` (CompileConfig field names) applied on top.
    No preset is applied: this is the configuration exactly as given."""
    return CompileConfig.build({**_fields(config), **_given(options)})


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """The non-None ``options``, checked against CompileConfig's fields and their types."""
    return check_types({k: v for k, v in options.items() if v is not None})


def _fields(config: CompileConfig | None) -> dict[str, Any]:
    """The fields of ``config`` that differ from the defaults: what a user set."""
    if config is None:
        return {}
    default = CompileConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(CompileConfig)
            if getattr(config, f.name) != getattr(default, f.name)}


@dataclasses.dataclass
class _Planned:
    config: CompileConfig
    passes: list[Pass]
    report: dict[str, Any] | None
    summary: list[str]


def _read_qdq() -> list[Pass]:
    """A statically quantized model read as float: QOperator kernels -> QDQ, quantized constant
    expressions -> int8 weights, activation Q -> DQ pairs stripped (restore-qdq puts them back)."""
    return [UnfuseQop(), FoldQdqConstants(), StripQdq()]


def compile(  # noqa: A001 - the verb users expect; spatten_compiler.compile, not builtins.compile
    model: ModelLike,
    *,
    config: CompileConfig | None = None,
    pipeline: str | Sequence[Pass] | None = None,
    check: bool = True,
    report: bool = True,
    on_pass: Callable[[Pass, float], None] | None = None,
    on_start: Callable[[Pass], None] | None = None,
    hooks: Mapping[str, Callable[..., Any]] | None = None,
    **options: Any,
) -> CompileResult:
    """Rewrite ``model`` with SpAtten's pruning and quantization, as ``spattenc MODEL -o OUT`` does.

    ``model``: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (rewritten in place).
    ``options``: any :class:`CompileConfig` field, e.g. ``token_keep=0.5``, ``head_keep=0.75``,
    ``kv_bits="6+4"``, ``preset="aggressive"``, ``no_token_pruning=True``; or pass
    ``config=CompileConfig(...)`` (options win). With no option that turns a rewrite on, the measured
    preset for the model's kind applies (:mod:`spatten_compiler.defaults`), as on the command line.
    ``kv_cache``: where a fused GroupQueryAttention model's eviction runs - ``"graph"`` (default),
    ``"shared"`` (spattenc's runtime), or ``"decomposed"`` (unfuse-ort + evict-kv, as before session 20;
    :mod:`spatten_compiler.eviction_form`).
    ``pipeline``: an explicit pass list (``"normalize,prune-tokens{keep=0.5}"``) instead of options.
    ``check``: onnx.checker after each pass. ``report``: also compute the compile report and summary.
    ``on_start(pass)`` / ``on_pass(pass, seconds)``: progress hooks around each pass.
    ``hooks``: any other keyword the pass pipeline takes (progress callbacks), passed through unchanged.

    >>> result = compile("models/bert_torchscript.onnx", token_keep=0.5, kv_bits="6+4")
    >>> [p.split("{")[0] for p in result.report["passes"]]  # pack-kv-cache packs decoders' caches only
    ['unfuse-ort', 'normalize', 'decompose-attention', 'prune-tokens', 'quantize-kv', 'pack-kv-cache']
    >>> result.report["flop_ratio"]["512"]  # ideal dense/pruned FLOPs at 512 tokens
    2.3133
    """
    m, name = as_model(model)
    float16 = is_float16(m) and not pipeline  # rewritten in float32, converted back (passes/float16.py)
    if float16:
        UpcastFloat16()(m)
    qdq = has_qdq(m) and not pipeline  # static quantization: compiled in float, QDQ pairs restored (passes/qdq.py)
    if qdq:
        Pipeline(_read_qdq(), check=check)(m)
    unmerged = not pipeline and UnmergeDecoder()(m).modified  # a merged decoder: its with-past branch
    planned = _plan(m, name, {**_fields(config), **_given(options)}, pipeline, report)
    extra = dict(hooks or {})
    extra.update({k: v for k, v in (("on_pass", on_pass), ("on_start", on_start)) if v is not None})
    compiled_before = any(n.domain == "spatten" for n in m.graph)
    try:
        if planned.config.prune_min_length:
            compile_gated(m, planned.passes, planned.config.unpruned().passes(), planned.config.prune_min_length,
                          check=check, **extra)
        else:
            Pipeline(planned.passes, check=check, **extra)(m)
    except NoAttentionError as e:
        if not compiled_before:
            raise
        raise NoAttentionError(f"{e} - {name} was written by spattenc already (it holds spatten ops, which "
                               "hide the attention it rewrote); compile the original export") from e
    if qdq:
        Pipeline([RestoreQdq()], check=check, **extra)(m)
    if float16:
        Pipeline([DowncastFloat16()], check=check, **extra)(m)
    if planned.report is not None:
        planned.report["passes"] = [*([p.name for p in _read_qdq()] * qdq),
                                    *(["unmerge-decoder"] * unmerged),
                                    *planned.report["passes"], *(["restore-qdq"] * qdq), *(["downcast-fp16"] * float16)]
    return CompileResult(m, planned.report, planned.summary)


def _plan(m: ir.Model, name: str, options: dict[str, Any], pipeline: str | Sequence[Pass] | None,
          report: bool) -> _Planned:
    """The options with the preset for ``m``'s kind resolved, the passes they make, and the report."""
    from spatten_compiler.plan import plan
    from spatten_compiler.report import compile_report
    from spatten_compiler.summary import summary_lines

    text = pipeline if isinstance(pipeline, str) else ",".join(p.name for p in pipeline or ())
    cfg, chosen, probe = plan(options, m, Path(name), text)
    planned = cfg.passes()
    if pipeline and planned:
        raise OptionError("--pipeline replaces the option-built pipeline; give one or the other")
    if pipeline:
        passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    else:
        passes = planned
    if not report:
        return _Planned(cfg, passes, None, [])
    summary = compile_report(probe, passes, cfg.prune_min_length)
    if chosen.preset is not None:
        summary["preset"] = {"kind": chosen.kind, "name": chosen.preset.name, "applied": chosen.applied,
                             "off": list(chosen.off), "replaced": list(chosen.replaced),
                             "skipped": list(chosen.skipped)}
    return _Planned(cfg, passes, summary, summary_lines(chosen, passes, summary, text))


def inspect_report(model: ModelLike) -> AttentionReport:
    """The attention sites found and, for every other Softmax, why it was not taken. The input is
    not changed (an ``ir.Model`` is normalized on a clone)."""
    m, name = as_model(model, copy=True)
    refuse_gated(m, name)
    if has_qdq(m):  # as compile does: QOperator kernels unfused, quantized activations read as float
        Pipeline(_read_qdq(), check=False)(m)
    UnmergeDecoder()(m)  # as compile does: a merged decoder's with-past branch
    if any(n.domain == "com.microsoft" for n in m.graph):
        # onnxruntime's fused ops (optimizer, model builder): read them as compile will, unfused
        refused = run_quietly(UnfuseOrt(), m)
        if refused is not None:  # report the fused ops as they are
            logger.warning("%s", refused)
            m, name = as_model(model, copy=True)
    Normalize()(m)
    return find_attention(m)


def inspect(model: ModelLike) -> list[AttentionSite]:
    """The attention blocks spattenc finds (``spattenc inspect``), one :class:`AttentionSite` per
    layer, in order; empty if there are none.

    >>> [(s.layer, s.num_heads, s.head_dim) for s in inspect("models/gpt2_torchscript.onnx")]
    [(0, 4, 16), (1, 4, 16), (2, 4, 16), (3, 4, 16)]
    """
    return list(inspect_report(model).sites)
