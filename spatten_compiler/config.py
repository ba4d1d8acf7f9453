"""Compile options: one dataclass, filled from a JSON config file and/or command-line flags.

``--config spatten.json`` takes the same keys as the flags (``token_keep``, ``token_keep_schedule``,
...); flags given on the command line win. :meth:`CompileConfig.passes` turns the options into the
pass pipeline.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pass, make_pass


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    token_keep: float | None = None  # average keep ratio with SpAtten's schedule
    token_keep_schedule: tuple[float, ...] = ()  # or an explicit per-layer list
    token_unpruned: float = 0.15  # fraction of leading layers left unpruned by the schedule
    token_min_keep: int = 1
    token_protect_first: bool = True
    restore: str = "stale"
    emit_kept: bool = False

    def __post_init__(self) -> None:
        if self.token_keep is not None and not 0 < self.token_keep <= 1:
            raise OptionError(f"--token-keep must be in (0, 1], got {self.token_keep}")
        for r in self.token_keep_schedule:
            if not 0 < r <= 1:
                raise OptionError(f"--token-keep-schedule ratios must be in (0, 1], got {r}")
        if self.token_keep is not None and self.token_keep_schedule:
            raise OptionError("give --token-keep or --token-keep-schedule, not both")
        if self.token_min_keep < 1:
            raise OptionError(f"--token-min-keep must be >= 1, got {self.token_min_keep}")

    @property
    def prunes_tokens(self) -> bool:
        return self.token_keep is not None or bool(self.token_keep_schedule)

    def passes(self) -> list[Pass]:
        if not self.prunes_tokens:
            return []
        return [
            make_pass("normalize"),
            make_pass(
                "prune-tokens",
                keep=self.token_keep if self.token_keep is not None else 1.0,
                schedule=tuple(self.token_keep_schedule),
                unpruned=self.token_unpruned,
                min_keep=self.token_min_keep,
                protect_first=self.token_protect_first,
                restore=self.restore,
                emit_kept=self.emit_kept,
            ),
        ]

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any]) -> CompileConfig:
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = json.loads(Path(path).read_text())
            except OSError as e:
                raise OptionError(f"--config {path}: cannot read: {e.strerror}") from e
            except json.JSONDecodeError as e:
                raise OptionError(f"--config {path}: not valid JSON: {e.msg} at line {e.lineno}") from e
            if not isinstance(data, dict):
                raise OptionError(f"--config {path}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise OptionError(f"--config {path}: unknown key {sorted(unknown)[0]!r}; keys: {', '.join(sorted(known))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "token_keep_schedule" in data:
            data["token_keep_schedule"] = tuple(float(x) for x in data["token_keep_schedule"])
        try:
            return cls(**data)
        except TypeError as e:
            raise OptionError(f"--config {path}: {e}") from e


def parse_ratio_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise OptionError(f"--token-keep-schedule: expected comma-separated numbers, got {text!r}") from e
