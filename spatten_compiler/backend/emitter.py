"""The lowering's one place that builds a program: instructions, DRAM regions, SRAM addresses.

Rules (``lower.py``, ``lower_attention.py``) call :meth:`Emitter.emit`; nobody else appends
instructions. The logical stream has no dependency tokens: :func:`finish` inserts them
(:func:`spatten_compiler.backend.tokens.insert_tokens`); the program is validated when serialized.
"""

from __future__ import annotations

import re

from spatten_compiler.backend.hw import HwDesc
from spatten_compiler.backend.isa import Instr, make
from spatten_compiler.backend.program import NO_LAYER, Program, Reloc, Tensor
from spatten_compiler.backend.tokens import insert_tokens
from spatten_compiler.errors import SpattencError

LINE = 32  # bytes per SRAM address unit
ACT_BYTES = 2  # activations are 16-bit on chip


class LoweringError(SpattencError):
    """A model the backend cannot lower (one line, names the node)."""


class Emitter:
    def __init__(self, hw: HwDesc) -> None:
        self.hw = hw
        self.instrs: list[Instr] = []
        self.relocs: list[Reloc] = []
        self.debug: list[tuple[int, str]] = []
        self.tensors: list[Tensor] = []
        self.by_name: dict[str, int] = {}
        self.barriers: set[int] = set()
        self._dram = 0
        self.reserved = self.RESERVED  # score-buffer lines kept across blocks (accumulators)
        self._ring: dict[str, int] = {"score": self.reserved}
        self._node: str | None = None
        self._where: str | None = None

    # ---- DRAM ---------------------------------------------------------------------------------
    def region(self, name: str, kind: str, size: int, elem_bits: int = 32, source: str = "",
               layer: int = NO_LAYER) -> int:
        """Reserve a DRAM region (aligned to the transaction size); returns its tensor index."""
        name = re.sub(r"[^A-Za-z0-9_.:/\-\[\]]", "_", name)
        if name in self.by_name:
            return self.by_name[name]
        align = self.hw.transaction_bytes
        dram = -(-self._dram // align) * align
        if dram + size > self.hw.dram_bytes:
            raise LoweringError(f"the model needs more than the {self.hw.dram_mb} MB of DRAM of hardware "
                                f"'{self.hw.name}' (at tensor '{name}')")
        self.tensors.append(Tensor(name, kind, dram, max(1, size), elem_bits, source, layer))
        self._dram = dram + max(1, size)
        self.by_name[name] = len(self.tensors) - 1
        return self.by_name[name]

    def dram(self, tensor: int, offset: int = 0) -> int:
        t = self.tensors[tensor]
        return t.dram + min(offset, t.size - 1)

    # ---- SRAM: a ring per buffer (addresses in 32-byte lines) ------------------------------------
    def sram(self, buf: str, nbytes: int) -> int:
        lines = max(1, -(-nbytes // LINE))
        cap = max(1, self.hw.sram_bytes(buf) // LINE)
        lines = min(lines, cap)
        at = self._ring.get(buf, 0)
        if at + lines > cap:
            at = self.reserved if buf == "score" else 0
        self._ring[buf] = at + lines
        return at

    HEAD_ACC = 0  # score-buffer lines 0..RESERVED-1 hold the head-importance accumulator (kept across blocks)
    RESERVED = 32

    def reset_sram(self) -> None:
        self._ring = {"score": self.reserved}

    def reserve(self, buf: str, nbytes: int) -> int:
        """Score-buffer lines kept across blocks (e.g. a layer's token-importance accumulator)."""
        if buf != "score":
            raise ValueError("only score-buffer lines can be reserved")
        at, lines = self.reserved, max(1, -(-nbytes // LINE))
        if at + lines > self.hw.sram_bytes("score") // LINE // 2:
            raise LoweringError(f"accumulators kept across tokens need more than half the score buffer "
                                f"({self.hw.score_sram_kb} KB) of hardware '{self.hw.name}'; use fewer tokens")
        self.reserved = at + lines
        self.reset_sram()
        return at

    # ---- instructions -------------------------------------------------------------------------
    def node(self, name: str) -> None:
        """Following instructions come from ONNX node ``name`` (debug map)."""
        self._node = self._where = name

    def emit(self, mnemonic: str, tensor: int | None = None, **fields: int) -> None:
        if tensor is not None:
            fields.setdefault("dram", self.tensors[tensor].dram)
        try:
            ins = make(mnemonic, **fields)
        except SpattencError as e:
            raise LoweringError(f"node '{self._where}': {e}") from None
        if self._node is not None:
            if not self.debug or self.debug[-1][1] != self._node:
                self.debug.append((len(self.instrs), self._node))
            self._node = None
        if tensor is not None:
            self.relocs.append(Reloc(len(self.instrs), tensor))
        self.instrs.append(ins)

    def replay(self, a: int, b: int, c: int, k: int) -> bool:
        """Append block ``k`` of an arithmetic series of blocks: instrs[a:b] is block 0 and
        instrs[b:c] block 1 (same classes in the same order); every field changes by k times its
        step (positions, K/V row offsets). Returns False, appending nothing, when they differ in shape."""
        first, second = self.instrs[a:b], self.instrs[b:c]
        if len(first) != len(second) or any(x.spec is not y.spec for x, y in zip(first, second)):
            return False
        base = len(self.instrs)
        try:
            new = [x.spec.make(0, **{n: v0 + k * (v1 - v0)
                                     for n, v0, v1 in zip(x.spec.field_names, x.values, y.values)})
                   for x, y in zip(first, second)]
        except SpattencError:
            return False
        self.instrs.extend(new)
        self.relocs.extend(Reloc(base + r.instr - a, r.tensor, r.field) for r in self.relocs if a <= r.instr < b)
        self.debug.extend((base + i - a, name) for i, name in self.debug if a <= i < b)
        self.barriers.update(base + i - a for i in list(self.barriers) if a <= i < b)
        return True

    def patch(self, at: int, mnemonic: str, **fields: int) -> None:
        """Replace instruction ``at`` (same class) with new field values (step-dependent fields)."""
        if self.instrs[at].mnemonic != mnemonic:
            raise LoweringError(f"internal: instruction {at} is {self.instrs[at].mnemonic}, not {mnemonic}")
        self.instrs[at] = make(mnemonic, **fields)

    def barrier(self) -> None:
        """DRAM written by earlier stores is read by later loads (e.g. K/V planes)."""
        self.barriers.add(len(self.instrs))
        self.emit("sync.compute")

    def finish(self) -> Program:
        self.emit("finish")
        instrs, index = insert_tokens(self.instrs, self.barriers)
        relocs = [Reloc(index[r.instr], r.tensor, r.field) for r in self.relocs]
        debug = [(index[i], name) for i, name in self.debug]
        return Program(self.hw, instrs, self.tensors, relocs, debug)  # validated when written (to_bytes)
