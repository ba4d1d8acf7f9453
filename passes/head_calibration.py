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
    import onnxruntime as ort

    feeds = load_calibration(path)
    graph = model.graph
    names = {i.name for i in graph.inputs}
    missing = names - set(feeds)
    if missing:
        raise OptionError(f"--head-calibration {path}: no array for model input(s) {sorted(missing)}")
    taps = [s.pv.outputs[0] for s in sites]
    added = [t for t in taps if t not in graph.outputs]
    graph.outputs.extend(added)
    with tempfile.TemporaryDirectory() as tmp:
        try:  # a file beside its weights: models with external data cannot be handed over as bytes
            ir.save(model, f"{tmp}/calibration.onnx", external_data="calibration.onnx.data")
        finally:
            for t in added:
                graph.outputs.remove(t)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(f"{tmp}/calibration.onnx", so, providers=["CPUExecutionProvider"])
    groups = sites[0].num_kv_heads
    scores = np.zeros((len(sites), groups))
    n = len(next(iter(feeds.values())))
    for start in range(0, n, BATCH):
        batch = {k: v[start:start + BATCH] for k, v in feeds.items() if k in names}
        es = sess.run([t.name for t in taps], batch)
        for i, (site, e) in enumerate(zip(sites, es)):
            mask = batch.get("attention_mask")
            valid = np.ones((e.shape[0], e.shape[2])) if mask is None else mask[:, -e.shape[2]:].astype(np.float64)
            per_head = np.einsum("bhid,bi->h", np.abs(e.astype(np.float64)), valid)
            scores[i] += per_head.reshape(groups, -1).sum(axis=1)
    logger.info("head calibration: %d inputs from %s", n, path)
    return scores


def choose_heads(scores: np.ndarray, counts: list[int], importance: str) -> list[list[int]]:
    """Kept groups per layer (ascending); ties: the lower index wins."""
    groups = scores.shape[1]
    kept, acc, sel = [], np.zeros(groups), np.arange(groups)
    for layer, n in enumerate(counts):
        if importance == "layer":
            order = np.argsort(-scores[layer], kind="stable")[:n]
            kept.append(sorted(order.tolist()))
            continue
        if n < len(sel):
            sel = sel[np.sort(np.argsort(-acc[sel], kind="stable")[:n])]
        kept.append(sel.tolist())
        acc[sel] += scores[layer][sel]
    return kept
