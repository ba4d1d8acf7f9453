"""Latency of the top-k engine: quick-select with a random pivot (SpAtten §IV-B, the authors' model).

Each round streams the remaining candidates through ``parallelism`` comparators (``ceil(m / p)``
cycles) plus 3 cycles for the comparators, zero eliminator and FIFO; the round keeps the side that
holds the k-th element. Then the k survivors drain at ``p`` per cycle. Scores are not known in
timing-only runs, so the rounds are counted on seeded random scores (deterministic per ``(n, k)``);
with real scores (functional runs) pass them in.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def quickselect_rounds(scores: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """Sizes of the candidate sets the engine streams, round by round, to find the k largest."""
    seq = np.asarray(scores, dtype=np.float64).ravel()
    k = min(max(k, 0), seq.size)
    sizes: list[int] = []
    if k == 0 or k == seq.size:
        return sizes  # nothing to select: every candidate passes (or none)
    while seq.size:
        sizes.append(int(seq.size))
        pivot = seq[rng.integers(seq.size)]
        above, equal = seq[seq > pivot], int((seq == pivot).sum())
        if above.size >= k:
            seq = above
        elif above.size + equal >= k:
            break
        else:
            k -= above.size + equal
            seq = seq[seq < pivot]
    return sizes


def cycles_for_rounds(sizes: list[int], k: int, parallelism: int) -> int:
    per_round = sum(math.ceil(m / parallelism) + 3 for m in sizes)
    return per_round + math.ceil(k / parallelism)


@functools.lru_cache(maxsize=65536)
def topk_cycles(n: int, k: int, parallelism: int) -> int:
    """Cycles to select k of n on random scores (seeded by n and k)."""
    rng = np.random.default_rng(n * 1_000_003 + k)
    return cycles_for_rounds(quickselect_rounds(rng.random(n), k, rng), k, parallelism)


def topk_cycles_scores(scores: np.ndarray, k: int, parallelism: int, seed: int = 0) -> int:
    """Cycles to select the k largest of real ``scores`` (functional + timing runs)."""
    rng = np.random.default_rng(seed)
    return cycles_for_rounds(quickselect_rounds(scores, k, rng), k, parallelism)
