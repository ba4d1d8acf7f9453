"""Insert dependency tokens into a logical instruction stream (which has none).

Rules, each one token from a producer to a consumer (so the stream balances by construction):

- load -> compute (RAW): the last load before a compute instruction pushes ``next``; that compute
  pops ``prev``.
- compute -> load (double buffering): the consumer of load group j pushes ``prev``; the first
  load of group j+2 pops ``next`` (at most two groups of loads in flight).
- compute -> store (RAW): the last compute before a group of stores pushes ``next``; the first
  store of the group pops ``prev``.
- store -> compute (double buffering): the last store of group j pushes ``prev``; the first
  compute after store group j+1 pops ``next``.
- store -> load through DRAM: at a barrier (a ``sync.compute`` the lowering placed), the last
  store before it pushes ``prev``, the barrier pops ``next`` and pushes ``prev``, the first load
  after it pops ``next``.
- the last store pushes ``prev`` and ``finish`` pops ``next``, so the program ends after all stores.

An instruction has one bit per direction; a second token on the same bit goes on a ``sync.<stage>``
placed before (pops) or after (pushes) it. :func:`spatten_compiler.backend.deps.check_deps` then
replays the result.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence

from spatten_compiler.backend.isa import DEP_NAMES, Instr, make


def _groups(stages: list[str], stage: str) -> list[list[int]]:
    """Maximal runs of ``stage`` instructions not separated by a compute instruction."""
    out: list[list[int]] = []
    current: list[int] = []
    for i, s in enumerate(stages):
        if s == stage:
            current.append(i)
        elif s == "compute" and current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def insert_tokens(instrs: Sequence[Instr], barriers: set[int]) -> tuple[list[Instr], dict[int, int]]:
    stages = [i.stage for i in instrs]
    n = len(instrs)
    next_compute = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        next_compute[i] = i if stages[i] == "compute" else next_compute[i + 1]
    prev_compute = [-1] * n
    last = -1
    for i in range(n):
        prev_compute[i] = last
        if stages[i] == "compute":
            last = i
    want: dict[int, list[str]] = defaultdict(list)

    def token(src: int, push: str, dst: int, pop: str) -> None:
        want[src].append(push)
        want[dst].append(pop)

    loads = _groups(stages, "load")
    consumers = []
    for g in loads:
        c = next_compute[g[-1]]
        if c < n:
            token(g[-1], "push_next", c, "pop_prev")
        consumers.append(c)
    for j in range(2, len(loads)):
        if consumers[j - 2] < loads[j][0]:
            token(consumers[j - 2], "push_prev", loads[j][0], "pop_next")
    stores = _groups(stages, "store")
    for g in stores:
        p = prev_compute[g[0]]
        if p >= 0:
            token(p, "push_next", g[0], "pop_prev")
    for j in range(len(stores) - 1):
        c = next_compute[stores[j + 1][0]]
        if c < n:
            token(stores[j][-1], "push_prev", c, "pop_next")
    store_ends = [g[-1] for g in stores]
    load_starts = [g[0] for g in loads]
    for b in sorted(barriers):
        k = bisect.bisect_left(store_ends, b)
        if k:
            token(store_ends[k - 1], "push_prev", b, "pop_next")
        k = bisect.bisect_right(load_starts, b)
        if k < len(load_starts):
            token(b, "push_prev", load_starts[k], "pop_next")
    if stores and stages[-1] == "compute":
        token(stores[-1][-1], "push_prev", n - 1, "pop_next")

    out: list[Instr] = []
    index: dict[int, int] = {}
    for i, ins in enumerate(instrs):
        bits = want.get(i, [])
        pops = [b for b in bits if b.startswith("pop")]
        pushes = [b for b in bits if b.startswith("push")]
        main = 0
        extra_pops, extra_pushes = [], []
        for b in pops + pushes:
            bit = 1 << DEP_NAMES.index(b)
            if main & bit:
                (extra_pops if b.startswith("pop") else extra_pushes).append(bit)
            else:
                main |= bit
        sync = f"sync.{ins.stage}"
        out.extend(make(sync, deps=bit) for bit in extra_pops)
        index[i] = len(out)
        out.append(ins.with_deps(main))
        out.extend(make(sync, deps=bit) for bit in extra_pushes)
    return out, index
