"""Every flag's help fits in two lines and says its default; ``--version`` works."""

from __future__ import annotations

import argparse
import textwrap

import pytest

from spatten_compiler import __version__
from spatten_compiler.cli import build_parser, main

SWITCHES = (argparse._StoreTrueAction, argparse._StoreConstAction, argparse._CountAction, argparse._HelpAction)
HELP_WIDTH = 100 - 24  # a 100-column terminal, argparse's help column


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options() -> list[tuple[str, argparse.Action]]:
    return [(f"{name} {a.option_strings[-1]}", a) for name, p in _commands().items()
            for a in p._actions if a.option_strings]


@pytest.mark.parametrize(("flag", "action"), _options(), ids=[f for f, _ in _options()])
def test_flag_help_is_short_and_says_its_default(flag: str, action: argparse.Action) -> None:
    text = (action.help or "") % {"default": action.default}
    assert text, f"{flag} has no help"
    assert len(textwrap.wrap(text, HELP_WIDTH)) <= 2, f"{flag}: help longer than two lines: {text!r}"
    if not isinstance(action, SWITCHES):
        assert any(w in text for w in ("default", "rule:", "required")), f"{flag}: help does not say its default"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"spattenc {__version__}"
