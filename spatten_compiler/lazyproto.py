"""Read an ONNX file without copying its inline weights into memory.

Protobuf has no lazy parsing, so ``onnx.load`` of a 600 MB model holds the file's bytes and the
parsed message at once (2x the file). Here the wire format is walked field by field with small
positioned reads (``os.pread``; not a memory map: on kernels with large page-cache folios, touching
one byte of a mapped file maps up to 2 MB of it, and a walk over 300 tensor headers put 300 MB of
the file into the process's resident memory): every field is parsed as usual except the
``raw_data`` of large initializers, which becomes an external-data reference into the ``.onnx``
file itself (location = the file's own name, offset and length of the bytes). onnx-ir then
memory-maps those weights like any external data. Wire format:
key = varint(field << 3 | wire_type); wire type 2 is varint length + payload.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

GRAPH_FIELD = 7  # ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer
RAW_DATA_FIELD = 9  # TensorProto.raw_data
MIN_LAZY_BYTES = 1 << 16
WINDOW = 1 << 12  # bytes read at a time while decoding keys and lengths


class _File:
    """Random access to a file's bytes through ``os.pread``, with one small window for headers."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self._start, self._window = 0, b""

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            return os.pread(self.fd, key.stop - key.start, key.start)
        if not self._start <= key < self._start + len(self._window):
            self._start, self._window = key, os.pread(self.fd, WINDOW, key)
        return self._window[key - self._start]


def _varint(buf: _File | bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: _File, start: int, end: int):
    """Yield (field number, wire type, field start, payload start, field end)."""
    pos = start
    while pos < end:
        key, p = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, q = _varint(buf, p)
            yield field, wire, pos, p, q
        elif wire == 1:
            yield field, wire, pos, p, p + 8
        elif wire == 5:
            yield field, wire, pos, p, p + 4
        elif wire == 2:
            length, q = _varint(buf, p)
            yield field, wire, pos, q, q + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
        pos = (q + length) if wire == 2 else (q if wire == 0 else p + (8 if wire == 1 else 4))
        if pos > end:
            raise ValueError("field runs past the end of its message (truncated file?)")


def _tensor(buf: _File, start: int, end: int, location: str | None) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    raw: tuple[int, int] | None = None
    for field, wire, f_start, p_start, f_end in _fields(buf, start, end):
        if location and field == RAW_DATA_FIELD and wire == 2 and f_end - p_start >= MIN_LAZY_BYTES:
            raw = (p_start, f_end - p_start)
        else:
            tensor.MergeFromString(buf[f_start:f_end])
    if raw is not None:
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1]))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return tensor


def read_model(path: Path, *, lazy: bool = True) -> onnx.ModelProto:
    """Parse ``path`` with large inline initializers left in the file as self-references
    (``lazy=False``: parsed into memory like ``onnx.load``)."""
    model = onnx.ModelProto()
    with open(path, "rb") as f:
        buf = _File(f.fileno())
        for field, wire, f_start, p_start, f_end in _fields(buf, 0, len(buf)):
            if field != GRAPH_FIELD or wire != 2:
                model.MergeFromString(buf[f_start:f_end])
                continue
            graph = onnx.GraphProto()
            for g_field, g_wire, g_start, gp_start, g_end in _fields(buf, p_start, f_end):
                if g_field == INITIALIZER_FIELD and g_wire == 2:
                    graph.initializer.append(_tensor(buf, gp_start, g_end, path.name if lazy else None))
                else:
                    graph.MergeFromString(buf[g_start:g_end])
            model.graph.MergeFrom(graph)
    return model
