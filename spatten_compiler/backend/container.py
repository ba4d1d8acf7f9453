"""The ``.spbin`` container: header, section table, CRC32-checked sections.

Layout (all integers little-endian)::

    header (64 bytes)
      0  magic b"SPBN"          4  version major u16, minor u16     8  endian mark u32 0x01020304
      12 section count u16      14 flags u16 (0)                     16 hardware digest (32 bytes)
      48 file size u64          56 header CRC32 u32 (bytes 0-55 + 60-63 + section table)  60 zero u32
    section table: one 24-byte entry per section
      kind u16, zero u16, count u32, offset u64, size u32, CRC32 u32
    sections, contiguous and in kind order: HWDESC, STRINGS, TENSORS, INSTR, RELOCS, DEBUG[, MODEL]

MODEL (optional, version 1.1) holds the ONNX model the stream was lowered from - its graph names the
nodes of the debug map and its initializers are the data of the ``weight`` tensors - so the binary is
data-complete for the functional simulator (``spattenc emit --no-weights`` leaves it out).

Every byte is covered by a CRC or an exact-layout rule, so any flipped, inserted or removed byte is
refused with one line (bad magic / version / endianness / hardware digest / CRC / section bounds /
a field out of range) before anything is used. :mod:`spatten_compiler.backend.program` turns the
sections into a :class:`Program` and checks their cross-references.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

from spatten_compiler.errors import SpattencError

MAGIC = b"SPBN"
VERSION = (1, 1)
ENDIAN_MARK = 0x01020304
HEADER = struct.Struct("<4sHHIHH32sQII")
ENTRY = struct.Struct("<HHIQII")
assert HEADER.size == 64 and ENTRY.size == 24

# Section kinds in file order; the entry size for fixed-record sections (0 = byte blob).
SECTIONS: dict[int, tuple[str, int]] = {
    1: ("hwdesc", 0),
    2: ("strings", 0),
    3: ("tensors", 32),
    4: ("instr", 16),
    5: ("relocs", 12),
    6: ("debug", 8),
    7: ("model", 0),
}
OPTIONAL = ("model",)  # trailing sections a binary may leave out
KIND_BY_NAME = {name: kind for kind, (name, _) in SECTIONS.items()}
MAX_SECTION = 1 << 32


class ContainerError(SpattencError):
    """A .spbin that is not well-formed."""


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    count: int
    data: bytes


def _header_crc(header: bytes, table: bytes) -> int:
    return zlib.crc32(table, zlib.crc32(header[60:64], zlib.crc32(header[:56])))


def pack(hw_digest: bytes, sections: dict[str, Section]) -> bytes:
    """Serialize the sections (all but the trailing optional ones must be present) into one container."""
    required = [k for k in KIND_BY_NAME if k not in OPTIONAL]
    present = [k for k in KIND_BY_NAME if k in sections]
    if any(k not in KIND_BY_NAME for k in sections) or present[:len(required)] != required or \
            present != list(KIND_BY_NAME)[:len(present)]:
        raise ContainerError(f"sections must be exactly {', '.join(required)} (then optionally {', '.join(OPTIONAL)})")
    n = len(present)
    offset = HEADER.size + n * ENTRY.size
    table, blobs = b"", []
    for kind, (name, _) in list(SECTIONS.items())[:n]:
        sec = sections[name]
        if len(sec.data) >= MAX_SECTION:
            raise ContainerError(f"section {name} is too large ({len(sec.data)} bytes)")
        table += ENTRY.pack(kind, 0, sec.count, offset, len(sec.data), zlib.crc32(sec.data))
        blobs.append(sec.data)
        offset += len(sec.data)
    header = HEADER.pack(MAGIC, *VERSION, ENDIAN_MARK, n, 0, hw_digest, offset, 0, 0)
    crc = _header_crc(header, table)
    header = header[:56] + struct.pack("<I", crc) + header[60:]
    return header + table + b"".join(blobs)


def unpack(data: bytes, where: str = "spbin") -> tuple[bytes, dict[str, Section]]:
    """Check header, table and CRCs; return the hardware digest and the sections by name."""
    if len(data) < HEADER.size:
        raise ContainerError(f"{where}: truncated header ({len(data)} of {HEADER.size} bytes)")
    magic, major, minor, mark, n, flags, digest, size, crc, zero = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ContainerError(f"{where}: bad magic {magic!r} (not a .spbin file)")
    if mark != ENDIAN_MARK:
        raise ContainerError(f"{where}: bad endianness mark 0x{mark:08x} (expected little-endian 0x{ENDIAN_MARK:08x})")
    if major != VERSION[0]:
        raise ContainerError(f"{where}: unsupported version {major}.{minor} (this spattenc reads {VERSION[0]}.x)")
    if not len(SECTIONS) - len(OPTIONAL) <= n <= len(SECTIONS):
        raise ContainerError(f"{where}: section count {n}, expected {len(SECTIONS) - len(OPTIONAL)} to {len(SECTIONS)}")
    if flags or zero:
        raise ContainerError(f"{where}: reserved header bytes are not zero")
    table_end = HEADER.size + n * ENTRY.size
    if len(data) < table_end:
        raise ContainerError(f"{where}: truncated section table ({len(data)} of {table_end} bytes)")
    table = data[HEADER.size:table_end]
    if crc != _header_crc(data[:HEADER.size], table):
        raise ContainerError(f"{where}: header CRC mismatch (corrupted header or section table)")
    if size != len(data):
        raise ContainerError(f"{where}: file is {len(data)} bytes but the header says {size} (truncated or padded)")
    sections: dict[str, Section] = {}
    expect_offset = table_end
    for i, (kind, (name, record)) in enumerate(list(SECTIONS.items())[:n]):
        k, zero16, count, offset, length, scrc = ENTRY.unpack_from(table, i * ENTRY.size)
        if k != kind or zero16:
            raise ContainerError(f"{where}: section {i} has kind {k}, expected {kind} ({name})")
        if offset != expect_offset or offset + length > len(data):
            raise ContainerError(f"{where}: section {name} out of bounds (offset {offset}, size {length})")
        expected_count = length // record if record else length
        if (record and length % record) or count != expected_count:
            raise ContainerError(f"{where}: section {name} size {length} does not hold {count} records")
        blob = data[offset:offset + length]
        if zlib.crc32(blob) != scrc:
            raise ContainerError(f"{where}: CRC mismatch in section {name}")
        sections[name] = Section(name, count, blob)
        expect_offset = offset + length
    if expect_offset != len(data):
        raise ContainerError(f"{where}: {len(data) - expect_offset} trailing bytes after the last section")
    return digest, sections


# ---- the string table: NUL-terminated UTF-8, addressed by byte offset ---------------------------
class StringTable:
    def __init__(self) -> None:
        self._blob = bytearray(b"\0")  # offset 0 is the empty string
        self._index: dict[str, int] = {"": 0}

    def add(self, text: str) -> int:
        if text not in self._index:
            raw = text.encode("utf-8")
            if b"\0" in raw:
                raise ContainerError(f"name {text!r} contains a NUL byte")
            self._index[text] = len(self._blob)
            self._blob += raw + b"\0"
        return self._index[text]

    def section(self) -> Section:
        return Section("strings", len(self._blob), bytes(self._blob))


def read_string(blob: bytes, offset: int, where: str) -> str:
    end = blob.find(b"\0", offset) if 0 <= offset < len(blob) else -1
    if end < 0:
        raise ContainerError(f"{where}: string offset {offset} outside the string table")
    if offset and blob[offset - 1] != 0:
        raise ContainerError(f"{where}: string offset {offset} is not at the start of a string")
    try:
        return blob[offset:end].decode("utf-8")
    except UnicodeDecodeError:
        raise ContainerError(f"{where}: string at offset {offset} is not UTF-8") from None
