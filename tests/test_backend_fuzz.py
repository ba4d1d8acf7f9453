"""Corrupted .spbin files: every flipped, inserted, deleted or truncated byte is refused in one line."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODELS

from spatten_compiler.backend import program
from spatten_compiler.backend.fuzz import classify, mutate, mutate_deep
from spatten_compiler.backend.lower import emit_model
from spatten_compiler.cli import main as spattenc


@pytest.fixture(scope="module")
def binary() -> bytes:
    return program.to_bytes(emit_model(MODELS / "gpt2_kv_torchscript.onnx", 8, gen_steps=2))


def test_a_few_hundred_corruptions_are_refused(binary: bytes) -> None:
    r = random.Random(14)
    categories: dict[str, int] = {}
    for _ in range(400):
        kind, bad = mutate(r, binary)
        category, message = classify(bad)
        assert category != "ACCEPTED", kind
        assert message and "\n" not in message
        categories[category] = categories.get(category, 0) + 1
    assert any("CRC" in c for c in categories) and any("truncated" in c or "header says" in c for c in categories)


def test_corruptions_behind_repaired_crcs_never_crash() -> None:
    data = program.to_bytes(emit_model(MODELS / "bert_dynamo.onnx", 8))
    r = random.Random(15)
    seen: dict[str, int] = {}
    for _ in range(120):
        kind, bad = mutate_deep(r, data)
        category, message = classify(bad)
        assert category != "CRASH", message
        assert "\n" not in message
        seen[kind] = seen.get(kind, 0) + (category != "ACCEPTED")
    assert all(seen.get(f"deep-{s}") for s in ("instr", "tensors", "relocs", "debug"))


def test_every_header_byte_is_checked(binary: bytes) -> None:
    for i in range(64 + 6 * 24):  # header and section table
        bad = binary[:i] + bytes([binary[i] ^ 0xFF]) + binary[i + 1:]
        assert classify(bad)[0] != "ACCEPTED", i


def test_cli_refuses_corrupt_binaries_with_exit_2(binary: bytes, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    r = random.Random(2)
    for k in range(20):
        _, bad = mutate(r, binary)
        f = tmp_path / f"bad{k}.spbin"
        f.write_bytes(bad)
        assert spattenc(["disasm", str(f)]) == 2
        out = capsys.readouterr()
        assert len(out.err.strip().splitlines()) == 1 and out.out == "" and "Traceback" not in out.err
    # and once as a real process: exit status 2, one line, no traceback
    res = subprocess.run([sys.executable, "-m", "spatten_compiler", "disasm", str(f)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""
