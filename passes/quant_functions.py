"""SpAtten progressive-quantization ops as ``spatten`` ONNX functions (bodies are standard ONNX).

Split-precision K/V layout (what a KV cache would store; shapes as the attention core sees them)::

    K^T planes  msb, lsb : int8 [B, Hkv, Dh, S]      (V planes: int8 [B, Hkv, S, Dh])
    scale s              : float32, the MSB plane's step, broadcastable to the planes, one value per
                           reduction group (granularity "head": [B, Hkv, 1, 1]; "channel": K
                           [B, Hkv, Dh, 1], V [B, Hkv, 1, Dh]; "token": K [B, Hkv, 1, S], V
                           [B, Hkv, S, 1]; "tensor": [B, 1, 1, 1]); s = abs-max / (2^(m-1) - 1)
    full value           q   = msb * 2^l + lsb                   (exact, integers)
    dequantized          x   = q * (s / 2^l)                     (MSB + LSB)
                         x_m = msb * s                           (MSB only)

Residual split. The MSB plane IS the static m-bit quantizer, ``msb = clip(round(x / s), -qmax,
qmax)`` with ``qmax = 2^(m-1) - 1`` (so MSB-only equals ``Quantize``/``Dequantize`` at m bits, bit
for bit), and the LSB plane quantizes the residual ``x - msb * s`` with step ``s / 2^l``:
``lsb = clip(round((x / s - msb) * 2^l), -2^(l-1), 2^(l-1) - 1)``. ``x / s - msb`` is exact in
float32 (Sterbenz: |x/s - msb| <= 1/2 and msb is the nearest integer), so the NumPy oracle and the
ONNX body agree bit for bit. Error bounds: MSB only ``|x - x_m| <= s / 2``; MSB + LSB ``<= s / 2^(l+1)``,
except on the residual's top edge (residual within half a step of ``+s/2``, where ``lsb`` saturates
at ``2^(l-1) - 1``): there ``<= s / 2^l``, one fine step.

The planes are int8 containers of 4..8-bit values: ONNX int4 needs opset 21 (the real exports are
opset 17 and function bodies must use the model's opset) and DequantizeLinear only takes per-tensor,
per-axis or blocked scales, not the broadcast per-(batch, head) run-time scales used here. Bit
packing is the accelerator backend's job; bytes are counted at the true bit widths.

  Quantize(x, scale, qmax) -> q                     static (MSB-only) storage
  QuantizeSplit(x, scale, step, qmax) -> msb, lsb   step = 2^l; msb == Quantize(x, scale, qmax)
  Dequantize(q, scale) -> x                         static, or MSB only (same scale)
  DequantizeSplit(msb, lsb, scale, step) -> x       MSB + LSB: (msb * step + lsb) * (scale / step)
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
    t = Div (x, scale)
    rq = Round (t)
    lo = Neg (qmax)
    m = Clip (rq, lo, qmax)
    resid = Sub (t, m)
    fine = Mul (resid, step)
    rl = Round (fine)
    two = Constant <value_float = 2.0> ()
    half = Div (step, two)
    one = Constant <value_float = 1.0> ()
    lhi = Sub (half, one)
    llo = Neg (half)
    l = Clip (rl, llo, lhi)
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
    fine = Div (scale, step)
    x = Mul (q, fine)
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
