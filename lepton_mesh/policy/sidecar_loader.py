"""Turn a sidecar's YAML config (or the same shape as plain data) into a `SidecarConfig`.

Loading is kept apart from the model: `load_sidecar_config` reads a file,
`sidecar_config_from_mapping` validates plain data from any source (later the
control daemon's snapshots), and `sidecar_config_to_json` goes the other way
for the admin `/config` endpoint. The YAML shape is documented in
docs/sidecar-config.md.

Validation never stops at the first problem: every parser below records what
is wrong and returns None, the caller keeps the model's default, and one
`ConfigError` lists everything at the end. A config with any problem is never
returned, so the defaults substituted along the way are never seen.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from lepton_mesh.policy.errors import ConfigError, Path, Problem, format_path
from lepton_mesh.policy.sidecar_config import (
    AccessLogConfig,
    Address,
    Endpoint,
    Limits,
    Listeners,
    PoolConfig,
    ServiceConfig,
    SidecarConfig,
    Timeouts,
)
from lepton_mesh.policy.yaml_source import line_of, load_file

T = TypeVar("T")

__all__ = ["load_sidecar_config", "sidecar_config_from_mapping", "sidecar_config_to_json"]


def load_sidecar_config(path: str | os.PathLike[str]) -> SidecarConfig:
    """Read and validate one sidecar config file. Raises `ConfigError`."""
    source = os.fspath(path)
    docs = load_file(path)
    if not docs:
        raise ConfigError.single(
            source,
            None,
            "",
            "the file is empty: expected a mapping with at least 'service' and 'app'",
        )
    extra: list[Problem] = []
    if len(docs) > 1:
        message = f"expected one YAML document, found {len(docs)}"
        extra.append(Problem(source, docs[1].line(), "", message))
    return _build(docs[0].data, source, docs[0].lines, extra)


def sidecar_config_from_mapping(
    data: Any, source: str, *, lines: Mapping[Path, int] | None = None
) -> SidecarConfig:
    """Validate plain data (dicts, lists, scalars) in the YAML shape.

    `source` names the origin in errors and in `SidecarConfig.source`;
    `lines`, when the data came from YAML, maps field paths to lines.
    """
    return _build(data, source, lines or {}, [])


# --- the checker: where problems are collected -------------------------------


class _Checker:
    __slots__ = ("lines", "problems", "source")

    def __init__(self, source: str, lines: Mapping[Path, int], problems: list[Problem]) -> None:
        self.source = source
        self.lines = lines
        self.problems = problems

    def error(self, path: Path, message: str) -> None:
        self.problems.append(
            Problem(self.source, line_of(self.lines, path), format_path(path), message)
        )

    def bad_key(self, path: Path, key: object, message: str) -> None:
        """A non-string key: reported on its mapping (a path can't show it), at its line."""
        line = line_of(self.lines, (*path, key))
        self.problems.append(Problem(self.source, line, format_path(path), message))


def _build(
    data: Any, source: str, lines: Mapping[Path, int], problems: list[Problem]
) -> SidecarConfig:
    c = _Checker(source, lines, problems)
    cfg = _sidecar(c, data)
    if problems or cfg is None:
        # Order by line, so the list reads top to bottom; unknown lines last.
        problems.sort(key=lambda p: (p.line is None, p.line or 0))
        raise ConfigError(problems)
    return cfg


# --- describing what was found -----------------------------------------------


def _found(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def _expected(c: _Checker, path: Path, what: str, value: Any) -> None:
    c.error(path, f"expected {what}, found {_found(value)}")


def _did_you_mean(word: object, choices: Iterable[str]) -> str:
    # Case-insensitive, so that 'HTTP' suggests 'http'.
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


# --- scalar parsers: (checker, value, path) -> parsed value, or None if invalid


def _string(c: _Checker, value: Any, path: Path) -> str | None:
    if isinstance(value, str):
        return value
    hint = " (quote it to make it a string)" if isinstance(value, (bool, int, float)) else ""
    c.error(path, f"expected a string, found {_found(value)}{hint}")
    return None


_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _name(c: _Checker, value: Any, path: Path) -> str | None:
    """A DNS label: service and namespace names become parts of host names."""
    name = _string(c, value, path)
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


def _boolean(c: _Checker, value: Any, path: Path) -> bool | None:
    if isinstance(value, bool):
        return value
    _expected(c, path, "true or false", value)
    return None


def _integer(lo: int, hi: int | None = None) -> Callable[[_Checker, Any, Path], int | None]:
    def parse(c: _Checker, value: Any, path: Path) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            _expected(c, path, "an integer", value)
            return None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            c.error(path, f"must be {bound}, found {value}")
            return None
        return value

    return parse


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_SECONDS_PER = {"s": 1, "m": 60, "h": 3600}


def _seconds(value: Any) -> float | None:
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


def _duration(*, zero_ok: bool) -> Callable[[_Checker, Any, Path], float | None]:
    def parse(c: _Checker, value: Any, path: Path) -> float | None:
        seconds = _seconds(value)
        if seconds is None or not math.isfinite(seconds):
            what = "a duration like '250ms', '1s', '5m', '1m30s' or a number of seconds"
            _expected(c, path, what, value)
            return None
        if seconds < 0 or (seconds == 0 and not zero_ok):
            c.error(path, f"must be {'0 or more' if zero_ok else 'greater than 0'}, found {value}")
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


def _size(minimum: int) -> Callable[[_Checker, Any, Path], int | None]:
    def parse(c: _Checker, value: Any, path: Path) -> int | None:
        size: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value.strip())):
            size = int(m[1]) * _SIZE_UNITS[(m[2] or "B").lower()]
        if size is None:
            _expected(c, path, "a size in bytes like 65536, '64KiB', '10MiB' or '500KB'", value)
            return None
        if size < minimum:
            c.error(path, f"must be at least {minimum} bytes, found {value}")
            return None
        return size

    return parse


_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")


def _address(*, port_zero_ok: bool) -> Callable[[_Checker, Any, Path], Address | None]:
    """'host:port' or '[v6]:port'. Port 0 (pick a free port) only where we listen."""

    def parse(c: _Checker, value: Any, path: Path) -> Address | None:
        if not isinstance(value, str):
            _expected(c, path, "an address 'host:port'", value)
            return None
        problem, address = _parse_address(value)
        if problem is None and address is not None:
            low = 0 if port_zero_ok else 1
            if not low <= address.port <= 65535:
                problem = f"port must be between {low} and 65535, found {address.port}"
        if problem is not None:
            c.error(path, f"invalid address {value!r}: {problem}")
            return None
        return address

    return parse


def _parse_address(text: str) -> tuple[str | None, Address | None]:
    """(problem, None) or (None, address); the port range is the caller's rule."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            return "expected '[ipv6]:port'", None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address", None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            return "missing ':port'", None
        if ":" in host:
            return "put IPv6 addresses in brackets: '[::1]:8080'", None
        if not _valid_host(host):
            return f"{host!r} is not an IPv4 address or host name", None
    if not port.isascii() or not port.isdigit():
        return f"port {port!r} is not a number", None
    return None, Address(host, int(port))


def _valid_host(host: str) -> bool:
    if not host or len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):  # looks numeric: must be a real IPv4
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return all(len(label) <= 63 and _HOST_LABEL.fullmatch(label) for label in labels)


# --- sections ---------------------------------------------------------------

_Parser = Callable[[_Checker, Any, Path], Any]


def _mapping(
    c: _Checker, value: Any, path: Path, allowed: Mapping[str, Any] | tuple[str, ...]
) -> dict[str, Any] | None:
    """`value` as a mapping whose keys are all in `allowed`; problems recorded.

    Unknown keys are reported and dropped; the rest is still checked.
    """
    if not isinstance(value, Mapping):
        _expected(c, path, "a mapping", value)
        return None
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            c.bad_key(path, key, f"field names must be strings, found {_found(key)}")
        elif key not in allowed:
            hint = _did_you_mean(key, allowed) or f"; expected one of: {', '.join(allowed)}"
            c.error((*path, key), f"unknown field {key!r}{hint}")
        else:
            out[key] = item
    return out


def _parse_fields(
    c: _Checker, m: Mapping[str, Any], path: Path, fields: Mapping[str, _Parser]
) -> dict[str, Any]:
    """Parse each present field; invalid ones are left out so the model's default applies."""
    parsed = {key: fields[key](c, item, (*path, key)) for key, item in m.items()}
    return {key: value for key, value in parsed.items() if value is not None}


def _section(cls: Callable[..., T], fields: Mapping[str, _Parser]) -> Callable[..., T | None]:
    """A parser for a flat section whose absent fields take the model's defaults."""

    def parse(c: _Checker, value: Any, path: Path) -> T | None:
        m = _mapping(c, value, path, fields)
        return None if m is None else cls(**_parse_fields(c, m, path, fields))

    return parse


_access_log_section = _section(AccessLogConfig, {"enabled": _boolean})


def _access_log(c: _Checker, value: Any, path: Path) -> AccessLogConfig | None:
    if isinstance(value, bool):  # short form: `access_log: false`
        return AccessLogConfig(enabled=value)
    if not isinstance(value, Mapping):
        _expected(c, path, "true, false or a mapping", value)
        return None
    return _access_log_section(c, value, path)


# --- services and endpoints -------------------------------------------------

_SERVICE_FIELDS = ("protocol", "listen", "endpoints")
_ENDPOINT_FIELDS = ("address", "weight", "labels", "healthy")
_PROTOCOLS = ("http", "tcp")
_weight = _integer(1, 10_000)
_endpoint_address = _address(port_zero_ok=False)
_listen_address = _address(port_zero_ok=True)


def _services(c: _Checker, value: Any, path: Path) -> Mapping[str, ServiceConfig] | None:
    if not isinstance(value, Mapping):
        _expected(c, path, "a mapping of service name to service", value)
        return None
    out: dict[str, ServiceConfig] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            c.bad_key(path, key, f"service names must be strings, found {_found(key)}")
            continue
        name = _name(c, key, (*path, key))
        svc = _service(c, name or "", item, (*path, key))
        if name is not None and svc is not None:
            out[name] = svc
    return MappingProxyType(out)


def _service(c: _Checker, name: str, value: Any, path: Path) -> ServiceConfig | None:
    m = _mapping(c, value, path, _SERVICE_FIELDS)
    if m is None:
        return None
    protocol = m.get("protocol", "http")
    if protocol not in _PROTOCOLS:
        hint = _did_you_mean(protocol, _PROTOCOLS) if isinstance(protocol, str) else ""
        c.error((*path, "protocol"), f"expected 'http' or 'tcp', found {_found(protocol)}{hint}")
        protocol = "http"
    listen = None
    if "listen" in m:
        listen = _listen_address(c, m["listen"], (*path, "listen"))
        if protocol == "http":
            c.error(
                (*path, "listen"),
                "only tcp services have 'listen'; http services are reached "
                "through listeners.outbound",
            )
    elif protocol == "tcp":
        c.error((*path, "listen"), "required for protocol tcp (the local address the app dials)")
    endpoints = _endpoints(c, m["endpoints"], (*path, "endpoints")) if "endpoints" in m else ()
    return ServiceConfig(name=name, protocol=protocol, endpoints=endpoints, listen=listen)


def _endpoints(c: _Checker, value: Any, path: Path) -> tuple[Endpoint, ...]:
    # An empty list is fine (the proxy answers 503 no_healthy_endpoint);
    # anything but a list is not, a lone "host:port" included.
    if not isinstance(value, (list, tuple)):
        _expected(c, path, "a list of endpoints", value)
        return ()
    out: list[Endpoint] = []
    seen: dict[Address, int] = {}
    for i, item in enumerate(value):
        ep = _endpoint(c, item, (*path, i))
        if ep is None:
            continue
        if ep.address in seen:
            c.error((*path, i), f"duplicate endpoint {ep.address} (also at [{seen[ep.address]}])")
            continue
        seen[ep.address] = i
        out.append(ep)
    return tuple(out)


def _endpoint(c: _Checker, value: Any, path: Path) -> Endpoint | None:
    if isinstance(value, str):
        address = _endpoint_address(c, value, path)
        return Endpoint(address) if address is not None else None
    if not isinstance(value, Mapping):
        _expected(c, path, "'host:port' or a mapping with 'address'", value)
        return None
    m = _mapping(c, value, path, _ENDPOINT_FIELDS)
    assert m is not None
    if "address" not in m:
        c.error((*path, "address"), "required field is missing")
        return None
    address = _endpoint_address(c, m["address"], (*path, "address"))
    weight = _weight(c, m["weight"], (*path, "weight")) if "weight" in m else 1
    labels = _labels(c, m["labels"], (*path, "labels")) if "labels" in m else {}
    healthy = _boolean(c, m["healthy"], (*path, "healthy")) if "healthy" in m else True
    if address is None or weight is None or labels is None or healthy is None:
        return None
    return Endpoint(address, weight, MappingProxyType(labels), healthy)


def _labels(c: _Checker, value: Any, path: Path) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        _expected(c, path, "a mapping of label to value", value)
        return None
    out: dict[str, str] = {}
    ok = True
    for key, item in value.items():
        if not isinstance(key, str):
            c.bad_key(path, key, f"label names must be strings, found {_found(key)}")
            ok = False
            continue
        text = _string(c, item, (*path, key))
        if text is None:
            ok = False
        else:
            out[key] = text
    return out if ok else None


# --- the top level ---------------------------------------------------------

_TOP_FIELDS: dict[str, _Parser] = {
    "service": _name,
    "namespace": _name,
    "app": _address(port_zero_ok=False),
    "listeners": _section(
        Listeners,
        {
            "outbound": _listen_address,
            "inbound": _listen_address,
            "admin": _listen_address,
        },
    ),
    "timeouts": _section(
        Timeouts,
        {
            "connect": _duration(zero_ok=False),
            "request": _duration(zero_ok=True),  # 0: no overall timeout (long inference calls)
            "header_read": _duration(zero_ok=False),
            "idle": _duration(zero_ok=False),
            "drain": _duration(zero_ok=False),
        },
    ),
    "limits": _section(
        Limits,
        {
            "max_header_bytes": _size(1024),
            "max_body_bytes": _size(0),  # 0: no limit
            "max_connections": _integer(1),
        },
    ),
    "pool": _section(
        PoolConfig,
        {"max_per_endpoint": _integer(1), "idle_timeout": _duration(zero_ok=False)},
    ),
    "access_log": _access_log,
    "services": _services,
}
_REQUIRED = ("service", "app")


def _sidecar(c: _Checker, data: Any) -> SidecarConfig | None:
    if not isinstance(data, Mapping):
        c.error((), f"expected a mapping at the top level, found {_found(data)}")
        return None
    m = _mapping(c, data, (), _TOP_FIELDS)
    assert m is not None
    for key in _REQUIRED:
        if key not in m:
            c.error((key,), "required field is missing")
    fields = _parse_fields(c, m, (), _TOP_FIELDS)
    _check_binds(
        c, fields.get("app"), fields.get("listeners", Listeners()), fields.get("services", {})
    )
    if c.problems:
        return None
    return SidecarConfig(**fields, source=c.source)


# --- cross-field rules ------------------------------------------------------

_WILDCARDS = ("0.0.0.0", "::")


def _overlap(a: Address, b: Address) -> bool:
    """Would binding both fail? Same port, and same host or one is a wildcard."""
    if a.port != b.port or a.port == 0:
        return False
    return a.host == b.host or a.host in _WILDCARDS or b.host in _WILDCARDS


def _check_binds(
    c: _Checker,
    app: Address | None,
    listeners: Listeners,
    services: Mapping[str, ServiceConfig],
) -> None:
    """Every address the sidecar listens on is distinct; the app is none of them."""
    binds: list[tuple[Path, Address]] = [
        (("listeners", "outbound"), listeners.outbound),
        (("listeners", "inbound"), listeners.inbound),
        (("listeners", "admin"), listeners.admin),
    ]
    binds += [
        (("services", name, "listen"), svc.listen)
        for name, svc in services.items()
        if svc.protocol == "tcp" and svc.listen is not None
    ]
    for i, (path, address) in enumerate(binds):
        for other_path, other in binds[:i]:
            if _overlap(address, other):
                c.error(
                    path,
                    f"{address} conflicts with {format_path(other_path)} ({other}): "
                    "two listeners cannot bind the same port",
                )
                break
    if app is None:
        return
    for path, address in binds:
        if _overlap(app, address):
            c.error(
                ("app",), f"{app} is also {format_path(path)}: the sidecar would forward to itself"
            )
            break


# --- back to data, for the admin /config endpoint --------------------------


def sidecar_config_to_json(cfg: SidecarConfig) -> dict[str, Any]:
    """The active config as JSON-able data: addresses as 'host:port', durations in seconds.

    Written field by field on purpose: a secret added to the model later (a
    key path, a token) must not appear here unless someone decides it should.
    The result, minus `source`, is accepted by `sidecar_config_from_mapping`.
    """
    return {
        "source": cfg.source,
        "service": cfg.service,
        "namespace": cfg.namespace,
        "app": str(cfg.app),
        "listeners": {
            "outbound": str(cfg.listeners.outbound),
            "inbound": str(cfg.listeners.inbound),
            "admin": str(cfg.listeners.admin),
        },
        "timeouts": {
            "connect": cfg.timeouts.connect,
            "request": cfg.timeouts.request,
            "header_read": cfg.timeouts.header_read,
            "idle": cfg.timeouts.idle,
            "drain": cfg.timeouts.drain,
        },
        "limits": {
            "max_header_bytes": cfg.limits.max_header_bytes,
            "max_body_bytes": cfg.limits.max_body_bytes,
            "max_connections": cfg.limits.max_connections,
        },
        "pool": {
            "max_per_endpoint": cfg.pool.max_per_endpoint,
            "idle_timeout": cfg.pool.idle_timeout,
        },
        "access_log": {"enabled": cfg.access_log.enabled},
        "services": {name: _service_json(svc) for name, svc in cfg.services.items()},
    }


def _service_json(svc: ServiceConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"protocol": svc.protocol}
    if svc.listen is not None:
        out["listen"] = str(svc.listen)
    out["endpoints"] = [
        {
            "address": str(ep.address),
            "weight": ep.weight,
            "labels": dict(ep.labels),
            "healthy": ep.healthy,
        }
        for ep in svc.endpoints
    ]
    return out
