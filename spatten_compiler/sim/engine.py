"""Run an instruction stream: the stage scheduler calls the mode's handler for each instruction.

``simulate(program)`` takes a decoded :class:`~spatten_compiler.backend.program.Program` (or a bare
instruction list, for hand-built streams) and returns a :class:`~spatten_compiler.sim.report.SimReport`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from spatten_compiler.backend.isa import DEP_NAMES, STAGES, Instr
from spatten_compiler.errors import SpattencError
from spatten_compiler.sim import scheduler
from spatten_compiler.sim.dram import Dram, TraceWriter
from spatten_compiler.sim.hw import SimHw
from spatten_compiler.sim.machine import config_snapshots
from spatten_compiler.sim.report import SimReport
from spatten_compiler.sim.timing import CHARGES, Ctx

log = logging.getLogger("spattenc.sim")
_BIT = {name: 1 << i for i, name in enumerate(DEP_NAMES)}
INSTRUCTION_BASE = 0  # where the stream itself is read from (charged as 'instructions')


def deps_of(instrs: list[Instr]) -> list[scheduler.Deps]:
    stage = {s: i for i, s in enumerate(STAGES)}
    return [scheduler.Deps(stage[ins.stage], *(bool(ins.deps & _BIT[n]) for n in DEP_NAMES)) for ins in instrs]


def simulate(program: Any, hw: SimHw | None = None, *, lsb_fraction: float = 0.07, trace: Path | None = None,
             trace_format: str = "ramulator", ctx: Ctx | None = None) -> SimReport:
    """Timing run of ``program`` (a Program or a list of Instr); deadlocks raise scheduler.Deadlock."""
    instrs: list[Instr] = list(getattr(program, "instrs", program))
    if hw is None:
        desc = getattr(program, "hw", None)
        hw = SimHw.from_description(desc) if desc is not None else SimHw()
    writer = TraceWriter(trace, trace_format) if trace is not None else None
    ctx = ctx or Ctx(hw, Dram(hw, writer), lsb_fraction=lsb_fraction)
    missing = sorted({i.mnemonic for i in instrs} - set(CHARGES))
    if missing:
        raise SpattencError(f"the simulator has no timing model for {', '.join(missing)}")
    started = time.perf_counter()
    try:
        t0 = ctx.dram.transfer_arrays(0.0, "instructions", -1, np.array([INSTRUCTION_BASE], dtype=np.int64),
                                      np.array([16 * len(instrs)], dtype=np.int64))
        handlers = [CHARGES[i.mnemonic] for i in instrs]
        configs = config_snapshots(instrs)

        def execute(k: int, t: float) -> float | tuple[float, float]:
            ctx.m.cfg = configs[k]
            return handlers[k](ctx, instrs[k], max(t, t0))

        sched = scheduler.run(deps_of(instrs), execute, labels=lambda k: instrs[k].mnemonic)
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - started
    dram_end = float(ctx.dram.free.max())
    return SimReport(
        mode="timing", hw=hw.name, cycles=max(sched.finish, dram_end), clock_ghz=hw.clock_ghz,
        instructions=len(instrs), flops=ctx.flops, dram_bytes=ctx.dram.by_category(),
        dram_bytes_by_layer=ctx.dram.by_layer(), dram_requested=dict(ctx.dram.requested),
        stage_busy={**sched.stage_busy, **{f'unit {u}': b for u, b in ctx.unit_busy.items()}},
        counters=dict(ctx.counters), sim_seconds=elapsed,
    )
