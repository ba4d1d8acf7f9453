"""Dependency tokens between the load, compute and store stages (TVM VTA's scheme).

Four token queues connect neighbouring stages::

    load --l2c--> compute --c2s--> store
    load <--c2l-- compute <--s2c-- store

An instruction's ``pop_prev`` / ``pop_next`` bits wait for (and take) one token from the queue
coming from the previous / next stage before it runs; ``push_prev`` / ``push_next`` put one token
into the queue going there after it ran. Each stage runs its own instructions in program order.

:func:`check_deps` replays the three in-order stages with unbounded queues (atomic instructions)
and refuses, before anything is written: a token to or from a stage that does not exist (load has
no prev, store has no next), a stream that deadlocks (every stage waits for a token that never
comes; the message names the waiting instructions), and tokens pushed but never popped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from spatten_compiler.backend.isa import DEP_NAMES, Instr, IsaError

# (stage, dependency bit name) -> queue it pops from / pushes into
QUEUES: dict[tuple[str, str], str] = {
    ("load", "pop_next"): "c2l",
    ("load", "push_next"): "l2c",
    ("compute", "pop_prev"): "l2c",
    ("compute", "push_prev"): "c2l",
    ("compute", "pop_next"): "s2c",
    ("compute", "push_next"): "c2s",
    ("store", "pop_prev"): "c2s",
    ("store", "push_prev"): "s2c",
}
QUEUE_NAMES = {"l2c": "load->compute", "c2l": "compute->load", "c2s": "compute->store", "s2c": "store->compute"}


class DeadlockError(IsaError):
    """The stream's dependency tokens deadlock or do not balance."""


@dataclasses.dataclass(frozen=True)
class DepStats:
    pushed: dict[str, int]  # tokens per queue (each also popped: the stream balances)


@functools.lru_cache(maxsize=512)
def _queues(stage: str, deps: int) -> tuple[tuple[str, ...], tuple[str, ...]] | str:
    """(pops, pushes) of a dependency nibble in a stage, or the name of a bit with no queue."""
    pops, pushes = [], []
    for bit, name in enumerate(DEP_NAMES):
        if deps >> bit & 1:
            queue = QUEUES.get((stage, name))
            if queue is None:
                return name
            (pops if name.startswith("pop") else pushes).append(queue)
    return tuple(pops), tuple(pushes)


def _queues_of(instr: Instr, index: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    got = _queues(instr.stage, instr.deps)
    if isinstance(got, str):
        raise DeadlockError(f"instruction {index} ({instr.mnemonic}, {instr.stage} stage): "
                            f"'{got}' names a stage that does not exist")
    return got


def check_deps(instrs: Sequence[Instr]) -> DepStats:
    """Replay the stages; raise :class:`DeadlockError` naming the problem, else return the counts."""
    by_stage: dict[str, list[tuple[int, tuple[str, ...], tuple[str, ...]]]] = {"load": [], "compute": [], "store": []}
    for i, ins in enumerate(instrs):
        pops, pushes = _queues_of(ins, i)
        by_stage[ins.stage].append((i, pops, pushes))
    tokens = dict.fromkeys(QUEUE_NAMES, 0)
    pushed = dict.fromkeys(QUEUE_NAMES, 0)
    pc = dict.fromkeys(by_stage, 0)
    progress = True
    while progress:
        progress = False
        for stage, queue in by_stage.items():
            while pc[stage] < len(queue):
                _, pops, pushes = queue[pc[stage]]
                if any(tokens[q] == 0 for q in pops):
                    break
                for q in pops:
                    tokens[q] -= 1
                for q in pushes:
                    tokens[q] += 1
                    pushed[q] += 1
                pc[stage] += 1
                progress = True
    stuck = [(stage, queue[pc[stage]]) for stage, queue in by_stage.items() if pc[stage] < len(queue)]
    if stuck:
        waits = "; ".join(
            f"{stage} at instruction {i} ({instrs[i].mnemonic}) waits on "
            + ", ".join(QUEUE_NAMES[q] for q in pops if tokens[q] == 0)
            for stage, (i, pops, _) in stuck
        )
        raise DeadlockError(f"dependency deadlock: {waits}")
    left = {q: n for q, n in tokens.items() if n}
    if left:
        q, n = next(iter(left.items()))
        raise DeadlockError(f"dependency tokens do not balance: {n} {QUEUE_NAMES[q]} token(s) pushed but never popped")
    return DepStats(pushed)
