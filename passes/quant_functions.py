"""SpAtten progressive-quantization ops as ``spatten`` ONNX functions (bodies are standard ONNX).

Split-precision K/V layout (what a KV cache would store; shapes as the attention core sees them)::

    K^T planes  msb, lsb : int8, uint8 [B, Hkv, Dh, S]      (V planes: [B, Hkv, S, Dh])
    scale s              : float32, the fine step of the full (m+l)-bit quantizer, broadcastable to
                           the planes, one value per reduction group (granularity "head": [B, Hkv,
                           1, 1]; "channel": K [B, Hkv, Dh, 1], V [B, Hkv, 1, Dh]; "token": K
                           [B, Hkv, 1, S], V [B, Hkv, S, 1]; "tensor": [B, 1, 1, 1]);
                           s = abs-max / (2^(m+l-1) - 1)
    full value           q   = clip(round(x / s), -(2^(m+l-1) - 1), 2^(m+l-1) - 1)
                             = msb * 2^l + lsb,  msb = floor(q / 2^l), lsb = q - msb * 2^l in [0, 2^l)
    dequantized          x   = q * s                                   (MSB + LSB)
                         x_m = (msb * 2^l + (2^l - 1) / 2) * s         (MSB only: the bin's middle)

Bit split. The planes are the high and low bits of one (m+l)-bit quantization, so MSB + LSB equals
static (m+l)-bit quantization bit for bit (threshold 1.0), and MSB only is itself an m-bit uniform
quantizer - 2^m bins of width 2^l * s, read at their middle - using all 2^m codes of the m-bit
plane (a symmetric static m-bit quantizer uses 2^m - 1). Every LSB bit counts, one included.
Error bounds: MSB + LSB ``|x - q s| <= s / 2``; MSB only ``<= 2^(l-1) * s`` (half an MSB bin).
Numerics: the only rounding is ``round(x / s)``, whose ties lie at fine half-steps, exactly as in
static quantization; the split and the dequantizations are exact in float32 up to the one final
multiply, so the NumPy oracle and the ONNX bodies agree bit for bit.

(Sessions before this one used a residual split: MSB = the static m-bit quantizer, LSB = its
residual rounded on a 2^l finer grid. One LSB bit was then worse than none - a round-to-nearest
residual clipped to {-1, 0} only corrects downwards - and a mid-rise residual grid put every MSB
grid point on a fine-bin edge, where 1e-7 float differences flip the bin.)

The planes are int8 (MSB, signed) and uint8 (LSB) containers of 1..8-bit values: ONNX int4 needs opset 21 (the real exports are
opset 17 and function bodies must use the model's opset) and DequantizeLinear only takes per-tensor,
per-axis or blocked scales, not the broadcast per-(batch, head) run-time scales used here. Bit
packing is the accelerator backend's job; bytes are counted at the true bit widths.

  Quantize(x, scale, qmax) -> q                     static (MSB-only) storage
  QuantizeSplit(x, scale, step, qmax) -> msb, lsb   step = 2^l, qmax = 2^(m+l-1) - 1: the planes of
                                                    Quantize(x, scale, qmax)
  Dequantize(q, scale) -> x                         static: q * scale
  DequantizeMSB(msb, scale, step) -> x              MSB only: (msb * step + (step - 1) / 2) * scale
  DequantizeSplit(msb, lsb, scale, step) -> x       MSB + LSB: (msb * step + lsb) * scale
  LowConfidence(p_msb, thr) -> low                 low[B, H, Sq, 1] = max_j p_msb <= thr
  LowConfidenceUniform(p_msb, thr) -> low          max_j p_msb * n_keys <= thr (n_keys: p > 0, unmasked)
  ProgressiveContext(low, p_msb, p_full, v_msb, v_full, qvalid) -> ctx, need
      ctx = low ? p_full @ v_full : p_msb @ v_msb (per row); need[B, H, Sq] = low * qvalid (stats)
  Other readers of the probabilities get Where(low, p_full, p_msb).
"""

from __future__ import annotations

from .spatten_ops import define

FUNCTIONS = ("Quantize", "QuantizeSplit", "Dequantize", "DequantizeMSB", "DequantizeSplit", "LowConfidence", "LowConfidenceUniform",
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
    q = Clip (rq, lo, qmax)
    d = Div (q, step)
    h = Floor (d)
    hs = Mul (h, step)
    l = Sub (q, hs)
    msb = Cast <to = 3> (h)
    lsb = Cast <to = 2> (l)
}""")

define("Dequantize", """
<domain: "spatten", opset_import: ["" : 17]>
Dequantize (q, scale) => (x) {
    qf = Cast <to = 1> (q)
    x = Mul (qf, scale)
}""")

define("DequantizeMSB", """
<domain: "spatten", opset_import: ["" : 17]>
DequantizeMSB (msb, scale, step) => (x) {
    mf = Cast <to = 1> (msb)
    hi = Mul (mf, step)
    one = Constant <value_float = 1.0> ()
    two = Constant <value_float = 2.0> ()
    below = Sub (step, one)
    mid = Div (below, two)
    q = Add (hi, mid)
    x = Mul (q, scale)
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
