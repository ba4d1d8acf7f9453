"""Model I/O that does not lose data.

* :func:`load_model` validates: the file exists, parses as an ONNX ModelProto (inline weights are
  left in the file and memory-mapped, see :mod:`.lazyproto`), every
  external-data reference points at readable bytes, and the graph passes ``onnx.checker`` (run
  with large weights hidden, so models over 2 GB work and the file is parsed only once). External
  data is memory-mapped by onnx-ir, not copied, so loading a large model costs little more than its graph.
* :func:`save_model` writes into a private temporary folder next to the destination and renames the
  finished files into place, so a failure never leaves a partial output and never touches the input.
  Models whose weights exceed the protobuf limit (or that came with external data) are written with
  external data in ``<name>.data`` beside the ``.onnx``. Weights are never gathered in memory to
  be written: each is streamed from where it is (the input file, or a new array) to the output.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir.passes.common import CheckerPass

from spatten_compiler.errors import ModelLoadError, SpattencError
from spatten_compiler.lazyproto import read_model
from spatten_compiler.weightio import Progress, write_external, write_inline

logger = logging.getLogger(__name__)


def _register_ort_onnx_domain_ops() -> None:
    """onnxruntime registers SimplifiedLayerNormalization (RMS norm) in the ONNX domain and
    onnxruntime-genai's model builder writes it there; declare it so onnx's checker accepts such a
    model (unfuse-ort rewrites it into standard ops)."""
    try:
        onnx.defs.get_schema("SimplifiedLayerNormalization", 1, "")
        return
    except onnx.defs.SchemaError:
        pass
    p = onnx.defs.OpSchema.FormalParameter
    opt = onnx.defs.OpSchema.FormalParameterOption.Optional
    attr = onnx.defs.OpSchema.Attribute
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    schema = onnx.defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[p("X", "T"), p("scale", "V")],
        outputs=[p("Y", "V"), p("mean", "U", param_option=opt), p("inv_std_var", "U", param_option=opt)],
        type_constraints=[("T", types, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", types, "")],
        attributes=[attr("axis", onnx.defs.OpSchema.AttrType.INT, "", required=False),
                    attr("epsilon", onnx.defs.OpSchema.AttrType.FLOAT, "", required=False),
                    attr("stash_type", onnx.defs.OpSchema.AttrType.INT, "", required=False)],
    )
    onnx.defs.register_schema(schema)


_register_ort_onnx_domain_ops()

SELF_MAPPED = "spattenc.self_mapped_file"

# Protobuf cannot serialize a message over 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _read_proto(path: Path) -> onnx.ModelProto:
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (the file is empty)")
    # onnx-ir refuses to map a file with several hard links (its guard against a linked-in secret),
    # so a hard-linked model's inline weights are read into memory instead of mapped.
    try:
        proto = read_model(path, lazy=path.stat().st_nlink == 1)
    except (DecodeError, ValueError, IndexError) as e:
        raise ModelLoadError(f"{path}: not an ONNX model (the protobuf is truncated or corrupt)") from e
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror}") from e
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph or ir_version in the file)")
    return proto


def _external_locations(proto: onnx.ModelProto) -> dict[str, list[tuple[str, int, int]]]:
    """Map external data file -> [(tensor name, offset, length)] for every external initializer."""
    found: dict[str, list[tuple[str, int, int]]] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        found.setdefault(info.get("location", ""), []).append(
            (tensor.name, int(info.get("offset", 0)), int(info.get("length", -1)))
        )
    return found


def _check_external_data(path: Path, proto: onnx.ModelProto) -> None:
    base = path.parent
    for location, tensors in _external_locations(proto).items():
        data_file = base / location
        name = tensors[0][0]
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            raise ModelLoadError(f"{path}: tensor '{name}' has an invalid external data location {location!r}")
        if not data_file.is_file() or not os.access(data_file, os.R_OK):
            raise ModelLoadError(f"{path}: external data file '{location}' (tensor '{name}') is missing or unreadable")
        links = data_file.stat().st_nlink
        if links > 1:
            raise ModelLoadError(f"{path}: external data file '{location}' has {links} hard links; onnx-ir refuses "
                                 "to read those (a guard against linked-in files): copy it instead")
        size = data_file.stat().st_size
        for tname, offset, length in tensors:
            if length >= 0 and offset + length > size:
                raise ModelLoadError(
                    f"{path}: external data for tensor '{tname}' ends at byte {offset + length} "
                    f"but '{location}' has only {size} bytes"
                )


# onnx-ir hands tensors up to this size to the onnx C API (checker, shape inference) as they are;
# an external one would be looked up relative to the working directory, not the model's folder.
_SMALL_TENSOR_BYTES = 1000  # onnx_ir.passes.common._c_api_utils._BIG_TENSOR_SIZE_LIMIT
# Inline weight bytes up to which the checker gets a copy of the parsed message (lazyproto leaves
# only tensors under 64 KB inline; a hard-linked file is parsed whole and is not copied).
_COPY_LIMIT_BYTES = 64 << 20


def _inline_small_external(model: ir.Model) -> None:
    """Read small external initializers into memory (a dynamo export stores even scalars outside)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= _SMALL_TENSOR_BYTES:
                value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype)


def _without_external_weights(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``proto`` for the C++ checker: main-graph initializers stored outside the message
    (external data, or the large inline weights lazyproto turned into references) become typed graph
    inputs, as onnx-ir's checker pass does. Copying the parsed message is cheap (its weights are
    references); re-serializing the deserialized ``ir.Model`` cost 0.8 s on SmolLM2. None when the
    message holds its weights inline (a hard-linked file) or a subgraph has external initializers:
    the caller falls back to onnx-ir's pass."""
    inline = sum(len(t.raw_data) for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    if inline > _COPY_LIMIT_BYTES:
        return None
    light = onnx.ModelProto()
    light.CopyFrom(proto)
    main = len(light.graph.initializer)
    if sum(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(light)) \
            != sum(t.data_location == onnx.TensorProto.EXTERNAL for t in light.graph.initializer[:main]):
        return None
    keep = [t for t in light.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    moved = [t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inputs = {i.name for i in light.graph.input}
    for t in moved:
        if t.name not in inputs:
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del light.graph.initializer[:]
    light.graph.initializer.extend(keep)
    return light


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (their own values excluded)."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            own = {i.name for i in g.input} | {t.name for t in g.initializer}
            own |= {o for n in g.node for o in n.output}
            for n in g.node:
                names |= {i for i in n.input if i and i not in own} | (_outer_names(n) - own)
    return names


def sort_nodes(graph: onnx.GraphProto) -> bool:
    """Put the main graph's nodes in topological order if they are not (onnxruntime's float16 converter
    appends the Casts it inserts at the end; onnxruntime runs such a file, the ONNX checker does not
    accept it). Returns whether anything moved; a cycle or a missing input leaves the graph as it is
    for the checker to name."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    needs = [set(n.input) | _outer_names(n) for n in graph.node]
    for need, n in zip(needs, graph.node):
        if not need <= known:
            break
        known.update(n.output)
    else:
        return False  # in order already: one pass, the names seen updated in place
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    deps = [{producer[x] for x in need if x in producer} for need in needs]  # Kahn's algorithm
    users: list[list[int]] = [[] for _ in graph.node]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    order = [i for i, w in enumerate(waiting) if w == 0]
    for i in order:  # grows while it is walked
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                order.append(u)
    if len(order) != len(graph.node):
        return False
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def load_model(path: str | os.PathLike, *, check: bool = True) -> ir.Model:
    """Load and validate an ONNX model; raise :class:`ModelLoadError` with one line if it is bad."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    proto = _read_proto(path)
    if sort_nodes(proto.graph):
        logger.info("%s: its nodes were not in topological order; sorted", path)
    _check_external_data(path, proto)
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)  # dangling inputs are reported by the checker, in one line
    try:
        model = ir.serde.deserialize_model(proto)
    finally:
        serde_log.setLevel(level)
    # Resolve relative external-data paths against the model's folder (memory-mapped on access).
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    _inline_small_external(model)
    if check:
        try:
            light = _without_external_weights(proto)
            if light is not None:  # the file's own message, weights left out: no re-serialization
                onnx.checker.check_model(light, full_check=False)
            else:
                # onnx-ir's checker pass hides large weights from the C++ checker, so the graph is
                # validated without a second parse of a 600 MB file (and >2 GB models work).
                CheckerPass(full_check=False)(model)
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"{path}: invalid ONNX graph: {first}") from e
    model.meta[SELF_MAPPED] = path.name  # inline weights left in the .onnx itself (lazyproto)
    logger.debug("loaded %s: %d nodes", path, len(model.graph))
    return model


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers (what writing the model streams)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _has_external_data(model: ir.Model) -> bool:
    """True when weights came from a separate data file (not inline weights mapped from the .onnx)."""
    own = model.meta.get(SELF_MAPPED)
    return any(
        isinstance(v.const_value, ir.ExternalTensor) and v.const_value.location != own
        for v in model.graph.initializers.values()
    )


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (following links), whether or not b exists."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    threshold: int = EXTERNAL_DATA_THRESHOLD,
    progress: Progress | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically; return the files written.

    ``external_data=None`` chooses: external data (``<name>.data``) when the model came with it or
    its weights exceed ``threshold`` bytes, inline otherwise. Either way weights are streamed to the
    file one tensor at a time (:mod:`.weightio`); ``progress(tensor, nbytes)`` is called after each.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SpattencError(f"{path}: output folder '{parent}' does not exist")
    if external_data is None:
        external_data = _has_external_data(model) or weight_bytes(model) > threshold
    data_name = path.name + ".data" if external_data else None
    tmp = Path(tempfile.mkdtemp(prefix=".spattenc-", dir=parent))
    try:
        if data_name:
            write_external(model, tmp / path.name, data_name, progress=progress)
        else:
            write_inline(model, tmp / path.name, progress=progress)
        written = [tmp / data_name] if data_name else []
        # Data first, then the .onnx that refers to it: the model file appears only when complete.
        final: list[Path] = []
        for f in [*written, tmp / path.name]:
            os.replace(f, parent / f.name)
            final.append(parent / f.name)
        logger.debug("wrote %s", ", ".join(map(str, final)))
        return final
    except OSError as e:
        raise SpattencError(f"{path}: cannot write: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
