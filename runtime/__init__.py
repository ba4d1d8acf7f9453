"""NumPy reference runtime for rewritten models (installed as ``spatten_compiler.runtime``)."""

from __future__ import annotations
