"""spattenc: SpAtten's dynamic sparsity (cascade token/head pruning, progressive quantization)
for transformer models exported to ONNX.

The top-level folders ``passes/`` and ``runtime/`` are installed as ``spatten_compiler.passes``
and ``spatten_compiler.runtime`` (see ``pyproject.toml``), so they never collide with other
projects' top-level packages.
"""

from __future__ import annotations

__version__ = "0.1.0"

from spatten_compiler.errors import SpattencError
from spatten_compiler.modelio import load_model, save_model

__all__ = ["SpattencError", "__version__", "load_model", "save_model"]
