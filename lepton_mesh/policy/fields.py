"""Field parsers shared by the config and policy loaders.

Each parser takes `(checker, value, path)` and returns the parsed value, or
records a problem on the checker and returns None; the caller keeps going,
so one run reports everything wrong with a file. The syntax accepted here
(durations like '1m30s', sizes like '64KiB', names as DNS labels) is the
same in every file lepton-mesh reads; docs/sidecar-config.md describes it.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from lepton_mesh.policy.errors import Path, Problem, describe, format_path
from lepton_mesh.policy.yaml_source import line_of

T = TypeVar("T")

# Upper bounds where a field names none of its own. Every count, rate and size
# in a policy is far below them; what is above is a typo, and would not fit
# the 64-bit integers JSON tools and etcd's values (orjson) take.
MAX_COUNT = 1_000_000_000
MAX_SIZE = 1024**4  # 1TiB
MAX_DURATION = 365 * 86400.0  # a year, in seconds


class Checker:
    """Where problems about one document go, with its line map.

    `prefix` is prepended to every path: a document embedded in another
    (a policy manifest inline in a sidecar config) reports its problems at
    their real place in the outer file.
    """

    __slots__ = ("lines", "prefix", "problems", "source")

    def __init__(
        self,
        source: str,
        lines: Mapping[Path, int],
        problems: list[Problem],
        prefix: Path = (),
    ) -> None:
        self.source = source
        self.lines = lines
        self.problems = problems
        self.prefix = prefix

    def line(self, path: Path) -> int | None:
        return line_of(self.lines, (*self.prefix, *path))

    def error(self, path: Path, message: str) -> None:
        full = (*self.prefix, *path)
        self.problems.append(
            Problem(self.source, line_of(self.lines, full), format_path(full), message)
        )

    def bad_key(self, path: Path, key: object, message: str) -> None:
        """A non-string key: reported on its mapping (a path can't show it), at its line."""
        full = (*self.prefix, *path)
        line = line_of(self.lines, (*full, key))
        self.problems.append(Problem(self.source, line, format_path(full), message))


# --- describing what was found -----------------------------------------------


def expected(c: Checker, path: Path, what: str, value: Any) -> None:
    c.error(path, f"expected {what}, found {describe(value)}")


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    # Case-insensitive, so that 'HTTP' suggests 'http'.
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


# --- scalar parsers: (checker, value, path) -> parsed value, or None if invalid


def parse_string(c: Checker, value: Any, path: Path) -> str | None:
    if isinstance(value, str):
        return value
    hint = " (quote it to make it a string)" if isinstance(value, (bool, int, float)) else ""
    c.error(path, f"expected a string, found {describe(value)}{hint}")
    return None


_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def parse_name(c: Checker, value: Any, path: Path) -> str | None:
    """A DNS label: service and namespace names become parts of host names."""
    name = parse_string(c, value, path)
    if name is None:
        return None
    if len(name) > 63 or not _NAME_RE.fullmatch(name):
        c.error(
            path,
            f"invalid name {name!r}: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters",
        )
        return None
    return name


def parse_boolean(c: Checker, value: Any, path: Path) -> bool | None:
    if isinstance(value, bool):
        return value
    expected(c, path, "true or false", value)
    return None


def choice(
    choices: tuple[str, ...], listed: str | None = None
) -> Callable[[Checker, Any, Path], str | None]:
    """One of `choices`; the problem says 'expected <listed>' (default: 'one of a, b, c')."""
    shown = listed if listed is not None else f"one of {', '.join(choices)}"

    def parse(c: Checker, value: Any, path: Path) -> str | None:
        if value in choices:
            return str(value)
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        c.error(path, f"expected {shown}, found {describe(value)}{hint}")
        return None

    return parse


def _bound(lo: float, hi: float | None, cap: float, value: float) -> str:
    """'between lo and hi' for a field's own range; else the side `value` is out of."""
    if hi is not None:
        return f"between {_plain(lo)} and {_plain(hi)}"
    return f"at least {_plain(lo)}" if value < lo else f"at most {_plain(cap)}"


def _plain(x: float) -> str:
    """1e9 as 1000000000, 0.5 as 0.5."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def integer(lo: int, hi: int | None = None) -> Callable[[Checker, Any, Path], int | None]:
    """An integer in [lo, hi]; without `hi`, at most MAX_COUNT."""
    top = MAX_COUNT if hi is None else hi

    def parse(c: Checker, value: Any, path: Path) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            expected(c, path, "an integer", value)
            return None
        if not lo <= value <= top:
            c.error(path, f"must be {_bound(lo, hi, top, value)}, found {value}")
            return None
        return value

    return parse


def number(lo: float, hi: float | None = None) -> Callable[[Checker, Any, Path], float | None]:
    """An integer or decimal number in [lo, hi], as a float; without `hi`, at most MAX_COUNT."""
    top = MAX_COUNT if hi is None else hi

    def parse(c: Checker, value: Any, path: Path) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            expected(c, path, "a number", value)
            return None
        if not math.isfinite(value):
            expected(c, path, "a finite number", value)
            return None
        if not lo <= value <= top:
            c.error(path, f"must be {_bound(lo, hi, top, value)}, found {value}")
            return None
        return float(value)

    return parse


_percent_number = number(0, 100)
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def parse_percent(c: Checker, value: Any, path: Path) -> float | None:
    """A percentage 0..100: a number (`10`, `12.5`) or a string like '10%'."""
    if isinstance(value, str):
        m = _PERCENT_RE.fullmatch(value.strip())
        if m is None:
            expected(c, path, "a percentage like 10, 12.5 or '10%'", value)
            return None
        value = float(m[1])
    return _percent_number(c, value, path)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_SECONDS_PER = {"s": 1, "m": 60, "h": 3600}


def to_seconds(value: Any) -> float | None:
    """Seconds from a bare number or a string like '250ms', '1m30s'; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if not _DURATION_RE.fullmatch(text):
        return None
    total = 0.0
    for number, unit in _DURATION_PART.findall(text):
        # Divide for ms so that '100ms' is exactly 0.1, not 100 * 0.001.
        total += float(number) / 1000 if unit == "ms" else float(number) * _SECONDS_PER[unit]
    return total


def duration(*, zero_ok: bool) -> Callable[[Checker, Any, Path], float | None]:
    def parse(c: Checker, value: Any, path: Path) -> float | None:
        seconds = to_seconds(value)
        if seconds is None or not math.isfinite(seconds):
            what = "a duration like '250ms', '1s', '5m', '1m30s' or a number of seconds"
            expected(c, path, what, value)
            return None
        if seconds < 0 or (seconds == 0 and not zero_ok):
            c.error(path, f"must be {'0 or more' if zero_ok else 'greater than 0'}, found {value}")
            return None
        if seconds > MAX_DURATION:
            c.error(path, f"must be at most {MAX_DURATION / 3600:g}h (a year), found {value}")
            return None
        return seconds

    return parse


_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def size(minimum: int) -> Callable[[Checker, Any, Path], int | None]:
    def parse(c: Checker, value: Any, path: Path) -> int | None:
        size: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value.strip())):
            size = int(m[1]) * _SIZE_UNITS[(m[2] or "B").lower()]
        if size is None:
            expected(c, path, "a size in bytes like 65536, '64KiB', '10MiB' or '500KB'", value)
            return None
        if size < minimum:
            c.error(path, f"must be at least {minimum} bytes, found {value}")
            return None
        if size > MAX_SIZE:
            c.error(path, f"must be at most 1TiB, found {value}")
            return None
        return size

    return parse


# --- mappings and sections ---------------------------------------------------

Parser = Callable[[Checker, Any, Path], Any]


def check_mapping(
    c: Checker, value: Any, path: Path, allowed: Mapping[str, Any] | tuple[str, ...]
) -> dict[str, Any] | None:
    """`value` as a mapping whose keys are all in `allowed`; problems recorded.

    Unknown keys are reported and dropped; the rest is still checked.
    """
    if not isinstance(value, Mapping):
        expected(c, path, "a mapping", value)
        return None
    out: dict[str, Any] = {}
    for key, item in string_entries(c, value, path, "field names"):
        if key not in allowed:
            hint = did_you_mean(key, allowed) or f"; expected one of: {', '.join(allowed)}"
            c.error((*path, key), f"unknown field {key!r}{hint}")
        else:
            out[key] = item
    return out


def string_entries(
    c: Checker, m: Mapping[Any, Any], path: Path, keys: str
) -> Iterator[tuple[str, Any]]:
    """The entries of `m` whose keys are strings; any other key is a problem at its line.

    YAML allows `1: x` or `true: x`; no field, label or service is named so.
    A generator, so these problems and the caller's stay in document order.
    """
    for key, item in m.items():
        if isinstance(key, str):
            yield key, item
        else:
            c.bad_key(path, key, f"{keys} must be strings, found {describe(key)}")


def required(c: Checker, m: Mapping[str, Any], path: Path, key: str, parse: Parser) -> Any:
    """`m[key]` through `parse`, or None with a problem where the field is missing."""
    if key not in m:
        c.error((*path, key), "required field is missing")
        return None
    return parse(c, m[key], (*path, key))


def parse_fields(
    c: Checker, m: Mapping[str, Any], path: Path, fields: Mapping[str, Parser]
) -> dict[str, Any]:
    """Parse each present field; invalid ones are left out so the model's default applies."""
    parsed = {key: fields[key](c, item, (*path, key)) for key, item in m.items()}
    return {key: value for key, value in parsed.items() if value is not None}


def section(cls: Callable[..., T], fields: Mapping[str, Parser]) -> Callable[..., T | None]:
    """A parser for a flat section whose absent fields take the model's defaults."""

    def parse(c: Checker, value: Any, path: Path) -> T | None:
        m = check_mapping(c, value, path, fields)
        return None if m is None else cls(**parse_fields(c, m, path, fields))

    return parse


def string_map(c: Checker, value: Any, path: Path, what: str, keys: str) -> dict[str, str] | None:
    """A mapping of `what`, strings to strings; an entry that is not is reported and left out."""
    if not isinstance(value, Mapping):
        expected(c, path, f"a mapping of {what}", value)
        return None
    out: dict[str, str] = {}
    for key, item in string_entries(c, value, path, keys):
        text = parse_string(c, item, (*path, key))
        if text is not None:
            out[key] = text
    return out


def parse_labels(c: Checker, value: Any, path: Path) -> dict[str, str] | None:
    """Labels, or None if any entry is invalid: one left out would change what they select."""
    before = len(c.problems)
    labels = string_map(c, value, path, "label to value", "label names")
    return labels if len(c.problems) == before else None


# --- lists -------------------------------------------------------------------


def check_list(c: Checker, value: Any, path: Path, what: str, *, empty: str = "") -> list[Any]:
    """`value` as a list of `what` ([] if it is not one, problem recorded).

    An empty list is a problem only when `empty` says why ("an empty list
    <empty>"): where leaving the field out means something else.
    """
    if not isinstance(value, list):
        expected(c, path, f"a list of {what}", value)
        return []
    if not value and empty:
        c.error(path, f"an empty list {empty}")
    return value


def required_list(
    c: Checker, m: Mapping[str, Any], path: Path, key: str, what: str, *, empty: str
) -> list[Any]:
    """`m[key]` as a list of `what`; [] where it is missing or not a list (problem recorded)."""
    if key not in m:
        c.error((*path, key), "required field is missing")
        return []
    return check_list(c, m[key], (*path, key), what, empty=empty)


def valid_items(
    c: Checker, value: Any, path: Path, what: str, parse: Parser, *, empty: str = ""
) -> list[Any]:
    """The items of the list `value` that `parse` accepts; the others are reported and left out."""
    return [item for item in _each(c, value, path, what, parse, empty) if item is not None]


def all_items(
    c: Checker, value: Any, path: Path, what: str, parse: Parser, *, empty: str = ""
) -> list[Any] | None:
    """Every item of the list `value` through `parse`; None if there is none or one is invalid.

    For lists that narrow what a rule matches: one item dropped would widen it.
    """
    parsed = _each(c, value, path, what, parse, empty)
    return None if not parsed or any(item is None for item in parsed) else parsed


def _each(c: Checker, value: Any, path: Path, what: str, parse: Parser, empty: str) -> list[Any]:
    items = check_list(c, value, path, what, empty=empty)
    return [parse(c, item, (*path, i)) for i, item in enumerate(items)]


def name_reused(
    c: Checker, seen: dict[str, int], name: str, path: Path, index: int, what: str
) -> bool:
    """Whether an earlier item of the list at `path` has this name (a problem then).

    `seen` keeps each name's first index; the problem names that item as a
    path would, so 'rules[0]' for a rule under `rules`.
    """
    first = seen.setdefault(name, index)
    if first == index:
        return False
    c.error((*path, index), f"{what} name {name!r} is already used by {path[-1]}[{first}]")
    return True
