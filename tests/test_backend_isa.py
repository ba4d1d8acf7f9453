# ruff: noqa: E501  (golden instructions stay one per line)
"""ISA: golden encodings per opcode (LLVM MC style), asm <-> binary round trips, range checks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spatten_compiler.backend import isa
from spatten_compiler.backend.isa import OPCODES, WORD_BYTES, IsaError, decode_word

# One line per opcode: canonical assembly and its 16 little-endian bytes. Field k holds
# (37 k + 5) mod (max + 1) and the dependency nibble is opcode mod 16, so every field and every
# token bit is exercised somewhere. A change here is an ISA change: note it in isa-changes.md.
GOLDEN = [
    ("finish deps=pop_prev",
     "41000000000000000000000000000000"),
    ("cfg.attn layer=5 heads=42 kv_heads=79 head_dim=116 tokens=153 causal=0 past=227 scale=3.699427945817517e-43 div=1 deps=pop_next",
     "8214a83cd19109601c00210000200000"),
    ("cfg.quant q_bits=5 k_msb=10 k_lsb=15 v_bits=20 threshold=0.004669189453125 rule=uniform deps=pop_prev|pop_next",
     "c314f568268000000000000000000000"),
    ("cfg.prune token_keep=0.000152587890625 head_keep=0.00128173828125 value_keep=0.002410888671875 protect_first=116 protect_recent=153 score=mean deps=push_prev",
     "041500a8003c01d06502040000000000"),
    ("load buf=weight sram=0x2a dram=0x4f rows=116 row_bytes=153 stride=190 live=1 hmask=0 head=45 deps=pop_prev|push_prev",
     "455505e009000000800e2013f005402d"),
    ("store buf=weight sram=0x2a dram=0x4f rows=116 row_bytes=153 stride=190 live=1 hmask=0 head=45 deps=pop_next|push_prev",
     "865505e009000000800e2013f005402d"),
    ("fetch.kv kv=v plane=full head=79 sram=0x74 dram=0x99 row_bytes=190 idx=227 pred=0 deps=pop_prev|pop_next|push_prev",
     "c7e5890e2013000000c0171807000000"),
    ("store.kv kv=v plane=full head=79 sram=0x74 dram=0x99 row_bytes=190 rows=227 live=0 deps=push_next",
     "08e6890e2013000000c0171807000000"),
    ("qk head=5 q=0x2a k=0x4f out=0x74 idx=153 pred=0 deps=pop_prev|push_next",
     "4916a8003c01d0016402000000000000"),
    ("softmax head=5 src=0x2a dst=0x4f pred=0 deps=pop_next|push_next",
     "8a16a8003c0100000000000000000000"),
    ("requant head=5 src=0x2a deps=pop_prev|pop_next|push_next",
     "cb16a800000000000000000000000000"),
    ("topk kind=values head=42 src=0x4f idx_in=116 idx_out=153 deps=push_prev|push_next",
     "0cabf204400799000000000000000000"),
    ("accum kind=head head=42 src=0x4f dst=0x74 idx=153 deps=pop_prev|push_prev|push_next",
     "4d577902a003c8040000000000000000"),
    ("pv head=5 prob=0x2a v=0x4f out=0x74 idx=153 deps=pop_next|push_prev|push_next",
     "8e17a8003c01d0016402000000000000"),
    ("gemm inp=0x5 wgt=0x2a out=0x4f rows=116 k=153 n=190 acc=1 live=0 hmask=1 head=82 deps=pop_prev|pop_next|push_prev|push_next",
     "cf1700a8003c01d0016402be40a50000"),
    ("elt op=neg a=0x2a b=0x4f out=0x74 rows=153 cols=190 live=1 bcast=0",
     "1014158027003a804c005f2000000000"),
    ("compact buf=score src=0x2a dst=0x4f idx=116 cols=153 deps=pop_prev",
     "5154017802a0834c0000000000000000"),
    ("ilist op=copy dst=42 src=79 value=116 live=1 deps=pop_next",
     "92a8024f400710000000000000000000"),
    ("fetch.rows buf=weight sram=0x2a dram=0x4f row_bytes=116 idx=153 deps=pop_prev|pop_next",
     "d35405e009000000800ec80400000000"),
    ("sync.load deps=push_prev",
     "14010000000000000000000000000000"),
    ("sync.compute deps=pop_prev|push_prev",
     "55010000000000000000000000000000"),
    ("sync.store deps=pop_next|push_prev",
     "96010000000000000000000000000000"),
]


def _parse(line: str) -> isa.Instr:
    mnemonic, *ops = line.split()
    return isa.spec(mnemonic).parse(ops, "test")


def test_golden_covers_every_opcode() -> None:
    assert sorted(_parse(text).opcode for text, _ in GOLDEN) == sorted(OPCODES)


@pytest.mark.parametrize(("text", "hexbytes"), GOLDEN, ids=[g[0].split()[0] for g in GOLDEN])
def test_golden_encoding(text: str, hexbytes: str) -> None:
    ins = _parse(text)
    assert ins.encode().hex() == hexbytes
    assert decode_word(bytes.fromhex(hexbytes)).asm() == text


@st.composite
def instructions(draw: st.DrawFn) -> isa.Instr:
    spec = draw(st.sampled_from(sorted(OPCODES.values(), key=lambda s: s.opcode)))
    values = {f.name: draw(_field_values(f)) for f in spec.fields}
    return spec.make(draw(st.integers(0, 15)), **values)


def _field_values(f: isa.Field) -> st.SearchStrategy[int]:
    """Every value the field accepts: for a float32 field, the bit patterns of finite floats
    (an all-ones exponent, inf or NaN, is refused by the ISA; see the test below)."""
    if not f.f32:
        return st.integers(0, f.max)
    return st.floats(width=32, allow_nan=False, allow_infinity=False).map(
        lambda x: struct.unpack("<I", struct.pack("<f", x))[0]
    ).filter(lambda bits: bits <= f.max)


@settings(max_examples=400, deadline=None)
@given(instructions())
def test_asm_binary_asm_identity(ins: isa.Instr) -> None:
    text = ins.asm()
    again = _parse(text)
    assert again == ins
    word = again.encode()
    assert len(word) == WORD_BYTES
    assert decode_word(word).asm() == text


@pytest.mark.parametrize("spec", sorted(OPCODES.values(), key=lambda s: s.opcode), ids=lambda s: s.mnemonic)
def test_every_field_out_of_range_is_refused_by_name(spec: isa.InstrSpec) -> None:
    for f in spec.fields:
        with pytest.raises(IsaError, match=f"field '{f.name}' = {f.max + 1} out of range"):
            spec.make(**{f.name: f.max + 1})
        with pytest.raises(IsaError, match=f"field '{f.name}'"):
            spec.make(**{f.name: -1})
        bad = f"{f.name}={f.max + 1}" if not f.symbols and f.scale == 1 and not f.f32 else f"{f.name}=nonsense"
        with pytest.raises(IsaError, match=f"field '{f.name}'"):
            spec.parse([bad], "t")


def test_float32_fields_refuse_nan_and_infinity() -> None:
    attn = isa.spec("cfg.attn")
    for bits in (0x7FC00000, 0x7F800000, 0xFF800000):
        with pytest.raises(IsaError, match="field 'scale' .* is not a finite float32"):
            attn.make(scale=bits)
    with pytest.raises(IsaError, match="field 'scale'"):
        attn.parse(["scale=inf"], "t")
    assert attn.parse(["scale=0.17677669"], "t").asm() == "cfg.attn layer=0 heads=0 kv_heads=0 head_dim=0 tokens=0 " \
        "causal=0 past=0 scale=0.1767766922712326 div=0"


def test_enum_value_beyond_symbols_is_refused_when_decoding() -> None:
    load = isa.spec("load")
    word = int.from_bytes(load.make(buf=0).encode(), "little") | (7 << isa.HEADER_BITS)  # buf=7: no such buffer
    with pytest.raises(IsaError, match="field 'buf' = 7 out of range 0..6"):
        decode_word(word.to_bytes(16, "little"))


def test_reserved_bits_and_unknown_opcodes_are_refused() -> None:
    word = bytearray(isa.make("finish").encode())
    word[15] = 0x80
    with pytest.raises(IsaError, match="reserved bits"):
        decode_word(bytes(word))
    with pytest.raises(IsaError, match="unknown opcode 0"):
        decode_word(bytes(16))
    with pytest.raises(IsaError, match="unknown opcode 63"):
        decode_word(bytes([63]) + bytes(15))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("load bogus=1", "'load' has no field 'bogus'"),
        ("load rows", "operand 'rows' is not name=value"),
        ("load rows=1 rows=2", "operand 'rows' given twice"),
        ("load deps=pop_sideways", "unknown dependency token 'pop_sideways'"),
        ("load deps=push_next|push_next", "'push_next' given twice"),
        ("cfg.prune token_keep=0.3", "not a multiple of 1/32768"),
        ("cfg.prune token_keep=1.5", "out of range 0..32768"),
        ("load buf=dram", "must be one of q|k|v|index|score|weight|act"),
    ],
)
def test_assembly_errors_are_one_line_and_named(line: str, message: str) -> None:
    with pytest.raises(IsaError, match=message.replace("|", r"\|")) as e:
        _parse(line)
    assert "\n" not in str(e.value)


def test_unknown_mnemonic() -> None:
    with pytest.raises(IsaError, match="unknown instruction 'jump'"):
        isa.spec("jump")


def test_fields_fit_the_word_and_registry_is_consistent() -> None:
    for op, spec in OPCODES.items():
        assert spec.opcode == op and isa.MNEMONICS[spec.mnemonic] is spec
        assert isa.HEADER_BITS + sum(f.width for f in spec.fields) <= isa.WORD_BITS
        assert len(set(spec.field_names)) == len(spec.fields)
