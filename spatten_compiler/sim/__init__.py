"""Accelerator simulator for ``.spbin`` instruction streams: functional (NumPy) and timing
(cycles, DRAM traffic) modes. See docs/simulator.md."""

from __future__ import annotations
