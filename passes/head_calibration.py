"""Head scores from calibration data, for prune-heads' ``calibrated`` rule.

The calibration file is an ``.npz`` whose arrays are the model's inputs (same names), batch first:
for an encoder ``input_ids``, ``attention_mask`` (and ``token_type_ids``) as ``[N, S]``;
``bench/head_calibration.py`` writes one from WikiText-2. The model (as it is when prune-heads
runs) is executed in onnxruntime with every layer's attention output ``E = MatMul(P, V)`` as an
extra output, and each head's score is SpAtten's: the sum over tokens and dims of ``|E|``, over
valid query rows only (rows whose ``attention_mask`` entry is 1; for a KV-cache step the last
``S_q`` entries of the mask), summed over the calibration inputs. Heads are then chosen once:

- ``layer``: each layer keeps its own highest-scoring groups (a head in layer 4 has nothing to do
  with the head of the same index in layer 3, so nothing is carried across layers);
- ``cascade``: SpAtten's rule on the calibration scores - scores accumulated over the earlier
  layers, top-k among the groups still kept, a pruned group stays pruned.

``ablation`` importance (:func:`ablation_scores`) replaces SpAtten's magnitude by what removing the
head does to the output: a group's score is the mean cosine distance, over the calibration inputs,
between the model's first output mean-pooled over valid tokens (sentence-transformers' pooling; a
rank-3 output ``[B, S, D]``, other ranks are flattened) with every head and with only that group
removed. Removing a group is done by zeroing its ``E`` rows, which is exactly what slicing its
Q/K/V columns and output-projection rows computes. Heads are then chosen per layer as with ``layer``.
It costs ``1 + layers * groups`` passes over the calibration data at compile time (only the layers
that lose heads are ablated).

Head reconstruction (:func:`context_stats`, :func:`reconstruct_output`) needs one more pass: the
second moments of each pruned layer's attention contexts, from which the output projection of
the kept heads is refitted in closed form.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from spatten_compiler.errors import OptionError

from .find_attention import AttentionSite

logger = logging.getLogger(__name__)

BATCH = 8


def load_calibration(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            feeds = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise OptionError(f"--head-calibration {path}: cannot read an .npz of input arrays: {e}") from e
    sizes = {len(v) for v in feeds.values()}
    if not feeds or len(sizes) != 1:
        raise OptionError(f"--head-calibration {path}: expected input arrays with one batch size, got "
                          f"{ {k: v.shape for k, v in feeds.items()} }")
    return feeds


def calibration_scores(model: ir.Model, sites: list[AttentionSite], path: str | Path) -> np.ndarray:
    """``[layers, groups]`` scores of the model on the calibration inputs."""
    groups = sites[0].num_kv_heads
    scores = np.zeros((len(sites), groups))
    for i, e, valid in _contexts(model, sites, path):
        per_head = np.einsum("bhid,bi->h", np.abs(e), valid)
        scores[i] += per_head.reshape(groups, -1).sum(axis=1)
    return scores


def context_stats(model: ir.Model, sites: list[AttentionSite], path: str | Path,
                  layers: list[int]) -> dict[int, tuple[np.ndarray, int]]:
    """Per layer of ``layers``: ``(sum x x^T, rows)`` over the attention contexts ``x`` of the
    calibration inputs (one valid query row of ``E`` with its heads side by side, ``[H * Dh]``
    head-major: what the output projection reads)."""
    stats = {i: [0.0, 0] for i in layers}
    for i, e, valid in _contexts(model, sites, path, layers, "head reconstruction"):
        b, h, s, d = e.shape
        x = e.transpose(0, 2, 1, 3).reshape(b * s, h * d)[valid.reshape(-1) > 0]
        acc = stats[i]
        acc[0] = acc[0] + x.T @ x
        acc[1] += len(x)
    return {i: (g, n) for i, (g, n) in stats.items()}


def _contexts(model: ir.Model, sites: list[AttentionSite], path: str | Path, layers: list[int] | None = None,
              what: str = "head calibration"):
    """Yields ``(layer, E, valid)`` for every calibration batch: ``E = MatMul(P, V)`` of that layer as
    float64 ``[B, H, S_q, Dh]`` and ``valid`` ``[B, S_q]`` (1 for the query rows of real tokens)."""
    feeds = load_calibration(path)
    names = _check_feeds(model, feeds, path)
    chosen = list(range(len(sites))) if layers is None else list(layers)
    taps = [sites[i].pv.outputs[0] for i in chosen]
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(model, tmp, taps)
    n = len(next(iter(feeds.values())))
    for start in range(0, n, BATCH):
        batch = {k: v[start:start + BATCH] for k, v in feeds.items() if k in names}
        mask = batch.get("attention_mask")
        for i, e in zip(chosen, sess.run([t.name for t in taps], batch)):
            valid = np.ones((e.shape[0], e.shape[2])) if mask is None else mask[:, -e.shape[2]:].astype(np.float64)
            yield i, e.astype(np.float64), valid
    logger.info("%s: %d inputs from %s", what, n, path)


def reconstruct_output(weight: np.ndarray, stats: tuple[np.ndarray, int], kept: np.ndarray,
                       ridge: float) -> np.ndarray:
    """Output-projection rows for the ``kept`` context columns that reproduce the full projection
    ``x @ weight`` (``weight`` ``[H * Dh, D]``) best on the calibration contexts: the pruned columns
    are regressed on the kept ones, ``x_P ~ x_K A`` (ridge ``ridge`` times the kept columns' mean
    second moment), and folded in, ``W_K + A W_P``. There is no constant term: a pruned head's mean
    depends on the text (docs/experiments.md, mean compensation), and on other text a fitted
    offset did more harm than good."""
    gram, rows = stats
    if rows < 1:
        raise OptionError("head reconstruction: the calibration inputs have no valid tokens")
    second = gram / rows
    pruned = np.setdiff1d(np.arange(len(weight)), kept)
    ckk = second[np.ix_(kept, kept)]
    lam = ridge * max(float(np.trace(ckk)) / max(len(kept), 1), 1e-30)
    a = np.linalg.solve(ckk + lam * np.eye(len(kept)), second[np.ix_(kept, pruned)])
    w = weight.astype(np.float64)
    return w[kept] + a @ w[pruned]


def _check_feeds(model: ir.Model, feeds: dict[str, np.ndarray], path: str | Path) -> set[str]:
    names = {i.name for i in model.graph.inputs}
    missing = names - set(feeds)
    if missing:
        raise OptionError(f"--head-calibration {path}: no array for model input(s) {sorted(missing)}")
    return names


def _session(model: ir.Model, tmp: str, extra_outputs: list[ir.Value], extra_inputs: list[ir.Value] = (),
             wraps: list[tuple[ir.Value, ir.Value]] = ()):
    """An onnxruntime session of ``model`` with temporary extra graph inputs/outputs; ``wraps``: each
    ``(value, mask)`` makes every consumer of ``value`` read ``value * mask`` instead. The model is
    restored before returning."""
    import onnxruntime as ort

    graph = model.graph
    added = [t for t in extra_outputs if t not in graph.outputs]
    graph.outputs.extend(added)
    graph.inputs.extend(extra_inputs)
    muls, restore = [], []
    for value, mask in wraps:
        uses = list(value.uses())
        mul = ir.node("Mul", [value, mask], name=f"ablation_{mask.name}")
        graph.insert_after(value.producer(), mul)  # saved graphs must stay in topological order
        muls.append(mul)
        for use in uses:
            use.node.replace_input_with(use.idx, mul.outputs[0])
            restore.append((use.node, use.idx, value))
    try:  # a file beside its weights: models with external data cannot be handed over as bytes
        ir.save(model, f"{tmp}/calibration.onnx", external_data="calibration.onnx.data")
    finally:
        for node, idx, value in restore:
            node.replace_input_with(idx, value)
        for mul in muls:
            graph.remove(mul, safe=True)
        for t in added:
            graph.outputs.remove(t)
        for i in extra_inputs:
            graph.inputs.remove(i)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(f"{tmp}/calibration.onnx", so, providers=["CPUExecutionProvider"])


def _pooled(out: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``[B, F]``: a rank-3 output mean-pooled over its valid rows (the last rows of the mask), else flattened."""
    out = out.astype(np.float64)
    if out.ndim == 3:
        w = np.ones(out.shape[:2]) if mask is None else mask[:, -out.shape[1]:].astype(np.float64)
        return (out * w[..., None]).sum(axis=1) / np.maximum(w.sum(axis=1, keepdims=True), 1e-9)
    return out.reshape(len(out), -1)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def ablation_scores(model: ir.Model, sites: list[AttentionSite], path: str | Path,
                    layers: list[int] | None = None) -> np.ndarray:
    """``[layers, groups]``: mean cosine distance of the pooled first output when only that group is
    removed; only the rows of ``layers`` (default all) are computed, the others are 0."""
    feeds = load_calibration(path)
    names = _check_feeds(model, feeds, path)
    graph = model.graph
    groups, heads = sites[0].num_kv_heads, sites[0].num_heads
    out = graph.outputs[0]
    masks = []
    for i, site in enumerate(sites):
        e = site.pv.outputs[0]
        dtype = e.type.dtype if e.type is not None else ir.DataType.FLOAT
        masks.append(ir.Value(name=f"spatten_ablation_mask_{i}", type=ir.TensorType(dtype),
                              shape=ir.Shape([1, heads, 1, 1])))
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(model, tmp, [], masks, [(s.pv.outputs[0], m) for s, m in zip(sites, masks)])
    dtypes = [m.type.dtype.numpy() for m in masks]
    ones = [np.ones((1, heads, 1, 1), dt) for dt in dtypes]
    n = len(next(iter(feeds.values())))
    scores = np.zeros((len(sites), groups))
    per = heads // groups
    ablations = groups * (len(sites) if layers is None else len(layers))
    logger.info("head ablation: %d inputs x %d ablations (one model run each, plus the unablated one)", n, ablations)
    for start in range(0, n, BATCH):
        if start:  # long work: one line per batch
            logger.info("head ablation: %d/%d inputs done", start, n)
        batch = {k: v[start:start + BATCH] for k, v in feeds.items() if k in names}
        mask = batch.get("attention_mask")

        def run(ms: list[np.ndarray], batch=batch, mask=mask) -> np.ndarray:
            return _pooled(sess.run([out.name], {**batch, **{m.name: a for m, a in zip(masks, ms)}})[0], mask)

        dense = run(ones)
        for layer in range(len(sites)) if layers is None else layers:
            for g in range(groups):
                ms = list(ones)
                ms[layer] = ones[layer].copy()
                ms[layer][0, g * per:(g + 1) * per] = 0
                scores[layer, g] += (1 - _cosine(dense, run(ms))).sum()
    logger.info("head ablation: %d inputs from %s, %d ablations", n, path, ablations)
    return scores / n


def choose_heads(scores: np.ndarray, counts: list[int], importance: str) -> list[list[int]]:
    """Kept groups per layer (ascending); ties: the lower index wins."""
    groups = scores.shape[1]
    kept, acc, sel = [], np.zeros(groups), np.arange(groups)
    for layer, n in enumerate(counts):
        if importance in ("layer", "ablation"):
            order = np.argsort(-scores[layer], kind="stable")[:n]
            kept.append(sorted(order.tolist()))
            continue
        if n < len(sel):
            sel = sel[np.sort(np.argsort(-acc[sel], kind="stable")[:n])]
        kept.append(sel.tolist())
        acc[sel] += scores[layer][sel]
    return kept
