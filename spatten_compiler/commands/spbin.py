"""``spattenc emit`` / ``asm`` / ``disasm``: accelerator binaries (see docs/backend.md)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from spatten_compiler.backend.asm import assemble, disassemble
from spatten_compiler.backend.hw import load_hw
from spatten_compiler.backend.lower import emit_model
from spatten_compiler.backend.program import Program, read_program, write_program
from spatten_compiler.commands import Command, output_path, register
from spatten_compiler.errors import OptionError, SpattencError
from spatten_compiler.progress import Reporter

HW_HELP = "hardware: built-in 'spatten' (default) or 'spatten-1/8', or a TOML file (docs/backend.md)"


def _out_path(args: argparse.Namespace, source: Path) -> Path:
    out = Path(args.output)
    if out.resolve() == source.resolve():
        raise OptionError(f"-o {out} would overwrite the input")
    return out


# ---- emit ----------------------------------------------------------------------------------------
def add_emit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="ONNX model (a spattenc output, or a dense model for the baseline)")
    p.add_argument("-o", "--output", type=output_path, required=True, help="output .spbin (required)")
    p.add_argument("--seq-len", type=int,
                   help="encoder: longest input (tokens) the stream handles (required for encoders, default none)")
    p.add_argument("--prompt-len", type=int,
                   help="decoder: prompt tokens, processed as one block (required for decoders, default none)")
    p.add_argument("--gen-steps", type=int, default=0,
                   help="decoder: tokens generated after the prompt (default %(default)s)")
    p.add_argument("--hw", default="spatten", help=HW_HELP)
    p.add_argument("--stats", action="store_true", help="print the instruction mix and DRAM bytes per tensor kind")
    p.add_argument("--no-weights", action="store_true",
                   help="leave the model (graph + weight data) out of the binary: enough for timing runs; "
                        "functional runs then need --model (default: embedded)")


def stats_text(p: Program, top: int = 8) -> str:
    lines = [f"{len(p.instrs)} instructions, {len(p.tensors)} DRAM regions, hardware '{p.hw.name}'", "instruction mix:"]
    lines += [f"  {m:<13} {n:>8}" for m, n in p.mix().most_common()]
    kinds: Counter[str] = Counter()
    for t in p.tensors:
        kinds[t.kind] += t.size
    lines.append("DRAM bytes reserved per tensor kind:")
    lines += [f"  {k:<13} {n:>12,}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines.append(f"largest {top} regions:")
    for t in sorted(p.tensors, key=lambda t: -t.size)[:top]:
        lines.append(f"  {t.name:<24} {t.kind:<10} {t.size:>12,}  {t.source}")
    return "\n".join(lines)


def run_emit(args: argparse.Namespace) -> int:
    if (args.seq_len is None) == (args.prompt_len is None):
        raise OptionError("give exactly one of --seq-len (encoders) and --prompt-len (decoders)")
    if args.gen_steps < 0 or (args.gen_steps and args.prompt_len is None):
        raise OptionError("--gen-steps needs --prompt-len and must be >= 0")
    out = _out_path(args, args.model)
    hw = load_hw(args.hw)
    n = args.seq_len if args.seq_len is not None else args.prompt_len
    report = Reporter.from_args(args)
    steps = f" + {args.gen_steps} steps" if args.gen_steps else ""
    with report.step(f"lowering {args.model} for {n} tokens{steps}"):
        program = emit_model(args.model, n, args.gen_steps, hw, weights=not args.no_weights)
    size = write_program(program, out)
    if not args.quiet:
        print(f"wrote {out} ({len(program.instrs)} instructions, {size:,} bytes, hardware '{hw.name}')")
    if args.stats:
        print(stats_text(program))
    return 0


# ---- asm / disasm --------------------------------------------------------------------------------
def add_asm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="assembly text (as printed by 'spattenc disasm')")
    p.add_argument("-o", "--output", type=output_path, required=True, help="output .spbin (required)")
    p.add_argument("--hw", default=None, help=HW_HELP + "; used when the text has no .hw line")


def run_asm(args: argparse.Namespace) -> int:
    try:
        text = args.source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise SpattencError(f"{args.source}: cannot read ({why})") from None
    out = _out_path(args, args.source)
    program = assemble(text, load_hw(args.hw) if args.hw else None, str(args.source))
    size = write_program(program, out)
    if not args.quiet:
        print(f"wrote {out} ({len(program.instrs)} instructions, {size:,} bytes)")
    return 0


def add_disasm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("binary", type=Path, help=".spbin file")
    p.add_argument("-o", "--output", type=output_path, help="write the text here (default: stdout)")
    p.add_argument("--hw", default=None,
                   help="refuse the binary unless it was built for this hardware (default: accept any)")
    p.add_argument("--addresses", action="store_true", help="number every instruction (a comment; asm ignores it)")


def run_disasm(args: argparse.Namespace) -> int:
    program = read_program(args.binary, load_hw(args.hw) if args.hw else None)
    text = disassemble(program, addresses=args.addresses)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


register(Command(
    name="emit", help="lower a model to an accelerator binary (.spbin)", add_arguments=add_emit_arguments,
    run=run_emit,
    epilog="examples:\n  spattenc emit model.spatten.onnx --seq-len 128 -o model.spbin --stats\n"
    "  spattenc emit model.onnx --seq-len 128 -o dense.spbin              (baseline: no SpAtten passes)\n"
    "  spattenc emit gpt2.spatten.onnx --prompt-len 64 --gen-steps 16 -o gpt2.spbin --hw spatten-1/8",
))
register(Command(
    name="asm", help="assemble text into a .spbin", add_arguments=add_asm_arguments, run=run_asm,
    epilog="example:\n  spattenc disasm model.spbin > model.s && spattenc asm model.s -o again.spbin",
))
register(Command(
    name="disasm", help="print a .spbin as assembly (ONNX node names as comments)",
    add_arguments=add_disasm_arguments, run=run_disasm,
    epilog="example:\n  spattenc disasm model.spbin | less",
))
