"""Load / compute / store stages that run in order and overlap through dependency tokens (as VTA).

Each instruction belongs to one stage and may pop a token from its previous or next stage's queue
before starting and push one to either after finishing. The queues carry the cycle at which the
token was pushed, so an instruction starts at ``max(stage free, popped tokens)``. The scheduler
takes instructions from whichever stage can go; when none can while some are left, the stream
would deadlock: :class:`Deadlock` says which instruction of which stage waits on which queue.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

from spatten_compiler.errors import SpattencError

STAGES = ("load", "compute", "store")


@dataclasses.dataclass(frozen=True)
class Deps:
    """The dependency bits of one instruction."""

    stage: int  # index into STAGES
    pop_prev: bool = False
    pop_next: bool = False
    push_prev: bool = False
    push_next: bool = False


class Deadlock(SpattencError):
    def __init__(self, blocked: list[str], done: int, total: int) -> None:
        super().__init__(f"deadlock after {done}/{total} instructions: " + "; ".join(blocked))
        self.blocked, self.done, self.total = blocked, done, total


@dataclasses.dataclass
class Schedule:
    finish: float
    stage_busy: dict[str, float]
    start: list[float]
    end: list[float]


def run(deps: Sequence[Deps], execute: Callable[[int, float], float | tuple[float, float]],
        labels: Callable[[int], str] = str) -> Schedule:
    """Schedule ``deps`` (program order); ``execute(i, start)`` charges instruction i and returns its finish,
    or (stage free again, result ready) when the stage hands the work to a unit that runs on its own;
    tokens it pushes carry the ready cycle."""
    n = len(deps)
    queues: dict[tuple[int, int], collections.deque[float]] = collections.defaultdict(collections.deque)
    order: list[list[int]] = [[] for _ in STAGES]
    for i, d in enumerate(deps):
        order[d.stage].append(i)
    heads = [0] * len(STAGES)
    free = [0.0] * len(STAGES)
    busy = [0.0] * len(STAGES)
    start, end = [0.0] * n, [0.0] * n
    done = 0
    last = 0.0
    while done < n:
        progressed = False
        for s in range(len(STAGES)):
            todo = order[s]
            while heads[s] < len(todo):
                i = todo[heads[s]]
                d = deps[i]
                need = ([(s - 1, s)] if d.pop_prev else []) + ([(s + 1, s)] if d.pop_next else [])
                if any(not queues[q] for q in need):
                    break
                t = max([free[s], *(queues[q].popleft() for q in need)])
                res = execute(i, t)
                f, ready = res if isinstance(res, tuple) else (res, res)
                start[i], end[i] = t, ready
                busy[s] += f - t
                free[s] = f
                last = max(last, ready)
                if d.push_prev:
                    queues[(s, s - 1)].append(ready)
                if d.push_next:
                    queues[(s, s + 1)].append(ready)
                heads[s] += 1
                done += 1
                progressed = True
        if not progressed:
            raise Deadlock(_blocked(deps, order, heads, queues, labels), done, n)
    return Schedule(max(last, *free), dict(zip(STAGES, busy)), start, end)


def _blocked(deps: Sequence[Deps], order: list[list[int]], heads: list[int],
             queues: dict[tuple[int, int], collections.deque[float]], labels: Callable[[int], str]) -> list[str]:
    out = []
    for s, todo in enumerate(order):
        if heads[s] < len(todo):
            i = todo[heads[s]]
            d = deps[i]
            waits = [f"{STAGES[q[0]]}->{STAGES[s]}" for q, want in (((s - 1, s), d.pop_prev), ((s + 1, s), d.pop_next))
                     if want and not queues[q]]
            out.append(f"{STAGES[s]} #{i} {labels(i)} waits for a token {' and '.join(waits)}")
    return out
