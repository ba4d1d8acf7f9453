"""Progress bars: shown on a terminal, never with -q or when stderr is a pipe or a log."""

from __future__ import annotations

import io

from spatten_compiler.progress import Reporter


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _draw(verbosity: int, stream: io.StringIO) -> str:
    with Reporter(verbosity, stream).bar(1000, "writing weights", unit="B", unit_scale=True) as bar:
        bar.update(600)
    return stream.getvalue()


def test_bar_on_a_terminal() -> None:
    assert "writing weights" in _draw(0, _Terminal())


def test_no_bar_when_quiet_or_piped() -> None:
    assert _draw(-1, _Terminal()) == ""
    assert _draw(0, io.StringIO()) == ""  # not a terminal: logs and pipes stay clean
