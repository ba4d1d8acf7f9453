"""Coverage over the model corpus (models/corpus.py): family x exporter x {discovered exactly, token
pruning exact at keep 1.0, head pruning exact at keep 1.0, K/V quantization runs}, with the reason
for every miss (issue #16).

    python -m bench.coverage                       # every model in models/cache/corpus/manifest.jsonl
    python -m bench.coverage --only llama,bert     # families

* discovered: one site per layer (no false sites), each with the config's heads, KV heads and head dim.
* tokens: the token rewrite of the model, <= 1e-5 against the input model in onnxruntime. Without a
  KV cache (encoders, a decoder's prompt): ``prune-tokens`` at keep 1.0 (``emit_kept``), and with a
  schedule of 1.0 then 0.999 (every layer after the first selects all S tokens: TopK, token, mask,
  position-term and RoPE gathers and the restore all run) on the inputs with attention_mask all ones.
  With a KV cache: ``evict-kv`` at budget 1.0 (every slot kept) fed an empty eviction state.
* heads: ``--head-keep 1.0`` (site checks, normalize and decompose run) and, where the model has
  more than one KV group, the last layer's group 0 sliced out of the weights at compile time
  against the input model with that group's output-projection rows zeroed (<= 1e-5).
* kv: ``--kv-bits 8+4`` compiles and runs to finite outputs (quantization is not exact).
* tokens-0.5 / heads-0.5: real pruning, which the exactness checks above never do (at keep 1.0 or
  0.999 every stale sequence length still fits): ``prune-tokens`` at keep 0.5 (the default spattenc
  rule, floor 1) or, with a KV cache, ``evict-kv`` at budget 0.5; ``prune-heads`` at keep 0.5 (the
  run-time rule). The written model must run in onnxruntime on the reference inputs to finite outputs
  of the input model's shapes (a refusal in one line counts as refused).
* preset: ``spattenc MODEL -o OUT`` with no option (the default preset) writes a model that runs to
  finite outputs of the input model's shapes (a KV-cache decoder fed an empty eviction state).

``--format int8|int8pc|fp16|qdq|qop``: every TorchScript / dynamo export converted first (onnxruntime's
quantize_dynamic with one scale per tensor or per output column, its float16 converter, its
quantize_static in the QDQ or QOperator format), the same checks (float16 within its rounding).
``--format ortopt|ortext|slim|onnxsim``: every model (any exporter) post-processed the way users often
do before deploying - onnxruntime's saved optimized model (basic or extended level), onnxslim
(optimum-cli ``--slim``), onnx-simplifier - then the same checks against the post-processed model.
``--format fixed``: onnx-simplifier with the inputs' shapes fixed to the reference inputs' (an export
without dynamic axes, as mobile/NPU users deploy it); models without a KV cache only (a fixed cache
length cannot grow: evict-kv and generation need one that does).

Writes bench/results/<ts>-coverage.{md,json}.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.nbits_blocks import is_nbits, layout
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.prune_heads import _weight_slot
from spatten_compiler.passes.unfuse_ort import UnfuseOrt
from spatten_compiler.passes.unmerge_decoder import UnmergeDecoder

from spatten_compiler.errors import NoAttentionError, SpattencError
from spatten_compiler.match import const_array
from spatten_compiler.modelio import load_model, save_model
from spatten_compiler.pipeline import Pipeline, make_pass

log = logging.getLogger("bench.coverage")
CORPUS = Path(__file__).resolve().parents[1] / "models" / "cache" / "corpus"
ATOL = 1e-5
CHECKS = ("discovered", "tokens", "heads", "kv", "tokens-0.5", "heads-0.5", "preset")


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    half = {i.name for i in sess.get_inputs() if i.type == "tensor(float16)"}  # a float16 model's cache inputs
    feeds = {i.name: feeds[i.name].astype(np.float16) if i.name in half else feeds[i.name]
             for i in sess.get_inputs() if i.name in feeds}
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) if a[k].size else 0.0 for k in a)


# --format: every corpus model converted as users get them, then the same checks. float16 outputs are
# compared within float16 rounding (relative to the largest output value); int8 (quantize_dynamic)
# exactly, onnxruntime against onnxruntime - except a KV group sliced out, whose output projection then
# quantizes a narrower context with its own per-tensor scale (it must run; the difference is reported).
FORMAT: dict[str, Any] = {"name": "float", "reference": None}


def _reference(path: Path) -> Path:
    """What an exactness check compares with: the input model, or (``--format ortext``) the input with
    onnxruntime's fused CPU kernels written back as the standard ops they fused (``unfuse-ort``): those
    kernels round differently (7.9e-6 on the Llama fixture's logits), and the check is about spattenc's
    rewrite, not that rounding (as ``float_activations`` does for int4)."""
    return FORMAT.get("reference") or path


def _unfused(path: Path, tmp: Path) -> Path:
    model = load_model(path)
    UnfuseOrt()(model)
    out = tmp / f"{path.stem}.unfused.onnx"
    save_model(model, out, external_data=False)
    return out


def _tolerance(want: dict[str, np.ndarray]) -> float:
    if FORMAT["name"] != "fp16":
        return ATOL
    return 4e-3 * max(1.0, max((float(np.abs(v.astype(np.float32)).max()) for v in want.values() if v.size),
                               default=1.0))


def to_int8(path: Path, tmp: Path, per_channel: bool = False) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / f"{path.stem}.int8.onnx"
    quantize_dynamic(path, out, weight_type=QuantType.QInt8, per_channel=per_channel)
    if not any(n.op_type == "MatMulInteger" for n in onnx.load(str(out), load_external_data=False).graph.node):
        raise ValueError("quantize_dynamic quantized no projection (dynamo's weights sit behind a Transpose)")
    return out


def to_fp16(path: Path, tmp: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = tmp / f"{path.stem}.fp16.onnx"
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
    onnx.save(convert_float_to_float16(onnx.load(str(path))), str(out))
    return out


def to_ortopt(path: Path, tmp: Path, extended: bool = False) -> Path:
    """onnxruntime's own saved optimized model (``SessionOptions.optimized_model_filepath``); basic level:
    constant folding, identical initializers merged, every attribute written out; extended: its CPU
    fusions too (FusedMatMul for a scaled or transposed MatMul, QuickGelu, RMS norms, ...)."""
    out = tmp / f"{path.stem}.{'ortext' if extended else 'ortopt'}.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if extended
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return out


def to_slim(path: Path, tmp: Path) -> Path:
    """onnxslim (optimum-cli's ``--slim``): constant folding, shared shape computations, dead code."""
    import onnx

    try:
        import onnxslim
    except ImportError as err:
        raise SystemExit("--format slim needs onnxslim (pip install onnxslim)") from err
    out = tmp / f"{path.stem}.slim.onnx"
    onnx.save(onnxslim.slim(str(path)), str(out))
    return out


def to_onnxsim(path: Path, tmp: Path, fixed: bool = False) -> Path:
    """onnx-simplifier: constant folding of shape computations (fixed shapes stay symbolic here).
    ``fixed``: every input's dims fixed to the reference inputs' shapes first (``onnxsim
    --overwrite-input-shape``; an export without dynamic axes, as mobile/NPU users deploy it), so the
    causal mask, RoPE tables and view targets fold to constants holding that length."""
    import onnx

    fmt = "fixed" if fixed else "onnxsim"
    try:
        import onnxsim
    except ImportError as err:
        raise SystemExit(f"--format {fmt} needs onnxsim (pip install onnxsim)") from err
    model = onnx.load(str(path))
    shapes = None
    if fixed:
        feeds = np.load(path.with_suffix(".npz"))
        shapes = {i.name: list(feeds[i.name].shape) for i in model.graph.input if i.name in feeds}
    model, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes)
    if not ok:
        raise ValueError("onnxsim's own check failed")
    out = tmp / f"{path.stem}.{fmt}.onnx"
    onnx.save(model, str(out))
    return out


def to_static(path: Path, tmp: Path, quant_format: str = "QDQ") -> Path:
    """onnxruntime's static quantization (uint8 activations, int8 weights), calibrated on the model's
    reference inputs with the attention mask all ones (a padded mask's fill value in the calibration
    range makes the scores' quantization step 1e36: passes/qdq.py)."""
    import shutil

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    feeds = {k: np.ones_like(v) if "mask" in k else v for k, v in np.load(path.with_suffix(".npz")).items()}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([feeds])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    src, out = tmp / f"src-{path.name}", tmp / f"{path.stem}.{quant_format.lower()}.onnx"
    shutil.copy(path, src)  # the quantizer writes beside its input
    logging.getLogger().setLevel(logging.ERROR)  # its per-tensor "inference failed" warnings
    try:
        quantize_static(src, out, Reader(), quant_format=getattr(QuantFormat, quant_format),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(logging.WARNING)
    return out


FORMATS = {"float": None, "int8": to_int8, "fp16": to_fp16,
           "int8pc": functools.partial(to_int8, per_channel=True),  # per output column, as transformers.js
           "qdq": to_static, "qop": functools.partial(to_static, quant_format="QOperator"),
           "ortopt": to_ortopt, "ortext": functools.partial(to_ortopt, extended=True),
           "slim": to_slim, "onnxsim": to_onnxsim, "fixed": functools.partial(to_onnxsim, fixed=True)}
# post-processed forms of any export (the model builder's too); the other formats convert float exports
POSTPROCESS = frozenset({"ortopt", "ortext", "slim", "onnxsim", "fixed"})


def _read(path: Path) -> ir.Model:
    """The model as compile reads it: a merged decoder's with-past branch, onnxruntime's fused ops
    (the model builder's GroupQueryAttention) unfused, normalized."""
    model = load_model(path)
    Pipeline([make_pass("unfuse-qop"), make_pass("fold-qdq-constants"), make_pass("strip-qdq")], check=False)(model)
    UnmergeDecoder()(model)
    UnfuseOrt()(model)
    Normalize()(model)
    return model


def discovered(path: Path, rec: dict[str, Any]) -> tuple[bool, str]:
    report = find_attention(_read(path))
    want = (rec["num_heads"], rec["num_kv_heads"], rec["head_dim"])
    if len(report.sites) != rec["num_layers"]:
        first = f"; first not taken: {report.rejected[0][0]}: {report.rejected[0][1]}" if report.rejected else ""
        return False, f"{len(report.sites)} sites for {rec['num_layers']} layers{first}"
    dims = rec.get("site_head_dims")  # attentions of different head sizes (LiLT's text and layout streams)
    if dims is not None and sorted(s.head_dim for s in report.sites) != sorted(dims):
        return False, f"head sizes {[s.head_dim for s in report.sites]}, the corpus says {dims}"
    for s in report.sites:
        got = (s.num_heads, s.num_kv_heads, s.head_dim if dims is None else want[2])
        if got != want:
            return False, f"layer {s.layer}: heads/kv/dim {got}, config says {want}"
    return True, ""


def _compile(path: Path, passes: list, out: Path) -> None:
    from spatten_compiler.passes.float16 import is_float16

    model = load_model(path)
    half = is_float16(model)  # compiled in float32 as spattenc's compile does (passes/float16.py)
    Pipeline([*([make_pass("upcast-fp16")] if half else []), make_pass("unfuse-qop"), make_pass("fold-qdq-constants"),
              make_pass("strip-qdq"),
              make_pass("unmerge-decoder"), make_pass("unfuse-ort"), make_pass("normalize"),
              make_pass("decompose-attention"), *passes, make_pass("restore-qdq"),
              *([make_pass("downcast-fp16")] if half else [])], check=True)(model)
    save_model(model, out, external_data=False)


def _exact(path: Path, feeds: dict[str, np.ndarray], passes: list, tmp: Path,
           base: Path | None = None) -> tuple[bool, str]:
    out = tmp / "out.onnx"
    _compile(path, passes, out)
    want = _run(base or _reference(path), feeds)
    got = _run(out, feeds)
    d, tol = _diff(want, {k: got[k] for k in want}), _tolerance(want)
    return d <= tol, f"max |diff| {d:.2g}" + ("" if d <= tol else f" > {tol:g}")


def tokens(path: Path, feeds: dict[str, np.ndarray], tmp: Path, rec: dict[str, Any]) -> tuple[bool, str]:
    """prune-tokens (no cache) or, for a KV-cache decoder, evict-kv at a full budget."""
    if rec.get("kv_cache"):
        return evict_full(path, feeds, tmp)
    ok, why = _exact(path, feeds, [make_pass("prune-tokens", keep=1.0, min_keep=1, emit_kept=True)], tmp)
    if not ok:
        return ok, why
    # keep 1.0 selects nothing; 0.999 after the first layer selects every token (k = ceil(0.999 S) = S),
    # so the TopK, gathers, mask/position-term gathers and restore all run: exact when nothing is padding.
    ones = {k: np.ones_like(v) if k == "attention_mask" else v for k, v in feeds.items()}
    schedule = (1.0,) + (0.999,) * (rec["num_layers"] - 1)
    ok2, why2 = _exact(path, ones, [make_pass("prune-tokens", schedule=schedule, min_keep=1, emit_kept=True)], tmp)
    return ok2, f"keep 1.0: {why}; all tokens selected after layer 0 (no padding): {why2}"


def _evict_feeds(out: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference inputs plus the cache state evict-kv adds, empty of history (importance 0, past
    positions 0..P-1, position_ids P..P+q-1)."""
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    batch, q = ids.shape
    past = mask.shape[1] - q
    so = ort.SessionOptions()
    so.log_severity_level = 3
    names = [i.name for i in ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).get_inputs()]
    extra: dict[str, np.ndarray] = {}
    for name in names:
        if name.startswith("past_importance."):
            extra[name] = np.zeros((batch, past), np.float32)
        elif name.startswith("past_positions."):
            extra[name] = np.broadcast_to(np.arange(past, dtype=np.int64), (batch, past)).copy()
        elif name == "position_ids" and name not in feeds:
            extra[name] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -q:].astype(np.int64)
    return {**feeds, **extra}


def evict_full(path: Path, feeds: dict[str, np.ndarray], tmp: Path) -> tuple[bool, str]:
    """evict-kv with budget 1.0 (keeps every cache slot) against the input model."""
    out = tmp / "evict.onnx"
    _compile(path, [make_pass("evict-kv", budget=1.0)], out)
    want = _run(_reference(path), feeds)
    got = _run(out, _evict_feeds(out, feeds))
    want, note = _window_slots(out, want, got)
    d, tol = _diff(want, {k: got[k] for k in want}), _tolerance(want)
    return d <= tol, f"evict-kv budget 1.0: max |diff| {d:.2g}{note}" + ("" if d <= tol else f" > {tol:g}")


def _window_slots(out: Path, want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[dict, str]:
    """evict-kv takes a sliding window over: a windowed layer's cache keeps its last ``W - 1`` slots
    even where the exporter's present keeps every slot (optimum's GPT-OSS), the others never being read
    again. Such a present is compared on those slots: the reference's last ``W - 1``."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    windows = json.loads(meta.get("spatten.evict_kv", "{}")).get("windows", {})
    cut = {}
    for name, ref in want.items():
        layer = next((part for part in name.split(".") if part.isdigit()), None)
        w = windows.get(layer) if name.startswith("present") else None
        if w and ref.ndim == 4 and got[name].shape[2] == w - 1 < ref.shape[2]:
            cut[name] = ref[:, :, -(w - 1):]
    note = f" ({len(cut)} windowed presents: their last W - 1 slots)" if cut else ""
    return {**want, **cut}, note


def _runs_like(path: Path, out: Path, feeds: dict[str, np.ndarray], cache_outputs: bool = True) -> tuple[bool, str]:
    """The written model runs to finite outputs of the input model's shapes (a KV cache's present.*
    may be shorter after eviction: ``cache_outputs=False`` leaves them out)."""
    want, got = _run(path, feeds), _run(out, feeds)
    for k, v in want.items():
        if not cache_outputs and k.startswith("present"):
            continue
        if got[k].shape != v.shape:
            return False, f"{k}: shape {got[k].shape}, the input model's {v.shape}"
        if got[k].dtype.kind == "f" and not np.isfinite(got[k]).all():
            return False, f"{k}: non-finite values"
    return True, "runs, finite outputs of the input model's shapes"


def tokens_half(path: Path, feeds: dict[str, np.ndarray], tmp: Path, rec: dict[str, Any]) -> tuple[bool, str]:
    """prune-tokens at keep 0.5 (evict-kv at budget 0.5 with a KV cache) runs."""
    out = tmp / "tokens-half.onnx"
    if rec.get("kv_cache"):
        _compile(path, [make_pass("evict-kv", budget=0.5)], out)
        want, got = _run(path, feeds), _run(out, _evict_feeds(out, feeds))
        bad = [k for k in want if not k.startswith("present") and (got[k].shape != want[k].shape
                                                                    or not np.isfinite(got[k]).all())]
        return not bad, f"{bad[0]}: shape or values wrong" if bad else "evict-kv budget 0.5 runs"
    _compile(path, [_token_pass(token_keep=0.5, token_min_keep=1)], out)
    return _runs_like(path, out, feeds)


def _token_pass(**options: Any) -> Any:
    """prune-tokens as ``spattenc --token-keep ...`` builds it (the default token rule)."""
    from spatten_compiler.config import CompileConfig

    return next(p for p in CompileConfig.build(options).passes() if p.name == "prune-tokens")


def heads_half(path: Path, feeds: dict[str, np.ndarray], tmp: Path) -> tuple[bool, str]:
    """prune-heads at keep 0.5 with the run-time (paper) rule runs."""
    out = tmp / "heads-half.onnx"
    _compile(path, [make_pass("prune-heads", keep=0.5)], out)
    return _runs_like(path, out, feeds)


def preset(path: Path, feeds: dict[str, np.ndarray], tmp: Path, rec: dict[str, Any]) -> tuple[bool, str]:
    """``spattenc MODEL -o OUT`` with no option (the default preset for the model's kind: token pruning
    then K/V planes, or eviction and packed planes for a KV cache) writes a model that runs."""
    from spatten_compiler.api import compile as compile_model
    from spatten_compiler.api import inspect

    if not inspect(path):  # the preset writes it back unchanged and says so; nothing of spattenc's to run
        raise NoAttentionError("no attention found: the default preset writes the model unchanged")
    out = tmp / "preset.onnx"
    save_model(compile_model(load_model(path)).model, out, external_data=False)
    if rec.get("kv_cache"):  # its cache state (eviction, packed planes) as generation feeds it: three steps
        from spatten_compiler.decoding import DecoderSession

        session = DecoderSession(out)
        session.reset(feeds["input_ids"].shape[0])
        logits = [session.step(feeds["input_ids"]) for _ in range(3)]
        bad = [x.shape for x in logits if x.shape[:2] != feeds["input_ids"].shape or not np.isfinite(x).all()]
        return not bad, f"logits {bad[0]} or non-finite" if bad else "generates 3 steps, finite logits"
    return _runs_like(path, out, feeds)


def heads(path: Path, feeds: dict[str, np.ndarray], tmp: Path) -> tuple[bool, str]:
    ok, why = _exact(path, feeds, [make_pass("prune-heads", keep=1.0)], tmp)
    if not ok:
        return ok, why
    model = _read(path)
    sites = find_attention(model).sites
    groups = sites[-1].num_kv_heads
    if groups < 2 or sites[-1].out_proj is None:
        return True, why + " (one KV group: no slice tested)"
    site = sites[-1]
    g, dh = site.num_heads // groups, site.v_head_dim
    _zero_rows(model, site.out_proj, slice(0, g * dh))  # group 0's query heads come first in the merged head axis
    Pipeline([make_pass("restore-qdq")], check=False)(model)  # a statically quantized model: its pairs again
    zeroed = tmp / "zeroed.onnx"
    save_model(model, zeroed, external_data=False)
    kept = tuple(() for _ in sites[:-1]) + (tuple(range(1, groups)),)
    ok, why2 = _exact(path, feeds, [make_pass("prune-heads", rule="calibrated", heads=kept)], tmp, base=zeroed)
    if FORMAT["name"].startswith("int8") and not ok:  # the output projection's input quantization (one scale per
        # tensor) spans the kept heads' context only: not the zeroed rows' model, by construction
        diff = why2.split(" >")[0]
        return True, f"{why}; last layer without group 0 runs ({diff}: int8 scales of a narrower context)"
    return ok, f"{why}; last layer without group 0: {why2}"


def _zero_rows(model: ir.Model, proj, rows: slice) -> None:
    """The output projection reads nothing from input ``rows``: float weights get zero rows (QDQ weights
    their int8 zero point); int4 blocks
    (MatMulNBits) the blocks holding them a zero scale (exact when ``rows`` are whole blocks; else
    prune-heads refuses the slice anyway). The zeroed tensor is a fresh initializer of this projection
    only: the weight may be shared with other layers (ALBERT; onnxruntime's saved optimized models merge
    identical initializers)."""
    if is_nbits(proj.node):
        nb, scales = layout(proj.node), proj.node.inputs[2]
        s = const_array(scales).reshape(nb.N, nb.blocks).copy()
        s[:, rows.start // nb.block_size:-(-rows.stop // nb.block_size)] = 0
        _fresh(model, proj.node, 2, s.reshape(const_array(scales).shape))
        return
    weight, slot = proj.weight, _weight_slot(proj)
    dq = weight.producer() if const_array(weight) is None else None
    zero = 0
    if dq is not None and dq.op_type == "DequantizeLinear":  # a QDQ weight: its int8 rows set to the zero point
        weight, slot = dq.inputs[0], (dq, 0)
        zero = const_array(dq.inputs[2]).reshape(-1)[0] if len(dq.inputs) > 2 and dq.inputs[2] is not None else 0
    w = const_array(weight).copy()
    if proj.transposed_weight:
        w[:, rows] = zero
    else:
        w[rows] = zero
    _fresh(model, *slot, w)


def _fresh(model: ir.Model, node: ir.Node, slot: int, array: np.ndarray) -> None:
    old = node.inputs[slot]
    value = ir.Value(name=f"{old.name}.zeroed", const_value=ir.tensor(array), shape=ir.Shape(array.shape),
                     type=old.type)
    model.graph.register_initializer(value)
    node.replace_input_with(slot, value)


def kv(path: Path, feeds: dict[str, np.ndarray], tmp: Path) -> tuple[bool, str]:
    out = tmp / "kv.onnx"
    _compile(path, [make_pass("quantize-kv", bits="8+4")], out)
    got = _run(out, feeds)
    want = _run(path, feeds)
    if not all(np.isfinite(v).all() for v in got.values() if v.dtype.kind == "f"):
        return False, "non-finite outputs"
    return True, f"max |diff| {_diff(want, {k: got[k] for k in want}):.2g}"


def float_activations(path: Path, tmp: Path) -> Path:
    """``path``, or a copy in ``tmp`` whose ``MatMulNBits`` compute with float activations
    (``accuracy_level`` 0). At level 4 (onnxruntime-genai's int4 builds) each MatMulNBits quantizes its
    input to int8 per block, so a 1e-6 float difference upstream (decomposed attention against the
    fused kernel) flips codes and moves the logits by up to 0.03; with float activations the same
    rewrites measure ~1e-6. The exactness checks test spattenc's rewrite, not that amplification."""
    import onnx

    model = onnx.load(str(path))
    levels = [a for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level" and a.i != 0]
    if not levels:
        return path
    for a in levels:
        a.i = 0
    out = tmp / f"{path.stem}.float-activations.onnx"
    onnx.save(model, str(out))
    return out


def evaluate(rec: dict[str, Any], corpus: Path = CORPUS, only: tuple[str, ...] = CHECKS,
             fmt: str = "float") -> dict[str, Any]:
    """See :func:`_evaluate`; the module's format state is reset after it (the checks are also called
    directly, by tests, with no format)."""
    try:
        return _evaluate(rec, corpus, only, fmt)
    finally:
        FORMAT["name"], FORMAT["reference"] = "float", None


def _evaluate(rec: dict[str, Any], corpus: Path, only: tuple[str, ...], fmt: str) -> dict[str, Any]:
    """One corpus model (converted to ``fmt`` first): each check (of ``only``) -> {ok, reason}. A check
    that raises is a refusal (its message). A conversion that fails or does not load in onnxruntime
    gives ``{"conversion": reason}`` and no checks."""
    path = corpus / rec["onnx"]
    feeds = dict(np.load(corpus / f"{rec['name']}.npz"))
    row: dict[str, Any] = {k: rec[k] for k in ("name", "family", "exporter", "kind", "kv_cache")}
    FORMAT["name"], FORMAT["reference"] = fmt, None
    with tempfile.TemporaryDirectory(prefix="coverage-") as d:
        if FORMATS[fmt] is not None:
            try:
                path = FORMATS[fmt](path, Path(d))
                _run(path, feeds)
            except Exception as e:  # noqa: BLE001 - the converter's fault, reported beside the table
                return {**row, "conversion": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
        path = float_activations(path, Path(d))
        if fmt == "ortext":
            try:
                FORMAT["reference"] = _unfused(path, Path(d))
            except SpattencError:  # a fused op unfuse-ort refuses: the checks say so themselves
                FORMAT["reference"] = None
        checks = (("discovered", lambda: discovered(path, rec)), ("tokens", lambda: tokens(path, feeds, Path(d), rec)),
                  ("heads", lambda: heads(path, feeds, Path(d))), ("kv", lambda: kv(path, feeds, Path(d))),
                  ("tokens-0.5", lambda: tokens_half(path, feeds, Path(d), rec)),
                  ("heads-0.5", lambda: heads_half(path, feeds, Path(d))),
                  ("preset", lambda: preset(path, feeds, Path(d), rec)))
        for check, fn in checks:
            if check not in only:
                continue
            t0 = time.perf_counter()
            try:
                ok, why = fn()
                row[check] = {"ok": ok, "reason": why}
                if not ok and "first not taken" in why:  # Softmax not taken, with inspect --explain's reason
                    row[check]["refused"] = True
            except SpattencError as e:
                row[check] = {"ok": False, "refused": True, "reason": str(e).splitlines()[0]}
            except Exception as e:  # noqa: BLE001 - a crash is a miss too, recorded as such
                first = str(e).splitlines()[0][:200] if str(e) else ""
                row[check] = {"ok": False, "crash": True, "reason": f"{type(e).__name__}: {first}"}
            row[check]["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def corpus_records(corpus: Path = CORPUS) -> list[dict[str, Any]]:
    """The manifest's latest record per model (models/corpus.py appends; no torch needed here)."""
    path = corpus / "manifest.jsonl"
    latest: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip():
            rec = json.loads(line)
            latest[rec["name"]] = rec
    return list(latest.values())


def render(rows: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    mark = lambda c: "yes" if c["ok"] else ("refused" if c.get("refused") else "NO")  # noqa: E731
    lines = [f"| model | exporter | {' | '.join(CHECKS)} |", "|---|---|" + "---|" * len(CHECKS)]
    for r in rows:
        lines.append(f"| {r['family']}{' (KV cache)' if r['kv_cache'] else ''} | {r['exporter']} | "
                     + " | ".join(mark(r[c]) for c in CHECKS) + " |")
    n = len(rows)
    totals = {c: sum(r[c]["ok"] for r in rows) for c in CHECKS}
    lines += ["", "| check | passed | of | % |", "|---|---|---|---|"]
    lines += [f"| {c} | {totals[c]} | {n} | {100 * totals[c] / max(n, 1):.0f} |" for c in CHECKS]
    groups = (("encoders (prune-tokens)", lambda r: r["kind"] != "decoder"),
              ("decoders without a cache (prune-tokens on the prompt)", lambda r: r["kind"] == "decoder"
               and not r["kv_cache"]),
              ("decoders with a KV cache (evict-kv)", lambda r: r["kv_cache"]))
    for label, member in groups:
        group = [r for r in rows if member(r)]
        ok = sum(r["tokens"]["ok"] for r in group)
        lines.append(f"| tokens, {label} | {ok} | {len(group)} | {100 * ok / max(len(group), 1):.0f} |")
    missed = [r[c] for r in rows for c in CHECKS if not r[c]["ok"]]
    lines.append(f"| misses refused with a reason | {sum(bool(m.get('refused')) for m in missed)} | {len(missed)} | "
                 f"{100 * sum(bool(m.get('refused')) for m in missed) / max(len(missed), 1):.0f} |")
    lines += ["", "## Reasons for every miss", ""]
    for r in rows:
        for c in CHECKS:
            if not r[c]["ok"]:
                lines.append(f"- {r['name']} / {c}: {r[c]['reason']}")
    if failed:
        lines += ["", "## Exports that failed (not in the table)", ""]
        lines += [f"- {f['name']}: {f.get('reason', '?')}" for f in failed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--only", help="comma-separated families")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--checks", help="comma-separated checks to run (default all); the others are carried "
                                    "over from the --merge runs' row of the same model")
    p.add_argument("--merge", type=Path, metavar="JSON", nargs="+",
                   help="earlier runs' .json: their rows for models not evaluated now are carried over "
                        "(the first file that has a model wins)")
    p.add_argument("--format", choices=sorted(FORMATS), default="float",
                   help="convert every model first: int8 / int8pc (onnxruntime's quantize_dynamic, one scale per "
                        "tensor / per output column), fp16 (its float16 converter) or qdq / qop (its "
                        "quantize_static, QDQ / QOperator format), as users download them, TorchScript and "
                        "dynamo exports only; or post-process every model as users do: ortopt / ortext "
                        "(onnxruntime's saved optimized model, basic / extended level), slim (onnxslim), onnxsim")
    p.add_argument("--drop-absent", action="store_true",
                   help="leave out --merge rows of models that are not in the corpus now (an older export)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    recs = corpus_records(args.corpus)
    if args.only:
        recs = [r for r in recs if r["family"] in args.only.split(",")]
    ok = [r for r in recs if r.get("status") == "ok"]
    failed = [r for r in recs if r.get("status") != "ok"]
    if args.format not in POSTPROCESS | {"float"}:  # the model builder's exports are already int4 / GQA fused
        ok = [r for r in ok if r["exporter"] in ("torchscript", "dynamo")]
    if args.format == "fixed":
        ok = [r for r in ok if not r.get("kv_cache")]
    rows = []
    t0 = time.perf_counter()
    only = tuple(args.checks.split(",")) if args.checks else CHECKS
    if set(only) - set(CHECKS) or (only != CHECKS and not args.merge):
        p.error(f"--checks takes {','.join(CHECKS)} and needs --merge for the checks not run")
    carried = {}
    for merged in reversed(args.merge or []):
        carried.update({r["name"]: {**r, "from": r.get("from", merged.name)}
                        for r in json.loads(merged.read_text())["rows"]})
    for rec in ok:
        row = evaluate(rec, args.corpus, only, args.format)
        if "conversion" in row:
            failed.append({"name": rec["name"], "reason": f"{args.format} conversion: {row['conversion']}"})
            print(rec["name"], failed[-1]["reason"], flush=True)
            continue
        old = carried.get(rec["name"])
        if only != CHECKS and old is None:  # nothing to carry the other checks from: run them all
            log.warning("%s: not in the --merge runs; running every check", rec["name"])
            old, row = {}, evaluate(rec, args.corpus)
        for c in CHECKS:
            if c not in row:
                row[c] = {**old.get(c, {"ok": False, "reason": "not run in the merged run"}), "from": old["from"]}
        rows.append(row)
        print(rec["name"], " ".join(f"{c}={'ok' if rows[-1][c]['ok'] else rows[-1][c]['reason']}" for c in CHECKS),
              flush=True)
    runs = [(m, json.loads(m.read_text())["rows"]) for m in args.merge or []]
    for fresh in (True, False):  # rows a run evaluated itself win over rows it carried from another
        for merged, earlier in runs:
            done = {r["name"] for r in rows}
            rows += [{**r, "from": r.get("from", merged.name)} for r in earlier
                     if r["name"] not in done and ("from" not in r) == fresh]
    if args.drop_absent:
        present = {r["name"] for r in corpus_records(args.corpus) if r.get("status") == "ok"}
        rows = [r for r in rows if r["name"] in present]
    if args.merge:
        order = {r["name"]: i for i, r in enumerate(corpus_records(args.corpus))}
        rows.sort(key=lambda r: order.get(r["name"], len(order)))
    table = render(rows, failed)
    print(table)
    if args.no_write:
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m bench.coverage " + " ".join(argv if argv is not None else sys.argv[1:])
    title = "" if args.format == "float" else f", every model converted to {args.format}"
    head = (f"# Coverage over the model corpus{title}\n\ncommand: `{cmd}`\n\nmachine: {platform.machine()}, "
            f"{os.cpu_count()} cores shared with other jobs; onnxruntime 1 thread; "
            f"{time.perf_counter() - t0:.0f} s\n\n")
    (args.out / f"{stamp}-coverage.md").write_text(head + table)
    record = {"command": cmd, "rows": rows, "export_failures": failed}
    (args.out / f"{stamp}-coverage.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out / f'{stamp}-coverage.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
