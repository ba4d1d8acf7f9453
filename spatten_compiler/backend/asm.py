"""Text assembly <-> :class:`Program`.

The disassembler prints every part of a binary, so ``assemble(disassemble(p))`` rebuilds ``p``
exactly and ``disassemble(assemble(text)) == text`` for canonical text::

    .hw spatten                         ; a built-in by name, else the description as JSON
    .tensor w.L0.q weight 0x0 147456 bits=32 layer=0 source='model.q.weight'
    ; node /layer.0/attn/q_proj/MatMul  ; debug map: the following instructions come from this node
    load buf=weight sram=0x0 dram=0x0 rows=384 row_bytes=256 stride=1536 live=0 deps=push_next @w.L0.q

Instruction syntax is owned by :class:`~spatten_compiler.backend.isa.InstrSpec` (``mnemonic
name=value ... [deps=a|b]``); ``@tensor`` relocates the ``dram`` field to that tensor. Other
``;`` comments are ignored. Every error names the line.
"""

from __future__ import annotations

import re
import shlex

from spatten_compiler.backend.hw import BUILTIN, HwDesc, from_json, load_hw
from spatten_compiler.backend.isa import IsaError, spec
from spatten_compiler.backend.program import NO_LAYER, TENSOR_KINDS, Program, Reloc, Tensor, validate
from spatten_compiler.errors import SpattencError

NODE_PREFIX = "; node "
TENSOR_NAME = re.compile(r"[A-Za-z0-9_.:/\-\[\]]+")


class AsmError(SpattencError):
    """Assembly text that cannot be assembled."""


def _hw_text(hw: HwDesc) -> str:
    if hw.name in BUILTIN and BUILTIN[hw.name] == hw:
        return hw.name
    return hw.canonical_json().decode()


def disassemble(p: Program, addresses: bool = False) -> str:
    """Canonical assembly text; with ``addresses``, each instruction is followed by ``; #index``."""
    out = [f".hw {_hw_text(p.hw)}"]
    for t in p.tensors:
        out.append(f".tensor {t.name} {t.kind} 0x{t.dram:x} {t.size} bits={t.elem_bits} layer={t.layer}"
                   f" source={shlex.quote(t.source)}")
    relocs = {r.instr: p.tensors[r.tensor].name for r in p.relocs}
    nodes = p.node_of()
    for i, ins in enumerate(p.instrs):
        if i in nodes:
            out.append(NODE_PREFIX + nodes[i])
        line = ins.asm() + (f" @{relocs[i]}" if i in relocs else "")
        out.append(line + (f"  ; #{i}" if addresses else ""))
    return "\n".join(out) + "\n"


def _tensor(args: list[str], where: str) -> Tensor:
    if len(args) < 4:
        raise AsmError(f"{where}: .tensor needs NAME KIND DRAM SIZE [bits=N] [layer=N] [source=S]")
    name, kind, dram, size, *opts = args
    if not TENSOR_NAME.fullmatch(name):
        raise AsmError(f"{where}: tensor name '{name}' may use only letters, digits and _.:/-[]")
    if kind not in TENSOR_KINDS:
        raise AsmError(f"{where}: unknown tensor kind '{kind}' (known: {', '.join(TENSOR_KINDS)})")
    values = {"bits": "32", "layer": str(NO_LAYER), "source": ""}
    for opt in opts:
        key, eq, val = opt.partition("=")
        if not eq or key not in values:
            raise AsmError(f"{where}: unknown .tensor option '{opt}'")
        values[key] = val
    try:
        nums = [int(x, 0) for x in (dram, size, values["bits"], values["layer"])]
    except ValueError:
        raise AsmError(f"{where}: .tensor {name}: DRAM, SIZE, bits and layer must be integers") from None
    if not (0 <= nums[0] < 1 << 64 and 0 < nums[1] < 1 << 64 and 0 <= nums[2] < 256 and 0 <= nums[3] <= NO_LAYER):
        raise AsmError(f"{where}: .tensor {name}: a number is out of range")
    return Tensor(name, kind, nums[0], nums[1], nums[2], values["source"], nums[3])


def assemble(text: str, hw: HwDesc | None = None, where: str = "asm") -> Program:
    """Parse assembly text; ``hw`` is used when the text has no ``.hw`` line."""
    desc: HwDesc | None = None
    tensors: list[Tensor] = []
    instrs = []
    pending_relocs: list[tuple[int, str, str]] = []
    debug: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        at = f"{where}:{lineno}"
        if raw.startswith(NODE_PREFIX):
            name = raw[len(NODE_PREFIX):]
            if debug and debug[-1][0] == len(instrs):
                raise AsmError(f"{at}: two node names for the same instruction")
            debug.append((len(instrs), name))
            continue
        line = raw.split(";", 1)[0].strip() if not raw.lstrip().startswith(".tensor") else raw.strip()
        if not line:
            continue
        if line.startswith(".hw "):
            arg = line[4:].strip()
            desc = from_json(arg.encode(), at) if arg.startswith("{") else load_hw(arg)
        elif line.startswith(".tensor"):
            try:
                lex = shlex.shlex(line, posix=True)
                lex.whitespace_split, lex.commenters = True, ";"
                args = list(lex)[1:]
            except ValueError as e:
                raise AsmError(f"{at}: {e}") from None
            tensors.append(_tensor(args, at))
        elif line.startswith("."):
            raise AsmError(f"{at}: unknown directive '{line.split()[0]}'")
        else:
            mnemonic, *ops = line.split()
            relocs = [op[1:] for op in ops if op.startswith("@")]
            ops = [op for op in ops if not op.startswith("@")]
            try:
                ins = spec(mnemonic).parse(ops, at)
            except IsaError as e:
                raise AsmError(str(e) if str(e).startswith(at) else f"{at}: {e}") from None
            if len(relocs) > 1 or (relocs and "dram" not in ins.spec.field_names):
                raise AsmError(f"{at}: '{mnemonic}' takes at most one @tensor and only with a dram field")
            pending_relocs += [(len(instrs), r, at) for r in relocs]
            instrs.append(ins)
    if debug and debug[-1][0] >= len(instrs):
        raise AsmError(f"{where}: node name after the last instruction")
    index = {t.name: k for k, t in enumerate(tensors)}
    relocs_out = []
    for i, name, at in pending_relocs:
        if name not in index:
            raise AsmError(f"{at}: unknown tensor '@{name}'")
        relocs_out.append(Reloc(i, index[name]))
    program = Program(desc or hw or load_hw(None), instrs, tensors, relocs_out, debug)
    validate(program, where)
    return program
