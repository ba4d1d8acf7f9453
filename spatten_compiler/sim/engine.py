"""Run an instruction stream in timing mode.

Two passes: the handlers of :mod:`.timing` walk the stream in program order (updating the machine
state, deciding what each instruction moves or computes); then the stage scheduler places that
work in time (load / compute / store in order, overlapping through the dependency tokens; DRAM
channels shared). ``simulate(program)`` takes a decoded
:class:`~spatten_compiler.backend.program.Program` (its relocations tag DRAM traffic by tensor
kind) or a bare instruction list (hand-built streams).
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
from spatten_compiler.sim.machine import Machine
from spatten_compiler.sim.report import SimReport
from spatten_compiler.sim.timing import PLAN, Ctx, DramWork, UnitWork

log = logging.getLogger("spattenc.sim")
_BIT = {name: 1 << i for i, name in enumerate(DEP_NAMES)}
INSTRUCTION_BASE = 0  # where the stream itself is read from (charged as 'instructions')


def deps_of(instrs: list[Instr]) -> list[scheduler.Deps]:
    stage = {s: i for i, s in enumerate(STAGES)}
    return [scheduler.Deps(stage[ins.stage], *(bool(ins.deps & _BIT[n]) for n in DEP_NAMES)) for ins in instrs]


def plan(instrs: list[Instr], ctx: Ctx, tensors: dict[int, Any] | None = None) -> list[DramWork | UnitWork | None]:
    """Pass 1: each instruction's work, in program order."""
    missing = sorted({i.mnemonic for i in instrs} - set(PLAN))
    if missing:
        raise SpattencError(f"the simulator has no timing model for {', '.join(missing)}")
    tensors = tensors or {}
    work = []
    step = getattr(ctx.decide, "step", None)
    if step is not None:
        ctx.decide.ctx = ctx
    for k, ins in enumerate(instrs):
        ctx.tensor = tensors.get(k)
        if step is not None:  # functional run: the numbers first, so the decisions below are the data's
            step(ins)
        work.append(PLAN[ins.mnemonic](ctx, ins))
    ctx.tensor = None
    return work


def simulate(program: Any, hw: SimHw | None = None, *, lsb_fraction: float = 0.07, trace: Path | None = None,
             trace_format: str = "ramulator", length: int | None = None, decide: Any = None) -> SimReport:
    """Timing run of ``program`` (a Program or a list of Instr); a deadlock raises scheduler.Deadlock.

    ``length``: the input's true length (slot 0 at reset; default the first cfg.attn's tokens);
    ``decide``: a functional run's decisions (kept tokens / heads, LSB rows) instead of the ratios.
    """
    instrs: list[Instr] = list(getattr(program, "instrs", program))
    if hw is None:
        desc = getattr(program, "hw", None)
        hw = SimHw.from_description(desc) if desc is not None else SimHw()
    tensors = {r.instr: program.tensors[r.tensor] for r in getattr(program, "relocs", [])}
    writer = TraceWriter(trace, trace_format) if trace is not None else None
    ctx = Ctx(hw, Dram(hw, writer), Machine(length=length), lsb_fraction=lsb_fraction, decide=decide)
    started = time.perf_counter()
    try:
        work = plan(instrs, ctx, tensors)
        t0 = ctx.dram.transfer_arrays(0.0, "instructions", -1, np.array([INSTRUCTION_BASE], dtype=np.int64),
                                      np.array([16 * len(instrs)], dtype=np.int64))
        compute = STAGES.index("compute")
        stage = [STAGES.index(i.stage) for i in instrs]

        def execute(k: int, t: float) -> float | tuple[float, float]:
            w, t = work[k], max(t, t0)
            if isinstance(w, DramWork):
                return ctx.dram.occupy(t, w.category, w.layer, w.counts, w.requested, w.write, w.tx)
            if isinstance(w, UnitWork):
                return ctx.run_unit(w, t) if w.unit != "sync" else t
            return t + 1 if stage[k] == compute else t

        sched = scheduler.run(deps_of(instrs), execute, labels=lambda k: instrs[k].mnemonic)
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - started
    return SimReport(
        mode="timing", hw=hw.name, cycles=max(sched.finish, float(ctx.dram.free.max())), clock_ghz=hw.clock_ghz,
        instructions=len(instrs), flops=ctx.flops, dram_bytes=ctx.dram.by_category(),
        dram_bytes_by_layer=ctx.dram.by_layer(), dram_requested=dict(ctx.dram.requested),
        stage_busy={**sched.stage_busy, **{f"unit {u}": b for u, b in ctx.unit_busy.items()}},
        counters=dict(ctx.counters), sim_seconds=elapsed,
    )
