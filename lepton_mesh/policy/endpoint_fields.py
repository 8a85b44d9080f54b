"""Parsers for addresses, endpoints and protocols, shared by the sidecar and policy loaders.

`host:port` or `[v6]:port`; endpoints as a bare address or a mapping with
address, weight, labels and healthy; what a service speaks. Problems go to
the `Checker` with the field path, like every other field parser.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from lepton_mesh.policy.endpoints import Address, Endpoint
from lepton_mesh.policy.errors import Path
from lepton_mesh.policy.fields import (
    Checker,
    check_mapping,
    choice,
    expected,
    integer,
    parse_boolean,
    parse_labels,
)

_ENDPOINT_FIELDS = ("address", "weight", "labels", "healthy")
_weight = integer(1, 10_000)

# What a service speaks: a sidecar's own services and ExternalServices alike.
parse_protocol = choice(("http", "tcp"), "'http' or 'tcp'")


# --- addresses --------------------------------------------------------------

_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")


def address_parser(*, port_zero_ok: bool) -> Callable[[Checker, Any, Path], Address | None]:
    """'host:port' or '[v6]:port'. Port 0 (pick a free port) only where we listen."""

    def parse(c: Checker, value: Any, path: Path) -> Address | None:
        if not isinstance(value, str):
            expected(c, path, "an address 'host:port'", value)
            return None
        problem, address = parse_address(value)
        if problem is None and address is not None:
            low = 0 if port_zero_ok else 1
            if not low <= address.port <= 65535:
                problem = f"port must be between {low} and 65535, found {address.port}"
        if problem is not None:
            c.error(path, f"invalid address {value!r}: {problem}")
            return None
        return address

    return parse


def parse_address(text: str) -> tuple[str | None, Address | None]:
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
        if not valid_host(host):
            return f"{host!r} is not an IPv4 address or host name", None
    if not port.isascii() or not port.isdigit():
        return f"port {port!r} is not a number", None
    return None, Address(host, int(port))


def valid_host(host: str) -> bool:
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


endpoint_address = address_parser(port_zero_ok=False)


def parse_endpoints(c: Checker, value: Any, path: Path) -> tuple[Endpoint, ...]:
    # An empty list is fine (the proxy answers 503 no_healthy_endpoint);
    # anything but a list is not, a lone "host:port" included.
    if not isinstance(value, (list, tuple)):
        expected(c, path, "a list of endpoints", value)
        return ()
    out: list[Endpoint] = []
    seen: dict[Address, int] = {}
    for i, item in enumerate(value):
        ep = parse_endpoint(c, item, (*path, i))
        if ep is None:
            continue
        if ep.address in seen:
            c.error((*path, i), f"duplicate endpoint {ep.address} (also at [{seen[ep.address]}])")
            continue
        seen[ep.address] = i
        out.append(ep)
    return tuple(out)


def parse_endpoint(c: Checker, value: Any, path: Path) -> Endpoint | None:
    if isinstance(value, str):
        address = endpoint_address(c, value, path)
        return Endpoint(address) if address is not None else None
    if not isinstance(value, Mapping):
        expected(c, path, "'host:port' or a mapping with 'address'", value)
        return None
    m = check_mapping(c, value, path, _ENDPOINT_FIELDS)
    assert m is not None
    if "address" not in m:
        c.error((*path, "address"), "required field is missing")
        return None
    address = endpoint_address(c, m["address"], (*path, "address"))
    weight = _weight(c, m["weight"], (*path, "weight")) if "weight" in m else 1
    labels = parse_labels(c, m["labels"], (*path, "labels")) if "labels" in m else {}
    healthy = parse_boolean(c, m["healthy"], (*path, "healthy")) if "healthy" in m else True
    if address is None or weight is None or labels is None or healthy is None:
        return None
    return Endpoint(address, weight, MappingProxyType(labels), healthy)


def base_url(url: str) -> tuple[str, str]:
    """(`url` as a base URL, with http:// added when it has no scheme, and
    without a trailing /; why it is not one, or "")."""
    text = url if "://" in url else "http://" + url
    why = ""
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port  # ValueError: not a number, or past 65535
    except ValueError as e:
        if str(e).startswith("Port"):
            why = "the port must be a number from 1 to 65535"
        elif "IPv6" in str(e):
            why = "an IPv6 address goes in [brackets], both of them"
        else:
            why = f"the host is not valid ({e})"
    else:
        if any(c.isspace() or not c.isprintable() for c in url):
            why = "it holds spaces or control characters"
        elif parts.scheme not in ("http", "https"):
            why = f"the scheme must be http or https, not {parts.scheme!r}"
        elif not parts.hostname:
            why = "it names no host"
        elif port == 0:
            why = "the port must be a number from 1 to 65535"
        elif parts.username is not None or parts.query or parts.fragment:
            why = "a base URL has no user, query or fragment"
    return text.rstrip("/"), why
