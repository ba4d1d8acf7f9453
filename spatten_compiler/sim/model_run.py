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
Decoder streams with generated steps run block by block (KV-cache eviction per layer, per K/V head or
in a cascade, at every step or in blocks (``--kv-slack``); float or packed cache); a prompt-only stream
of a decoder reads only ``input_ids`` (the session builds the empty cache). Limits: batch 1 without
padding; requantization rules ``low`` and ``peak``; per-KV-head eviction after head pruning (refused in one
line: the graph maps kept query heads to K/V heads by rank); a prompt-only stream of an eviction model
(refused: eviction is lowered with generated steps only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
        self.inputs = {i.name for i in model.graph.input}
        self.producer = {o: k for k, n in enumerate(self.nodes) for o in n.output if o}
        self.skip = skip  # node indices the accelerator computes
        self.stand_in: dict[int, Callable[[], list[Any]]] = {}  # node index -> its outputs, from the stream
        self.reset(feeds)

    def reset(self, feeds: dict[str, np.ndarray]) -> None:
        """A new run of the graph (a decoder's next token block) on ``feeds``."""
        self.env: dict[str, Any] = dict(self.ev.rt_inits_)
        self.env.update({k: v for k, v in feeds.items() if k in self.inputs})
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
            if j in self.stand_in:  # the stream decided these values: the node's inputs are not needed
                self.env.update(zip(self.nodes[j].output, self.stand_in[j]()))
                self.done.add(j)
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
    # read outside the block, or by its storage nodes (the host runs those: pack-kv-cache packing the rows
    # an eviction kept)
    exits = [(o, n, k) for n in nodes for k, o in enumerate(n.output)
             if o and id(n) not in g.storage
             and any(id(c) not in g.nodes or id(c) in g.storage for c in gi.consumers.get(o, []))]
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
    outputs: dict[str, np.ndarray]  # the graph outputs of the last token block (the prompt for encoders)
    kept_tokens: list[list[int]]  # each token top-k (encoder cascade), in order
    kept_heads: list[list[int]]  # each head top-k, in order (every block of a decoder)
    lsb_rows: list[tuple[int, int, list[int]]]  # (layer, head, query rows that fetched LSBs)
    timing: SimReport | None = None
    # decoders with generated steps: one entry per token block (the prompt, then each step)
    step_outputs: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)  # the token each block chose (or was fed)
    kv_lists: list[list[list[int]]] = dataclasses.field(default_factory=list)  # [block][layer] K/V rows kept
    step_lsb_rows: list[list[tuple[int, int, list[int]]]] = dataclasses.field(default_factory=list)

    def render(self) -> str:
        lines = ["functional run (accelerator: attention; host: the other nodes, reference runtime ops)", "outputs:"]
        for k, v in self.outputs.items():
            v = np.asarray(v)
            stat = f"mean {float(v.mean()):.6g}, max |x| {float(np.abs(v).max()):.6g}" if v.size else "empty"
            lines.append(f"  {k:<28} {str(list(v.shape)):<16} {v.dtype}  {stat}")
        if len(self.step_outputs) > 1:
            lines.append(f"token blocks: prompt + {len(self.step_outputs) - 1} generated steps; tokens chosen: "
                         + " ".join(str(t) for t in self.generated))
            for b, lists in enumerate(self.kv_lists):
                if lists:
                    lines.append(f"  block {b}: K/V rows kept per layer: " + ", ".join(str(len(x)) for x in lists))
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
        doc = {
            "outputs": {k: {"shape": list(np.shape(v)), "mean": float(np.mean(v)), "absmax": float(np.abs(v).max())}
                        for k, v in self.outputs.items() if np.size(v)},
            "kept_tokens": self.kept_tokens, "kept_heads": self.kept_heads,
            "lsb_rows": [[layer, h, rows] for layer, h, rows in self.lsb_rows],
        }
        if len(self.step_outputs) > 1:
            doc["generated"] = self.generated
            doc["kv_lists"] = self.kv_lists
        return doc


class ModelRun(Functional):
    """Functional run of a whole program; ``step`` is called by the timing pass in program order.

    A decoder stream holds one token block per token (the prompt, then each generated step; the
    debug map starts again at the graph's first node). Between blocks the host's graph run ends,
    its ``present*`` outputs become the next block's cache inputs (:class:`DecoderSession` state),
    and the next token is the block's greedy choice or the next fed id. The accelerator's K/V
    planes persist across blocks by row number, as ``store.kv`` leaves them in DRAM."""

    def __init__(self, program: Program, model: onnx.ModelProto, feeds: dict[str, np.ndarray], length: int,
                 blocks: int = 1, fed: list[int] | None = None, max_rows: int = 0) -> None:
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
        from spatten_compiler.backend.lower_evict import NODE_PREFIX, EvictPlan, list_slots

        plan = EvictPlan.from_model(model)  # the K/V list slots of each layer, as the lowering numbered them
        self.kv_slots = list_slots(plan.mode if plan is not None else "layer",
                                   [g.kv_heads for g in sorted(self.gi.groups, key=lambda g: g.layer)])
        self.session = None
        self.fed = list(fed or [])
        self.n_blocks, self.max_rows = blocks, max_rows
        from spatten_compiler.decoding import DecoderSession

        try:  # a KV-cache decoder: its state inputs (empty cache, importance, positions) come from the session
            self.session = DecoderSession(model, runtime="none")
        except SpattencError as e:
            if blocks > 1:
                raise FunctionalError(f"generated steps: {str(e).split(': ', 1)[-1]}") from None
        if self.session is not None and "input_ids" in feeds:
            prompt = np.asarray(feeds["input_ids"], np.int64)[:, :length]
            feeds = self.session.feeds(prompt)
        constant = {t.name for t in model.graph.initializer}
        missing = [i.name for i in model.graph.input if i.name not in feeds and i.name not in constant]
        if missing:
            raise FunctionalError(f"the input file has no '{missing[0]}' (the model reads "
                                  f"{', '.join(i.name for i in model.graph.input[:6])}"
                                  f"{', ...' if len(model.graph.input) > 6 else ''})")
        self.host = Host(model, feeds, skip | self.head_select)
        for k, n in enumerate(model.graph.node):  # evict-kv's block If (--kv-slack): the stream's lists
            if n.op_type == "If" and n.name.startswith(NODE_PREFIX):
                self.host.stand_in[k] = lambda n=n: self._evict_block(n)
        self.entries: dict[int, int] = {}
        for i, name in program.debug:
            if name not in index:
                raise FunctionalError(f"the binary names node '{name}', which the model does not have "
                                      "(the stream was lowered from another model)")
            self.entries[i] = index[name]
        self.k = 0
        self.last_node = -1
        self.open: tuple[str, Any] | None = None
        self.head_acc_before: np.ndarray | None = None
        self.mem: dict[tuple[int, str], Any] = {}  # (layer, k|v|kp|vp) -> K/V by row number (the DRAM planes)
        # layer -> the row number of each row of the host's K/V: [1, n], or [K/V heads, n] when each K/V
        # head keeps its own rows (per-KV-head eviction)
        self.host_rows: dict[int, np.ndarray] = {}
        self.step_outputs: list[dict[str, np.ndarray]] = []
        self.generated: list[int] = []
        self.kv_lists: list[list[list[int]]] = []
        self.step_lsb: list[list[tuple[int, int, list[int]]]] = []
        self._lsb_mark = 0

    # ---- program order -----------------------------------------------------------------------
    def step(self, ins) -> None:
        k, self.k = self.k, self.k + 1
        node = self.entries.get(k)
        if node is not None or ins.mnemonic == "finish":
            self._close()
            if node is None:
                self._end_block(last=True)
            else:
                if node <= self.last_node:  # the debug map starts again: the next token block
                    self._end_block(last=False)
                self.last_node = node
                self._enter(node)
        super().step(ins)

    def _end_block(self, last: bool) -> None:
        """The host finishes the graph run; a decoder takes the block's outputs as the next step's state."""
        h = self.host
        h.advance(len(h.nodes))
        outs = {o: np.asarray(h.env[o]) for o in h.ev.output_names if o in h.env}
        self.step_outputs.append(outs)
        self.step_lsb.append([(layer, hd, r.tolist()) for layer, hd, r in self.lsb_sets[self._lsb_mark:]])
        self._lsb_mark = len(self.lsb_sets)
        self.kv_lists.append([self._lists(g.layer) for g in self.gi.groups] if self.session else [])
        if self.session is None:
            return
        if "logits" not in outs:
            raise FunctionalError("generated steps: the model has no 'logits' output to choose the next token from")
        nxt = len(self.generated)
        token = self.fed[nxt] if nxt < len(self.fed) else int(np.asarray(outs["logits"])[0, -1].argmax())
        self.generated.append(token)
        self.session.commit(outs)
        if not last:
            h.reset(self.session.feeds(np.array([[token]], np.int64)))
            self.last_node = -1

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
        # head pruning: the host holds the kept heads only (sliced projections, or a KV cache's heads
        # gathered by spatten.KeptHeads); GQA: K/V have their own (fewer) heads
        sliced = k.shape[1] == live.size and live.size != g.heads and g.kv_heads == g.heads
        kept_k, kept_v = (self._kept_heads(b.kt), self._kept_heads(b.v))

        def layout(kept: tuple[np.ndarray, int] | None) -> Any:
            def lay(a: np.ndarray) -> np.ndarray:
                if kept is not None:  # host head j -> head kept[j] of the gathered tensor's layout
                    out = np.zeros((a.shape[0], kept[1], *a.shape[2:]), a.dtype)
                    out[:, kept[0]] = a
                    return out
                return _place(a, live, g.heads) if sliced else a
            return lay

        kp = _planes(h, b.k_quant, k_raw, layout(kept_k), b.k_transposed and not fused)
        vp = _planes(h, b.v_quant, v_raw, layout(kept_v), b.v_transposed)
        k, v = layout(kept_k)(k), layout(kept_v)(v)
        if self.session is not None:  # rows of the host's K/V -> row numbers in the accelerator's DRAM
            k, v, kp, vp = self._store(g.layer, k.shape[0], k, v, kp, vp)
        self.data[g.layer] = AttentionData(q, k, v, kp, vp, kt_view=_transposed_view(h, g.qk[0]))
        self.head_acc_before = None if self.head_acc is None or g.layer == 0 else self.head_acc.copy()

    def _kept_heads(self, value: str) -> tuple[np.ndarray, int] | None:
        """(kept head indices, heads of the tensor they were gathered from) when ``value`` comes from a
        ``spatten.KeptHeads`` (head pruning of a KV-cache decoder: the cache keeps every head)."""
        for _ in range(16):  # along the operand's own chain (views, scaling, quantization), not further up
            node = self.gi.producer.get(value)
            if node is None:
                return None
            if node.domain == "spatten" and node.op_type == "KeptHeads":
                return (np.asarray(self.host.value(node.input[1]), np.int64).reshape(-1),
                        int(np.shape(self.host.value(node.input[0]))[1]))
            if node.op_type not in OPERAND_CHAIN and not node.op_type.startswith(("Quantize", "Dequantize")):
                return None
            value = node.input[0]
        return None

    def _lists(self, layer: int) -> list[int] | list[list[int]]:
        """The layer's K/V rows: one list, or one per K/V head (per-KV-head eviction)."""
        lists = [self.ctx.m.slot(s).tolist() for s in self.kv_slots[layer]]
        return lists[0] if len(lists) == 1 else lists

    def _store(self, layer: int, n: int, *arrays: Any) -> list[Any]:
        """Write the host's K/V rows at their row numbers (store.kv writes each token's row once; rows
        an eviction dropped stay in DRAM, unread). The host's rows are its cache (row numbers: evict-kv's
        ``past_positions``, per K/V head when each keeps its own, else 0..) then the block's new rows."""
        h = self.host
        past = h.env.get(f"past_positions.{layer}")
        if past is None:  # the cache then the new rows
            rows = np.arange(self.session.next_mask.shape[1])[None]
        else:
            past = np.asarray(past, np.int64)[0]
            past = past if past.ndim == 2 else past[None]  # [1 or K/V heads, L]
            new = np.asarray(h.env["position_ids"], np.int64)[0]
            rows = np.concatenate([past, np.broadcast_to(new, (past.shape[0], new.size))], axis=1)
        self.host_rows[layer] = rows  # the rows of the graph's cache (what an eviction gathers from)
        rows = rows[:, rows.shape[1] - n:]  # the host's K/V: the cache, or (pack-kv-cache's quantizer) the new rows
        size = max(self.max_rows, int(rows.max()) + 1)

        def write(mem: np.ndarray, a: np.ndarray) -> None:
            if rows.shape[0] == 1:
                mem[rows[0]] = a
                return
            for j in range(a.shape[1]):  # K/V head j's rows at its own row numbers (a GQA-repeated
                mem[rows[j * rows.shape[0] // a.shape[1]], j] = a[:, j]  # operand: its K/V head's, KV-head major)

        out = []
        for name, a in zip(("k", "v", "kp", "vp"), arrays):
            if a is None:
                out.append(None)
                continue
            if isinstance(a, Planes):
                mem = self.mem.get((layer, name))
                if mem is None:
                    mem = Planes(*(np.zeros((size, *x.shape[1:]), x.dtype) for x in (a.msb, a.lsb, a.scale)), a.step)
                    self.mem[(layer, name)] = mem
                for plane, rows_of_a in ((mem.msb, a.msb), (mem.lsb, a.lsb), (mem.scale, a.scale)):
                    write(plane, rows_of_a)
            else:
                mem = self.mem.setdefault((layer, name), np.zeros((size, *a.shape[1:]), a.dtype))
                write(mem, a)
            out.append(mem)
        return out

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
            self.host.env[node.output[0]] = np.unique(self.ctx.m.live_heads // self.ctx.m.group).astype(np.int64)
            self.host.done.add(what)
            return
        b: Block = what
        for value, node, k in b.exits:
            if self.host.producer[value] in self.host.skip:  # not the host's own (de)quantization nodes
                self.host.env[value] = self._exit(b, node, k, value)

    def _exit(self, b: Block, node: onnx.NodeProto, k: int, value: str = "") -> np.ndarray:
        g, m = b.group, self.ctx.m
        op = node.op_type
        live = m.live_heads
        evicted = EVICT_EXITS.get(value.split(".")[0])
        if evicted is not None and f"past_positions.{g.layer}" in self.host.env:
            return evicted(self, g.layer, node)
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

    # ---- KV-cache eviction: the graph's next cache is the accelerator's kept list ------------------
    def _evicted(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kept row numbers, their places in the host's K/V rows, their importance) of this block, each
        [lists, k]: one list per layer, or one per K/V head (per-KV-head eviction)."""
        kept, places, imp = [], [], []
        for j, slot in enumerate(self.kv_slots[layer]):
            rows = self.ctx.m.slot(slot)
            place = {int(r): i for i, r in enumerate(self.host_rows[layer][j])}
            missing = [int(r) for r in rows if int(r) not in place]
            if missing:
                raise FunctionalError(f"layer {layer}: the stream keeps K/V row {missing[0]}, which the graph's "
                                      "cache does not hold")
            kept.append(rows)
            places.append([place[int(r)] for r in rows])
            imp.append(self.kv_importance[slot][rows])
        if len({r.size for r in kept}) > 1:
            raise FunctionalError(f"layer {layer}: the K/V heads keep different numbers of rows "
                                  f"({[r.size for r in kept]}); the graph's cache holds one length")
        return np.stack(kept), np.array(places, np.int64), np.stack(imp)

    def _evict_block(self, node: onnx.NodeProto) -> list[np.ndarray]:
        """Outputs of evict-kv's block ``If`` (passes/evict_block.py): the stream's lists, whichever branch the
        graph would take (kept rows after an eviction, every row after an append). Each output is gathered
        from the value the else-branch passes through (``Identity(appended cache / importance / positions)``)."""
        append = next(a.g for a in node.attribute if a.name == "else_branch")
        through = {o: n for n in append.node for o in n.output}
        return [EVICT_EXITS[name.split(".")[0]](self, int(name.split(".")[1]), through[o.name])
                for name, o in zip(node.output, append.output, strict=True)]

    def _per_list(self, layer: int, x: np.ndarray) -> np.ndarray:
        """[lists, k] -> the graph's [1, k] (one list per layer) or [1, K/V heads, k]."""
        return (x[0] if len(self.kv_slots[layer]) == 1 else x)[None]

    def _exit_positions(self, layer: int, node: onnx.NodeProto) -> np.ndarray:
        return self._per_list(layer, self._evicted(layer)[0]).astype(np.int64)

    def _exit_importance(self, layer: int, node: onnx.NodeProto) -> np.ndarray:
        return self._per_list(layer, self._evicted(layer)[2]).astype(np.float32)

    def _exit_cache(self, layer: int, node: onnx.NodeProto) -> np.ndarray:
        """present.<l>.key/value: the host's cache rows (float, as the graph carries them) the stream kept."""
        value = node.input[0]
        for _ in range(8):
            x = self.host.value(value)
            if np.ndim(x) == 4 and np.shape(x)[2] == self.host_rows[layer].shape[-1]:
                places = self._evicted(layer)[1]
                if places.shape[0] == 1:
                    return np.ascontiguousarray(np.asarray(x)[:, :, places[0]])
                x = np.asarray(x)
                per_head = places[np.arange(x.shape[1]) * places.shape[0] // x.shape[1]]  # KV-head major
                return np.ascontiguousarray(np.take_along_axis(x, per_head[None, :, :, None], axis=2))
            value = self.host.nodes[self.host.producer[value]].input[0]
        raise FunctionalError(f"layer {layer}: cannot find the cache that '{node.output[0]}' gathers from")


EVICT_EXITS = {  # evict-kv's outputs of an attention block (value name prefix) -> the accelerator's
    "present_positions": ModelRun._exit_positions,
    "present_importance": ModelRun._exit_importance,
    "present": ModelRun._exit_cache,
}


OPERAND_CHAIN = {"Transpose", "Reshape", "Identity", "Cast", "Expand", "Unsqueeze", "Squeeze", "Mul", "Div"}


def _transposed_view(host: Host, qk: onnx.NodeProto) -> bool:
    """Whether the graph's K^T operand of Q x K is K's rows transposed (not contiguous in its last dim)."""
    if qk.op_type != "MatMul" or host.producer.get(qk.input[1]) in host.skip:
        return False
    kt = host.value(qk.input[1])
    return isinstance(kt, np.ndarray) and kt.ndim >= 2 and kt.strides[-1] != kt.itemsize


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
    starts = sorted({i["past"] for i in cfg if i["layer"] == 0})  # one token block per position it starts at
    length = _length(proto, feeds)
    fed: list[int] = []
    if len(starts) > 1:  # a decoder's prompt, then one block per generated token
        prompt, steps = starts[1], len(starts) - 1
        if length == prompt + steps:  # the generated tokens are given: feed them instead of choosing
            fed = [int(t) for t in np.asarray(feeds["input_ids"])[0, prompt:]]
        elif length != prompt:
            raise FunctionalError(f"the input has {length} tokens but the stream was emitted for a {prompt}-token "
                                  f"prompt and {steps} steps (give {prompt} tokens, or {prompt + steps} to feed the "
                                  "generated ones; padding is not modelled)")
        length = prompt
        from spatten_compiler.backend.lower_evict import EvictPlan

        plan = EvictPlan.from_model(proto)
        if plan is not None and plan.mode == "head" and any(n.op_type == "HeadSelect" for n in proto.graph.node):
            raise FunctionalError("generated steps with per-KV-head eviction after head pruning are not modelled in "
                                  "functional mode: the graph's eviction maps a pruned layer's kept query heads to "
                                  "K/V heads by their rank, not their group (compile without --head-keep, or with "
                                  "--kv-evict layer; timing mode runs it)")
    else:
        from spatten_compiler.backend.lower_evict import EvictPlan

        if EvictPlan.from_model(proto) is not None:  # lower.py lowers eviction only with generated steps
            raise FunctionalError("a prompt-only stream of a KV-cache eviction model is not modelled in functional "
                                  "mode: its eviction is lowered with generated steps only (emit with --gen-steps N)")
        stream_rows = cfg[0]["tokens"] if cfg else length
        if length != stream_rows:
            raise FunctionalError(f"the input has {length} tokens but the stream was emitted for {stream_rows} "
                                  f"(emit with --seq-len {length}; padding is not modelled)")
    run = ModelRun(program, proto, feeds, length, blocks=len(starts), fed=fed,
                   max_rows=cfg[0]["tokens"] if cfg else length)
    report = simulate(program, hw or SimHw.from_description(program.hw), length=length, decide=run)
    report.mode = "functional"
    outputs = run.step_outputs[-1] if run.step_outputs else {}
    outputs = {o.name: outputs[o.name] for o in proto.graph.output if o.name in outputs}
    return FunctionalResult(outputs, [k.tolist() for k in run.kept_tokens], [k.tolist() for k in run.kept_heads],
                            [(layer, h, r.tolist()) for layer, h, r in run.lsb_sets], report,
                            run.step_outputs, run.generated, run.kv_lists, run.step_lsb)


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
