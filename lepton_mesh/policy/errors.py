"""Typed errors for config and policy files.

A `ConfigError` carries every problem found in a file, not just the first:
fixing a config one error per run is how people learn to hate a tool. Each
problem names the file, the 1-based line (when known), the field path and a
message, so `str(err)` reads like compiler output:

    sidecar.yaml:12: services.intent.endpoints[1].address: port must be ...

The CLI prints `str(err)` to stderr and exits with `err.exit_code`.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# A field path as the loader walks it: mapping keys and sequence indexes.
# Keys are usually strings, but YAML allows other scalars; those are shown
# with repr so that `1` and `'1'` are not confused.
Path = tuple[object, ...]


def format_path(path: Path) -> str:
    """`("services", "intent", "endpoints", 1, "address")` -> `services.intent.endpoints[1].address`."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out.append(f"[{part}]")
        elif isinstance(part, str):
            out.append(f".{part}" if out else part)
        else:
            out.append(f".{part!r}" if out else repr(part))
    return "".join(out)


def describe(value: Any) -> str:
    """A value as a problem shows what was found: `integer 1`, `boolean true`, `string 'x'`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return f"number {value}" if math.isfinite(value) else f"{'-' if value < 0 else ''}infinity"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, dt.date):  # YAML reads 2024-01-01 as a date
        return f"{'timestamp' if isinstance(value, dt.datetime) else 'date'} {value.isoformat()}"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a file. `path` is "" for the file as a whole."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """A config or policy file is invalid. Never raised with zero problems."""

    exit_code = 2
    reason = "invalid_config"

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        super().__init__(str(self))

    @classmethod
    def single(cls, file: str, line: int | None, path: str, message: str) -> ConfigError:
        return cls([Problem(file, line, path, message)])

    @classmethod
    def in_reading_order(
        cls, problems: Iterable[Problem], files: Iterable[str] = ()
    ) -> ConfigError:
        """The problems file by file, each top to bottom, unknown lines last.

        Files named in `files` come first, in that order; the others as first
        seen. Loaders collect problems in the order they check things (a rule
        spanning objects runs last), which is not the order a reader fixes them in.
        """
        order: dict[str, int] = {file: i for i, file in enumerate(files)}
        ordered = list(problems)
        for p in ordered:
            order.setdefault(p.file, len(order))
        ordered.sort(key=lambda p: (order[p.file], p.line is None, p.line or 0))
        return cls(ordered)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[tuple[Problem, ...]]]:
        # Exception pickling replays `args` (the message); rebuild from problems instead.
        return (type(self), (self.problems,))
