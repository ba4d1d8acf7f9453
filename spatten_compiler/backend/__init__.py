"""Accelerator backend: hardware description, ISA, .spbin container, assembler, lowering.

Modules: :mod:`.hw` (descriptions), :mod:`.isa` + :mod:`.opcodes` (instruction classes),
:mod:`.deps` + :mod:`.tokens` (dependency tokens), :mod:`.container` (.spbin bytes),
:mod:`.program` (Program and its checks), :mod:`.asm` (text), :mod:`.lower` (ONNX -> Program).

The Python API in one place (imported lazily, so ``import spatten_compiler.backend.isa`` stays cheap)::

    from spatten_compiler.backend import emit_model, write_program, read_program, disassemble, assemble, load_hw
    p = emit_model(Path("m.spatten.onnx"), seq_len=128, hw=load_hw("spatten"))
    write_program(p, Path("m.spbin")); print(disassemble(read_program(Path("m.spbin"))))
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "emit_model": "lower", "EmitOptions": "lower",
    "Program": "program", "Tensor": "program", "Reloc": "program", "read_program": "program",
    "write_program": "program", "to_bytes": "program", "from_bytes": "program", "validate": "program",
    "assemble": "asm", "disassemble": "asm",
    "HwDesc": "hw", "load_hw": "hw", "SPATTEN": "hw", "SPATTEN_1_8": "hw",
    "Instr": "isa", "InstrSpec": "isa", "OPCODES": "isa", "MNEMONICS": "isa", "decode_stream": "isa",
    "check_deps": "deps",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
