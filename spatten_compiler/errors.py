"""User-facing errors.

Anything the user can fix (a bad file, a bad option, a model we cannot handle) raises a
:class:`SpattencError`. The CLI prints it as one line and exits with code 2; any other exception
is a bug in spattenc and is shown with a traceback only under ``--debug``.
"""

from __future__ import annotations


class SpattencError(Exception):
    """A problem with the user's input or options; reported in one line with exit code 2."""


class ModelLoadError(SpattencError):
    """The input is not a readable, valid ONNX model."""


class OptionError(SpattencError):
    """A command-line or config option is invalid."""


class NoAttentionError(SpattencError):
    """The model has no attention block that spattenc can rewrite."""


class PassCheckError(SpattencError):
    """A pass produced a model that fails onnx.checker or shape inference."""

    def __init__(self, pass_name: str, detail: str) -> None:
        super().__init__(f"pass '{pass_name}' produced an invalid model: {detail}")
        self.pass_name = pass_name
