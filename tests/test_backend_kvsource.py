"""backend.kvsource: the K/V planes an attention block reads are found by what the dequantization
computes - quantize-kv's spatten dequantizers, or pack-kv-cache's append-only table lookups of the
stored planes - with their bits, their quantizer and its layout; the general packed form still lowers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, load_meta
from spatten_compiler.passes.pack_kv import _Packer

from spatten_compiler.backend.graphinfo import GraphInfo, load_onnx
from spatten_compiler.backend.kvsource import _table_bits, trace
from spatten_compiler.backend.lower import emit_model
from spatten_compiler.cli import main as spattenc


def compile_(tmp: Path, name: str, *opts: str) -> Path:
    dst = tmp / f"{name}-{'-'.join(o.replace('+', '_') for o in opts)}.onnx"
    assert spattenc(["compile", str(MODELS / f"{name}.onnx"), "-o", str(dst), "-q", *opts]) == 0
    return dst


@pytest.mark.parametrize("m,lo", [(2, 2), (4, 4), (3, 1), (6, 4), (8, 0), (4, 0), (5, 3)])
def test_table_bits_round_trip(m: int, lo: int) -> None:
    """The bits read back from pack-kv-cache's lookup table are the ones it was built for."""
    table = _Packer._table(None, m, 2 ** (m - 1), 2**lo)  # type: ignore[arg-type]
    assert _table_bits(table.astype(np.float64)) == (m, lo)


@pytest.mark.parametrize("name,bits,budget", [("gpt2_kv_torchscript", "4+4", "0.5"),
                                              ("llama_sdpa_dynamo", "6+4", "1.0"), ("llama_torchscript", "8", "1.0")])
def test_append_form_sources(name: str, bits: str, budget: str, tmp_path: Path) -> None:
    path = compile_(tmp_path, name, "--kv-bits", bits, "--kv-budget", budget)
    gi = GraphInfo(load_onnx(path), 8)
    m, lo = (int(b) for b in (bits.split("+") + ["0"])[:2])
    meta = load_meta(name)
    assert len(gi.groups) == meta["num_layers"]
    for g in gi.groups:
        for src in (g.k_src, g.v_src):
            assert src is not None and src.form == "lookup"
            assert (src.msb_bits, src.lsb_bits) == (m, lo)
            assert src.quant is not None and src.quant.op_type == ("QuantizeSplit" if lo else "Quantize")
            assert not src.transposed  # the new tokens [B, Hkv, T, Dh]
        assert g.k_src.dequant == ("msb" if lo else "static") and g.k_src.quant is not g.v_src.quant
        assert g.kv_heads == meta.get("num_kv_heads", meta["num_heads"])
        # the template owns the lookups and the packing: no table row fetch, no element-wise packing
        owned = {n.op_type for n in gi.nodes if id(n) in g.storage}
        assert {"Gather", "Mul"} <= owned
    p = emit_model(path, 8, gen_steps=2)
    assert any(t.kind == "k_lsb" for t in p.tensors) == bool(lo)
    assert not [i for i in p.instrs if i.mnemonic == "fetch.rows" and i.fields.get("row_bytes") == 8]  # [256, 2] fp32


def test_encoder_sources_are_quantize_kv_on_k_transposed(tmp_path: Path) -> None:
    path = compile_(tmp_path, "bert_torchscript", "--kv-bits", "6+4")
    gi = GraphInfo(load_onnx(path), 16)
    for g in gi.groups:
        assert g.k_src is not None and g.k_src.form == "spatten" and g.k_src.transposed
        assert (g.k_src.msb_bits, g.k_src.lsb_bits) == (6, 4) and g.k_src.dequant == "msb"
        assert g.v_src is not None and not g.v_src.transposed


def test_general_packed_form_still_lowers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pack-kv-cache's fallback (dequantize the whole past, quantize-kv re-quantizes) keeps lowering."""
    monkeypatch.setattr(_Packer, "append", lambda *a: "forced general form (test)")
    path = compile_(tmp_path, "llama_torchscript", "--kv-bits", "4+4", "--kv-budget", "1.0")
    gi = GraphInfo(load_onnx(path), 8)
    assert all(g.k_src is not None and g.k_src.form == "spatten" and g.k_src.transposed for g in gi.groups)
    assert any(t.kind == "k_lsb" for t in emit_model(path, 8, gen_steps=2).tensors)


def test_dense_operands_have_no_source() -> None:
    gi = GraphInfo(load_onnx(MODELS / "gpt2_kv_torchscript.onnx"), 8)
    why = trace(gi, gi.groups[0].qk[0].input[1], True)
    assert isinstance(why, str) and "between the cache and the attention" in why
    assert all(g.k_src is None and g.v_src is None for g in gi.groups)


def test_general_packed_form_simulates_as_the_reference_runtime(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Functional simulation of a decoder with pack-kv-cache's general form == reference runtime (the
    append-only form: tests/test_sim_model.py's decoders): the planes store.kv writes come from the
    quantizer the source names, in its layout (K^T here, the new tokens there)."""
    from test_sim_model import assert_same, feeds_for, reference

    from spatten_compiler.sim.model_run import run_functional

    monkeypatch.setattr(_Packer, "append", lambda *a: "forced general form (test)")
    path = compile_(tmp_path, "llama_torchscript", "--kv-bits", "6+4", "--value-keep", "0.5")
    feeds = feeds_for(path, 24)
    r = run_functional(emit_model(path, 24), feeds, model=path)
    assert_same(r, reference(path, feeds))
    assert sum(len(rows) for *_, rows in r.lsb_rows) > 0
