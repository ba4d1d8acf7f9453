"""SpAtten progressive-quantization ops as ``spatten`` ONNX functions (bodies are standard ONNX).

Split-precision K/V layout (what a KV cache would store; shapes as the attention core sees them)::

    K^T planes  msb, lsb : int8 [B, Hkv, Dh, S]      (V planes: int8 [B, Hkv, S, Dh])
    scale                : float32, broadcastable to the planes, one value per reduction group
                           (granularity "head": [B, Hkv, 1, 1]; "channel": K [B, Hkv, Dh, 1],
                           V [B, Hkv, 1, Dh]; "token": K [B, Hkv, 1, S], V [B, Hkv, S, 1];
                           "tensor": [B, 1, 1, 1])
    full value           q   = msb * 2^l + lsb                   (exact, integers)
    dequantized          x   = q * scale                         (MSB + LSB)
                         x_m = msb * (scale * 2^l)               (MSB only)

Quantization is linear and symmetric: ``q = clip(round(x / scale), -qmax, qmax)`` with
``qmax = (2^(m-1) - 1) * 2^l + 2^(l-1) - 1`` so that both planes fit m and l signed bits:
``msb = floor((q + 2^(l-1)) / 2^l)`` is ``round(q / 2^l)`` (half up) in [-(2^(m-1) - 1), 2^(m-1) - 1]
and ``lsb = q - msb * 2^l`` in [-2^(l-1), 2^(l-1) - 1]. Rounding (not truncating) the MSB plane
makes the MSB-only value unbiased: its error is at most ``scale * (2^(l-1) + 1/2)``; MSB + LSB is
at most ``scale / 2``. Static m-bit mode (no LSB plane) uses ``qmax = 2^(m-1) - 1``.

The planes are int8 containers of 4..8-bit values: ONNX int4 needs opset 21 (the real exports are
opset 17 and function bodies must use the model's opset) and DequantizeLinear only takes per-tensor,
per-axis or blocked scales, not the broadcast per-(batch, head) run-time scales used here. Bit
packing is the accelerator backend's job; bytes are counted at the true bit widths.

  Quantize(x, scale, qmax) -> q                     static (MSB-only) storage
  QuantizeSplit(x, scale, step, qmax) -> msb, lsb   step = 2^l
  Dequantize(q, scale) -> x                         MSB only: pass scale * step
  DequantizeSplit(msb, lsb, scale, step) -> x       MSB + LSB
  LowConfidence(p_msb, thr) -> low                 low[B, H, Sq, 1] = max_j p_msb <= thr
  LowConfidenceUniform(p_msb, thr) -> low          max_j p_msb * n_keys <= thr (n_keys: p > 0, unmasked)
  ProgressiveContext(low, p_msb, p_full, v_msb, v_full, qvalid) -> ctx, need
      ctx = low ? p_full @ v_full : p_msb @ v_msb (per row); need[B, H, Sq] = low * qvalid (stats)
  Other readers of the probabilities get Where(low, p_full, p_msb).
"""

from __future__ import annotations

from .spatten_ops import define

FUNCTIONS = ("Quantize", "QuantizeSplit", "Dequantize", "DequantizeSplit", "LowConfidence", "LowConfidenceUniform",
             "ProgressiveContext")

define("Quantize", """
<domain: "spatten", opset_import: ["" : 17]>
Quantize (x, scale, qmax) => (q) {
    r = Div (x, scale)
    rq = Round (r)
    lo = Neg (qmax)
    c = Clip (rq, lo, qmax)
    q = Cast <to = 3> (c)
}""")

define("QuantizeSplit", """
<domain: "spatten", opset_import: ["" : 17]>
QuantizeSplit (x, scale, step, qmax) => (msb, lsb) {
    r = Div (x, scale)
    rq = Round (r)
    lo = Neg (qmax)
    q = Clip (rq, lo, qmax)
    two = Constant <value_float = 2.0> ()
    half = Div (step, two)
    shifted = Add (q, half)
    hi = Div (shifted, step)
    m = Floor (hi)
    mstep = Mul (m, step)
    l = Sub (q, mstep)
    msb = Cast <to = 3> (m)
    lsb = Cast <to = 3> (l)
}""")

define("Dequantize", """
<domain: "spatten", opset_import: ["" : 17]>
Dequantize (q, scale) => (x) {
    qf = Cast <to = 1> (q)
    x = Mul (qf, scale)
}""")

define("DequantizeSplit", """
<domain: "spatten", opset_import: ["" : 17]>
DequantizeSplit (msb, lsb, scale, step) => (x) {
    mf = Cast <to = 1> (msb)
    lf = Cast <to = 1> (lsb)
    hi = Mul (mf, step)
    q = Add (hi, lf)
    x = Mul (q, scale)
}""")

define("LowConfidence", """
<domain: "spatten", opset_import: ["" : 17]>
LowConfidence (p, thr) => (low) {
    one = Constant <value_ints = [1]> ()
    maxp, argmax = TopK <axis = -1, largest = 1, sorted = 1> (p, one)
    low = LessOrEqual (maxp, thr)
}""")

define("LowConfidenceUniform", """
<domain: "spatten", opset_import: ["" : 17]>
LowConfidenceUniform (p, thr) => (low) {
    one = Constant <value_ints = [1]> ()
    maxp, argmax = TopK <axis = -1, largest = 1, sorted = 1> (p, one)
    live = Ceil (p)
    last = Constant <value_ints = [-1]> ()
    nkeys = ReduceSum <keepdims = 1> (live, last)
    rel = Mul (maxp, nkeys)
    low = LessOrEqual (rel, thr)
}""")

define("ProgressiveContext", """
<domain: "spatten", opset_import: ["" : 17]>
ProgressiveContext (low, p_msb, p_full, v_msb, v_full, qvalid) => (ctx, need) {
    ctx_full = MatMul (p_full, v_full)
    ctx_msb = MatMul (p_msb, v_msb)
    ctx = Where (low, ctx_full, ctx_msb)
    lowf = Cast <to = 1> (low)
    last = Constant <value_ints = [-1]> ()
    rows = Squeeze (lowf, last)
    one = Constant <value_ints = [1]> ()
    qv = Unsqueeze (qvalid, one)
    need = Mul (rows, qv)
}""")
