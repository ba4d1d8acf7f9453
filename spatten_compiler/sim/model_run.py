"""Functional execution of a whole emitted model: the stream decides, the numbers are computed.

The stream is executed in program order. Its debug map names the ONNX node each run of
instructions was lowered from; that splits the work in two:

- **accelerator**: an attention block (the run that starts with ``cfg.attn`` at the block's first
  Q x K node) and the head top-k (``spatten.HeadSelect`` -> ``topk kind=heads``) are executed by
  :class:`~spatten_compiler.sim.functional.Functional` instruction by instruction: K/V planes as
  ``store.kv`` writes them, Q x K, softmax, requantization and LSB refetch, importance, top-k,
  local value pruning, P x V. Which tokens, heads and LSB rows survive is decided here, from the data.
- **host ops**: every other instruction (``gemm``, ``elt``, ``fetch.rows``, ``load``/``store``,
  ``compact`` of activations) names an ONNX node (or a view / shape node that emits nothing); the
  host runs that node with the reference runtime's op (``onnx.reference`` + ``runtime/``), as the
  paper's accelerator leaves projections, FFN and norms to a host. The host reads the accelerator's
  results where the graph reads the block's outputs (attention output, kept-token indices, head
  importance, kept heads), so a decision made by the stream changes every number after it.

The block's inputs are the values the host computed for the block's Q, K, V (and the quantization
scale the graph computes for ``store.kv``); the planes are written with the runtime's ``split``.
Data is addressed by value name, not by SRAM address (the ring allocator's addresses are for timing).
Limits: batch 1 without padding; one token block (encoders, decoders' prompt block; a stream with
generated steps is refused); requantization rules ``low`` and ``peak``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from spatten_compiler.backend.graphinfo import GraphInfo, Group
from spatten_compiler.backend.program import Program
from spatten_compiler.errors import SpattencError
from spatten_compiler.sim.engine import simulate
from spatten_compiler.sim.functional import AttentionData, Functional, Planes
from spatten_compiler.sim.hw import SimHw
from spatten_compiler.sim.report import SimReport


class FunctionalError(SpattencError):
    """A binary / model / input the functional simulator cannot run (one line)."""


# ---- the host: node-by-node reference runtime ---------------------------------------------------
class Host:
    """Runs ONNX nodes one at a time with the reference runtime's ops; values by name."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], skip: set[int]) -> None:
        from onnx.reference import ReferenceEvaluator

        from spatten_compiler.runtime import reference, spatten_ops, std_ops

        del reference  # imported for its side effect: head_ops / quant_ops register their ops
        self.ev = ReferenceEvaluator(model, new_ops=[*std_ops.STD_OPS, *spatten_ops.SPATTEN_OPS])
        self.nodes = list(self.ev.rt_nodes_)
        self.names = [n.name or n.output[0] for n in model.graph.node]
        self.index = {name: k for k, name in enumerate(self.names)}
        self.env: dict[str, Any] = dict(self.ev.rt_inits_)
        inputs = {i.name for i in model.graph.input}
        self.env.update({k: v for k, v in feeds.items() if k in inputs})
        self.producer = {o: k for k, n in enumerate(self.nodes) for o in n.output if o}
        self.skip = skip  # node indices the accelerator computes
        self.done: set[int] = set()
        self.cursor = 0

    def run(self, k: int) -> None:
        """Run node ``k`` after the producers of its inputs (host nodes only)."""
        todo = [k]
        while todo:
            j = todo[-1]
            if j in self.done:
                todo.pop()
                continue
            missing = [self.producer[i] for i in self.nodes[j].input
                       if i and i not in self.env and self.producer.get(i) is not None
                       and self.producer[i] not in self.done]
            if missing:
                bad = [m for m in missing if m in self.skip]
                if bad:
                    raise FunctionalError(f"node '{self.names[j]}' needs a value of '{self.names[bad[0]]}' "
                                          "before the accelerator computed it")
                todo.extend(missing)
                continue
            node = self.nodes[j]
            args = [self.env[i] if i else None for i in node.input]
            if node.need_context():
                outs = node.run(*args, context=self.env)
            else:
                outs = node.run(*args)
            for name, value in zip(node.output, outs):
                if name:
                    self.env[name] = value
            self.done.add(j)
            todo.pop()

    def advance(self, until: int) -> None:
        """Run every host node before position ``until`` (graph order)."""
        for k in range(self.cursor, until):
            if k not in self.skip and k not in self.done:
                self.run(k)
        self.cursor = max(self.cursor, until)

    def value(self, name: str) -> Any:
        if name not in self.env:
            k = self.producer.get(name)
            if k is None:
                raise FunctionalError(f"value '{name}' is neither an input nor produced by a node")
            self.run(k)
        return self.env[name]


# ---- one attention block's inputs and outputs ----------------------------------------------------
@dataclasses.dataclass
class Block:
    group: Group
    q: str
    kt: str  # K operand of Q x K (K^T [B, H, D, T] for MatMul; K [B, H, T, D] for Attention)
    v: str
    k_quant: onnx.NodeProto | None  # QuantizeSplit / Quantize writing the K planes
    v_quant: onnx.NodeProto | None
    exits: list[tuple[str, onnx.NodeProto, int]]  # (value, producer, output index) read outside
    k_transposed: bool = True  # kt is [B, H, D, T] (quantize-kv's K^T; not pack-kv-cache's new tokens)
    v_transposed: bool = False


def _block(gi: GraphInfo, g: Group) -> Block:
    qk = g.qk[0]
    nodes = [gi.by_id[i] for i in sorted(g.nodes, key=lambda i: gi.position[i])]
    exits = [(o, n, k) for n in nodes for k, o in enumerate(n.output)
             if o and any(id(c) not in g.nodes for c in gi.consumers.get(o, []))]
    exits += [(o, n, k) for n in nodes for k, o in enumerate(n.output)
              if o in {x.name for x in gi.model.graph.output} and all(o != e[0] for e in exits)]
    if qk.op_type == "Attention":
        return Block(g, qk.input[0], qk.input[1], qk.input[2], None, None, exits)
    if g.k_src is not None and g.k_src.quant is not None and g.v_src is not None and g.v_src.quant is not None:
        k, v = g.k_src, g.v_src  # the quantizers behind the operands (backend.kvsource)
        return Block(g, qk.input[0], k.quant.input[0], v.quant.input[0], k.quant, v.quant, exits,
                     k.transposed, v.transposed)
    quants = g.spatten.get("QuantizeSplit", []) + g.spatten.get("Quantize", [])
    feeds_qk = _upstream(gi, qk.input[1], {id(n) for n in quants})
    k_quant = next((n for n in quants if id(n) in feeds_qk), None)
    v_quant = next((n for n in quants if n is not k_quant), None)
    pv = [n for n in nodes if n.op_type == "MatMul" and n not in g.qk]
    v = v_quant.input[0] if v_quant is not None else (pv[0].input[1] if pv else qk.input[1])
    kt = k_quant.input[0] if k_quant is not None else qk.input[1]
    return Block(g, qk.input[0], kt, v, k_quant, v_quant, exits)


def _upstream(gi: GraphInfo, value: str, targets: set[int]) -> set[int]:
    found, frontier, seen = set(), [value], set()
    while frontier:
        v = frontier.pop()
        n = gi.producer.get(v)
        if n is None or v in seen:
            continue
        seen.add(v)
        if id(n) in targets:
            found.add(id(n))
            continue
        frontier.extend(i for i in n.input if i and i not in gi.inits)
    return found


def _heads_last(x: np.ndarray, transposed: bool) -> np.ndarray:
    """[1, H, T, D] (or K^T [1, H, D, T]) -> [T, H, D]."""
    x = np.asarray(x, np.float32)
    if transposed:
        x = np.swapaxes(x, -1, -2)
    return np.ascontiguousarray(x[0].transpose(1, 0, 2))


def _place(x: np.ndarray, live: np.ndarray, heads: int) -> np.ndarray:
    """Host arrays hold only the kept heads (head pruning slices the projections): put host head j
    at accelerator head live[j] (zeros elsewhere; those heads' instructions are no-ops)."""
    if x.shape[1] == heads:
        return x
    if x.shape[1] != live.size:
        raise FunctionalError(f"a block input has {x.shape[1]} heads, the stream {heads} with {live.size} live")
    out = np.zeros((x.shape[0], heads, x.shape[2]), x.dtype)
    out[:, live] = x
    return out


def _planes(host: Host, node: onnx.NodeProto | None, value: np.ndarray, place: Any, transposed: bool) -> Planes | None:
    """The planes store.kv writes: the runtime quantizer with the scale the graph computes."""
    if node is None:
        return None
    from spatten_compiler.runtime.quant_ops import _quantize, split

    x = np.asarray(value, np.float32)
    scale = np.broadcast_to(np.asarray(host.value(node.input[1]), np.float32), x.shape)
    if node.op_type == "QuantizeSplit":
        step, qmax = (np.asarray(host.value(i)) for i in node.input[2:4])
        msb, lsb = split(x, scale, step, qmax)
    else:  # static quantization: one plane
        step, msb = np.float32(1), _quantize(x, scale, np.asarray(host.value(node.input[2]))).astype(np.int8)
        lsb = np.zeros_like(msb, np.uint8)

    def lay(a: np.ndarray) -> np.ndarray:
        return place(_heads_last(a, transposed))

    return Planes(lay(msb), lay(lsb), lay(scale), float(np.asarray(step).reshape(-1)[0]))


# ---- the run -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class FunctionalResult:
    outputs: dict[str, np.ndarray]
    kept_tokens: list[list[int]]  # each token top-k (encoder cascade), in order
    kept_heads: list[list[int]]  # each head top-k
    lsb_rows: list[tuple[int, int, list[int]]]  # (layer, head, query rows that fetched LSBs)
    timing: SimReport | None = None

    def render(self) -> str:
        lines = ["functional run (accelerator: attention; host: the other nodes, reference runtime ops)", "outputs:"]
        for k, v in self.outputs.items():
            v = np.asarray(v)
            stat = f"mean {float(v.mean()):.6g}, max |x| {float(np.abs(v).max()):.6g}" if v.size else "empty"
            lines.append(f"  {k:<28} {str(list(v.shape)):<16} {v.dtype}  {stat}")
        for title, sets in (("kept tokens", self.kept_tokens), ("kept heads", self.kept_heads)):
            lines.append(f"{title} (each top-k in order): " + ("none" if not sets else ""))
            lines += [f"  #{i}: {len(s)} kept: {_ranges(s)}" for i, s in enumerate(sets)]
        by_layer: dict[int, list[str]] = {}
        for layer, h, rows in self.lsb_rows:
            by_layer.setdefault(layer, []).append(f"h{h}:{len(rows)}")
        lines.append("rows fetching K/V LSBs (layer: head:rows): " + ("none" if not by_layer else ""))
        lines += [f"  layer {layer}: {' '.join(v)}" for layer, v in sorted(by_layer.items())]
        if self.timing is not None:
            lines.append(self.timing.render())
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {
            "outputs": {k: {"shape": list(np.shape(v)), "mean": float(np.mean(v)), "absmax": float(np.abs(v).max())}
                        for k, v in self.outputs.items() if np.size(v)},
            "kept_tokens": self.kept_tokens, "kept_heads": self.kept_heads,
            "lsb_rows": [[layer, h, rows] for layer, h, rows in self.lsb_rows],
        }


class ModelRun(Functional):
    """Functional run of a whole program; ``step`` is called by the timing pass in program order."""

    def __init__(self, program: Program, model: onnx.ModelProto, feeds: dict[str, np.ndarray], length: int) -> None:
        super().__init__({})
        self.gi = GraphInfo(model, length)
        names = [n.name or n.output[0] for n in model.graph.node]
        index = {name: k for k, name in enumerate(names)}
        self.blocks = {index[g.qk[0].name or g.qk[0].output[0]]: _block(self.gi, g) for g in self.gi.groups}
        # the host also runs the block's (de)quantization nodes: the graph may read them outside the block
        # (a K cache concatenated from the planes, a scale applied after dequantization); their numbers
        # never reach the accelerator, which writes its own planes with store.kv
        storage = self.gi.storage_nodes()
        skip = {k for k, n in enumerate(model.graph.node) if id(n) in self.gi.group_of_node() and id(n) not in storage}
        self.head_select = {k for k, n in enumerate(model.graph.node)
                            if n.domain == "spatten" and n.op_type == "HeadSelect"}
        self.host = Host(model, feeds, skip | self.head_select)
        self.entries: dict[int, int] = {}
        for i, name in program.debug:
            if name not in index:
                raise FunctionalError(f"the binary names node '{name}', which the model does not have "
                                      "(the stream was lowered from another model)")
            self.entries[i] = index[name]
        self.k = 0
        self.open: tuple[str, Any] | None = None
        self.head_acc_before: np.ndarray | None = None

    # ---- program order -----------------------------------------------------------------------
    def step(self, ins) -> None:
        k, self.k = self.k, self.k + 1
        node = self.entries.get(k)
        if node is not None or ins.mnemonic == "finish":
            self._close()
            if node is None:
                self.host.advance(len(self.host.nodes))
            else:
                self._enter(node)
        super().step(ins)

    def _enter(self, k: int) -> None:
        self.host.advance(k)
        if k in self.blocks:
            self._start_block(self.blocks[k])
            self.open = ("block", self.blocks[k])
        elif k in self.head_select:
            self.open = ("heads", k)
        else:
            self.host.run(k)
            self.host.cursor = max(self.host.cursor, k + 1)

    def _start_block(self, b: Block) -> None:
        g, m, h = b.group, self.ctx.m, self.host
        live = m.slot(1) if m.slot(1).size else np.arange(g.heads)
        fused = g.qk[0].op_type == "Attention"
        q = _place(self._rows_heads(h.value(b.q), g, fused), live, g.heads)
        k_raw, v_raw = h.value(b.kt), h.value(b.v)
        k = self._rows_heads(k_raw, g, fused, transposed=b.k_transposed and not fused)
        v = self._rows_heads(v_raw, g, fused, transposed=b.v_transposed)
        # head pruning: the host holds the kept heads only; GQA: K/V have their own (fewer) heads
        sliced = k.shape[1] == live.size and live.size != g.heads and g.kv_heads == g.heads

        def lay(a: np.ndarray) -> np.ndarray:
            return _place(a, live, g.heads) if sliced else a

        kp = _planes(h, b.k_quant, k_raw, lay, b.k_transposed and not fused)
        vp = _planes(h, b.v_quant, v_raw, lay, b.v_transposed)
        k, v = lay(k), lay(v)
        self.data[g.layer] = AttentionData(q, k, v, kp, vp)
        self.head_acc_before = None if self.head_acc is None or g.layer == 0 else self.head_acc.copy()

    @staticmethod
    def _rows_heads(x: Any, g: Group, fused: bool, transposed: bool = False) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.shape[0] != 1:
            raise FunctionalError(f"batch {x.shape[0]}: the functional simulator runs batch 1")
        if x.ndim == 3:  # [1, T, heads * D] (fused Attention)
            x = x.reshape(1, x.shape[1], -1, g.head_dim).transpose(0, 2, 1, 3)
        return _heads_last(x, transposed)

    def _close(self) -> None:
        if self.open is None:
            return
        kind, what = self.open
        self.open = None
        if kind == "heads":
            node = self.host.nodes[what]
            self.host.env[node.output[0]] = self.ctx.m.live_heads.astype(np.int64)
            self.host.done.add(what)
            return
        b: Block = what
        for value, node, k in b.exits:
            if self.host.producer[value] in self.host.skip:  # not the host's own (de)quantization nodes
                self.host.env[value] = self._exit(b, node, k)

    def _exit(self, b: Block, node: onnx.NodeProto, k: int) -> np.ndarray:
        g, m = b.group, self.ctx.m
        op = node.op_type
        live = m.live_heads
        if (op == "MatMul" and node not in g.qk) or (op in ("ProgressiveContext", "Attention") and k == 0):
            rows = self.out_rows.get(g.layer, m.slot(0))
            out = self.out[g.layer][rows]  # [rows, H, D]
            heads = _host_heads(self.host, b, g)
            out = out[:, live] if heads == live.size and heads != g.heads else out
            if op == "Attention":
                return out.reshape(1, out.shape[0], -1)
            return np.ascontiguousarray(out.transpose(1, 0, 2)[None])
        if op == "TokenSelect":
            kept = self.kept_tokens[-1]
            return kept[None].astype(np.int64) if k == 0 else np.ones((1, kept.size), np.float32)
        if op in ("HeadImportance", "HeadImportanceAll"):
            before = self.head_acc_before if self.head_acc_before is not None else np.zeros_like(self.head_acc)
            delta = (self.head_acc - before).astype(np.float32)
            heads = _host_heads(self.host, b, g)
            return delta[live] if heads == live.size and heads != g.heads else delta
        raise FunctionalError(f"layer {g.layer}: the graph reads '{node.output[k]}' ({op}) of the attention block, "
                              "which the accelerator does not produce")


def _host_heads(host: Host, b: Block, g: Group) -> int:
    q = np.asarray(host.env[b.q])
    return q.shape[1] if q.ndim == 4 else q.shape[-1] // g.head_dim


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2 5 7-8'."""
    out: list[str] = []
    for x in xs:
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == x - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        elif out and "-" not in out[-1] and int(out[-1]) == x - 1:
            out[-1] = f"{out[-1]}-{x}"
        else:
            out.append(str(x))
    return " ".join(out)


# ---- entry points ---------------------------------------------------------------------------------
def model_of(program: Program, model: Path | onnx.ModelProto | None) -> onnx.ModelProto:
    """The model the stream was lowered from: ``program.model`` (embedded) or ``model``; its
    initializers must match the binary's weight tensors (names and byte sizes)."""
    if model is None:
        blob = getattr(program, "model", None)
        if blob is None:
            raise FunctionalError("the binary carries no model (emitted with --no-weights): pass --model MODEL.onnx")
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(blob)
        except Exception:  # noqa: BLE001 - protobuf raises several types
            raise FunctionalError("the binary's model section is not an ONNX model") from None
    elif isinstance(model, onnx.ModelProto):
        proto = model
    else:
        try:
            proto = onnx.load(str(model))
        except Exception as e:  # noqa: BLE001
            raise FunctionalError(f"{model}: not a readable ONNX model ({type(e).__name__})") from None
    check_weights(program, proto)
    return proto


def check_weights(program: Program, model: onnx.ModelProto) -> None:
    from spatten_compiler.backend.graphinfo import tensor_bytes

    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            inits.setdefault(n.output[0], n.attribute[0].t)
    for t in program.tensors:
        if t.kind != "weight":
            continue
        init = inits.get(t.source)
        if init is None or tensor_bytes(init) != t.size:
            got = "missing" if init is None else f"{tensor_bytes(init)} bytes"
            raise FunctionalError(f"weight '{t.source}' ({t.size} bytes in the binary) does not match the model "
                                  f"({got}): the binary was lowered from another model")


def run_functional(program: Program, feeds: dict[str, np.ndarray], model: Path | onnx.ModelProto | None = None,
                   hw: SimHw | None = None) -> FunctionalResult:
    """Execute ``program`` on ``feeds``; returns outputs, decisions and the timing report of the same run."""
    proto = model_of(program, model)
    cfg = [i for i in program.instrs if i.mnemonic == "cfg.attn"]
    if any(i["past"] for i in cfg):
        raise FunctionalError("functional mode runs one token block (an encoder or a decoder's prompt); "
                              "emit the decoder with --gen-steps 0")
    length = _length(proto, feeds)
    stream_rows = cfg[0]["tokens"] if cfg else length
    if length != stream_rows:
        raise FunctionalError(f"the input has {length} tokens but the stream was emitted for {stream_rows} "
                              f"(emit with --seq-len {length}; padding is not modelled)")
    run = ModelRun(program, proto, feeds, length)
    report = simulate(program, hw or SimHw.from_description(program.hw), length=length, decide=run)
    report.mode = "functional"
    outputs = {o.name: np.asarray(run.host.env[o.name]) for o in proto.graph.output if o.name in run.host.env}
    return FunctionalResult(outputs, [k.tolist() for k in run.kept_tokens], [k.tolist() for k in run.kept_heads],
                            [(layer, h, r.tolist()) for layer, h, r in run.lsb_sets], report)


def _length(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    if "attention_mask" in feeds:
        mask = np.asarray(feeds["attention_mask"])
        if mask.shape[0] != 1 or not mask.all():
            raise FunctionalError("--input: batch 1 without padding only (attention_mask must be all ones)")
        return int(mask.shape[-1])
    if "input_ids" in feeds:
        ids = np.asarray(feeds["input_ids"])
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise FunctionalError(f"--input: input_ids of shape {list(ids.shape)}, expected [1, tokens]")
        return int(ids.shape[-1])
    raise FunctionalError("--input: no input_ids or attention_mask to take the length from")
