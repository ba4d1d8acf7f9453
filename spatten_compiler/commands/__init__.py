"""Sub-command registry. Each module registers one :class:`Command`; the CLI dispatches by name."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, Command] = {}


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""


def output_path(text: str) -> Path:
    """argparse ``type`` of every file a command writes: the folder must exist, checked when the
    command line is read - before any work, so a typo costs nothing and leaves nothing behind."""
    path = Path(text)
    if not path.parent.is_dir():  # Path("x").parent is Path("."): the working folder
        raise argparse.ArgumentTypeError(f"output folder '{path.parent}' does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"'{path}' is a folder, not a file name")
    return path


def register(command: Command) -> Command:
    COMMANDS[command.name] = command
    return command


def load_all() -> dict[str, Command]:
    # Imported for their registration side effect; the order is the order shown in --help.
    from spatten_compiler.commands import compile as _compile  # noqa: F401
    from spatten_compiler.commands import generate as _generate  # noqa: F401
    from spatten_compiler.commands import inspect as _inspect  # noqa: F401
    from spatten_compiler.commands import spbin as _spbin  # noqa: F401  (backend: emit, asm, disasm)
    from spatten_compiler.commands import sim as _sim  # noqa: F401


    return COMMANDS
