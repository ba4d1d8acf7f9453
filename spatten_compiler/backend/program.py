"""A lowered program (instructions, tensor table, relocations, debug map) and its .spbin form.

:func:`to_bytes` / :func:`from_bytes` are exact inverses; :func:`from_bytes` refuses anything that
is not a well-formed binary for the given hardware with one :class:`ContainerError` line, and so
does :func:`write_program` before writing (dependency tokens included), which writes atomically.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import tempfile
from collections import Counter
from pathlib import Path

from spatten_compiler.backend import container as ct
from spatten_compiler.backend.deps import check_deps
from spatten_compiler.backend.hw import HwDesc, HwError, from_json
from spatten_compiler.backend.isa import Instr, IsaError, decode_stream, encode_stream

TENSOR_KINDS = ("weight", "k_full", "k_msb", "k_lsb", "v", "activation", "input", "output", "index", "scratch")
TENSOR = struct.Struct("<IIBBHQQHH")
RELOC = struct.Struct("<IIBBH")
DEBUG = struct.Struct("<II")
NO_LAYER = 0xFFFF


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One DRAM region. ``source`` is the ONNX initializer or value it holds ('' for scratch)."""

    name: str
    kind: str
    dram: int
    size: int
    elem_bits: int = 32
    source: str = ""
    layer: int = NO_LAYER

    @property
    def end(self) -> int:
        return self.dram + self.size


@dataclasses.dataclass(frozen=True)
class Reloc:
    """Instruction ``instr``'s field ``field`` holds an address inside tensor ``tensor``."""

    instr: int
    tensor: int
    field: str = "dram"


@dataclasses.dataclass
class Program:
    hw: HwDesc
    instrs: list[Instr]
    tensors: list[Tensor]
    relocs: list[Reloc]
    debug: list[tuple[int, str]]  # (first instruction, ONNX node name), increasing
    model: bytes | None = None  # the ONNX model lowered (graph + weight data), the optional MODEL section

    def node_of(self) -> dict[int, str]:
        """Instruction index -> ONNX node name for the first instruction of each node's run."""
        return dict(self.debug)

    def mix(self) -> Counter[str]:
        return Counter(i.mnemonic for i in self.instrs)


def _fail(msg: str) -> ct.ContainerError:
    return ct.ContainerError(msg)


def validate(p: Program, where: str = "program") -> None:
    """Cross-reference checks shared by the writer and the reader."""
    if not p.instrs or p.instrs[-1].mnemonic != "finish":
        raise _fail(f"{where}: the instruction stream does not end with 'finish'")
    if any(i.mnemonic == "finish" for i in p.instrs[:-1]):
        raise _fail(f"{where}: 'finish' before the end of the instruction stream")
    names: set[str] = set()
    previous_end = 0
    for t in sorted(p.tensors, key=lambda t: t.dram):
        if t.name in names:
            raise _fail(f"{where}: tensor name '{t.name}' is not unique")
        names.add(t.name)
        if t.kind not in TENSOR_KINDS:
            raise _fail(f"{where}: tensor '{t.name}' has unknown kind {t.kind!r}")
        if t.size <= 0 or t.dram % p.hw.transaction_bytes or t.end > p.hw.dram_bytes:
            raise _fail(f"{where}: tensor '{t.name}' region 0x{t.dram:x}+{t.size} is empty, unaligned or "
                        f"beyond {p.hw.dram_mb} MB of DRAM")
        if t.dram < previous_end:
            raise _fail(f"{where}: tensor '{t.name}' overlaps another DRAM region")
        previous_end = t.end
    seen: set[int] = set()
    for r in p.relocs:
        if not 0 <= r.instr < len(p.instrs) or not 0 <= r.tensor < len(p.tensors):
            raise _fail(f"{where}: relocation ({r.instr}, {r.tensor}) points outside the program")
        ins, t = p.instrs[r.instr], p.tensors[r.tensor]
        if r.field not in ins.spec.field_names or r.instr in seen:
            raise _fail(f"{where}: relocation of instruction {r.instr} names field '{r.field}' twice or wrongly")
        seen.add(r.instr)
        if not t.dram <= ins[r.field] < t.end:
            raise _fail(f"{where}: instruction {r.instr} address 0x{ins[r.field]:x} is outside tensor '{t.name}'")
    for i, ins in enumerate(p.instrs):
        if "dram" in ins.spec.field_names and i not in seen:
            raise _fail(f"{where}: instruction {i} ({ins.mnemonic}) has a DRAM address without a relocation")
    last = -1
    for i, _ in p.debug:
        if not last < i < len(p.instrs):
            raise _fail(f"{where}: debug map entry for instruction {i} is out of order or range")
        last = i
    try:
        check_deps(p.instrs)
    except IsaError as e:
        raise _fail(f"{where}: {e}") from None


def to_bytes(p: Program) -> bytes:
    validate(p)
    strings = ct.StringTable()
    tensors = b"".join(
        TENSOR.pack(strings.add(t.name), strings.add(t.source), TENSOR_KINDS.index(t.kind), t.elem_bits, 0,
                    t.dram, t.size, t.layer, 0)
        for t in p.tensors
    )
    relocs = b"".join(RELOC.pack(r.instr, r.tensor, p.instrs[r.instr].spec.field_names.index(r.field), 0, 0)
                      for r in p.relocs)
    debug = b"".join(DEBUG.pack(i, strings.add(name)) for i, name in p.debug)
    hwblob = p.hw.canonical_json()
    sections = {
        "hwdesc": ct.Section("hwdesc", len(hwblob), hwblob),
        "strings": strings.section(),
        "tensors": ct.Section("tensors", len(p.tensors), tensors),
        "instr": ct.Section("instr", len(p.instrs), encode_stream(p.instrs)),
        "relocs": ct.Section("relocs", len(p.relocs), relocs),
        "debug": ct.Section("debug", len(p.debug), debug),
    }
    if p.model is not None:
        sections["model"] = ct.Section("model", len(p.model), p.model)
    return ct.pack(p.hw.digest(), sections)


def from_bytes(data: bytes, hw: HwDesc | None = None, where: str = "spbin") -> Program:
    """Parse and check a .spbin; with ``hw``, also refuse a binary built for other hardware."""
    digest, s = ct.unpack(data, where)
    blob = s["hwdesc"].data
    try:
        desc = from_json(blob, where)
    except HwError as e:
        raise _fail(str(e)) from None
    if desc.canonical_json() != blob or desc.digest() != digest:
        raise _fail(f"{where}: hardware digest does not match the embedded hardware description")
    if hw is not None and hw.digest() != digest:
        raise _fail(f"{where}: built for hardware '{desc.name}' ({digest.hex()[:12]}), not '{hw.name}' "
                    f"({hw.digest().hex()[:12]})")
    strings = s["strings"].data
    if not strings or strings[-1] != 0:
        raise _fail(f"{where}: string table is not NUL-terminated")
    tensors = []
    for k, row in enumerate(TENSOR.iter_unpack(s["tensors"].data)):
        name, source, kind, bits, flags, dram, size, layer, zero = row
        if kind >= len(TENSOR_KINDS) or flags or zero:
            raise _fail(f"{where}: tensor {k} has an unknown kind {kind} or non-zero reserved bytes")
        tensors.append(Tensor(ct.read_string(strings, name, f"{where}: tensor {k}"), TENSOR_KINDS[kind], dram, size,
                              bits, ct.read_string(strings, source, f"{where}: tensor {k}"), layer))
    try:
        instrs = decode_stream(s["instr"].data)
    except IsaError as e:
        raise _fail(f"{where}: {e}") from None
    relocs = []
    for k in range(s["relocs"].count):
        i, t, f, z1, z2 = RELOC.unpack_from(s["relocs"].data, k * RELOC.size)
        if z1 or z2 or i >= len(instrs) or f >= len(instrs[i].spec.fields):
            raise _fail(f"{where}: relocation {k} is malformed")
        relocs.append(Reloc(i, t, instrs[i].spec.fields[f].name))
    debug = [(i, ct.read_string(strings, off, f"{where}: debug entry {k}"))
             for k, (i, off) in enumerate(DEBUG.iter_unpack(s["debug"].data))]
    model = s["model"].data if "model" in s else None
    program = Program(desc, instrs, tensors, relocs, debug, model)
    validate(program, where)
    return program


def write_program(p: Program, path: Path) -> int:
    """Validate, serialize and write atomically (no half-written file); returns the byte count."""
    data = to_bytes(p)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an output file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)


def read_program(path: Path, hw: HwDesc | None = None) -> Program:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ct.ContainerError(f"{path}: cannot read ({e.strerror})") from None
    return from_bytes(data, hw, str(path))
