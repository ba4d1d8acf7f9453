"""Progress and summary lines on stderr: quiet with -q, timing per step with -v.

Long steps (the pass pipeline, writing the weights) also show a tqdm bar when stderr is a terminal
(never with -q, never in logs or pipes).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# Loggers whose lines are printed above a live bar instead of through it (see cli._configure_logging).
_LOGGERS = ("", "spatten_compiler.passes")


class Reporter:
    def __init__(self, verbosity: int = 0, stream: TextIO | None = None) -> None:
        self.verbosity = verbosity
        self.stream = stream or sys.stderr

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Reporter:
        return cls(-1 if getattr(args, "quiet", False) else getattr(args, "verbose", 0))

    def _say(self, text: str, level: int = 0) -> None:
        if self.verbosity >= level:
            tqdm.write(text, file=self.stream)  # above a live progress bar, if there is one

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._say(f"{what} ...", level=1)
        yield
        self._say(f"{what}: {time.perf_counter() - t0:.2f} s", level=1)

    @contextlib.contextmanager
    def bar(self, total: float | None, desc: str, **options: Any) -> Iterator[tqdm]:
        """A progress bar on the stream (disabled with -q or when the stream is not a terminal)."""
        disable = True if self.verbosity < 0 else None  # None: tqdm shows it on a TTY only
        with tqdm(total=total, desc=desc, file=self.stream, disable=disable, leave=False, **options) as bar:
            if bar.disable:
                yield bar
                return
            with logging_redirect_tqdm(loggers=[logging.getLogger(n) for n in _LOGGERS], tqdm_class=tqdm):
                yield bar

    def pass_done(self, p: object, seconds: float) -> None:
        describe = getattr(p, "describe", lambda: str(p))
        self._say(f"pass {describe()}: {seconds:.2f} s", level=1)

    def done(self, text: str) -> None:
        self._say(text, level=0)
