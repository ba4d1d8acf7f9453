"""The instruction set: 128-bit little-endian words, one table row (:class:`InstrSpec`) per opcode.

Word layout (bit 0 = least significant bit of byte 0)::

    bits 0-5    opcode
    bits 6-9    dependency tokens: pop_prev, pop_next, push_prev, push_next (as in TVM VTA)
    bits 10-    the class's fields, in table order, each ``width`` bits; the rest must be zero

Each :class:`InstrSpec` owns its fields (name, width, range, enum symbols, fixed-point scale), its
encoding and its assembly syntax; :data:`OPCODES` / :data:`MNEMONICS` are the registries. Nothing
dispatches with if/elif over opcodes: the simulator keys its handlers by ``instr.spec.mnemonic``.

Three stages run concurrently and synchronize only through the dependency tokens: ``load`` (DMA
into SRAM), ``compute``, ``store`` (DMA out of SRAM). ``prev``/``next`` are the neighbouring
stages in that order (load has no prev, store has no next); see :mod:`spatten_compiler.backend.deps`.

The table itself (which classes exist, their fields) is in :mod:`spatten_compiler.backend.opcodes`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
from collections.abc import Iterable, Iterator, Mapping

from spatten_compiler.errors import SpattencError

WORD_BYTES = 16
WORD_BITS = 8 * WORD_BYTES
OPCODE_BITS = 6
DEP_BITS = 4
HEADER_BITS = OPCODE_BITS + DEP_BITS
STAGES = ("load", "compute", "store")
DEP_NAMES = ("pop_prev", "pop_next", "push_prev", "push_next")  # bit i of the dependency nibble
POP_PREV, POP_NEXT, PUSH_PREV, PUSH_NEXT = 1, 2, 4, 8


class IsaError(SpattencError):
    """An instruction that cannot be encoded, decoded or assembled."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One operand: ``width`` bits, values ``lo..hi``; ``symbols`` name the values of an enum;
    ``scale`` makes it fixed point in assembly (text value = raw / scale)."""

    name: str
    width: int
    doc: str = ""
    symbols: tuple[str, ...] = ()
    scale: int = 1
    hi: int | None = None
    hex: bool = False
    f32: bool = False  # the bits of an IEEE float32 (exact scales the graph multiplies or divides by)

    @property
    def max(self) -> int:
        if self.hi is not None:
            return self.hi
        if self.symbols:
            return len(self.symbols) - 1
        return (1 << self.width) - 1

    def check(self, value: int, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise IsaError(f"{where}: field '{self.name}' must be an integer, got {value!r}")
        if not 0 <= value <= self.max:
            raise IsaError(f"{where}: field '{self.name}' = {value} out of range 0..{self.max}")
        if self.f32 and (value >> 23) & 0xFF == 0xFF:
            raise IsaError(f"{where}: field '{self.name}' = 0x{value:08x} is not a finite float32")
        return value

    def format(self, value: int) -> str:
        if self.symbols:
            return self.symbols[value]
        if self.f32:
            return repr(struct.unpack("<f", struct.pack("<I", value))[0])
        if self.scale != 1:
            return repr(value / self.scale)
        return hex(value) if self.hex else str(value)

    def parse(self, text: str, where: str) -> int:
        if self.symbols:
            if text in self.symbols:
                return self.symbols.index(text)
            raise IsaError(f"{where}: field '{self.name}' must be one of {'|'.join(self.symbols)}, got '{text}'")
        if self.f32:
            try:
                value = float(text)
                bits = struct.unpack("<I", struct.pack("<f", value))[0]
            except (ValueError, OverflowError):
                raise IsaError(f"{where}: field '{self.name}' must be a float32 number, got '{text}'") from None
            if not math.isfinite(value):
                raise IsaError(f"{where}: field '{self.name}' = {text} is not finite")
            return self.check(bits, where)
        if self.scale != 1:
            try:
                raw = float(text) * self.scale
            except ValueError:
                raise IsaError(f"{where}: field '{self.name}' must be a number, got '{text}'") from None
            if not (math.isfinite(raw) and raw == int(raw)):
                raise IsaError(f"{where}: field '{self.name}' = {text} is not a multiple of 1/{self.scale}")
            return self.check(int(raw), where)
        try:
            value = int(text, 0)
        except ValueError:
            raise IsaError(f"{where}: field '{self.name}' must be an integer, got '{text}'") from None
        return self.check(value, where)


@dataclasses.dataclass(frozen=True)
class InstrSpec:
    """One instruction class: its opcode, stage, fields, encoding and assembly syntax."""

    mnemonic: str
    opcode: int
    stage: str
    fields: tuple[Field, ...]
    doc: str = ""

    def __post_init__(self) -> None:
        used = HEADER_BITS + sum(f.width for f in self.fields)
        if used > WORD_BITS:
            raise ValueError(f"{self.mnemonic}: {used} bits do not fit a {WORD_BITS}-bit word")
        if self.stage not in STAGES:
            raise ValueError(f"{self.mnemonic}: unknown stage {self.stage}")

    @functools.cached_property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @functools.cached_property
    def _by_name(self) -> dict[str, tuple[int, Field]]:
        return {f.name: (k, f) for k, f in enumerate(self.fields)}

    def field(self, name: str) -> Field:
        hit = self._by_name.get(name)
        if hit is not None:
            return hit[1]
        raise IsaError(f"'{self.mnemonic}' has no field '{name}' (fields: {', '.join(self.field_names)})")

    def make(self, deps: int = 0, **values: int) -> Instr:
        """Build a checked instruction; omitted fields are 0; unknown or out-of-range ones refused."""
        for name in values:
            if name not in self._by_name:
                self.field(name)
        if not 0 <= deps < 1 << DEP_BITS:
            raise IsaError(f"{self.mnemonic}: dependency bits {deps} out of range 0..15")
        vals = tuple(f.check(values.get(f.name, 0), self.mnemonic) for f in self.fields)
        return Instr(self, vals, deps)

    # ---- binary ----------------------------------------------------------------------------
    def encode(self, instr: Instr) -> bytes:
        word, shift = self.opcode | instr.deps << OPCODE_BITS, HEADER_BITS
        for f, v in zip(self.fields, instr.values):
            word |= v << shift
            shift += f.width
        return word.to_bytes(WORD_BYTES, "little")

    def decode(self, word: int, where: str) -> Instr:
        deps = (word >> OPCODE_BITS) & ((1 << DEP_BITS) - 1)
        shift, vals = HEADER_BITS, []
        for f in self.fields:
            v = (word >> shift) & ((1 << f.width) - 1)
            vals.append(f.check(v, f"{where} ({self.mnemonic})"))
            shift += f.width
        if word >> shift:
            raise IsaError(f"{where} ({self.mnemonic}): reserved bits {shift}..{WORD_BITS - 1} are not zero")
        return Instr(self, tuple(vals), deps)

    # ---- assembly: ``mnemonic f1=v1 f2=v2 ... [deps=pop_prev|push_next]`` ----------------------
    def format(self, instr: Instr) -> str:
        parts = [self.mnemonic] + [f"{f.name}={f.format(v)}" for f, v in zip(self.fields, instr.values)]
        if instr.deps:
            parts.append("deps=" + "|".join(n for i, n in enumerate(DEP_NAMES) if instr.deps >> i & 1))
        return " ".join(parts)

    def parse(self, operands: Iterable[str], where: str) -> Instr:
        values: dict[str, int] = {}
        deps = 0
        for op in operands:
            name, eq, text = op.partition("=")
            if not eq or not text:
                raise IsaError(f"{where}: operand '{op}' is not name=value")
            if name in values or (name == "deps" and deps):
                raise IsaError(f"{where}: operand '{name}' given twice")
            if name == "deps":
                deps = _parse_deps(text, where)
                continue
            values[name] = self.field(name).parse(text, where)
        return self.make(deps, **values)



def _parse_deps(text: str, where: str) -> int:
    bits = 0
    for name in text.split("|"):
        if name not in DEP_NAMES:
            raise IsaError(f"{where}: unknown dependency token '{name}' (known: {'|'.join(DEP_NAMES)})")
        if bits >> DEP_NAMES.index(name) & 1:
            raise IsaError(f"{where}: dependency token '{name}' given twice")
        bits |= 1 << DEP_NAMES.index(name)
    return bits


@dataclasses.dataclass(frozen=True)
class Instr:
    """A decoded instruction: its class, field values in table order, dependency bits."""

    spec: InstrSpec
    values: tuple[int, ...]
    deps: int = 0

    @property
    def mnemonic(self) -> str:
        return self.spec.mnemonic

    @property
    def opcode(self) -> int:
        return self.spec.opcode

    @property
    def stage(self) -> str:
        return self.spec.stage

    @property
    def fields(self) -> dict[str, int]:
        return dict(zip(self.spec.field_names, self.values))

    def __getitem__(self, name: str) -> int:
        hit = self.spec._by_name.get(name)
        return self.values[hit[0]] if hit is not None else self.values[self.spec.fields.index(self.spec.field(name))]

    def symbol(self, name: str) -> str:
        """An enum field's value by name (e.g. ``instr.symbol('buf') == 'weight'``)."""
        return self.spec.field(name).format(self[name])

    def dep(self, name: str) -> bool:
        return bool(self.deps >> DEP_NAMES.index(name) & 1)

    def with_deps(self, deps: int) -> Instr:
        return dataclasses.replace(self, deps=deps)

    def replace(self, **values: int) -> Instr:
        merged = {**self.fields, **values}
        return self.spec.make(self.deps, **merged)

    def encode(self) -> bytes:
        return self.spec.encode(self)

    def asm(self) -> str:
        return self.spec.format(self)


OPCODES: dict[int, InstrSpec] = {}
MNEMONICS: dict[str, InstrSpec] = {}


def define(spec: InstrSpec) -> InstrSpec:
    """Register one instruction class (opcodes and mnemonics must be unique)."""
    if spec.opcode in OPCODES or spec.mnemonic in MNEMONICS:
        raise ValueError(f"duplicate instruction {spec.mnemonic} / opcode {spec.opcode}")
    if not 0 <= spec.opcode < 1 << OPCODE_BITS:
        raise ValueError(f"{spec.mnemonic}: opcode {spec.opcode} does not fit {OPCODE_BITS} bits")
    OPCODES[spec.opcode] = spec
    MNEMONICS[spec.mnemonic] = spec
    return spec


def spec(mnemonic: str) -> InstrSpec:
    try:
        return MNEMONICS[mnemonic]
    except KeyError:
        raise IsaError(f"unknown instruction '{mnemonic}'") from None


def decode_word(data: bytes | memoryview, where: str = "instruction") -> Instr:
    if len(data) != WORD_BYTES:
        raise IsaError(f"{where}: {len(data)} bytes, expected {WORD_BYTES}")
    word = int.from_bytes(data, "little")
    op = word & ((1 << OPCODE_BITS) - 1)
    if op not in OPCODES:
        raise IsaError(f"{where}: unknown opcode {op}")
    return OPCODES[op].decode(word, where)


def decode_stream(data: bytes | memoryview) -> list[Instr]:
    """Decode a packed instruction section; every problem names the instruction index."""
    if len(data) % WORD_BYTES:
        raise IsaError(f"instruction stream of {len(data)} bytes is not a multiple of {WORD_BYTES}")
    view = memoryview(data)
    return [decode_word(view[i:i + WORD_BYTES], f"instruction {i // WORD_BYTES}")
            for i in range(0, len(data), WORD_BYTES)]


def encode_stream(instrs: Iterable[Instr]) -> bytes:
    return b"".join(i.encode() for i in instrs)


def iter_fields(instr: Instr) -> Iterator[tuple[Field, int]]:
    return zip(instr.spec.fields, instr.values)


def make(mnemonic: str, deps: int = 0, **values: int) -> Instr:
    return spec(mnemonic).make(deps, **values)


def instr_from_mapping(mnemonic: str, values: Mapping[str, int], deps: int = 0) -> Instr:
    return spec(mnemonic).make(deps, **dict(values))


from spatten_compiler.backend import opcodes as _opcodes  # noqa: E402,F401  (fills the registries)
