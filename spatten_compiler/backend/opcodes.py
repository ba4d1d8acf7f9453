"""The instruction table: every class of the SpAtten-like ISA as one :class:`InstrSpec` row.

Conventions (the simulator implements these; docs/backend.md has the full semantics):
- SRAM addresses (``sram``, ``q``, ``k``, ``v``, ``src``, ``dst``, ``out`` ...) count 32-byte lines
  inside the buffer the field's doc names; DRAM addresses are absolute bytes (40 bit) and carry a
  relocation to their tensor-table entry in the .spbin.
- Run-time decisions live in hardware state, never in the stream: index lists (slots of the index
  buffer, filled by ``topk``), the live-token count (set by ``topk kind=tokens``, used by every
  ``live=1`` row count and by ``compact``), and the per-row requantization predicate of each head
  (set by ``requant``, consumed by ``pred=1``).
- Ratios and thresholds are fixed point with scale 32768 (1.0 = 32768).
Opcode 0 is invalid on purpose: zeroed memory never decodes as an instruction.
"""

from __future__ import annotations

from spatten_compiler.backend.isa import Field, InstrSpec, define

BUFFERS = ("q", "k", "v", "index", "score", "weight", "act")
PLANES = ("full", "msb", "lsb")
TOPK_KINDS = ("tokens", "heads", "values")
ACCUM_KINDS = ("token", "head")
SCORE_RULES = ("sum", "mean", "value")
ELT_OPS = ("copy", "add", "sub", "mul", "div", "neg", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh",
           "exp", "sqrt", "recip", "layernorm", "rmsnorm", "rope", "pow", "max", "min")
ILIST_OPS = ("iota", "append", "copy")
REQUANT_RULES = ("low", "peak", "uniform", "min")  # quantize-kv --lsb-rule fixed / peak / uniform / min
FIXED = 1 << 15  # scale of ratios and thresholds


def _sram(name: str, doc: str) -> Field:
    return Field(name, 16, doc + " (32-byte lines)", hex=True)


def _ratio(name: str, doc: str) -> Field:
    return Field(name, 16, doc, scale=FIXED, hi=FIXED)


DRAM = Field("dram", 40, "DRAM byte address (relocated)", hex=True)
ROWS = Field("rows", 16, "row count (an upper bound when live=1)")
ROW_BYTES = Field("row_bytes", 14, "bytes per row")
LIVE = Field("live", 1, "rows = min(rows, live-token count)")
HEAD = Field("head", 8, "head number")
IDX = Field("idx", 12, "index-list slot")
PRED = Field("pred", 1, "only rows whose requantization predicate is set")
KV = Field("kv", 1, "which cache", symbols=("k", "v"))
PLANE = Field("plane", 2, "bit plane", symbols=PLANES)
COLS = Field("cols", 14, "elements per row")

_MEMORY = (
    Field("buf", 3, "on-chip buffer", symbols=BUFFERS),
    _sram("sram", "buffer address"),
    DRAM,
    ROWS,
    ROW_BYTES,
    Field("stride", 19, "DRAM bytes between rows (0 = row_bytes)"),
    LIVE,
    Field("hmask", 1, "skip this transfer when head `head` is pruned"),
    HEAD,
)

TABLE: tuple[InstrSpec, ...] = (
    InstrSpec("finish", 1, "compute", (), "end of the program once all stages drained"),
    InstrSpec("cfg.attn", 2, "compute", (
        Field("layer", 8, "layer number (for the debug trace)"),
        Field("heads", 8, "query heads"),
        Field("kv_heads", 8, "key/value heads (GQA groups)"),
        Field("head_dim", 10, "dimension per head"),
        Field("tokens", 16, "tokens in the context (upper bound)"),
        Field("causal", 1, "mask keys whose row number > the query's position (past + query row)"),
        Field("past", 16, "position of the first query row (decoder steps)"),
        Field("scale", 32, "Q x K scale (float32)", f32=True),
        Field("div", 1, "scores are divided by scale (the graph's Div), not multiplied"),
    ), "attention dimensions of the following instructions"),
    InstrSpec("cfg.quant", 3, "compute", (
        Field("q_bits", 5, "Q width"),
        Field("k_msb", 5, "K MSB-plane bits (the full width when k_lsb = 0)"),
        Field("k_lsb", 5, "K LSB-plane bits (0 = no progressive quantization)"),
        Field("v_bits", 5, "V width"),
        _ratio("threshold", "the requantization rule's threshold on the row's max probability"),
        Field("rule", 2, "which rows fetch K/V LSBs: low = max P <= threshold, peak = max P > threshold",
              symbols=REQUANT_RULES),
    ), "bit widths and the requantization rule"),
    InstrSpec("cfg.prune", 4, "compute", (
        _ratio("token_keep", "fraction of live tokens topk kind=tokens keeps"),
        _ratio("head_keep", "fraction of live heads topk kind=heads keeps"),
        _ratio("value_keep", "fraction of V rows topk kind=values keeps"),
        Field("protect_first", 8, "leading tokens always kept (CLS / sinks)"),
        Field("protect_recent", 16, "trailing tokens always kept (decoders)"),
        Field("score", 2, "token importance rule", symbols=SCORE_RULES),
    ), "pruning ratios of the following top-k instructions"),
    InstrSpec("load", 5, "load", _MEMORY, "DMA rows DRAM -> buffer"),
    InstrSpec("store", 6, "store", _MEMORY, "DMA rows buffer -> DRAM"),
    InstrSpec("fetch.kv", 7, "load", (
        KV, PLANE, HEAD,
        _sram("sram", "K or V buffer address"),
        DRAM, ROW_BYTES, IDX, PRED,
    ), "fetch the K/V rows listed in index slot idx (one bit plane) of one head"),
    InstrSpec("store.kv", 8, "store", (
        KV, PLANE, HEAD,
        _sram("sram", "activation buffer address of the head's rows"),
        DRAM, ROW_BYTES, ROWS, LIVE,
    ), "quantize one head's K/V rows and write one bit plane"),
    InstrSpec("qk", 9, "compute", (
        HEAD,
        _sram("q", "activation buffer address of the head's Q columns"),
        _sram("k", "K buffer address"),
        _sram("out", "score buffer address"),
        IDX, PRED,
    ), "scores of the live queries against the keys of index slot idx (pred: add the LSB planes)"),
    InstrSpec("softmax", 10, "compute", (
        HEAD, _sram("src", "score buffer address"), _sram("dst", "score buffer address"), PRED,
    ), "row softmax of one head's scores (pred: only predicated rows)"),
    InstrSpec("requant", 11, "compute", (
        HEAD, _sram("src", "score buffer address of the probabilities"),
    ), "set the head's row predicate where the row max probability < threshold"),
    InstrSpec("topk", 12, "compute", (
        Field("kind", 2, "what is ranked", symbols=TOPK_KINDS),
        HEAD,
        _sram("src", "score buffer address of the scores ranked"),
        Field("idx_in", 12, "index slot of the candidates"),
        Field("idx_out", 12, "index slot written (original order kept)"),
    ), "quick-select top-k; kind=tokens also sets the live-token count"),
    InstrSpec("accum", 13, "compute", (
        Field("kind", 1, "importance accumulated", symbols=ACCUM_KINDS),
        HEAD,
        _sram("src", "probabilities (token) / head output (head)"),
        _sram("dst", "score buffer address of the accumulator"),
        Field("idx", 12, "index slot naming the key row of each column (token)"),
    ), "token importance acc[idx[j]] += column sum j; head importance acc[head] += sum |E|"),
    InstrSpec("pv", 14, "compute", (
        HEAD,
        _sram("prob", "score buffer address"),
        _sram("v", "V buffer address"),
        _sram("out", "activation buffer address"),
        IDX,
    ), "Prob x V over the V rows of index slot idx (local value pruning)"),
    InstrSpec("gemm", 15, "compute", (
        _sram("inp", "activation buffer address"),
        _sram("wgt", "weight buffer address"),
        _sram("out", "activation buffer address"),
        ROWS,
        Field("k", 14, "reduction size"),
        Field("n", 14, "output columns"),
        Field("acc", 1, "accumulate into out"),
        LIVE,
        Field("hmask", 1, "skip this GEMM when head `head` is pruned"),
        HEAD,
    ), "dense GEMM for projections and the FFN"),
    InstrSpec("elt", 16, "compute", (
        Field("op", 5, "operation", symbols=ELT_OPS),
        _sram("a", "activation buffer address"),
        _sram("b", "second operand (norms: gamma then beta rows)"),
        _sram("out", "activation buffer address"),
        ROWS, COLS, LIVE,
        Field("bcast", 1, "b is one row broadcast over all rows"),
    ), "element-wise and normalization ops"),
    InstrSpec("compact", 17, "compute", (
        Field("buf", 1, "buffer", symbols=("act", "score")),
        _sram("src", "buffer address"),
        _sram("dst", "buffer address"),
        IDX, COLS,
    ), "keep the rows listed in index slot idx, in order (cascade token pruning of activations)"),
    InstrSpec("ilist", 18, "compute", (
        Field("op", 2, "list operation", symbols=ILIST_OPS),
        Field("dst", 12, "index slot written"),
        Field("src", 12, "index slot read (copy)"),
        Field("value", 16, "iota: length; append: the row number appended"),
        LIVE,
    ), "index lists: iota dst=[0,value) (live: [0,min(value,live))), append value, copy src"),
    InstrSpec("fetch.rows", 19, "load", (
        Field("buf", 3, "on-chip buffer", symbols=BUFFERS),
        _sram("sram", "buffer address"),
        DRAM, ROW_BYTES, IDX,
    ), "gather table rows (embeddings) whose row numbers are the entries of index slot idx"),
    InstrSpec("sync.load", 20, "load", (), "no operation; carries dependency tokens"),
    InstrSpec("sync.compute", 21, "compute", (), "no operation; carries dependency tokens"),
    InstrSpec("sync.store", 22, "store", (), "no operation; carries dependency tokens"),
)

for _spec in TABLE:
    define(_spec)
