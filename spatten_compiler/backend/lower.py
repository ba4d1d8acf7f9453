"""Lower an ONNX model (rewritten by spattenc or dense) to a :class:`Program` for the accelerator.

``emit_model(path, seq_len=N)`` walks the graph once per token block (one block of N rows for an
encoder; for a decoder the prompt block, then one block per generated token) and dispatches every
node through :data:`RULES`, keyed by op type (``spatten.<Function>`` for the SpAtten functions):

  MatMul/Gemm with a weight -> weight-tile ``load`` + ``gemm`` (per head with ``hmask`` when the
                               weight is head-sliced by head pruning)
  Gather from a 2-D table   -> ``load`` of the ids into an index slot + ``fetch.rows``
  norms, element-wise ops   -> ``elt`` (weights/biases ``load``-ed and broadcast)
  an attention block        -> the template in :mod:`.lower_attention` (K/V planes, Q x K, softmax,
                               requantization, top-k, importance, P x V)
  spatten.HeadSelect / GatherTokens / ScatterTokens -> ``topk heads`` / ``compact`` / ``elt copy``
  shape and view ops        -> nothing (addresses are aliased)

Every initializer gets a DRAM region (the tensor table accounts for every weight byte); graph
inputs and outputs get regions; K/V planes get one region per layer and plane. Row counts are
upper bounds with ``live=1``: how many tokens survive is decided by the hardware at run time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from spatten_compiler.backend import lower_attention as attn
from spatten_compiler.backend import lower_evict
from spatten_compiler.backend.emitter import ACT_BYTES, Emitter, LoweringError
from spatten_compiler.backend.graphinfo import VIEW_OPS, GraphInfo, load_onnx, tensor_bytes
from spatten_compiler.backend.hw import HwDesc, load_hw
from spatten_compiler.backend.program import Program

logger = logging.getLogger(__name__)

SLOT_TOKENS, SLOT_HEADS, SLOT_KEYS, SLOT_INPUT0 = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class EmitOptions:
    seq_len: int  # rows of the (first) block: encoder input length or decoder prompt length
    gen_steps: int = 0  # decoder: tokens generated after the prompt, one block each
    hw: HwDesc = dataclasses.field(default_factory=lambda: load_hw(None))

    @property
    def decoder(self) -> bool:
        return self.gen_steps > 0


class Lowering:
    """State of one lowering: the emitter, value -> SRAM address, the current block."""

    def __init__(self, gi: GraphInfo, opts: EmitOptions, path: Path) -> None:
        self.gi, self.opts, self.path = gi, opts, path
        self.live_bound = opts.seq_len  # rows left after the token pruning seen so far (for keep ratios)
        self.heads_live = gi.groups[0].kv_heads if gi.groups else 1  # K/V groups left after head pruning so far
        self._evaluated: dict[str, np.ndarray | None] = {}
        self.e = Emitter(opts.hw)
        self.addr: dict[str, int] = {}
        self.rows = opts.seq_len  # rows of the current block
        self.past = 0  # position of the block's first row
        self.max_rows = opts.seq_len + opts.gen_steps
        self.group_of = gi.group_of_node()
        self.input_slots: dict[str, int] = {}
        self.weights = {name: self.e.region(f"w{i}", "weight", tensor_bytes(t), _bits(t), name)
                        for i, (name, t) in enumerate(gi.inits.items()) if tensor_bytes(t)}  # empty: no bytes
        for inp in gi.model.graph.input:
            if inp.name in gi.inits or "past" in inp.name:
                continue
            tt = inp.type.tensor_type
            shape = gi.shape(inp.name) or []
            per_row = int(np.prod([d or 1 for d in shape[2:]])) * _itemsize(tt.elem_type)  # [batch, token, ...]
            self.e.region(f"in.{inp.name}", "input", self.max_rows * per_row, 8 * _itemsize(tt.elem_type), inp.name)
        self.kv = attn.KVPlanes(self)
        self.prunes_heads = any(n.domain == "spatten" and n.op_type == "HeadSelect" for n in gi.nodes)
        plan = lower_evict.EvictPlan.from_model(gi.model)
        self.evict = lower_evict.EvictLowering(self, plan) if plan is not None and opts.decoder else None

    # ---- helpers used by the rules --------------------------------------------------------------
    def head_acc(self) -> int:
        return self.e.HEAD_ACC

    def evaluate(self, names: list[str]) -> list[np.ndarray | None]:
        """Values that depend only on the input length (keep counts), for a full block of N tokens."""
        missing = [n for n in names if n not in self._evaluated]
        if missing:
            self._evaluated.update(zip(missing, evaluate_for_length(self.path, missing, self.opts.seq_len)))
        return [self._evaluated[n] for n in names]

    def act_rows(self, value: str) -> int:
        """Rows of an activation: dims between batch and the last; token dims become the block rows
        ([batch, heads, tokens, dim] tensors: an unknown heads dim is the model's head count)."""
        shape = self.gi.shape(value) or [1, None, None]
        heads = self.gi.groups[0].heads if self.gi.groups else 1
        rows = 1
        for k, d in enumerate(shape[1:-1], 1):
            if d is None and len(shape) == 4 and k == 1:
                rows *= heads
            else:
                rows *= self.rows if d is None or d == self.opts.seq_len else d
        return max(1, min(rows, 65535))

    def cols(self, value: str) -> int | None:
        c = self.gi.last_dim(value)
        return c if c and c < (1 << 14) else None

    def new_act(self, value: str) -> int:
        cols = self.cols(value) or 1
        a = self.e.sram("act", self.act_rows(value) * cols * ACT_BYTES)
        self.addr[value] = a
        self._fresh.append(value)
        return a

    def resolve(self, value: str) -> str | None:
        """The value whose address ``value`` shares (through view ops), or None."""
        for _ in range(32):
            if value in self.addr:
                return value
            n = self.gi.producer.get(value)
            if n is None or not n.input:
                return None
            value = next((i for i in n.input if i in self.gi.act), n.input[0])
        return None

    def addr_of(self, value: str) -> int:
        """SRAM address of an activation; a spilled one is loaded back from DRAM first."""
        key = self.resolve(value)
        if key is None:
            return 0
        if key in self.spill:
            t, rows, row_bytes, live = self.spill[key]
            a = self.e.sram("act", rows * row_bytes)
            self.e.emit("load", t, buf=attn.BUF["act"], sram=a, rows=rows, row_bytes=row_bytes, live=live)
            return a
        return self.addr[key]

    def layout(self, rows: int, cols: int) -> tuple[int, int, int]:
        """(rows field, row_bytes, live) of a DMA of rows x cols activations (rows longer than the
        14-bit row_bytes are split in equal parts; then the row count is exact, not live)."""
        total = cols * ACT_BYTES
        parts = -(-total // 16383)
        return min(rows * parts, 65535), -(-total // parts), int(parts == 1)

    def spill_large(self) -> None:
        """Activations produced by the last node that do not fit half the activation SRAM go to DRAM."""
        for v in self._fresh:
            cols = self.cols(v) or 1
            rows = self.act_rows(v)
            if rows * cols * ACT_BYTES <= self.opts.hw.sram_bytes("act") // 2:
                continue
            rf, rb, live = self.layout(rows, cols)
            t = self.e.region(f"act.{v}", "scratch", rf * rb, 16, v)
            self.e.emit("store", t, buf=attn.BUF["act"], sram=self.addr[v], rows=rf, row_bytes=rb, live=live)
            self.e.barrier()
            self.spill[v] = (t, rf, rb, live)
        self._fresh = []

    def load_weight_row(self, init: str) -> int:
        """A bias / gamma vector into the weight buffer; returns its address."""
        t = self.gi.inits[init]
        nbytes = tensor_bytes(t)
        a = self.e.sram("weight", nbytes)
        rb = min(nbytes, 16383)
        self.e.emit("load", self.weights[init], buf=attn.BUF["weight"], sram=a, rows=-(-nbytes // rb), row_bytes=rb)
        return a

    # ---- the walk ---------------------------------------------------------------------------
    def block(self, rows: int, past: int) -> None:
        self.rows, self.past = rows, past
        self.heads_live = self.gi.groups[0].kv_heads if self.gi.groups else 1
        self.addr = {}
        self.spill: dict[str, tuple[int, int, int, int]] = {}  # value -> (tensor, rows, row_bytes, live)
        self._fresh: list[str] = []
        self.e.reset_sram()  # every block starts with empty buffers: step blocks get the same addresses
        if self.opts.decoder or past:
            self.e.emit("ilist", op=attn.ILIST["iota"], dst=SLOT_TOKENS, value=rows)
            if self.prunes_heads:  # every block ranks the heads anew (the graph's HeadSelect runs per step)
                self.e.emit("ilist", op=attn.ILIST["iota"], dst=SLOT_HEADS, value=0)
        for n in self.gi.nodes:
            grp = self.group_of.get(id(n))
            if grp is not None:
                if n is grp.qk[0]:
                    self.e.node(n.name or n.output[0])
                    attn.lower_group(self, grp)
                continue
            key = f"spatten.{n.op_type}" if n.domain == "spatten" else n.op_type
            key = lower_evict.RULE_KEY if n.name.startswith(lower_evict.NODE_PREFIX) else key
            rule = RULES.get(key)
            if rule is None:
                rule = _elementwise if key in attn.ELT_OF else _alias
            self.e.node(n.name or n.output[0])
            rule(self, n)
            self.spill_large()
        self._outputs()

    def _outputs(self) -> None:
        for out in self.gi.model.graph.output:
            shape = self.gi.shape(out.name)
            if out.name not in self.gi.act or (shape and len(shape) > 3) or out.name.startswith("present"):
                continue
            cols = self.cols(out.name) or _row_elems(shape)
            rf, rb, live = self.layout(self.act_rows(out.name), cols)
            t = self.e.region(f"out.{out.name}", "output", self.max_rows * _row_elems(shape) * ACT_BYTES, 16, out.name)
            sram = self.addr_of(out.name)
            self.e.emit("store", t, buf=attn.BUF["act"], sram=sram, rows=rf, row_bytes=rb, live=live,
                        dram=self.e.dram(t, self.past * _row_elems(shape) * ACT_BYTES))


def _bits(t: onnx.TensorProto) -> int:
    return 8 * _itemsize(t.data_type)


def _itemsize(dtype: int) -> int:
    try:
        return int(onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4


def _row_elems(shape: list[int | None] | None) -> int:
    return (shape[-1] or 1) if shape else 1


# ---- rules --------------------------------------------------------------------------------------
Rule = Callable[[Lowering, onnx.NodeProto], None]


def _alias(lw: Lowering, n: onnx.NodeProto) -> None:
    """View, shape and mask ops: no instruction; outputs share the input's address."""
    src = next((i for i in n.input if i in lw.gi.act), None)
    key = lw.resolve(src) if src is not None else None
    if key is not None:
        for o in n.output:
            lw.addr[o] = lw.addr[key]
            if key in lw.spill:
                lw.spill[o] = lw.spill[key]


def _elementwise(lw: Lowering, n: onnx.NodeProto) -> None:
    out = n.output[0]
    cols = lw.cols(out)
    if out not in lw.gi.act or not cols or cols == 1:  # scale vectors and masks: folded into other ops
        return _alias(lw, n)
    acts = [i for i in n.input if i in lw.gi.act]
    weights = [w for w in (lw.gi.weight_source(i) for i in n.input if i and i not in lw.gi.act) if w]
    weights = [w for w in weights if tensor_bytes(lw.gi.inits[w]) > 8]  # scalars are ALU immediates
    a = lw.addr_of(acts[0])
    b, bcast = (lw.load_weight_row(weights[0]), 1) if weights else (lw.addr_of(acts[-1]), 0)
    lw.e.emit("elt", op=attn.ELT_OF[n.op_type], a=a, b=b, out=lw.new_act(out), rows=lw.act_rows(out), cols=cols,
              live=1, bcast=bcast)


def _gemm(lw: Lowering, n: onnx.NodeProto) -> None:
    w = lw.gi.weight_source(n.input[1]) if len(n.input) > 1 else None
    if w is None or n.input[0] not in lw.gi.act:
        return _alias(lw, n)
    attn.lower_gemm(lw, n, w)


def _gather(lw: Lowering, n: onnx.NodeProto) -> None:
    table = n.input[0]
    if table not in lw.gi.inits or len(lw.gi.inits[table].dims) != 2 or n.output[0] not in lw.gi.act:
        return _alias(lw, n)
    ids = n.input[1]
    slot = lw.input_slots.setdefault(ids, SLOT_INPUT0 + len(lw.input_slots))
    src = ids
    while src not in lw.e.by_name.keys() and lw.gi.producer.get(src) is not None and \
            lw.gi.producer[src].op_type in VIEW_OPS:
        src = lw.gi.producer[src].input[0]
    region = lw.e.by_name.get(f"in.{src}")
    if region is not None:
        width = lw.e.tensors[region].elem_bits // 8
        lw.e.emit("load", region, buf=attn.BUF["index"], sram=slot, rows=lw.rows, row_bytes=width,
                  dram=lw.e.dram(region, lw.past * width))
    else:  # positions computed in the graph: the block's positions
        lw.e.emit("ilist", op=attn.ILIST["iota"], dst=slot, value=lw.rows if not lw.past else 0)
        for p in range(lw.past, lw.past + lw.rows) if lw.past else ():
            lw.e.emit("ilist", op=attn.ILIST["append"], dst=slot, value=p)
    row_bytes = lw.gi.inits[table].dims[1] * _itemsize(lw.gi.inits[table].data_type)
    if row_bytes >= 1 << 14:
        raise LoweringError(f"node '{n.name}': table rows of {row_bytes} bytes exceed the 16383-byte row limit")
    lw.e.emit("fetch.rows", lw.weights[table], buf=attn.BUF["act"], sram=lw.new_act(n.output[0]),
              row_bytes=row_bytes, idx=slot)


RULES: dict[str, Rule] = {
    "MatMul": _gemm,
    "Gemm": _gemm,
    "Gather": _gather,
    "LayerNormalization": attn.lower_norm,
    "SimplifiedLayerNormalization": attn.lower_norm,
    "RMSNormalization": attn.lower_norm,
    "SkipLayerNormalization": attn.lower_norm,
    "spatten.HeadSelect": attn.lower_head_select,
    "spatten.GatherTokens": attn.lower_gather_tokens,
    "spatten.ScatterTokens": attn.lower_scatter_tokens,
    lower_evict.RULE_KEY: _alias,  # evict-kv's mask / importance / TopK nodes: the template's top-k does it
}


def emit_model(path: Path, seq_len: int, gen_steps: int = 0, hw: HwDesc | None = None,
               weights: bool = False) -> Program:
    """Lower the model at ``path`` for blocks of ``seq_len`` rows (+ ``gen_steps`` decoder steps);
    ``weights``: the program carries the model itself (graph + weight data: the MODEL section that
    makes the binary data-complete for the functional simulator)."""
    hw = hw or load_hw(None)
    if not 1 <= seq_len <= hw.max_seq_len or seq_len + gen_steps > hw.max_seq_len:
        raise LoweringError(f"--seq-len/--prompt-len + --gen-steps must be in 1..{hw.max_seq_len} on '{hw.name}'")
    model = load_onnx(path)
    if any(p.key == "spatten.prune_min_length" for p in model.metadata_props):
        raise LoweringError(f"{path}: a length-gated model (--prune-min-length); emit the model compiled without "
                            "the gate - the stream's keep ratios already apply to the live length at run time")
    gi = GraphInfo(model, seq_len)
    if not gi.groups:
        fused = any(n.op_type == "GroupQueryAttention" for n in model.graph.node)  # evict-gqa keeps it fused
        raise LoweringError(f"{path}: no attention block found (no Softmax over a 4-D score tensor)" + (
            "; onnxruntime's fused GroupQueryAttention is not lowered: compile the original model with spattenc "
            "--kv-cache decomposed" if fused else ""))
    too_many = [g for g in gi.groups if g.heads > hw.max_heads or g.head_dim > hw.max_head_dim]
    if too_many:
        g = too_many[0]
        raise LoweringError(f"layer {g.layer}: {g.heads} heads of dim {g.head_dim} exceed hardware '{hw.name}' "
                            f"(max {hw.max_heads} heads, dim {hw.max_head_dim})")
    opts = EmitOptions(seq_len, gen_steps, hw)
    lw = Lowering(gi, opts, path)
    lw.block(seq_len, 0)
    marks = [len(lw.e.instrs)]
    for step in range(gen_steps):
        # generated tokens: the first two blocks are lowered; later ones follow their arithmetic series
        # (positions and K/V row offsets grow by one per step) unless the two differ in shape
        if step < 2 or not lw.e.replay(marks[0], marks[1], marks[2], step):
            lw.block(1, seq_len + step)
        elif lw.evict is not None:  # the eviction's keep ratio is not an arithmetic series
            lw.evict.patch(marks[0], marks[1], marks[-1], 1, seq_len + step)
        marks.append(len(lw.e.instrs))
    program = lw.e.finish()
    if weights:
        program.model = model_bytes(Path(path), model)
    return program


def model_bytes(path: Path, model: onnx.ModelProto) -> bytes:
    """The model file as one self-contained ONNX blob (external weight files inlined)."""
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if not external:
        return path.read_bytes()
    full = onnx.load(str(path))
    if full.ByteSize() >= 2**31:
        raise LoweringError(f"{path}: the model is larger than 2 GB and cannot be embedded; emit with --no-weights "
                            "and give it to the functional simulator with --model")
    return full.SerializeToString()


def evaluate_for_length(path: Path, names: list[str], seq_len: int) -> list[np.ndarray | None]:
    """Run the subgraph computing ``names`` on an all-valid input of ``seq_len`` tokens (ones)."""
    try:
        import onnxruntime as ort

        sub = _slice(onnx.load(str(path)), names)
        used = {i for n in sub.graph.node for i in n.input}
        feeds = {}
        for i in sub.graph.input:
            if i.name not in used:
                continue
            dims = [1 if "batch" in (d.dim_param or "").lower() else 0 if "past" in (d.dim_param or "").lower()
                    else d.dim_value or seq_len for d in i.type.tensor_type.shape.dim]
            feeds[i.name] = np.ones(dims, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return list(sess.run(names, {k: v for k, v in feeds.items() if k in {x.name for x in sess.get_inputs()}}))
    except Exception as e:  # noqa: BLE001 - a keep count we cannot evaluate falls back to "keep all"
        logger.warning("could not evaluate %s for %d tokens (%s); assuming no token pruning there",
                       ", ".join(names), seq_len, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return [None] * len(names)


def _slice(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The nodes that compute ``names`` (walking producers), as a model with those outputs."""
    producer = {o: n for n in model.graph.node for o in n.output}
    need, keep = list(names), set()
    while need:
        n = producer.get(need.pop())
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            need.extend(n.input)
    g = model.graph
    used = {i for n in g.node if id(n) in keep for i in n.input}
    graph = onnx.helper.make_graph(
        [n for n in g.node if id(n) in keep], "slice", [i for i in g.input if i.name in used],
        [onnx.ValueInfoProto(name=x) for x in names], [t for t in g.initializer if t.name in used])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, functions=model.functions,
                                  ir_version=model.ir_version)
