"""``spattenc sim``: run a ``.spbin`` on the accelerator simulator and report cycles and DRAM traffic."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from spatten_compiler.commands import Command, output_path, register
from spatten_compiler.errors import OptionError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("binary", type=Path, help="instruction binary (.spbin) from `spattenc emit`")
    p.add_argument("--input", type=Path,
                   help="feeds (.npz); timing mode takes the input length from it (default: none, see --length)")
    p.add_argument("--hw", help="hardware: built-in name or TOML file (default: the one the binary was built for; "
                                "another one must have the same digest)")
    p.add_argument("--mode", choices=("timing", "functional"), default="timing",
                   help="timing: cycles and DRAM traffic (default); functional: see docs/simulator.md")
    p.add_argument("--dense", type=Path,
                   help="the dense stream of the same model: adds speedup and DRAM reduction (default: none)")
    p.add_argument("--length", type=int, help="the input's true length (default: the stream's maximum)")
    p.add_argument("--lsb-fraction", type=float, default=0.07,
                   help="share of head-rows that refetch K LSBs when no functional run decides (default 0.07)")
    p.add_argument("--report", type=output_path, help="write the report as JSON (default: not written)")
    p.add_argument("--chart", type=output_path, help="write a PNG chart of DRAM bytes by category (default: none)")
    p.add_argument("--trace", type=output_path,
                   help="write every DRAM transaction as a Ramulator or DRAMsim3 trace (default: none)")
    p.add_argument("--trace-format", choices=("ramulator", "dramsim3"), default="ramulator",
                   help="the --trace file's format (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--model", type=Path,
                   help="functional: the ONNX model the binary was lowered from, when it was emitted with "
                        "--no-weights (default: the model embedded in the binary)")
    p.add_argument("--outputs", type=output_path,
                   help="functional: write the model's outputs to this .npz (default: none)")


def run(args: argparse.Namespace) -> int:
    from spatten_compiler.sim.api import run_binary

    if args.mode == "functional":
        return run_functional_mode(args)
    if args.model or args.outputs:
        raise OptionError("--model and --outputs are for --mode functional")
    if not 0.0 <= args.lsb_fraction <= 1.0:
        raise OptionError(f"--lsb-fraction {args.lsb_fraction} must be between 0 and 1")
    report = run_binary(args.binary, hw=args.hw, feeds=args.input, dense=args.dense, length=args.length,
                        lsb_fraction=args.lsb_fraction, trace=args.trace, trace_format=args.trace_format)
    if args.report:
        report.write_json(args.report)
    if args.chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise OptionError("--chart needs matplotlib: pip install 'spattenc[bench]'") from e
        from spatten_compiler.sim.report import plot_bytes

        runs: dict[str, object] = {}
        if report.baseline is not None:  # dense first: the candidate's bar says how much less it moves
            stem = args.dense.stem
            label = stem if "dense" in stem else f"{stem} (dense)"
            runs[label] = SimpleNamespace(dram_bytes=report.baseline["dram_bytes"])
        runs[args.binary.stem] = report
        plot_bytes({args.binary.name: runs}, args.chart)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0


def run_functional_mode(args: argparse.Namespace) -> int:
    """Outputs, kept tokens / heads and LSB rows of one input, computed by the stream (docs/simulator.md)."""
    import numpy as np

    from spatten_compiler.backend.hw import load_hw
    from spatten_compiler.backend.program import read_program
    from spatten_compiler.sim.api import load_feeds
    from spatten_compiler.sim.model_run import run_functional

    if args.input is None:
        raise OptionError("--mode functional needs --input FEEDS.npz")
    for name in ("dense", "trace", "chart", "length"):
        if getattr(args, name):
            raise OptionError(f"--{name} is for timing runs, not --mode functional")
    program = read_program(args.binary, load_hw(args.hw) if args.hw else None)
    result = run_functional(program, load_feeds(args.input), model=args.model)
    if args.outputs:
        generated = {"generated_ids": np.array(result.generated, np.int64)} if result.generated else {}
        np.savez(args.outputs, **result.outputs, **generated)
    doc = {"functional": result.summary(), "timing": result.timing.to_dict()}
    if args.report:
        args.report.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(doc, indent=2) if args.json else result.render())
    return 0


register(
    Command(
        name="sim",
        help="simulate a .spbin: cycles, time, FLOP/s and DRAM traffic by category and layer",
        add_arguments=add_arguments,
        run=run,
        epilog="examples:\n  spattenc sim model.spbin\n"
        "  spattenc sim model.spbin --dense model.dense.spbin --report sim.json --chart dram.png\n"
        "  spattenc sim model.spbin --input feeds.npz --trace dram.trace --trace-format dramsim3\n"
        "  spattenc sim model.spbin --input feeds.npz --mode functional --outputs out.npz",
    )
)
