"""spattenc: SpAtten's dynamic sparsity (cascade token/head pruning, progressive quantization)
for transformer models exported to ONNX.

The top-level folders ``passes/`` and ``runtime/`` are installed as ``spatten_compiler.passes``
and ``spatten_compiler.runtime`` (see ``pyproject.toml``), so they never collide with other
projects' top-level packages.

The Python API (see :mod:`spatten_compiler.api`)::

    import spatten_compiler as sc
    sites = sc.inspect("model.onnx")                     # the attention blocks found
    result = sc.compile("model.onnx", token_keep=0.5)    # same options and defaults as the flags
    result.save("model.spatten.onnx"); print(result.report)
"""

from __future__ import annotations

__version__ = "0.1.0"

from spatten_compiler.api import CompileResult, compile, inspect
from spatten_compiler.config import CompileConfig
from spatten_compiler.errors import SpattencError
from spatten_compiler.modelio import load_model, save_model

__all__ = ["CompileConfig", "CompileResult", "SpattencError", "__version__", "compile", "inspect", "load_model",
           "save_model"]
