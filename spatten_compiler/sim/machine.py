"""The accelerator's run-time state that the stream itself never holds (docs/backend.md, "Machine
state"): the configuration set by ``cfg.*``, the index buffer (slot 0 = the live-token list, whose
length is the live-token count and the number of query rows; slot 1 = the live-head list, empty =
every head; the others written by ``topk`` / ``ilist``) and each head's requantization predicate.

The simulator updates this state in program order (the stream's sequential meaning); the timing
of the three stages is scheduled afterwards from what each instruction was found to do, so a
stream whose dependency tokens are too weak gets optimistic times, never wrong amounts.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from spatten_compiler.backend.opcodes import FIXED, REQUANT_RULES, SCORE_RULES

LIVE_TOKENS, LIVE_HEADS = 0, 1


@dataclasses.dataclass
class Machine:
    length: int | None = None  # the input's true length L (slot 0 = [0, L) at reset); None: first cfg.attn's tokens
    layer: int = 0
    heads: int = 1
    kv_heads: int = 1
    head_dim: int = 64
    tokens: int = 0
    causal: bool = False
    past: int = 0
    q_bits: int = 32
    k_msb: int = 32
    k_lsb: int = 0
    v_bits: int = 32
    threshold: float = 0.0
    rule: str = "low"  # requantization rule (cfg.quant): low = max P <= threshold, peak = max P > threshold
    scale: float = 0.0  # Q x K scale (cfg.attn); 0 = 1 / sqrt(head_dim)
    scale_div: bool = False  # scores divided by scale (the graph's Div)
    token_keep: float = 1.0
    head_keep: float = 1.0
    value_keep: float = 1.0
    protect_first: int = 0
    protect_recent: int = 0
    score_rule: str = "sum"  # token importance rule (cfg.prune score)
    score_keys: int = 0  # width of the last qk's score rows
    slots: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    _head_set: frozenset[int] = frozenset()  # slot 1 as a set (empty = every head)
    predicated: dict[int, int] = dataclasses.field(default_factory=dict)  # head -> predicated query rows

    def configure_attention(self, f: dict[str, int]) -> None:
        self.layer, self.heads, self.kv_heads, self.head_dim = f["layer"], f["heads"], f["kv_heads"], f["head_dim"]
        self.tokens, self.causal, self.past = f["tokens"], bool(f["causal"]), f.get("past", 0)
        self.scale = float(np.array([f.get("scale", 0)], np.uint32).view(np.float32)[0])
        self.scale_div = bool(f.get("div", 0))
        if self.length is None:
            self.length = self.tokens

    def configure_quant(self, f: dict[str, int]) -> None:
        self.q_bits, self.k_msb, self.k_lsb, self.v_bits = f["q_bits"], f["k_msb"], f["k_lsb"], f["v_bits"]
        self.threshold = f["threshold"] / FIXED
        self.rule = REQUANT_RULES[f.get("rule", 0)]

    def configure_prune(self, f: dict[str, int]) -> None:
        self.token_keep, self.head_keep, self.value_keep = (
            f[k] / FIXED for k in ("token_keep", "head_keep", "value_keep"))
        self.protect_first, self.protect_recent = f["protect_first"], f["protect_recent"]
        self.score_rule = SCORE_RULES[f.get("score", 0)]

    def set_slot(self, idx: int, rows: np.ndarray) -> None:
        self.slots[idx] = rows
        if idx == LIVE_HEADS:
            self._head_set = frozenset(rows.tolist())

    def slot(self, idx: int) -> np.ndarray:
        if idx in self.slots:
            return self.slots[idx]
        if idx == LIVE_TOKENS:
            return np.arange(self.length if self.length is not None else self.tokens)
        return np.zeros(0, dtype=np.int64)

    @property
    def live(self) -> int:
        return int(self.slot(LIVE_TOKENS).size)

    @property
    def live_heads(self) -> np.ndarray:
        heads = self.slot(LIVE_HEADS)
        return heads if heads.size else np.arange(self.heads)

    def head_live(self, head: int) -> bool:
        return not self._head_set or head in self._head_set

    @property
    def group(self) -> int:
        """Query heads per K/V head (GQA; 1 for multi-head attention)."""
        return max(1, self.heads // max(1, self.kv_heads))

    def kv_head_live(self, kv_head: int) -> bool:
        """A K/V head is live while one of its group's query heads is."""
        g = self.group
        return not self._head_set or any(h in self._head_set for h in range(kv_head * g, (kv_head + 1) * g))

    def rows(self, rows: int, live: int) -> int:
        return min(rows, self.live) if live else rows

    @staticmethod
    def keep_count(n: int, ratio: float) -> int:
        return min(n, max(1, math.ceil(n * ratio - 1e-9))) if n else 0
