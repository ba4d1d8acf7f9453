"""Accelerator backend: hardware description, ISA, .spbin container, assembler, lowering.

Modules: :mod:`.hw` (descriptions), :mod:`.isa` + :mod:`.opcodes` (instruction classes),
:mod:`.deps` (dependency tokens), :mod:`.container` (.spbin bytes), :mod:`.program` (Program and
its checks), :mod:`.asm` (text), :mod:`.lower` (ONNX -> Program).
"""
