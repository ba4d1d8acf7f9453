"""Python API of the simulator: run a ``.spbin`` (or a decoded program / instruction list)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spatten_compiler.backend.hw import load_hw
from spatten_compiler.backend.program import Program, read_program
from spatten_compiler.errors import OptionError
from spatten_compiler.sim.engine import simulate
from spatten_compiler.sim.hw import SimHw
from spatten_compiler.sim.report import SimReport


def load_feeds(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise OptionError(f"--input {path}: not a readable .npz ({str(e).splitlines()[0] if str(e) else e})") from None


def input_length(feeds: Path | dict[str, np.ndarray]) -> int:
    """The true length of a feeds file: the attention mask's real tokens, else the ids' sequence axis."""
    if isinstance(feeds, Path):
        feeds = load_feeds(feeds)
    if "attention_mask" in feeds:
        return int(np.asarray(feeds["attention_mask"]).sum(axis=-1).max())
    if "input_ids" in feeds:
        return int(np.asarray(feeds["input_ids"]).shape[-1])
    raise OptionError("--input: no attention_mask or input_ids to take the length from")


def run_functional_binary(binary: Path | Program, feeds: Path | dict[str, np.ndarray], *, hw: str | None = None,
                          model: Path | None = None) -> Any:
    """Functional run of a whole emitted model (``sim.model_run``): outputs, kept tokens / heads,
    LSB rows, and the timing report of the same run with the data's decisions."""
    from spatten_compiler.sim.model_run import run_functional

    return run_functional(load(binary, hw), load_feeds(feeds) if isinstance(feeds, Path) else feeds, model=model)


def load(binary: Path | Program, hw: str | None = None) -> Program:
    if isinstance(binary, Program):
        return binary
    return read_program(binary, load_hw(hw) if hw else None)


def run_binary(binary: Path | Program, *, hw: str | None = None, feeds: Path | dict | None = None,
               dense: Path | Program | None = None, length: int | None = None, lsb_fraction: float = 0.07,
               trace: Path | None = None, trace_format: str = "ramulator", **kw: Any) -> SimReport:
    """Timing run of a binary (refused with one line if malformed or built for other hardware);
    ``dense``: the dense stream of the same model, run the same way, for speedup / DRAM reduction."""
    program = load(binary, hw)
    if length is None and feeds is not None:
        length = input_length(feeds)
    sim_hw = SimHw.from_description(program.hw)
    report = simulate(program, sim_hw, lsb_fraction=lsb_fraction, trace=trace, trace_format=trace_format,
                      length=length, **kw)
    if dense is not None:
        report.compare(simulate(load(dense, hw), sim_hw, lsb_fraction=lsb_fraction, length=length))
    return report
