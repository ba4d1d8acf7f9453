"""Paired intervals for bench/decode.py: per-token NLL differences on the same tokens, block bootstrap."""

from __future__ import annotations

import numpy as np


def paired_change(nll_a: np.ndarray, nll_b: np.ndarray, block: int = 8, n_boot: int = 2000,
                  seed: int = 0) -> tuple[float, float, float]:
    """Perplexity of A relative to B on the same tokens, ``exp(mean(nll_a - nll_b)) - 1``, and a 95%
    block-bootstrap interval: the ``[windows, tokens]`` differences are cut into blocks of ``block``
    consecutive tokens (neighbouring tokens are correlated) and the blocks resampled with replacement."""
    d = np.asarray(nll_a, np.float64) - np.asarray(nll_b, np.float64)
    d = d.reshape(-1, d.shape[-1])
    usable = d.shape[1] // block * block
    blocks = d[:, :usable].reshape(-1, block).mean(axis=1) if usable else d.mean(axis=1)
    rng = np.random.default_rng(seed)
    boot = blocks[rng.integers(0, len(blocks), (n_boot, len(blocks)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.expm1(d.mean())), float(np.expm1(lo)), float(np.expm1(hi))


def fmt_change(c: tuple[float, float, float]) -> str:
    return f"{c[0]:+.1%} [{c[1]:+.1%}, {c[2]:+.1%}]"
