"""Parsers for the HTTP pieces a policy names: header names, methods, cookie names, values.

Shared by the traffic and security loaders, so that a header name is the
same token (RFC 9110 5.6.2) in a route's header match, a header operation, a
token header and a rate-limit key, and so that the headers the proxy owns
are listed once. Same `(checker, value, path)` shape as `fields`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from lepton_mesh.policy.errors import Path
from lepton_mesh.policy.fields import Checker, parse_string

TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A field value may hold a tab but no other control character: CR and LF
# would end the header line, and NUL is refused by HTTP parsers.
_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Headers the proxy owns: they frame the message or belong to one hop.
PROXY_OWNED_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def parse_header_name(c: Checker, value: Any, path: Path) -> str | None:
    """A header name, lowercased (header names ignore case)."""
    text = parse_string(c, value, path)
    if text is None:
        return None
    if not TOKEN_RE.fullmatch(text):
        c.error(path, f"invalid header name {text!r}: letters, digits and !#$%&'*+-.^_`|~ only")
        return None
    return text.lower()


def parse_method(c: Checker, value: Any, path: Path) -> str | None:
    """An HTTP method, uppercased."""
    text = parse_string(c, value, path)
    if text is None:
        return None
    if not TOKEN_RE.fullmatch(text):
        c.error(path, f"invalid HTTP method {text!r}")
        return None
    return text.upper()


def parse_cookie_name(c: Checker, value: Any, path: Path) -> str | None:
    text = parse_string(c, value, path)
    if text is not None and not TOKEN_RE.fullmatch(text):
        c.error(path, f"invalid cookie name {text!r}")
        return None
    return text


def field_value(what: str) -> Callable[[Checker, Any, Path], str | None]:
    """A string that could stand in a header value; `what` names it in the problem."""

    def parse(c: Checker, value: Any, path: Path) -> str | None:
        text = parse_string(c, value, path)
        if text is not None and _VALUE_CONTROL.search(text):
            c.error(path, f"{what} may not contain control characters (CR, LF, NUL...)")
            return None
        return text

    return parse
