"""The ``spattenc`` command line.

``spattenc MODEL -o OUT`` is short for ``spattenc compile MODEL -o OUT``; other verbs are
sub-commands registered in :mod:`spatten_compiler.commands`. User errors print one line and exit
with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from spatten_compiler import __version__
from spatten_compiler.commands import COMMANDS, load_all
from spatten_compiler.errors import SpattencError

EXAMPLES = """\
examples:
  spattenc model.onnx -o model.spatten.onnx          compile with the measured default preset
  spattenc inspect model.onnx                         list the attention blocks found
  spattenc inspect model.onnx --explain               ... and why other Softmax ops were not taken
  python -m spatten_compiler --help                   the same command as a module

run 'spattenc COMMAND --help' for a command's options.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (and exit code 2, as argparse does)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more progress output")
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return common


def build_parser() -> argparse.ArgumentParser:
    commands = load_all()
    parser = _Parser(
        prog="spattenc",
        description="SpAtten-style token/head pruning and progressive K/V quantization for ONNX models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"spattenc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _common_options()
    for cmd in commands.values():
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.help,
            epilog=cmd.epilog,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _with_default_verb(argv: list[str]) -> list[str]:
    """Insert 'compile' unless the first argument is a verb or a top-level flag."""
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    return ["compile", *argv]


class _PassFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose >= 2 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # What each pass did (sites found, schedules chosen) is part of the normal output, one plain
    # line per pass; -q keeps only warnings, -vv switches to the full logger format.
    passes = logging.getLogger("spatten_compiler.passes")
    for h in [h for h in passes.handlers if getattr(h, "_spattenc", False)]:
        passes.removeHandler(h)
    passes.propagate = True
    passes.setLevel(logging.NOTSET)
    if level > logging.INFO:
        handler = logging.StreamHandler(sys.stderr)
        handler._spattenc = True  # type: ignore[attr-defined]
        handler.setFormatter(_PassFormatter())
        passes.addHandler(handler)
        passes.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
        passes.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `spattenc inspect m.onnx | head` ends quietly, like other tools
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    argv = _with_default_verb(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _configure_logging(args)
    try:
        return args._run(args)
    except SpattencError as e:
        if args.debug:
            raise
        print(f"spattenc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spattenc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in spattenc, not in the user's input
        if args.debug:
            raise
        print(f"spattenc: internal error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return 1
