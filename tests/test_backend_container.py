"""The .spbin container and hardware descriptions: round trips and one-line refusals."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from spatten_compiler.backend import asm, container, hw, program
from spatten_compiler.backend.container import ContainerError
from spatten_compiler.errors import SpattencError

SMALL = """\
.hw spatten
.tensor w0 weight 0x0 4096 bits=32 layer=0 source='enc.q.weight; odd name'
.tensor x input 0x1000 1024 bits=32 layer=65535 source=''
; node /layer.0/q/MatMul
load buf=weight sram=0x0 dram=0x0 rows=32 row_bytes=128 stride=0 live=0 hmask=0 head=0 deps=push_next @w0
load buf=act sram=0x0 dram=0x1000 rows=8 row_bytes=128 stride=0 live=0 hmask=0 head=0 deps=push_next @x
gemm inp=0x0 wgt=0x0 out=0x100 rows=8 k=32 n=32 acc=0 live=0 hmask=0 head=0 deps=pop_prev
gemm inp=0x0 wgt=0x0 out=0x100 rows=8 k=32 n=32 acc=1 live=0 hmask=0 head=0 deps=pop_prev|push_next
; node /layer.0/out
store buf=act sram=0x100 dram=0x1000 rows=8 row_bytes=128 stride=0 live=0 hmask=0 head=0 deps=pop_prev @x
finish
"""


def small() -> program.Program:
    return asm.assemble(SMALL)


def test_text_binary_text_identity() -> None:
    data = program.to_bytes(small())
    back = program.from_bytes(data, hw.SPATTEN)
    assert asm.disassemble(back) == SMALL
    assert program.to_bytes(back) == data


def _patch(data: bytes, offset: int, raw: bytes) -> bytes:
    return data[:offset] + raw + data[offset + len(raw):]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"XXXX" + d[4:], "bad magic"),
        (lambda d: _patch(d, 4, struct.pack("<H", 9)), "unsupported version 9.1"),
        (lambda d: _patch(d, 8, struct.pack("<I", 0x04030201)), "bad endianness mark"),
        (lambda d: d[:40], "truncated header"),
        (lambda d: d[:100], "truncated section table"),
        (lambda d: d[:-1], "header says"),
        (lambda d: d + b"\0", "header says"),
        (lambda d: _patch(d, 20, b"\xff"), "header CRC mismatch"),
        (lambda d: _patch(d, len(d) - 3, bytes([d[-3] ^ 1])), "CRC mismatch in section debug"),
    ],
)
def test_corruptions_are_refused_with_one_line(mutate, message: str) -> None:
    with pytest.raises(ContainerError, match=message) as e:
        program.from_bytes(mutate(program.to_bytes(small())))
    assert "\n" not in str(e.value)


def test_binary_for_other_hardware_is_refused() -> None:
    data = program.to_bytes(small())
    with pytest.raises(ContainerError, match="built for hardware 'spatten'.*not 'spatten-1/8'"):
        program.from_bytes(data, hw.SPATTEN_1_8)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("@w0", "@nope"), "unknown tensor '@nope'"),
        (lambda t: t.replace(" @x\nfinish", "\nfinish"), "DRAM address without a relocation"),
        (lambda t: t.replace("sram=0x100 dram=0x1000", "sram=0x100 dram=0x0"), "outside tensor 'x'"),
        (lambda t: t.replace("0x1000 1024", "0x800 4096"), "overlaps"),
        (lambda t: t.replace("0x1000 1024", "0x1001 1024"), "unaligned"),
        (lambda t: t.replace("finish\n", ""), "does not end with 'finish'"),
        (lambda t: t.replace("head=0 deps=pop_prev|push_next", "head=0 deps=pop_prev"),
         "deadlock: store at instruction 4"),
        (lambda t: t.replace("deps=pop_prev @x", "@x"), "1 compute->store token"),
        (lambda t: t.replace("head=0 deps=push_next @w0", "head=0 deps=push_prev @w0"), "does not exist"),
        (lambda t: t.replace(".tensor x input", ".tensor x wombat"), "unknown tensor kind 'wombat'"),
        (lambda t: t.replace("gemm inp", "gemm bogus=1 inp", 1), "'gemm' has no field 'bogus'"),
    ],
)
def test_bad_programs_are_refused_before_writing(edit, message: str, tmp_path: Path) -> None:
    with pytest.raises(SpattencError, match=message) as e:
        p = asm.assemble(edit(SMALL))
        program.write_program(p, tmp_path / "x.spbin")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_builtin_hardware_matches_the_paper() -> None:
    s = hw.SPATTEN
    assert (s.clock_mhz, s.qk_multipliers + s.pv_multipliers, s.bandwidth_gbps) == (1000, 1024, 512)
    assert (s.k_sram_kb, s.v_sram_kb, s.softmax_parallelism, s.transaction_bytes) == (196, 196, 8, 32)
    e = hw.SPATTEN_1_8
    assert (e.qk_multipliers + e.pv_multipliers, e.bandwidth_gbps) == (128, 64)
    assert s.digest() != e.digest()
    assert hw.load_hw("spatten-1/8") is e and hw.load_hw(None) is s


def test_user_hardware_file(tmp_path: Path) -> None:
    f = tmp_path / "my.toml"
    f.write_text(hw.SPATTEN.to_toml().replace('name = "spatten"', 'name = "mine"'))
    mine = hw.load_hw(f)
    assert dataclasses.replace(mine, name="spatten") == hw.SPATTEN


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("clock_mhz = 1000\n", ""), "missing field 'clock_mhz'"),
        (lambda t: t + "warp_drive = 1\n", "unknown field 'warp_drive'"),
        (lambda t: t.replace("hbm_channels = 16", "hbm_channels = 12"), "'hbm_channels' must be a power of two"),
        (lambda t: t.replace("qk_multipliers = 512", "qk_multipliers = -3"), "'qk_multipliers' must be a positive"),
        (lambda t: t.replace("qk_multipliers = 512", 'qk_multipliers = "many"'), "'qk_multipliers' must be an integer"),
        (lambda t: t.replace("k_sram_kb = 196", "k_sram_kb = 0"), "'k_sram_kb' must be between 1 and 2048"),
        (lambda t: t.replace("max_heads = 64", "max_heads = 300"), "'max_heads' must be between 1 and 255"),
        (lambda t: t.replace("= 1000", "= = 1000", 1), "not valid TOML"),
    ],
)
def test_bad_hardware_files_are_refused_in_one_line(edit, message: str, tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(edit(hw.SPATTEN.to_toml()))
    with pytest.raises(hw.HwError, match=message) as e:
        hw.load_hw(f)
    assert "\n" not in str(e.value)


def test_missing_hardware_file() -> None:
    with pytest.raises(hw.HwError, match="neither a built-in"):
        hw.load_hw("no/such/file.toml")


def test_string_table_checks() -> None:
    blob = b"\0abc\0"
    assert container.read_string(blob, 1, "t") == "abc"
    with pytest.raises(ContainerError, match="not at the start"):
        container.read_string(blob, 2, "t")
    with pytest.raises(ContainerError, match="outside"):
        container.read_string(blob, 99, "t")


def test_python_api_in_one_place(tmp_path: Path) -> None:
    import spatten_compiler.backend as backend

    p = backend.assemble(SMALL)
    backend.write_program(p, tmp_path / "s.spbin")
    assert backend.disassemble(backend.read_program(tmp_path / "s.spbin", backend.load_hw("spatten"))) == SMALL
    assert set(backend.__all__) >= {"emit_model", "assemble", "disassemble", "read_program", "write_program"}
