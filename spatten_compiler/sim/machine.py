"""The accelerator's state that the stream itself never holds.

Two kinds:
- :class:`Config`, set by ``cfg.attn`` / ``cfg.quant`` / ``cfg.prune``. Every stage sees the
  configuration in *program order* (the instruction fetch unit hands it to all three stages), so
  the simulator snapshots it per instruction before the stages start (:func:`config_snapshots`).
- :class:`Machine`, the run-time decisions made by the hardware's own instructions: the live-token
  count, the live heads, the index lists and each head's requantization predicate. Stages see these
  only as far as dependency tokens order them, exactly like data.

Conventions (see docs/simulator.md):
- index slot 0 is the identity list: every live token ``0 .. live - 1``; ``topk`` writes the others;
- ``load buf=q`` sets the number of query rows that ``qk`` / ``softmax`` / ``pv`` process;
- ``cfg.attn layer=0`` starts a new pass (prompt or generation step): every token and head is live
  again until a ``topk`` of that pass says otherwise;
- an instruction naming a head that ``topk kind=heads`` dropped does nothing and moves no byte;
- ``requant`` sets the head's predicated rows; ``fetch.kv pred=1`` reads the head's LSB plane when
  any of its rows is predicated, ``qk`` / ``softmax pred=1`` recompute only those rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from spatten_compiler.backend.isa import Instr
from spatten_compiler.backend.opcodes import FIXED


@dataclasses.dataclass(frozen=True)
class Config:
    pass_id: int = 0
    layer: int = 0
    heads: int = 1
    kv_heads: int = 1
    head_dim: int = 64
    tokens: int = 0  # context upper bound of cfg.attn
    causal: bool = False
    q_bits: int = 32
    k_msb: int = 32
    k_lsb: int = 0
    v_bits: int = 32
    threshold: float = 0.0
    token_keep: float = 1.0
    head_keep: float = 1.0
    value_keep: float = 1.0
    protect_first: int = 0
    protect_recent: int = 0


def _attn(c: Config, f: dict[str, int]) -> Config:
    return dataclasses.replace(c, pass_id=c.pass_id + (f["layer"] == 0), layer=f["layer"], heads=f["heads"],
                               kv_heads=f["kv_heads"], head_dim=f["head_dim"], tokens=f["tokens"],
                               causal=bool(f["causal"]))


def _quant(c: Config, f: dict[str, int]) -> Config:
    return dataclasses.replace(c, q_bits=f["q_bits"], k_msb=f["k_msb"], k_lsb=f["k_lsb"], v_bits=f["v_bits"],
                               threshold=f["threshold"] / FIXED)


def _prune(c: Config, f: dict[str, int]) -> Config:
    return dataclasses.replace(c, token_keep=f["token_keep"] / FIXED, head_keep=f["head_keep"] / FIXED,
                               value_keep=f["value_keep"] / FIXED, protect_first=f["protect_first"],
                               protect_recent=f["protect_recent"])


CONFIGURE = {"cfg.attn": _attn, "cfg.quant": _quant, "cfg.prune": _prune}


def config_snapshots(instrs: Sequence[Instr]) -> list[Config]:
    """The configuration each instruction runs under (after its own effect, for cfg.* themselves)."""
    cfg, out = Config(), []
    for ins in instrs:
        step = CONFIGURE.get(ins.mnemonic)
        if step is not None:
            cfg = step(cfg, ins.fields)
        out.append(cfg)
    return out


@dataclasses.dataclass
class Machine:
    cfg: Config = dataclasses.field(default_factory=Config)
    _q_rows: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)  # (pass, layer) -> rows
    score_keys: int = 0  # width of the last qk's score rows
    _live: tuple[int, int] | None = None  # (pass, live-token count)
    _heads: tuple[int, np.ndarray] | None = None  # (pass, live heads)
    slots: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    predicated: dict[tuple[int, int, int], int] = dataclasses.field(default_factory=dict)  # (pass, layer, head)

    @property
    def live(self) -> int:
        if self._live is not None and self._live[0] == self.cfg.pass_id:
            return min(self._live[1], self.cfg.tokens)
        return self.cfg.tokens

    @live.setter
    def live(self, n: int) -> None:
        self._live = (self.cfg.pass_id, n)

    @property
    def live_heads(self) -> np.ndarray:
        if self._heads is not None and self._heads[0] == self.cfg.pass_id:
            return self._heads[1]
        return np.arange(self.cfg.heads)

    @live_heads.setter
    def live_heads(self, heads: np.ndarray) -> None:
        self._heads = (self.cfg.pass_id, heads)

    @property
    def q_rows(self) -> int:
        """Query rows of this pass and layer (the load stage may already be loading later layers' Q)."""
        return self._q_rows.get((self.cfg.pass_id, self.cfg.layer), 1)

    @q_rows.setter
    def q_rows(self, rows: int) -> None:
        self._q_rows[(self.cfg.pass_id, self.cfg.layer)] = rows

    def head_live(self, head: int) -> bool:
        return self._heads is None or self._heads[0] != self.cfg.pass_id or bool(np.isin(head, self._heads[1]))

    def pred_key(self, head: int) -> tuple[int, int, int]:
        return (self.cfg.pass_id, self.cfg.layer, head)

    def slot(self, idx: int) -> np.ndarray:
        """The token (or V row) positions of index slot ``idx``; slot 0 = every live token."""
        if idx == 0 or idx not in self.slots:
            return np.arange(self.live)
        return self.slots[idx]

    def rows(self, rows: int, live: int) -> int:
        return min(rows, self.live) if live else rows

    @staticmethod
    def keep_count(n: int, ratio: float, protect: int = 0) -> int:
        return min(n, max(1, math.ceil(n * ratio - 1e-9), protect))
