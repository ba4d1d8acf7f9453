"""NumPy implementations of the progressive-quantization ops (oracle for ``passes/quant_functions``)
and the K/V fetch statistics the reference runtime reports.

The plane split follows the bit-split definition in ``passes/quant_functions`` with NumPy's own
rounding and clipping (the only rounding is ``round(x / s)``; the split is exact, so the planes must
equal onnxruntime's bit for bit). Each call appends a record to :data:`LOG`;
:func:`fetch_report` turns one run's records into per-layer statistics.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from .spatten_ops import spatten_op

LOG: list[dict] = []


def reset() -> None:
    LOG.clear()


def bits_of(step: float, qmax: float) -> tuple[int, int]:
    """(MSB bits, LSB bits) from the step 2^l and the full quantizer's qmax = 2^(m+l-1) - 1."""
    lsb = int(round(np.log2(float(step))))
    return int(qmax).bit_length() + 1 - lsb, lsb


def _quantize(x: np.ndarray, scale: np.ndarray, qmax: np.ndarray) -> np.ndarray:
    q = np.clip(np.round(x.astype(np.float32) / scale.astype(np.float32)), -float(qmax), float(qmax))
    return q.astype(np.int32)


@spatten_op
class Quantize(OpRun):
    def _run(self, x, scale, qmax):
        LOG.append({"op": "Quantize", "bits": bits_of(1, qmax), "numel": x.size, "scales": scale.size})
        return (_quantize(x, scale, qmax).astype(np.int8),)


def split(x: np.ndarray, scale: np.ndarray, step: np.ndarray, qmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The high m and low l bits of the (m+l)-bit quantization ``Quantize(x, scale, qmax)``:
    msb = floor(q / 2^l) (int8), lsb = q - msb * 2^l in [0, 2^l) (uint8)."""
    q = _quantize(x, scale, qmax)
    k = int(round(float(step)))  # 2^l
    msb = np.floor_divide(q, k)
    return msb.astype(np.int8), (q - msb * k).astype(np.uint8)


@spatten_op
class QuantizeSplit(OpRun):
    def _run(self, x, scale, step, qmax):
        LOG.append({"op": "QuantizeSplit", "bits": bits_of(step, qmax), "numel": x.size, "scales": scale.size})
        return split(x, scale, step, qmax)


@spatten_op
class Dequantize(OpRun):
    def _run(self, q, scale):
        return ((q.astype(np.float32) * scale).astype(np.float32),)


def dequantize_msb(msb: np.ndarray, scale: np.ndarray, step: np.ndarray) -> np.ndarray:
    """MSB only: each 2^l-wide bin of the fine grid read at its middle."""
    step = np.float32(step)
    mid = msb.astype(np.float32) * step + (step - np.float32(1)) / np.float32(2)
    return (mid * scale).astype(np.float32)


@spatten_op
class DequantizeMSB(OpRun):
    def _run(self, msb, scale, step):
        return (dequantize_msb(msb, scale, step),)


@spatten_op
class DequantizeSplit(OpRun):
    def _run(self, msb, lsb, scale, step):
        q = msb.astype(np.int32) * int(round(float(step))) + lsb.astype(np.int32)
        return ((q.astype(np.float32) * scale).astype(np.float32),)


@spatten_op
class LowConfidence(OpRun):
    def _run(self, p, thr):
        return (p.max(axis=-1, keepdims=True) <= thr,)


@spatten_op
class LowConfidenceUniform(OpRun):
    def _run(self, p, thr):
        nkeys = (p > 0).sum(axis=-1, keepdims=True).astype(np.float32)
        return (p.max(axis=-1, keepdims=True) * nkeys <= thr,)


@spatten_op
class ProgressiveContext(OpRun):
    def _run(self, low, p_msb, p_full, v_msb, v_full, qvalid):
        ctx = np.where(low, p_full @ v_full, p_msb @ v_msb).astype(np.float32)
        need = low[..., 0].astype(np.float32) * qvalid[:, None, :].astype(np.float32)
        LOG.append({"op": "ProgressiveContext", "need": need, "qvalid": qvalid.astype(np.float32),
                    "nkeys": (p_msb > 0).sum(axis=-1).max(axis=(1, 2)), "head_dim": v_full.shape[-1],
                    "values": v_msb is not v_full and not np.array_equal(v_msb, v_full)})
        return ctx, need


def fetch_bytes(need: np.ndarray, qvalid: np.ndarray, nkeys: np.ndarray, head_dim: int, msb: int, lsb: int,
                tensors: int = 2, scale_bytes: float = 0.0) -> dict[str, float]:
    """K/V bytes one layer reads, over real keys, vs fp32.

    Row policy (the paper's: each query row streams the MSB planes and, when unconfident, the LSB
    planes): per (b, h), ``n_keys * Dh * (msb + f_bh * lsb) / 8`` per tensor, f_bh = fraction of
    the head's real rows needing LSBs. Head policy (K/V resident on chip per head, as in an encoder):
    the LSB planes are read once if any row of the head needs them. ``scale_bytes`` (the layer's
    float32 scales, read once with the MSB planes) is added to both.
    """
    rows = qvalid.sum(axis=1)  # [B]
    heads = need.shape[1]
    f = need.sum(axis=2) / np.maximum(rows[:, None], 1)  # [B, H]
    elems = (nkeys * head_dim)[:, None] * np.ones((1, heads))  # [B, H]
    fp32 = float((elems * 4 * tensors).sum())
    row = float((elems * (msb + f * lsb) / 8 * tensors).sum()) + scale_bytes
    head = float((elems * (msb + (f > 0) * lsb) / 8 * tensors).sum()) + scale_bytes
    return {"rows": float(rows.sum() * heads), "rows_lsb": float(need.sum()),
            "heads": float((rows > 0).sum() * heads), "heads_lsb": float(((f > 0) & (rows[:, None] > 0)).sum()),
            "bytes_fp32": fp32, "bytes_read": row, "bytes_read_head_policy": head}


def fetch_report() -> list[dict]:
    """Per-layer statistics of the last run. Progressive models: one entry per attention layer
    (the quantizers since the previous ProgressiveContext belong to it); static models: one entry
    per quantized tensor with ``lsb_bits`` 0 and ``bytes_read = bits / 32`` of fp32."""
    out: list[dict] = []
    bits: tuple[int, int] | None = None
    scales = 0
    for rec in LOG:
        if rec["op"] == "QuantizeSplit":
            bits, scales = rec["bits"], scales + rec["scales"]
        elif rec["op"] == "Quantize":
            m = rec["bits"][0]
            out.append({"layer": None, "msb_bits": m, "lsb_bits": 0, "lsb_fraction": 0.0,
                        "bytes_fp32": 4.0 * rec["numel"], "bytes_read": m / 8 * rec["numel"] + 4.0 * rec["scales"]})
        elif rec["op"] == "ProgressiveContext" and bits is not None:
            stats = fetch_bytes(rec["need"], rec["qvalid"], rec["nkeys"], rec["head_dim"], *bits,
                                tensors=2 if rec["values"] else 1, scale_bytes=4.0 * scales)
            scales = 0
            stats.update(layer=sum(1 for o in out if o["layer"] is not None), msb_bits=bits[0], lsb_bits=bits[1],
                         lsb_fraction=stats["rows_lsb"] / max(stats["rows"], 1.0))
            out.append(stats)
    return out
