"""Byte-level corruption of .spbin files: the mutations the fuzz test and ``bench.spbin_fuzz`` apply.

Every mutation changes the file (flip a bit, overwrite a byte, insert, delete or truncate bytes,
overwrite a run); :func:`classify` runs the reader and reports how the binary was refused - or
``"ACCEPTED"``, which must never happen - and the message. :func:`mutate_deep` changes bytes inside
one section and then repairs the CRCs, so the checks behind the CRCs (instruction decoding, tensor
table, relocations, dependency tokens) are exercised: there a corruption may also produce another
valid program, but it must never crash the reader (``"CRASH"``).
"""

from __future__ import annotations

import random
import re
import struct
import zlib
from collections.abc import Callable

from spatten_compiler.backend import container as ct
from spatten_compiler.backend.program import from_bytes
from spatten_compiler.errors import SpattencError


def _flip_bit(r: random.Random, d: bytes) -> bytes:
    i = r.randrange(len(d))
    return d[:i] + bytes([d[i] ^ (1 << r.randrange(8))]) + d[i + 1:]


def _set_byte(r: random.Random, d: bytes) -> bytes:
    i = r.randrange(len(d))
    return d[:i] + bytes([(d[i] + r.randrange(1, 256)) % 256]) + d[i + 1:]


def _insert(r: random.Random, d: bytes) -> bytes:
    i = r.randrange(len(d) + 1)
    return d[:i] + r.randbytes(r.randrange(1, 17)) + d[i:]


def _delete(r: random.Random, d: bytes) -> bytes:
    i = r.randrange(len(d))
    return d[:i] + d[i + r.randrange(1, 17):]


def _truncate(r: random.Random, d: bytes) -> bytes:
    return d[:r.randrange(len(d))]


def _overwrite(r: random.Random, d: bytes) -> bytes:
    i = r.randrange(len(d))
    n = min(len(d) - i, r.randrange(2, 33))
    junk = r.randbytes(n)
    return d if junk == d[i:i + n] else d[:i] + junk + d[i + n:]


MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "flip-bit": _flip_bit, "set-byte": _set_byte, "insert": _insert, "delete": _delete,
    "truncate": _truncate, "overwrite": _overwrite,
}


def mutate(r: random.Random, data: bytes) -> tuple[str, bytes]:
    while True:
        kind = r.choice(sorted(MUTATIONS))
        out = MUTATIONS[kind](r, data)
        if out != data:
            return kind, out


def mutate_deep(r: random.Random, data: bytes) -> tuple[str, bytes]:
    """Flip or overwrite bytes inside one section (not the hardware JSON), then fix every CRC."""
    n = struct.unpack_from("<H", data, 12)[0]  # the binary's section count (MODEL is optional)
    table = ct.HEADER.size
    entries = [ct.ENTRY.unpack_from(data, table + i * ct.ENTRY.size) for i in range(n)]
    candidates = [i for i, e in enumerate(entries) if e[4] and ct.SECTIONS[e[0]][0] != "hwdesc"]
    i = r.choice(candidates)
    kind, _, _, offset, size, _ = entries[i]
    body = bytearray(data[offset:offset + size])
    for _ in range(r.randrange(1, 4)):
        j = r.randrange(size)
        body[j] = body[j] ^ (1 << r.randrange(8)) if r.random() < 0.5 else r.randrange(256)
    out = bytearray(data[:offset] + bytes(body) + data[offset + size:])
    struct.pack_into("<I", out, table + i * ct.ENTRY.size + 20, zlib.crc32(bytes(body)))
    header, tab = bytes(out[:table]), bytes(out[table:table + n * ct.ENTRY.size])
    struct.pack_into("<I", out, 56, ct._header_crc(header, tab))
    return f"deep-{ct.SECTIONS[kind][0]}", bytes(out)


def classify(data: bytes) -> tuple[str, str]:
    """(category, message): the category is the message without numbers and names."""
    try:
        from_bytes(data)
    except Exception as e:  # noqa: BLE001 - anything but a SpattencError is a crash, and reported
        if not isinstance(e, SpattencError):
            return "CRASH", f"{type(e).__name__}: {e}"
        msg = str(e)
        category = re.sub(r"0x[0-9a-f]+|\d+|'[^']*'|\([^)]*\)", "N", msg.removeprefix("spbin: "))
        return category, msg
    return "ACCEPTED", ""
