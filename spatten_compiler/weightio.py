"""Write a model without holding its weights in memory: one tensor at a time, straight to the file.

``onnx.save`` (and ``ir.save`` without external data) builds the whole ``ModelProto`` with every
weight's bytes inside it and then serializes it: the weights are in memory twice more (the proto's
copies, the serialized string) on top of the model's own. Here the protobuf wire format is written
directly (the inverse of :mod:`.lazyproto`):

* the model is serialized with every large tensor replaced by a placeholder external reference
  (so the proto holds the graph only); those placeholders are cut out of ``graph.initializer``;
* the file is written as ``<model fields> <graph key> <graph length> <graph fields>`` followed by
  one ``initializer`` entry per large tensor: its header (name, dims, data type) and a ``raw_data``
  field whose bytes come from the tensor's own ``tofile``: a memory-mapped weight of the input is
  copied file to file by the kernel (``copy_file_range``), an in-memory one written from its array.

Protobuf allows fields in any order and repeated fields to be split, so the result parses like any
ONNX file (large initializers come last). With external data, onnx-ir's writer already streams
tensor by tensor (:func:`write_external` adds the progress callback).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

GRAPH_FIELD = 7  # ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer
RAW_DATA_FIELD = 9  # TensorProto.raw_data
MIN_STREAM_BYTES = 1 << 12  # smaller tensors are serialized with the graph
PLACEHOLDER = "spattenc-stream-placeholder"

Progress = Callable[[ir.TensorProtocol, int], None]  # (tensor written, its bytes)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _streamable(value: ir.Value, min_bytes: int) -> bool:
    t = value.const_value
    return t is not None and t.dtype != ir.DataType.STRING and t.nbytes >= min_bytes


def streamed_bytes(model: ir.Model, min_bytes: int = MIN_STREAM_BYTES) -> int:
    """Bytes of the main graph's tensors that :func:`write_inline` streams."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if _streamable(v, min_bytes))


def _graph_proto(model: ir.Model, streamed: list[ir.Value]) -> tuple[onnx.ModelProto, list[bytes]]:
    """The model's proto without the ``streamed`` tensors, and each one's TensorProto header."""
    saved = [v.const_value for v in streamed]
    try:
        for i, (value, tensor) in enumerate(zip(streamed, saved, strict=True)):
            value.const_value = ir.ExternalTensor(PLACEHOLDER, offset=i, length=tensor.nbytes, dtype=tensor.dtype,
                                                  shape=tensor.shape, name=value.name)
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in zip(streamed, saved, strict=True):
            value.const_value = tensor
    headers: list[bytes] = [b""] * len(streamed)
    kept = []
    for t in proto.graph.initializer:
        where = {e.key: e.value for e in t.external_data} if t.data_location == onnx.TensorProto.EXTERNAL else {}
        if where.get("location") != PLACEHOLDER:
            kept.append(t)
            continue
        t.ClearField("external_data")
        t.ClearField("data_location")
        headers[int(where["offset"])] = t.SerializeToString()
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto, headers


def _write_tensor(f, tensor: ir.TensorProtocol) -> None:
    f.flush()
    if hasattr(tensor, "tofile"):
        tensor.tofile(f)  # ExternalTensor: copy_file_range from the source; ir.Tensor: from its array
    else:
        f.write(tensor.tobytes())


def write_inline(model: ir.Model, path: str | os.PathLike, *, min_bytes: int = MIN_STREAM_BYTES,
                 progress: Progress | None = None) -> None:
    """Write ``model`` to ``path`` with all weights inside the file, streaming the large ones."""
    streamed = [v for v in model.graph.initializers.values() if _streamable(v, min_bytes)]
    proto, headers = _graph_proto(model, streamed)
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    entries = []
    for value, header in zip(streamed, headers, strict=True):
        n = value.const_value.nbytes
        tensor_len = len(header) + len(_key(RAW_DATA_FIELD)) + len(_varint(n)) + n
        entries.append((_key(INITIALIZER_FIELD) + _varint(tensor_len) + header + _key(RAW_DATA_FIELD) + _varint(n), n))
    graph_len = len(graph) + sum(len(prefix) + n for prefix, n in entries)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        f.write(_key(GRAPH_FIELD) + _varint(graph_len))
        f.write(graph)
        for value, (prefix, n) in zip(streamed, entries, strict=True):
            f.write(prefix)
            start = f.tell()
            _write_tensor(f, value.const_value)
            f.seek(0, os.SEEK_END)
            if f.tell() - start != n:
                raise OSError(f"tensor '{value.name}': wrote {f.tell() - start} bytes, expected {n}")
            if progress:
                progress(value.const_value, n)
    logger.debug("wrote %s: graph %d bytes + %d streamed tensors", path, len(graph), len(streamed))


def write_external(model: ir.Model, path: str | os.PathLike, data_name: str, *,
                   progress: Progress | None = None) -> None:
    """Write ``model`` to ``path`` with its weights in ``data_name`` beside it (onnx-ir's streaming writer)."""

    def callback(tensor: ir.TensorProtocol, info: ir.external_data.CallbackInfo) -> None:
        if progress:
            progress(tensor, tensor.nbytes)

    ir.save(model, Path(path), external_data=data_name, callback=callback)
