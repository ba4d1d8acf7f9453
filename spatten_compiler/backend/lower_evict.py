"""Lowering of decoder KV-cache eviction (``evict-kv``, docs/decoders.md) to the accelerator's own
top-k: every token block (the prompt and each generated token) ends each evicting layer's attention with

    accum kind=token  (per head, already in the template) acc_l[row] += column sums of P_h
    cfg.prune         token_keep = k / n of this step, protect_first = sinks, protect_recent = window
    topk kind=tokens  src=acc_l idx_in=<candidates> idx_out=16+l      (the layer's K/V list shrinks)

``acc_l`` is a per-layer importance accumulator in reserved score-buffer lines (kept across blocks,
indexed by K/V row number, like ``past_importance``). Candidates are the layer's own list (``layer``
mode) or, in ``cascade`` mode, the list the layer above kept this step. In ``head`` mode every K/V
head has its own list, accumulator and top-k (:func:`list_slots`): evict-kv keeps one set per K/V head.
The next block appends its new row to the list, so its ``fetch.kv`` read only kept rows: K/V bytes per
step follow the budget.

``n`` and ``k`` are compile-time numbers for a batch-1 sequence without padding (``k`` = the
pass's own :func:`budget_tokens`, ``T`` = the length so far), so ``cfg.prune`` differs from step
to step: :meth:`EvictLowering.patch` rewrites those fields after the emitter replays a step block.
The ``spatten/evict/*`` nodes of the graph (mask, importance, TopK, GatherElements) emit nothing.

Block eviction (``slack = S``, passes/evict_block.py) mirrors the graph's ``If`` per block::

    over = max_l (n_l - k_l) > S      n_l: layer l's list after the append, k_l: its budget at T
    over:     every layer keeps min(n, k_l) of its n candidates (the rule above)
    not over: every layer keeps all n (token_keep = 1: the top-k keeps every row, in order)

The instructions are the same in both cases (only ``cfg.prune`` differs), so the lists grow between
evictions and the accumulators keep accumulating, as the graph's else-branch passes importance and
the appended cache through. ``slack = 0`` is the same rule (not over: every ``n_l <= k_l``, all kept).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING

import onnx

from spatten_compiler.backend.emitter import LoweringError
from spatten_compiler.backend.opcodes import FIXED, SCORE_RULES, TOPK_KINDS
from spatten_compiler.passes.evict_kv import META_KEY, budget_tokens

if TYPE_CHECKING:
    from spatten_compiler.backend.lower import Lowering

NODE_PREFIX = "spatten/evict/"  # the pass's node names (GraphEditor namespace)
RULE_KEY = "spatten.evict"  # the RULES key of those nodes
SLOT_CACHE = 16  # index slot 16 + l: layer l's K/V list (lower_attention.SLOT_CACHE)
SLOT_LIMIT = 1024  # the K/V lists end where the local-V lists start (lower_attention.SLOT_VALUES)


def list_slots(mode: str, kv_heads: list[int]) -> list[list[int]]:
    """Index slots of each layer's K/V lists: one per layer (``layer`` / ``cascade``: 16 + l), or one per
    K/V head (``head``: each keeps its own rows; 16 + the K/V heads of the layers before + j)."""
    if mode != "head":
        return [[SLOT_CACHE + layer] for layer in range(len(kv_heads))]
    starts = SLOT_CACHE
    out = []
    for n in kv_heads:
        out.append(list(range(starts, starts + n)))
        starts += n
    return out


@dataclasses.dataclass(frozen=True)
class EvictPlan:
    budget: float
    sinks: int
    recent: int
    share: float
    mode: str
    schedule: tuple[float, ...]
    layers: int
    min_keep: int = 0  # the floor for short sequences (no eviction below it)
    slack: int = 0  # block eviction: a list may exceed its budget by this much before every layer evicts
    score: str = "accumulated"  # evict-kv's ranking (evict_kv.SCORES); the top-k ranks by the accumulator
    windowed: bool = False  # some layer's budget is capped by its sliding window

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> EvictPlan | None:
        meta = next((p.value for p in model.metadata_props if p.key == META_KEY), None)
        if meta is None:
            return None
        try:
            d = json.loads(meta)
            plan = cls(float(d["budget"]), int(d["sinks"]), int(d.get("recent", 0)), float(d.get("recent_share", 0)),
                       str(d.get("mode", "layer")), tuple(float(x) for x in d.get("schedule", [])), int(d["layers"]),
                       int(d.get("min_keep", 0)), int(d.get("slack", 0)), str(d.get("score", "accumulated")),
                       bool(d.get("windows")))
        except (ValueError, KeyError, TypeError) as e:
            raise LoweringError(f"metadata '{META_KEY}' is malformed ({e})") from None
        if plan.mode == "cascade" and len(set(plan.schedule)) > 1:
            raise LoweringError("cascade eviction with a per-layer schedule cannot be lowered: the top-k would need "
                                "the intersection of a layer's list with the list kept above (no such instruction)")
        if plan.sinks > 255:
            raise LoweringError(f"--kv-sinks {plan.sinks} exceeds the 8-bit protect_first field (max 255)")
        return plan

    def check_steps(self) -> None:
        """Refuse, in one line, what generated steps cannot evict as the graph does (the prompt block's
        eviction changes no output: a prompt-only stream is exact)."""
        if self.score != "accumulated":
            raise LoweringError(f"--kv-score {self.score} cannot be lowered: the stream's top-k ranks tokens by their "
                                "accumulated attention (compile with --kv-score accumulated)")
        if self.slack and self.windowed:
            raise LoweringError("--kv-slack with a sliding-window layer cannot be lowered: the graph's budget is "
                                "capped by the window, the stream's is not (compile with --kv-slack 0)")

    def layer_budget(self, layer: int) -> float:
        if not self.schedule:
            return self.budget
        m = self.schedule[min(layer, len(self.schedule) - 1)]
        return self.budget * m if self.budget <= 1 else float(max(1, round(self.budget * m)))

    def budget_of(self, layer: int, total: int) -> int:
        """``k_l``: the slots ``layer`` keeps when the sequence has ``total`` tokens (the graph's
        ``k_budget``: the budget, sinks + recent and the floor, not capped by the list length)."""
        return budget_tokens(self.layer_budget(layer), total, self.sinks, self.recent, 1 << 62, self.min_keep)

    def keep(self, layer: int, total: int, n: int, evict: bool = True) -> tuple[int, int]:
        """(kept slots, recent window) of ``n`` candidates when the sequence has ``total`` tokens
        (``evict`` False: a block that only appends keeps all ``n``)."""
        k = min(n, self.budget_of(layer, total)) if evict else n
        return k, max(self.recent, int(math.floor(self.share * (k - self.sinks))))


class EvictLowering:
    """Per-lowering state: accumulator addresses, each layer's list length, the cfg.prune to patch."""

    def __init__(self, lw: Lowering, plan: EvictPlan) -> None:
        layers = [g.layer for g in lw.gi.groups]
        if sorted(layers) != list(range(plan.layers)):
            raise LoweringError(f"evict-kv rewrote {plan.layers} layers but {len(layers)} attention blocks were "
                                f"found (layers {layers})")
        plan.check_steps()
        self.plan, self.lw = plan, lw
        self.slots = list_slots(plan.mode, [g.kv_heads for g in sorted(lw.gi.groups, key=lambda g: g.layer)])
        if self.slots[-1][-1] >= SLOT_LIMIT:
            raise LoweringError(f"per-KV-head eviction needs {self.slots[-1][-1] - SLOT_CACHE + 1} K/V lists; the "
                                f"index buffer holds {SLOT_LIMIT - SLOT_CACHE} (use --kv-evict layer)")
        # one importance accumulator per K/V list (evict-kv's past_importance: [B, n] or [B, H_kv, n])
        self.acc = {slot: lw.e.reserve("score", 4 * lw.max_rows) for slots in self.slots for slot in slots}
        self.kept: dict[int, int] = {}  # layer -> list length after its last top-k
        self.sites: list[tuple[int, int]] = []  # (instruction index of cfg.prune, layer)
        self.block: tuple[int, bool] | None = None  # (past, evicts) of the block being lowered

    def key_slot(self, layer: int, kv_head: int) -> int:
        """The index slot listing the K/V rows K/V head ``kv_head`` of ``layer`` reads."""
        slots = self.slots[layer]
        return slots[kv_head] if len(slots) > 1 else slots[0]

    def accumulator(self, layer: int, kv_head: int = 0) -> int:
        return self.acc[self.key_slot(layer, kv_head)]

    def evicts(self, rows: int, past: int) -> bool:
        """The graph's ``If`` condition (evict_block.over_budget) for a block of ``rows`` at ``past``: some
        layer's list, after the append, holds more than its budget + slack (before any layer's top-k)."""
        total = past + rows
        return max(self.kept.get(layer, 0) + rows - self.plan.budget_of(layer, total)
                   for layer in range(self.plan.layers)) > self.plan.slack

    def fields(self, layer: int, rows: int, past: int) -> tuple[dict[str, int], int]:
        """cfg.prune fields of this block's eviction in ``layer`` and the candidates' slot; advances the
        layer's list length (call once per layer and block, in layer order)."""
        if self.block is None or self.block[0] != past:  # the block's first layer: decide for all layers
            self.block = (past, self.evicts(rows, past))
        cascade = self.plan.mode == "cascade" and layer > 0
        n = self.kept[layer - 1] if cascade else self.kept.get(layer, 0) + rows
        k, window = self.plan.keep(layer, past + rows, n, self.block[1])
        self.kept[layer] = k
        # keep_count = ceil(ratio * n): aim half a slot below k so the 15-bit floor never rounds it away
        ratio = FIXED if k >= n else int(math.floor((k - 0.5) / n * FIXED))
        prune = {"token_keep": ratio, "head_keep": FIXED, "value_keep": FIXED, "protect_first": self.plan.sinks,
                 "protect_recent": min(window, 65535), "score": SCORE_RULES.index("sum")}
        return prune, self.slots[layer - 1 if cascade else layer][0]

    def lower(self, layer: int) -> None:
        """After the layer's heads: choose the rows its K/V list keeps (hardware top-k)."""
        lw = self.lw
        prune, cand = self.fields(layer, lw.rows, lw.past)
        self.sites.append((len(lw.e.instrs), layer))
        lw.e.emit("cfg.prune", **prune)
        for j, slot in enumerate(self.slots[layer]):  # head mode: every K/V head keeps k of its own n rows
            lw.e.emit("topk", kind=TOPK_KINDS.index("tokens"), head=j, src=self.acc[slot],
                      idx_in=cand if len(self.slots[layer]) == 1 else slot, idx_out=slot)

    def patch(self, first: int, last: int, base: int, rows: int, past: int) -> None:
        """A replayed block at ``base`` copies instrs[first:last]: give its cfg.prune this step's values."""
        for at, layer in [s for s in self.sites if first <= s[0] < last]:
            prune, _ = self.fields(layer, rows, past)
            self.lw.e.patch(base + at - first, "cfg.prune", **prune)
