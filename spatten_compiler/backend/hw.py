"""Hardware description of a SpAtten-like accelerator.

One description is read by the ISA range checks, the lowering (tile sizes, SRAM capacity) and the
simulator (clock, multipliers, DRAM channels). It is a flat TOML table (read with ``tomllib``)::

    name = "my-spatten"
    clock_mhz = 1000
    qk_multipliers = 512
    ...

Built-ins: ``spatten`` (HPCA'21 Tables I-III: 1 GHz, 512 + 512 12-bit multipliers, HBM2 16 x
32 GB/s, 196 KB K and V SRAM, softmax parallelism 8, top-k 16 comparators) and ``spatten-1/8``
(128 multipliers, 64 GB/s; the paper gives only those two figures, so we keep the SRAM sizes and
scale the parallelism of the remaining engines by 1/8, see docs/backend.md).

The paper's accelerator runs attention only; projections and the FFN need a GEMM array with a
weight and an activation buffer, which we add (``gemm_*``, ``weight_sram_kb``, ``act_sram_kb``).

A binary is tied to one description through :func:`HwDesc.digest` (SHA-256 of the canonical JSON).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from spatten_compiler.errors import SpattencError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class HwError(SpattencError):
    """A hardware description is missing, unreadable, or has impossible values."""


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class HwDesc:
    """All figures the ISA, lowering and simulator need. Sizes in KB are KiB."""

    name: str
    clock_mhz: int  # core clock
    qk_multipliers: int  # Q x K multipliers (12-bit)
    pv_multipliers: int  # Prob x V multipliers
    multiplier_bits: int  # operand width of the attention multipliers
    gemm_multipliers: int  # projection / FFN array (our extension)
    q_sram_kb: int
    k_sram_kb: int
    v_sram_kb: int
    index_sram_kb: int  # index lists (kept tokens / heads / local V)
    score_sram_kb: int  # attention scores and probabilities
    weight_sram_kb: int  # GEMM weight tiles (our extension)
    act_sram_kb: int  # activations (our extension)
    hbm_channels: int
    channel_gbps: int  # GB/s per channel
    transaction_bytes: int  # DRAM access granularity
    dram_mb: int  # DRAM capacity the binary may address
    topk_parallelism: int  # comparators per top-k array
    topk_engines: int  # tokens/heads engine + local-V engine
    softmax_parallelism: int
    qk_parallelism: int  # key rows processed per cycle by Q x K
    max_seq_len: int  # longest sequence the index buffer and K/V SRAM are sized for
    max_heads: int
    max_head_dim: int

    # ---- derived figures -------------------------------------------------------------------
    @property
    def bandwidth_gbps(self) -> int:
        return self.hbm_channels * self.channel_gbps

    @property
    def dram_bytes(self) -> int:
        return self.dram_mb << 20

    def sram_bytes(self, buffer: str) -> int:
        """Capacity of one on-chip buffer by its short name (q, k, v, index, score, weight, act)."""
        return int(getattr(self, f"{buffer}_sram_kb")) << 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> bytes:
        """32-byte SHA-256 of the canonical JSON; stored in every .spbin header."""
        return hashlib.sha256(self.canonical_json()).digest()

    def to_toml(self) -> str:
        lines = []
        for k, v in self.to_dict().items():
            lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}")
        return "\n".join(lines) + "\n"


# ---- validation: each field's rule as data (name -> (check, what it must be)) ------------------
_RULES: dict[str, tuple[Any, str]] = {
    "clock_mhz": (lambda v: 1 <= v <= 100_000, "between 1 and 100000"),
    "multiplier_bits": (lambda v: 2 <= v <= 32, "between 2 and 32"),
    "hbm_channels": (lambda v: _pow2(v) and v <= 1024, "a power of two <= 1024"),
    "transaction_bytes": (lambda v: _pow2(v) and 4 <= v <= 4096, "a power of two between 4 and 4096"),
    "dram_mb": (lambda v: 1 <= v <= 1 << 20, "between 1 and 1048576 (1 TiB; 40-bit DRAM addresses)"),
    "topk_engines": (lambda v: 1 <= v <= 16, "between 1 and 16"),
    "max_seq_len": (lambda v: 1 <= v <= 65535, "between 1 and 65535 (16-bit row counts)"),
    "max_heads": (lambda v: 1 <= v <= 255, "between 1 and 255 (8-bit head numbers)"),
    "max_head_dim": (lambda v: 1 <= v <= 1023, "between 1 and 1023 (10-bit head dims)"),
}
_POSITIVE = "a positive integer"
for _buf in ("q", "k", "v", "index", "score", "weight", "act"):  # 16-bit SRAM line addresses
    _RULES[f"{_buf}_sram_kb"] = (lambda v: 1 <= v <= 2048, "between 1 and 2048 (16-bit 32-byte line addresses)")


def _check_value(name: str, value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HwError(f"{where}: '{name}' must be an integer, got {value!r}")
    check, what = _RULES.get(name, (lambda v: v >= 1, _POSITIVE))
    if not check(value):
        raise HwError(f"{where}: '{name}' must be {what}, got {value}")


def from_dict(data: dict[str, Any], where: str = "hardware description") -> HwDesc:
    """Build and check a description; every problem is one line naming the field."""
    fields = [f.name for f in dataclasses.fields(HwDesc)]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise HwError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(fields)})")
    for name in fields:
        if name not in data:
            raise HwError(f"{where}: missing field '{name}'")
    if not isinstance(data["name"], str) or not data["name"]:
        raise HwError(f"{where}: 'name' must be a non-empty string")
    for name in fields[1:]:
        _check_value(name, data[name], where)
    hw = HwDesc(**data)
    # Cross-field limits: K/V SRAM must hold at least one head's rows at full width (double-buffered).
    row_bytes = -(-hw.max_head_dim * hw.multiplier_bits // 8)
    if hw.sram_bytes("k") < 2 * row_bytes or hw.sram_bytes("v") < 2 * row_bytes:
        raise HwError(f"{where}: 'k_sram_kb'/'v_sram_kb' too small for two {hw.max_head_dim}-dim key rows")
    if hw.sram_bytes("index") < 2 * hw.max_seq_len:
        raise HwError(f"{where}: 'index_sram_kb' too small for an index list of max_seq_len={hw.max_seq_len}")
    return hw


SPATTEN = from_dict(
    {
        "name": "spatten",
        "clock_mhz": 1000,
        "qk_multipliers": 512,
        "pv_multipliers": 512,
        "multiplier_bits": 12,
        "gemm_multipliers": 1024,
        "q_sram_kb": 8,
        "k_sram_kb": 196,
        "v_sram_kb": 196,
        "index_sram_kb": 16,
        "score_sram_kb": 64,
        "weight_sram_kb": 512,
        "act_sram_kb": 1024,
        "hbm_channels": 16,
        "channel_gbps": 32,
        "transaction_bytes": 32,
        "dram_mb": 8192,
        "topk_parallelism": 16,
        "topk_engines": 2,
        "softmax_parallelism": 8,
        "qk_parallelism": 8,
        "max_seq_len": 4096,
        "max_heads": 64,
        "max_head_dim": 256,
    },
    "built-in 'spatten'",
)

SPATTEN_1_8 = from_dict(
    {
        **SPATTEN.to_dict(),
        "name": "spatten-1/8",
        "qk_multipliers": 64,
        "pv_multipliers": 64,
        "gemm_multipliers": 128,
        "hbm_channels": 2,
        "topk_parallelism": 2,
        "softmax_parallelism": 1,
        "qk_parallelism": 1,
    },
    "built-in 'spatten-1/8'",
)

BUILTIN: dict[str, HwDesc] = {hw.name: hw for hw in (SPATTEN, SPATTEN_1_8)}


def load_hw(spec: str | Path | None) -> HwDesc:
    """A built-in name (``spatten``, ``spatten-1/8``), a TOML file path, or None for ``spatten``."""
    if spec is None:
        return SPATTEN
    if str(spec) in BUILTIN:
        return BUILTIN[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise HwError(f"--hw {spec}: neither a built-in ({', '.join(BUILTIN)}) nor a readable file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HwError(f"hw file {path}: not valid TOML ({str(e).splitlines()[0]})") from None
    return from_dict(data, f"hw file {path}")


def from_json(blob: bytes, where: str) -> HwDesc:
    """The description embedded in a .spbin (canonical JSON)."""
    try:
        data = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HwError(f"{where}: embedded hardware description is not valid JSON") from None
    if not isinstance(data, dict):
        raise HwError(f"{where}: embedded hardware description is not a table")
    return from_dict(data, where)
