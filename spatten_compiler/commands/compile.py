"""``spattenc compile`` (the default verb): load, validate, run the pass pipeline, write."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from spatten_compiler.commands import Command, register
from spatten_compiler.errors import OptionError
from spatten_compiler.modelio import load_model, same_file, save_model
from spatten_compiler.pipeline import Pipeline, parse_pipeline
from spatten_compiler.progress import Reporter

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="input ONNX model (external data beside it is followed)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output ONNX model")
    p.add_argument("--in-place", action="store_true", help="allow -o to be the input file")
    p.add_argument(
        "--pipeline",
        default="",
        help="explicit pass pipeline, e.g. 'normalize,prune-tokens{keep=0.5}' (default: from options)",
    )
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker after each pass")
    p.add_argument(
        "--external-data",
        choices=("auto", "yes", "no"),
        default="auto",
        help="write weights to <output>.data (auto: when the input had external data or is > 1.8 GB)",
    )


def run(args: argparse.Namespace) -> int:
    if same_file(args.model, args.output) and not args.in_place:
        raise OptionError(f"-o {args.output} is the input model; pass --in-place to overwrite it")
    report = Reporter.from_args(args)
    passes = parse_pipeline(args.pipeline)
    t0 = time.perf_counter()
    with report.step(f"loading {args.model}"):
        model = load_model(args.model)
    pipeline = Pipeline(passes, check=not args.no_check, on_pass=report.pass_done)
    pipeline(model)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    with report.step(f"writing {args.output}"):
        files = save_model(model, args.output, external_data=external)
    size = sum(f.stat().st_size for f in files) / 1e6
    report.done(f"wrote {args.output} ({len(model.graph)} nodes, {size:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


register(
    Command(
        name="compile",
        help="rewrite a model with SpAtten pruning/quantization (the default verb)",
        add_arguments=add_arguments,
        run=run,
        epilog="example:\n  spattenc model.onnx -o model.spatten.onnx",
    )
)
