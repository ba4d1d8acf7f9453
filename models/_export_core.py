"""Exporter-independent plumbing: run an exporter, inspect the graph, verify with onnxruntime,
and write the sidecar JSON that describes a fixture.

Used by both the tiny random-weight fixtures (``_fixtures.py``) and the real-model exports
(``_real.py``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

log = logging.getLogger("spattenc.models")



@dataclass(frozen=True)
class Exporter:
    """How ``torch.onnx.export`` is called for an exporter name."""

    dynamo: bool
    optimize: bool = False  # dynamo: run onnxscript's optimizer (at opset 23 also its onnx_fusions)
    opset: int | None = None  # fixed opset; None: the caller's (None there: torch's default)
    # transformers attention the model is built with (the corpus: None = its eager default; "sdpa" is
    # transformers' own default, which dynamo exports as the ONNX Attention op at opset 23)
    attn_implementation: str | None = None


EXPORTERS: dict[str, Exporter] = {
    "torchscript": Exporter(dynamo=False),
    "dynamo": Exporter(dynamo=True),  # the raw graph, so discovery sees what torch emitted
    # torch's defaults (dynamo=True, optimize=True): constant folding and onnxscript's rewrite rules
    "dynamo_opt": Exporter(dynamo=True, optimize=True),
    # the same at opset 23, where optimize also fuses RMSNormalization, RotaryEmbedding and GQA Attention
    "dynamo_op23": Exporter(dynamo=True, optimize=True, opset=23),
    # and with transformers' default attention: SDPA -> the ONNX Attention op (GQA fusion onnxscript's)
    "dynamo_op23_sdpa": Exporter(dynamo=True, optimize=True, opset=23, attn_implementation="sdpa"),
}
# Dynamo-export node metadata key holding Python stack traces with absolute paths of the
# exporting machine; it is most of a small model's bytes and makes files non-reproducible.
_STRIPPED_METADATA = ("pkg.torch.onnx.stack_trace",)

DynamicAxes = Mapping[str, Mapping[int, str]]


def set_offline() -> None:
    """Forbid Hugging Face hub access (models come from configs or local files) and quiet the
    exporters' own loggers (torch configures them at import, so this runs after importing)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    for noisy in ("torch", "torch.onnx", "torch.export", "transformers", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def export_onnx(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    path: Path,
    *,
    exporter: str,
    opset: int | None,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: DynamicAxes,
    dim_max: Mapping[str, int] | None = None,
) -> float:
    """Export ``module(*args)`` to ``path`` with weights inline; return the seconds it took.

    ``dynamic_axes`` names the symbolic dims of inputs and outputs (TorchScript style). For the
    dynamo exporter the input entries become ``torch.export.Dim`` objects (one per distinct
    name, bounded by ``dim_max`` if given) and the output entries are inferred by the exporter.
    ``exporter`` names an entry of :data:`EXPORTERS`: ``dynamo`` saves the raw graph
    (``optimize=False``), ``dynamo_opt`` / ``dynamo_op23`` torch's optimized default; dynamo graphs
    are saved minus stack-trace metadata.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")
    spec = EXPORTERS[exporter]
    opset = spec.opset or opset
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not spec.dynamo:
            torch.onnx.export(
                module,
                tuple(args),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                do_constant_folding=True,
            )
        else:
            dims: dict[str, torch.export.Dim] = {}
            for axes in dynamic_axes.values():
                for name in axes.values():
                    if name not in dims:
                        dims[name] = torch.export.Dim(name, max=(dim_max or {}).get(name, torch.inf))
            shapes = tuple({ax: dims[n] for ax, n in dynamic_axes.get(name, {}).items()} or None
                           for name in input_names)
            program = torch.onnx.export(
                module,
                tuple(args),
                dynamo=True,
                optimize=spec.optimize,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes={"inputs": shapes},
                verbose=False,
            )
            for node in program.model.graph.all_nodes():
                for key in _STRIPPED_METADATA:
                    node.metadata_props.pop(key, None)
            program.save(str(path), external_data=False)
    return time.perf_counter() - start


@dataclass(frozen=True)
class GraphFacts:
    """What the exported graph contains, read back with ``onnx``."""

    opset: int
    op_counts: Counter[str]
    input_names: list[str]
    output_names: list[str]
    input_dims: dict[str, list[str | int]]

    @property
    def softmax_count(self) -> int:
        return self.op_counts.get("Softmax", 0)

    @property
    def attention_count(self) -> int:
        return self.op_counts.get("Attention", 0)


def inspect_graph(path: Path) -> GraphFacts:
    """Run ``onnx.checker`` on ``path`` and collect op counts, opset and I/O names."""
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    counts: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[node.op_type] += 1
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return GraphFacts(opset, counts, [i.name for i in model.graph.input], [o.name for o in model.graph.output], dims)


def run_torch(
    module: torch.nn.Module, feeds: Mapping[str, np.ndarray], input_names: Sequence[str], output_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Run the wrapper on numpy feeds and return its outputs by name."""
    with torch.no_grad():
        outs = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names))
    return {n: o.detach().cpu().numpy() for n, o in zip(output_names, outs, strict=True)}


def record_failure(record: dict[str, Any], path: Path, error: Exception) -> None:
    """A failed export: no half-written file, the reason as one line in the manifest record, the
    traceback at debug level."""
    import traceback

    path.unlink(missing_ok=True)

    def line(e: BaseException) -> str:
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"

    root = error
    while root.__cause__ is not None:  # torch.onnx's ConversionError wraps the failing op's error
        root = root.__cause__
    record.update(status="failed", reason=line(error) + (f" (cause: {line(root)})" if root is not error else ""))
    log.debug("%s", traceback.format_exc())


def run_onnx(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the ONNX model on onnxruntime's CPU provider and return outputs by name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def valid_positions(name: str, array: np.ndarray, feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Boolean mask (broadcastable to ``array``) of the positions of real, unpadded tokens.

    ``last_hidden_state`` / ``logits`` ``[B, S, ...]`` use the last ``S`` columns of
    ``attention_mask``; ``present.*`` ``[B, H, T, D]`` use all ``T`` columns. Other outputs
    (e.g. ``probs``) have no token axis: None means every element counts.
    """
    mask = feeds.get("attention_mask")
    if mask is None:
        return None
    keep = mask.astype(bool)
    if name.startswith("present.") and array.ndim == 4 and array.shape[2] == keep.shape[1]:
        return keep[:, None, :, None]
    if name in ("last_hidden_state", "logits") and array.shape[1] <= keep.shape[1]:
        return keep[:, keep.shape[1] - array.shape[1] :].reshape(*array.shape[:2], *[1] * (array.ndim - 2))
    return None


def max_abs_diff(
    expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray]
) -> tuple[float, float]:
    """Largest absolute difference over all outputs: (at real tokens, everywhere incl. padding).

    Outputs at padded positions are well defined but numerically fragile (their attention rows
    see only masked keys or a shifted mask), so the acceptance check uses the first number.
    Shapes and names must match exactly.
    """
    if set(expected) != set(actual):
        raise AssertionError(f"output names differ: {sorted(expected)} vs {sorted(actual)}")
    valid = everywhere = 0.0
    for name, ref in expected.items():
        got = actual[name]
        if ref.shape != got.shape:
            raise AssertionError(f"{name}: shape {got.shape} != torch {ref.shape}")
        if not ref.size:
            continue
        diff = np.abs(ref.astype(np.float64) - got)
        everywhere = max(everywhere, float(diff.max()))
        keep = valid_positions(name, ref, feeds)
        masked = diff if keep is None else np.where(keep, diff, 0.0)
        valid = max(valid, float(masked.max()))
    return valid, everywhere


def tensor_record(array: np.ndarray) -> dict[str, Any]:
    """JSON record of a tensor: dtype, shape and the flat data (float32 kept exact)."""
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": array.ravel().tolist()}


def model_dims(config: Any) -> dict[str, int]:
    """Layer/head/size numbers of a transformers config (works across BERT, GPT-2, Llama...)."""
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "num_layers": int(config.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "hidden_size": hidden,
    }


def write_sidecar(
    path: Path, meta: Mapping[str, Any], feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
) -> None:
    """Write the sidecar JSON: ``meta`` fields, versions, then the reference inputs/outputs."""
    import transformers

    record = dict(meta)
    record["torch_version"] = torch.__version__
    record["transformers_version"] = transformers.__version__
    record["reference"] = {
        "inputs": {n: tensor_record(feeds[n]) for n in meta["inputs"]},
        "outputs": {n: tensor_record(outputs[n]) for n in meta["outputs"]},
    }
    path.write_text(json.dumps(record, separators=(",", ":")) + "\n")


def check_graph(
    facts: GraphFacts,
    *,
    num_layers: int,
    fused: str | None,
    extra_softmax: int,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> None:
    """Assert the graph has the expected I/O and one Softmax (or fused op) per layer + extras."""
    if facts.input_names != list(input_names):
        raise AssertionError(f"graph inputs {facts.input_names} != {list(input_names)}")
    if facts.output_names != list(output_names):
        raise AssertionError(f"graph outputs {facts.output_names} != {list(output_names)}")
    want_softmax = extra_softmax + (0 if fused else num_layers)
    if facts.softmax_count != want_softmax:
        raise AssertionError(f"{facts.softmax_count} Softmax nodes, expected {want_softmax}")
    if fused and facts.op_counts.get(fused, 0) != num_layers:
        raise AssertionError(f"{facts.op_counts.get(fused, 0)} {fused} nodes, expected {num_layers}")


def dynamic_axes_for(
    input_names: Sequence[str], output_names: Sequence[str], kv_cache: bool
) -> dict[str, dict[int, str]]:
    """Symbolic dims by tensor name: batch and sequence everywhere, past/total with a KV cache."""
    seq_axes = {0: "batch", 1: "sequence"}
    axes: dict[str, dict[int, str]] = {}
    for name in [*input_names, *output_names]:
        if name.startswith("past_key_values."):
            axes[name] = {0: "batch", 2: "past_sequence"}
        elif name.startswith("present."):
            axes[name] = {0: "batch", 2: "total_sequence"}
        elif name == "attention_mask" and kv_cache:
            axes[name] = {0: "batch", 1: "total_sequence"}
        elif name == "probs":
            axes[name] = {0: "batch"}
        else:
            axes[name] = dict(seq_axes)
    return axes


@dataclass
class ExportResult:
    """Outcome of one verified export."""

    name: str
    onnx_path: Path
    size_bytes: int
    export_seconds: float
    max_abs_diff: float  # at real (unpadded) token positions: the acceptance check
    max_abs_diff_all: float  # including padded positions
    extra_diffs: list[float]  # real-token diffs of the other-shape runs
    facts: GraphFacts


def export_verified(
    wrapper: torch.nn.Module,
    meta: dict[str, Any],
    feeds: Mapping[str, np.ndarray],
    onnx_path: Path,
    sidecar_path: Path,
    *,
    extra_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    dim_max: Mapping[str, int] | None = None,
    atol: float = 1e-4,
) -> ExportResult:
    """Export, check, verify against torch and write the sidecar; raise on any mismatch.

    ``meta`` holds the sidecar fields (``name``, ``exporter``, ``opset``, ``inputs``,
    ``outputs``, ``num_layers``, ``fused_attention``, ``extra_softmax``, ``kv_cache``...); its
    ``opset`` is replaced by the opset actually found in the graph. ``feeds`` is the stored
    reference; ``extra_feeds`` are other shapes run only to prove the dynamic axes.
    """
    inputs, outputs = meta["inputs"], meta["outputs"]
    expected = run_torch(wrapper, feeds, inputs, outputs)
    seconds = export_onnx(
        wrapper,
        [torch.from_numpy(feeds[n]) for n in inputs],
        onnx_path,
        exporter=meta["exporter"],
        opset=meta["opset"],
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=dynamic_axes_for(inputs, outputs, meta["kv_cache"]),
        dim_max=dim_max,
    )
    facts = inspect_graph(onnx_path)
    check_graph(
        facts,
        num_layers=meta["num_layers"],
        fused=meta["fused_attention"],
        extra_softmax=meta["extra_softmax"],
        input_names=inputs,
        output_names=outputs,
    )
    diff, diff_all = max_abs_diff(expected, run_onnx(onnx_path, feeds), feeds)
    if diff > atol:
        raise AssertionError(f"onnxruntime differs from torch by {diff:.3g} > {atol}")
    extra = []
    for other in extra_feeds:
        extra.append(max_abs_diff(run_torch(wrapper, other, inputs, outputs), run_onnx(onnx_path, other), other)[0])
        if extra[-1] > atol:
            shapes = {n: other[n].shape for n in inputs[:2]}
            raise AssertionError(f"dynamic-shape run {shapes} differs by {extra[-1]:.3g}")
    write_sidecar(sidecar_path, {**meta, "opset": facts.opset}, feeds, expected)
    return ExportResult(meta["name"], onnx_path, onnx_path.stat().st_size, seconds, diff, diff_all, extra, facts)
