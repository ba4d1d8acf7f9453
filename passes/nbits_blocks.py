"""Head slicing of onnxruntime's block-quantized projections (com.microsoft ``MatMulNBits``, what
onnxruntime-genai's model builder writes for ``-p int4`` and ``spattenc --weights int4``).

``Y[., n] = sum_k A[., k] * W[k, n]`` with ``W`` stored by output column ``n`` in blocks of
``block_size`` along ``k``: ``B`` [N, k_blocks, blob] (``bits``-bit codes packed low-first),
``scales`` [N, k_blocks] (or flat), ``zero_points`` [N, ceil(k_blocks * bits / 8)] packed uint8 or
[N, k_blocks] unpacked float (or flat), ``g_idx`` [K] (deprecated), ``bias`` [N]. Slicing is exact
(codes, scales and zero points are copied, never requantized)::

    output columns cols (Q/K/V):  B, scales, zero_points, bias = X[cols]            N = len(cols)
    input rows rows (output proj): B, scales, zero_points = X[:, blocks(rows)]       K = kept rows
                                   (only when rows are whole blocks: no block mixes a kept and a
                                   removed head; a trivial g_idx is rebuilt, any other refused)

With ``accuracy_level`` 4 onnxruntime quantizes ``A`` per block along ``K``: whole kept blocks keep
their activation scales too, so the sliced op equals the full one with the removed rows zeroed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from spatten_compiler.match import const_array

DOMAIN = "com.microsoft"
SLOTS = {"B": 1, "scales": 2, "zero_points": 3, "g_idx": 4, "bias": 5}


def is_nbits(node: ir.Node | None) -> bool:
    return node is not None and (node.domain, node.op_type) == (DOMAIN, "MatMulNBits")


@dataclasses.dataclass(frozen=True)
class NBits:
    node: ir.Node
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def blocks(self) -> int:
        return -(-self.K // self.block_size)

    def input(self, name: str) -> ir.Value | None:
        i = SLOTS[name]
        return self.node.inputs[i] if len(self.node.inputs) > i else None

    def array(self, name: str) -> np.ndarray | None:
        v = self.input(name)
        return const_array(v)


def layout(node: ir.Node) -> NBits:
    a = node.attributes
    return NBits(node, a.get_int("K"), a.get_int("N"), a.get_int("bits", 4), a.get_int("block_size"))


def out_width(node: ir.Node) -> int | None:
    """Output features of a MatMulNBits (its ``N``); None for any other op."""
    return layout(node).N if is_nbits(node) else None


def in_width(node: ir.Node) -> int | None:
    """Input features of a MatMulNBits (its ``K``); None for any other op."""
    return layout(node).K if is_nbits(node) else None


def unsliceable(node: ir.Node) -> str | None:
    """Why the blocks of this MatMulNBits cannot be sliced at compile time (None: they can)."""
    nb = layout(node)
    for name in SLOTS:
        if nb.input(name) is not None and nb.array(name) is None:
            return f"MatMulNBits {name} computed in the graph"
    if 8 % nb.bits:
        return f"{nb.bits}-bit codes (packed zero points of 2, 4 or 8 bits only)"
    return None


def row_blocks(nb: NBits, rows: np.ndarray) -> np.ndarray | str:
    """The kept blocks along K when ``rows`` (kept input rows) are whole blocks, else why not."""
    kept = np.zeros(nb.K, bool)
    kept[rows] = True
    block = np.arange(nb.K) // nb.block_size
    some, every = np.zeros(nb.blocks, bool), np.ones(nb.blocks, bool)
    np.logical_or.at(some, block, kept)
    np.logical_and.at(every, block, kept)
    if (some != every).any():
        return (f"the kept heads' input rows of MatMulNBits '{nb.node.name}' are not whole blocks of "
                f"{nb.block_size} (a block mixes kept and removed heads)")
    g_idx = nb.array("g_idx")
    if g_idx is not None and not np.array_equal(g_idx.reshape(-1), np.arange(nb.K) // nb.block_size):
        return f"MatMulNBits '{nb.node.name}' reorders rows by g_idx"
    return np.flatnonzero(every)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[N, bytes] uint8 -> [N, count] codes (low bits first, as B packs them)."""
    per = 8 // bits
    shifts = (np.arange(per) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :count]


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    pad = (-codes.shape[1]) % per
    codes = np.pad(codes, ((0, 0), (0, pad))).reshape(codes.shape[0], -1, per).astype(np.uint8)
    return np.bitwise_or.reduce(codes << (np.arange(per) * bits).astype(np.uint8), axis=-1).astype(np.uint8)


def take_columns(editor, node: ir.Node, cols: np.ndarray) -> None:
    """Keep output columns ``cols`` (ascending) of ``node``: rows of B, scales, zero points, bias."""
    nb = layout(node)
    for name in ("B", "scales", "zero_points", "bias"):
        a = nb.array(name)
        if a is None:
            continue
        by_col = a.reshape(nb.N, -1)[cols]
        new = by_col.reshape((len(cols), *a.shape[1:]) if a.ndim > 1 else -1)
        node.replace_input_with(SLOTS[name], editor.const(f"nbits_{name}", np.ascontiguousarray(new)))
    editor.set_attr(node, "N", len(cols))


def take_rows(editor, node: ir.Node, blocks: np.ndarray) -> None:
    """Keep the input-row ``blocks`` (from :func:`row_blocks`) of ``node``: B, scales, zero points
    along k_blocks; K shrinks to the kept rows, a trivial g_idx is rebuilt for them."""
    nb = layout(node)
    k = int(sum(min(nb.block_size, nb.K - b * nb.block_size) for b in blocks))
    for name in ("B", "scales", "zero_points"):
        a = nb.array(name)
        if a is None:
            continue
        if name == "zero_points" and a.dtype == np.uint8:  # packed like B: unpack, take, repack
            new = _pack(_unpack(a.reshape(nb.N, -1), nb.bits, nb.blocks)[:, blocks], nb.bits)
        else:
            new = a.reshape(nb.N, nb.blocks, -1)[:, blocks]
        new = new.reshape(-1 if a.ndim == 1 else (nb.N, -1) if a.ndim == 2 else (nb.N, len(blocks), -1))
        node.replace_input_with(SLOTS[name], editor.const(f"nbits_{name}", np.ascontiguousarray(new)))
    if nb.input("g_idx") is not None:
        g_idx = (np.arange(k) // nb.block_size).astype(nb.array("g_idx").dtype)
        node.replace_input_with(SLOTS["g_idx"], editor.const("nbits_g_idx", g_idx))
    editor.set_attr(node, "K", k)
