"""Turn RequestAuthentication, AuthorizationPolicy and RateLimit manifests into the security model.

The envelope (`apiVersion`, `kind`, `metadata`) is read by `traffic_loader`,
which dispatches these kinds here, so the sidecar's `policies:`, `lepton-mesh
validate` and the control daemon's policy store all validate them as part
of one set. `SecurityCollector` parses each spec (recording every problem
with file, line and field path, as the other loaders do) and then checks
what spans objects: one RequestAuthentication and one RateLimit per
service, and rules on request principals only where a RequestAuthentication
can give requests one. `security_to_manifests` goes back to plain data for
`/config` and round-trips.

Objects are keyed by (namespace, service): a sidecar takes its own
service's, in its own namespace (`SecurityPolicies`).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from lepton_mesh.policy.errors import Path, Problem
from lepton_mesh.policy.fields import (
    Checker,
    Parser,
    all_items,
    check_list,
    check_mapping,
    choice,
    describe,
    did_you_mean,
    duration,
    expected,
    integer,
    name_reused,
    number,
    parse_boolean,
    parse_name,
    parse_string,
    required,
    required_list,
)
from lepton_mesh.policy.http_fields import (
    PROXY_OWNED_HEADERS,
    TOKEN_RE,
    field_value,
    parse_cookie_name,
    parse_header_name,
    parse_method,
)
from lepton_mesh.policy.manifest_fields import envelope
from lepton_mesh.policy.security import (
    ACTIONS,
    CONDITION_KEYS,
    DEFAULT_TOKEN_HEADERS,
    HMAC_ALGORITHMS,
    JWT_ALGORITHMS,
    AuthorizationPolicy,
    AuthorizationRule,
    ClaimToHeader,
    Condition,
    IPNetwork,
    JwtProvider,
    Operation,
    RateKey,
    RateLimit,
    RateLimitRule,
    RateOverride,
    RequestAuthentication,
    RequestSelector,
    SecurityPolicies,
    Source,
    TokenHeader,
)

__all__ = ["SecurityCollector", "ServiceKey", "security_to_manifests"]

ServiceKey = tuple[str, str]  # (namespace, service)


# --- small parsers -------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x20\x7f]")
# Headers a claim may never become: they frame the message or belong to one
# hop (the proxy owns them, the proxy credentials with them), `host` routes
# it, and `x-lepton-*` are the mesh's own.
_RESERVED_HEADERS = PROXY_OWNED_HEADERS | {"host", "proxy-authenticate", "proxy-authorization"}


# Headers policies never see as the client sent them: the sidecar takes them
# out of the request before deciding (hop-by-hop, Host, the caller identity
# headers, X-Forwarded-For which it re-renders). A condition on one would never
# match, so a DENY naming it would silently deny nothing: refused, with what to
# use instead.
_ONE_HOP = "it belongs to one hop and the proxy consumes it"
_UNSEEN_HEADERS = {
    **dict.fromkeys(PROXY_OWNED_HEADERS | {"proxy-authenticate", "proxy-authorization"}, _ONE_HOP),
    "content-length": None,  # seen as sent (framing is checked, the value kept)
    "host": "the proxy owns it (the request already reached this service)",
    "x-forwarded-for": "the proxy re-renders it; compare the caller's address with source.ip"
    " or ip_blocks",
    "x-forwarded-client-cert": "the proxy drops it; use source.principal or identities",
}


def _unseen_header(name: str) -> str | None:
    """Why policies never see header `name` (None when they do)."""
    if name.startswith("x-lepton-"):
        return "x-lepton-* headers are the mesh's own and never reach policies"
    why = _UNSEEN_HEADERS.get(name)
    return f"policies never see {name!r}: {why}" if why else None


# Why an empty list narrowing a match is refused (the rule would match nothing).
_NARROWS_NOTHING = "matches nothing; omit the field instead"


def _text(c: Checker, value: Any, path: Path, what: str) -> str | None:
    """A non-empty string without whitespace or control characters."""
    text = parse_string(c, value, path)
    if text is None:
        return None
    if not text:
        c.error(path, f"an empty {what}")
        return None
    if _CONTROL.search(text):
        c.error(path, f"{what} {text!r} contains whitespace or control characters")
        return None
    return text


def _strings(
    c: Checker, value: Any, path: Path, what: str, parse: Callable[..., str | None]
) -> tuple[str, ...] | None:
    """A non-empty list of unique items, each through `parse`; None if any is invalid."""
    items = check_list(c, value, path, what, empty=_NARROWS_NOTHING)
    out: list[str] = []
    ok = bool(items)
    for i, item in enumerate(items):
        parsed = parse(c, item, (*path, i))
        if parsed is None:
            ok = False
        elif parsed in out:
            c.error((*path, i), f"{parsed!r} is listed twice")
        else:
            out.append(parsed)
    return tuple(out) if ok else None


def _pattern_text(c: Checker, value: Any, path: Path, what: str) -> str | None:
    """`_text` that may hold '*' and '**' wildcards, but not '***'."""
    text = _text(c, value, path, what)
    if text is not None and "***" in text:
        c.error(path, f"invalid pattern {text!r}: '***' means nothing; use '*' or '**'")
        return None
    return text


def _identity(c: Checker, value: Any, path: Path) -> str | None:
    text = _pattern_text(c, value, path, "identity")
    if text is None:
        return None
    if "*" not in text and not text.startswith("spiffe://"):
        c.error(
            path,
            f"{text!r} is not a SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/svc/<service>); "
            "match a service name with 'services', or use a '*' pattern",
        )
        return None
    return text


_LABEL_PATTERN = re.compile(r"\*|\*?[a-z0-9-]{1,63}|[a-z0-9-]{1,63}\*")


def _label_pattern(what: str) -> Callable[[Checker, Any, Path], str | None]:
    """A service or namespace name, with at most one '*' at its start or end, or `*`."""

    def parse(c: Checker, value: Any, path: Path) -> str | None:
        text = parse_string(c, value, path)
        if text is None:
            return None
        if not _LABEL_PATTERN.fullmatch(text):
            c.error(
                path,
                f"invalid {what} {text!r}: a name (lowercase letters, digits, '-'), "
                "optionally with one '*' at its start or end, or '*'",
            )
            return None
        return text

    return parse


def _principal(c: Checker, value: Any, path: Path) -> str | None:
    text = _pattern_text(c, value, path, "principal")
    if text is None:
        return None
    if "*" not in text and "/" not in text:
        c.error(path, f"{text!r} is not a request principal: principals are '<iss>/<sub>'")
        return None
    return text


def _path_pattern(c: Checker, value: Any, path: Path) -> str | None:
    """Exact, prefix ('/v1/*'), suffix ('*/healthz'), '*', or a glob ('/v1/*/x', '/a/**/b')."""
    text = _pattern_text(c, value, path, "path")
    if text is None:
        return None
    if "?" in text or "#" in text:
        c.error(
            path,
            f"invalid path {text!r}: paths are matched without the query string "
            "or fragment, so '?' and '#' never appear",
        )
        return None
    if not text.startswith(("/", "*")):
        c.error(path, f"invalid path {text!r}: a path starts with '/' (or '*' for a suffix)")
        return None
    for m in re.finditer(r"\*\*", text):
        before = text[m.start() - 1] if m.start() else "/"
        after = text[m.end()] if m.end() < len(text) else "/"
        if before != "/" or after != "/":
            c.error(
                path,
                f"invalid path {text!r}: '**' (any number of segments) must be a whole "
                "segment, as in '/a/**' or '/a/**/b'; '*' matches within one segment",
            )
            return None
    return text


_value_pattern = field_value("values")


def _cidr(c: Checker, value: Any, path: Path) -> IPNetwork | None:
    text = parse_string(c, value, path)
    if text is None:
        return None
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            c.error(path, f"invalid IP block {text!r}: {e} (expected a CIDR like 10.0.0.0/8)")
            return None
        c.error(path, f"invalid IP block {text!r}: host bits set (did you mean {str(loose)!r}?)")
        return None


def _cidrs(c: Checker, value: Any, path: Path) -> tuple[IPNetwork, ...] | None:
    parsed = all_items(c, value, path, "IP blocks", _cidr, empty=_NARROWS_NOTHING)
    return None if parsed is None else tuple(parsed)


_port = integer(1, 65535)


def _ports(c: Checker, value: Any, path: Path) -> frozenset[int] | None:
    parsed = all_items(c, value, path, "ports", _port, empty=_NARROWS_NOTHING)
    return None if parsed is None else frozenset(parsed)


def _methods(c: Checker, value: Any, path: Path) -> frozenset[str] | None:
    parsed = _strings(c, value, path, "HTTP methods", parse_method)
    return None if parsed is None else frozenset(parsed)


# --- RequestAuthentication ------------------------------------------------------------

_AUTHN_FIELDS = ("service", "providers")
_PROVIDER_FIELDS = (
    "name",
    "issuer",
    "audiences",
    "jwks_uri",
    "jwks",
    "jwks_file",
    "algorithms",
    "from_headers",
    "from_params",
    "from_cookies",
    "forward_original_token",
    "claims_to_headers",
    "clock_skew",
    "required",
    "jwks_refresh",
    "jwks_min_refresh",
    "jwks_timeout",
)
_KEY_SOURCES = ("jwks_uri", "jwks", "jwks_file")
_PROVIDER_DURATIONS = {
    "clock_skew": duration(zero_ok=True),
    "jwks_refresh": duration(zero_ok=False),
    "jwks_min_refresh": duration(zero_ok=False),
    "jwks_timeout": duration(zero_ok=False),
}
_ASYMMETRIC_KTY = ("RSA", "EC", "OKP")
# Private parts of RSA, EC and OKP keys (RFC 7518 6.2.2, 6.3.2; RFC 8037 2).
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")


def _algorithm(c: Checker, value: Any, path: Path) -> str | None:
    text = parse_string(c, value, path)
    if text is None:
        return None
    if text in JWT_ALGORITHMS:
        return text
    if text.lower() == "none":
        c.error(path, "'none' is never accepted: a token with alg none carries no signature")
    elif text.upper() in HMAC_ALGORITHMS:
        c.error(
            path,
            f"{text} is an HMAC algorithm and is refused: verified with a provider's public "
            "key, it lets anyone who has that key forge tokens (algorithm confusion); use "
            "an asymmetric one (RS256, PS256, ES256, EdDSA...)",
        )
    else:
        hint = did_you_mean(text, JWT_ALGORITHMS)
        c.error(
            path, f"unknown algorithm {text!r}{hint}; expected one of {', '.join(JWT_ALGORITHMS)}"
        )
    return None


def _jwks_uri(c: Checker, value: Any, path: Path) -> str | None:
    text = _text(c, value, path, "URL")
    if text is None:
        return None
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        c.error(path, f"invalid jwks_uri {text!r}: expected an http:// or https:// URL with a host")
        return None
    return text


def _jwks_file(c: Checker, value: Any, path: Path) -> str | None:
    text = parse_string(c, value, path)
    if text is None:
        return None
    if not text.startswith("/"):
        c.error(
            path,
            f"jwks_file {text!r} must be an absolute path: the sidecar reads it, and "
            "a relative one would depend on where it runs",
        )
        return None
    return text


def _jwks_inline(c: Checker, value: Any, path: Path, algorithms: tuple[str, ...]) -> str | None:
    """An inline JWKS (a mapping, or its JSON text) of public asymmetric keys,
    as canonical JSON text. Every key is parsed with PyJWT now, so a broken
    key is a config error here and never a 401 storm later."""
    data = value
    if isinstance(value, str):
        try:
            data = json.loads(value)
        except ValueError as e:
            c.error(path, f"jwks is not valid JSON: {e}")
            return None
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        c.error(path, 'expected a JWKS: a mapping with a list of keys, {"keys": [...]}')
        return None
    keys = data["keys"]
    if not keys:
        c.error((*path, "keys"), "an empty list: a JWKS needs at least one key")
        return None
    ok = True
    kids: dict[str, int] = {}
    for i, key in enumerate(keys):
        kpath = (*path, "keys", i)
        if not _jwk_ok(c, key, kpath, algorithms):
            ok = False
            continue
        kid = key.get("kid")
        if isinstance(kid, str):
            if kid in kids:
                c.error((*kpath, "kid"), f"kid {kid!r} is already used by keys[{kids[kid]}]")
                ok = False
            kids.setdefault(kid, i)
    if not ok:
        return None
    try:
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        c.error(path, f"jwks is not plain JSON data: {e}")
        return None


def _jwk_ok(c: Checker, key: Any, path: Path, algorithms: tuple[str, ...]) -> bool:
    if not isinstance(key, Mapping):
        expected(c, path, "a JWK (a mapping)", key)
        return False
    kty = key.get("kty")
    if kty == "oct":
        c.error(
            (*path, "kty"),
            "symmetric ('oct') keys are refused: a provider's keys are public, and an "
            "HMAC secret must never be one (algorithm confusion)",
        )
        return False
    if kty not in _ASYMMETRIC_KTY:
        c.error((*path, "kty"), f"expected kty RSA, EC or OKP, found {describe(kty)}")
        return False
    private = [m for m in _PRIVATE_MEMBERS if m in key]
    if private:
        c.error(
            path,
            f"private key material ({', '.join(private)}) in a JWKS: give public keys only",
        )
        return False
    alg = key.get("alg")
    if alg is not None and alg not in algorithms:
        c.error(
            (*path, "alg"),
            f"the key is for {alg!r}, which is not in the provider's algorithms "
            f"({', '.join(algorithms) or 'none valid'})",
        )
        return False
    # Imported here, not at module level: PyJWT brings in cryptography (~20 MB
    # of RSS), and every sidecar loads this module, most with no inline JWKS.
    import jwt

    try:
        jwt.PyJWK(dict(key))
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as e:
        c.error(path, f"invalid key: {e}")
        return False
    return True


_TOKEN_HEADER_FIELDS = ("name", "prefix")


def _token_headers(c: Checker, value: Any, path: Path) -> tuple[TokenHeader, ...] | None:
    items = check_list(c, value, path, "headers ({name, prefix})")
    out: list[TokenHeader] = []
    ok = True
    for i, item in enumerate(items):
        ipath = (*path, i)
        if isinstance(item, str):
            item = {"name": item}
        m = check_mapping(c, item, ipath, _TOKEN_HEADER_FIELDS)
        if m is None:
            ok = False
            continue
        name = required(c, m, ipath, "name", parse_header_name)
        prefix = parse_string(c, m["prefix"], (*ipath, "prefix")) if "prefix" in m else ""
        if name is None or prefix is None:
            ok = False
            continue
        if name in _RESERVED_HEADERS or name.startswith("x-lepton-"):
            c.error(
                (*ipath, "name"), f"{name!r} is a header the proxy owns; it cannot hold a token"
            )
            ok = False
            continue
        if any(h.name == name for h in out):
            c.error((*ipath, "name"), f"header {name!r} is listed twice")
            ok = False
            continue
        out.append(TokenHeader(name, prefix))
    return tuple(out) if ok else None


def _param_name(c: Checker, value: Any, path: Path) -> str | None:
    return _text(c, value, path, "query parameter name")


_CLAIM_HEADER_FIELDS = ("claim", "header")


def _claims_to_headers(
    c: Checker, value: Any, path: Path, token_headers: tuple[TokenHeader, ...]
) -> tuple[ClaimToHeader, ...] | None:
    items = check_list(c, value, path, "{claim, header} mappings")
    out: list[ClaimToHeader] = []
    ok = True
    for i, item in enumerate(items):
        ipath = (*path, i)
        m = check_mapping(c, item, ipath, _CLAIM_HEADER_FIELDS)
        if m is None:
            ok = False
            continue
        claim = required(c, m, ipath, "claim", lambda c, v, p: _text(c, v, p, "claim name"))
        header = required(c, m, ipath, "header", parse_header_name)
        if claim is None or header is None:
            ok = False
            continue
        hpath = (*ipath, "header")
        problem = None
        if header in _RESERVED_HEADERS:
            problem = "frames the message or belongs to one hop; the proxy owns it"
        elif header.startswith("x-lepton-"):
            problem = "x-lepton-* headers are the mesh's own"
        elif header.startswith(":"):
            problem = "pseudo-headers are not headers"
        elif any(h.name == header for h in token_headers):
            problem = "the token itself is read from it"
        elif any(x.header == header for x in out):
            problem = "another claim already goes to it"
        if problem is not None:
            c.error(hpath, f"a claim cannot be forwarded as {header!r}: {problem}")
            ok = False
            continue
        out.append(ClaimToHeader(claim, header))
    return tuple(out) if ok else None


def _provider(c: Checker, value: Any, path: Path) -> JwtProvider | None:
    m = check_mapping(c, value, path, _PROVIDER_FIELDS)
    if m is None:
        return None
    before = len(c.problems)
    name = required(c, m, path, "name", parse_name)
    issuer = required(c, m, path, "issuer", lambda c, v, p: _text(c, v, p, "issuer"))
    kw: dict[str, Any] = {}
    algorithms: tuple[str, ...] = ()
    if "algorithms" not in m:
        c.error(
            (*path, "algorithms"),
            "required field is missing: list the algorithms the issuer signs with "
            "(RS256, ES256, EdDSA...), so a token cannot pick a weaker one",
        )
    else:
        algorithms = (
            _strings(c, m["algorithms"], (*path, "algorithms"), "algorithms", _algorithm) or ()
        )
        kw["algorithms"] = algorithms
    source = _key_source(c, m, path, algorithms)
    if source is not None:
        kw[source[0]] = source[1]
    if "audiences" in m:
        kw["audiences"] = _strings(
            c,
            m["audiences"],
            (*path, "audiences"),
            "audiences",
            lambda c, v, p: _text(c, v, p, "audience"),
        )
    headers = DEFAULT_TOKEN_HEADERS
    if "from_headers" in m:
        headers = _token_headers(c, m["from_headers"], (*path, "from_headers")) or ()
        kw["from_headers"] = headers
    if "from_params" in m:
        kw["from_params"] = _strings(
            c, m["from_params"], (*path, "from_params"), "query parameter names", _param_name
        )
    if "from_cookies" in m:
        kw["from_cookies"] = _strings(
            c, m["from_cookies"], (*path, "from_cookies"), "cookie names", parse_cookie_name
        )
    no_place = not headers and not kw.get("from_params") and not kw.get("from_cookies")
    if no_place and len(c.problems) == before:
        c.error(
            path,
            "no place to read a token from: from_headers is empty and there are "
            "no from_params or from_cookies",
        )
    if "claims_to_headers" in m:
        kw["claims_to_headers"] = _claims_to_headers(
            c, m["claims_to_headers"], (*path, "claims_to_headers"), headers
        )
    for key in ("forward_original_token", "required"):
        if key in m:
            kw[key] = parse_boolean(c, m[key], (*path, key))
    for key, parse in _PROVIDER_DURATIONS.items():
        if key in m:
            kw[key] = parse(c, m[key], (*path, key))
    if len(c.problems) != before or name is None or issuer is None:
        return None
    return JwtProvider(name, issuer, **{k: v for k, v in kw.items() if v is not None})


def _key_source(
    c: Checker, m: Mapping[str, Any], path: Path, algorithms: tuple[str, ...]
) -> tuple[str, str] | None:
    given = [k for k in _KEY_SOURCES if k in m]
    if len(given) != 1:
        found = f"found {' and '.join(given)}" if given else "found none"
        c.error(path, f"exactly one key source is needed: jwks_uri, jwks or jwks_file; {found}")
        return None
    key = given[0]
    kpath = (*path, key)
    if key == "jwks_uri":
        text = _jwks_uri(c, m[key], kpath)
    elif key == "jwks_file":
        text = _jwks_file(c, m[key], kpath)
    else:
        text = _jwks_inline(c, m[key], kpath, algorithms)
    return None if text is None else (key, text)


def _request_authentication(
    c: Checker, value: Any, name: str, namespace: str, where: str
) -> RequestAuthentication | None:
    path: Path = ("spec",)
    m = check_mapping(c, value, path, _AUTHN_FIELDS)
    if m is None:
        return None
    service = required(c, m, path, "service", parse_name)
    ppath = (*path, "providers")
    empty = "accepts no token; give at least one provider"
    items = required_list(c, m, path, "providers", "providers", empty=empty)
    providers: list[JwtProvider] = []
    ok = bool(items)
    names: dict[str, int] = {}
    issuers: dict[str, int] = {}
    for i, item in enumerate(items):
        provider = _provider(c, item, (*ppath, i))
        if provider is None:
            ok = False
            continue
        if provider.name in names:
            c.error(
                (*ppath, i, "name"),
                f"provider {provider.name!r} is already defined at [{names[provider.name]}]",
            )
            ok = False
        elif provider.issuer in issuers:
            c.error(
                (*ppath, i, "issuer"),
                f"issuer {provider.issuer!r} is already providers[{issuers[provider.issuer]}]'s: "
                "a token's issuer picks its provider, so each issuer has one",
            )
            ok = False
        names.setdefault(provider.name, i)
        issuers.setdefault(provider.issuer, i)
        providers.append(provider)
    if service is None or not ok:
        return None
    return RequestAuthentication(name, namespace, service, tuple(providers), source=where)


# --- AuthorizationPolicy ---------------------------------------------------------------

_AUTHZ_FIELDS = ("service", "action", "dry_run", "rules")
_RULE_FIELDS = ("name", "from", "to", "when")
_CONDITION_FIELDS = ("key", "values", "not_values")
_action = choice(ACTIONS)


def _pattern_list(
    parse: Callable[[Checker, Any, Path], str | None], what: str
) -> Callable[[Checker, Any, Path], Any]:
    return lambda c, v, p: _strings(c, v, p, what, parse)


def _with_negations(parsers: dict[str, Parser]) -> dict[str, Parser]:
    """Each field followed by its `not_` twin, which takes the same values."""
    return {key: parse for field, parse in parsers.items() for key in (field, f"not_{field}")}


_SOURCE_PARSERS = _with_negations(
    {
        "identities": _pattern_list(_identity, "SPIFFE IDs"),
        "services": _pattern_list(_label_pattern("service"), "service names"),
        "namespaces": _pattern_list(_label_pattern("namespace"), "namespaces"),
        "principals": _pattern_list(_principal, "principals"),
        "ip_blocks": _cidrs,
    }
)
_OPERATION_PARSERS = _with_negations(
    {"methods": _methods, "paths": _pattern_list(_path_pattern, "paths"), "ports": _ports}
)


def _source(c: Checker, value: Any, path: Path) -> Source | None:
    empty = "an empty source matches every caller; omit 'from' instead"
    parsed = _clause(c, value, path, _SOURCE_PARSERS, empty)
    return None if parsed is None else Source(**parsed)


def _operation(c: Checker, value: Any, path: Path) -> Operation | None:
    empty = "an empty operation matches every request; omit 'to' instead"
    parsed = _clause(c, value, path, _OPERATION_PARSERS, empty)
    return None if parsed is None else Operation(**parsed)


def _clause(
    c: Checker, value: Any, path: Path, parsers: dict[str, Parser], empty: str
) -> dict[str, Any] | None:
    """The fields of a `from` or `to` item; None if any is invalid, or there is none
    (an empty one would match everything, so `empty` says to leave it out)."""
    m = check_mapping(c, value, path, parsers)
    if m is None:
        return None
    if not m and isinstance(value, Mapping) and not value:
        c.error(path, empty)
        return None
    parsed = {k: parsers[k](c, v, (*path, k)) for k, v in m.items()}
    if any(v is None for v in parsed.values()) or not m:
        return None
    return parsed


_HEADER_KEY = re.compile(r"request\.headers\[([^\[\]]*)\]")
_CLAIM_KEY = re.compile(r"request\.auth\.claims((?:\[[^\[\]]*\])+)")
_PLAIN_KEYS = {
    "request.auth.principal": "principal",
    "request.auth.audiences": "audiences",
    "request.auth.presenter": "presenter",
    "source.ip": "source_ip",
    "source.principal": "source_principal",
    "source.namespace": "source_namespace",
    "source.service": "source_service",
    "destination.port": "destination_port",
}


def _condition_key(
    c: Checker, value: Any, path: Path
) -> tuple[str, str, str, tuple[str, ...]] | None:
    """(key, kind, arg, claim_path) from `request.headers[x]`, `request.auth.claims[a][b.c]`..."""
    text = parse_string(c, value, path)
    if text is None:
        return None
    if text in _PLAIN_KEYS:
        return text, _PLAIN_KEYS[text], "", ()
    if m := _HEADER_KEY.fullmatch(text):
        name = m[1]
        if not TOKEN_RE.fullmatch(name):
            c.error(path, f"invalid header name {name!r} in {text!r}")
            return None
        if (why := _unseen_header(name.lower())) is not None:
            c.error(path, why)
            return None
        return text, "header", name.lower(), ()
    if m := _CLAIM_KEY.fullmatch(text):
        segments = tuple(m[1][1:-1].split("]["))
        if any(not s or s.startswith(".") or s.endswith(".") or ".." in s for s in segments):
            c.error(path, f"invalid claim path in {text!r}: empty names, or a dot at an end")
            return None
        return text, "claim", ".".join(segments), segments
    known = ", ".join(CONDITION_KEYS)
    # Suggest on the part before any bracket and keep the bracket: request.header[x] -> request.headers[x].
    base, bracket, rest = text.partition("[")
    takes_arg = {k.partition("[")[0]: "[" in k for k in CONDITION_KEYS}
    close = difflib.get_close_matches(base, list(takes_arg), n=1, cutoff=0.6)
    hint = ""
    if close:
        guess = close[0] + (bracket + rest if takes_arg[close[0]] else "")
        hint = f" (did you mean {guess!r}?)"
    c.error(path, f"unknown key {text!r}{hint}; the keys are {known}")
    return None


def _port_value(c: Checker, value: Any, path: Path) -> str | None:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        expected(c, path, "a port number (destination.port compares the inbound port)", value)
        return None
    port = _port(c, value, path)
    return None if port is None else str(port)


def _condition(c: Checker, value: Any, path: Path) -> Condition | None:
    m = check_mapping(c, value, path, _CONDITION_FIELDS)
    if m is None:
        return None
    key = required(c, m, path, "key", _condition_key)
    if "values" not in m and "not_values" not in m:
        c.error(path, "values or not_values is needed")
        return None
    if key is None:
        return None
    text, kind, arg, claim_path = key
    parsed: dict[str, Any] = {}
    ok = True
    for field in ("values", "not_values"):
        if field not in m:
            continue
        fpath = (*path, field)
        if kind == "source_ip":
            nets = _cidrs(c, m[field], fpath)
            ok = ok and nets is not None
            # The networks decide; `values` keep their canonical text for messages and /config.
            parsed["networks" if field == "values" else "not_networks"] = nets or ()
            parsed[field] = tuple(str(n) for n in nets or ())
            continue
        parse = _port_value if kind == "destination_port" else _value_pattern
        values = _strings(c, m[field], fpath, "values", parse)
        ok = ok and values is not None
        parsed[field] = values or ()
    if not ok:
        return None
    return Condition(text, kind, arg, claim_path, **parsed)  # type: ignore[arg-type]


def _parts(
    c: Checker, m: Mapping[str, Any], path: Path, key: str, parse: Any, what: str
) -> tuple[Any, ...] | None:
    if key not in m:
        return ()
    empty = f"matches nothing; omit '{key}' to match any"
    parsed = all_items(c, m[key], (*path, key), what, parse, empty=empty)
    return None if parsed is None else tuple(parsed)


def _named_items(
    c: Checker, items: list[Any], path: Path, parse: Callable[..., Any], what: str
) -> tuple[list[Any], bool]:
    """Each item through `parse(c, item, path, index)`; whether all parsed, names unique.

    `parse` names an unnamed item by its index ('rule-2'), so every item has a name.
    """
    out: list[Any] = []
    ok = True
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        parsed = parse(c, item, (*path, i), i)
        if parsed is None:
            ok = False
            continue
        if name_reused(c, seen, parsed.name, path, i, what):
            ok = False
        out.append(parsed)
    return out, ok


def _authz_rule(c: Checker, value: Any, path: Path, index: int) -> AuthorizationRule | None:
    m = check_mapping(c, value, path, _RULE_FIELDS)
    if m is None:
        return None
    name = parse_name(c, m["name"], (*path, "name")) if "name" in m else f"rule-{index}"
    sources = _parts(c, m, path, "from", _source, "sources")
    operations = _parts(c, m, path, "to", _operation, "operations")
    conditions = _parts(c, m, path, "when", _condition, "conditions ({key, values})")
    if name is None or sources is None or operations is None or conditions is None:
        return None
    return AuthorizationRule(name, sources, operations, conditions)


def _authorization_policy(
    c: Checker, value: Any, name: str, namespace: str, where: str
) -> AuthorizationPolicy | None:
    path: Path = ("spec",)
    m = check_mapping(c, value, path, _AUTHZ_FIELDS)
    if m is None:
        return None
    service = required(c, m, path, "service", parse_name)
    action = _action(c, m["action"], (*path, "action")) if "action" in m else "ALLOW"
    dry_run = parse_boolean(c, m["dry_run"], (*path, "dry_run")) if "dry_run" in m else False
    rpath = (*path, "rules")
    items = check_list(c, m["rules"], rpath, "rules") if "rules" in m else []
    rules, ok = _named_items(c, items, rpath, _authz_rule, "rule")
    if (
        not items
        and action in ("DENY", "AUDIT")
        and ("rules" not in m or isinstance(m["rules"], list))
    ):
        c.error(
            rpath,
            f"a {action} policy with no rules matches nothing; give rules (to deny "
            "everything by default, write an ALLOW policy with no rules instead)",
        )
        ok = False
    if service is None or action is None or dry_run is None or not ok:
        return None
    return AuthorizationPolicy(
        name, namespace, service, action, tuple(rules), dry_run, source=where
    )  # type: ignore[arg-type]


# --- RateLimit ---------------------------------------------------------------------------

_RATE_FIELDS = ("service", "limits")
_LIMIT_FIELDS = ("name", "key", "requests_per_second", "burst", "overrides", "route", "max_keys")
_OVERRIDE_FIELDS = ("key_value", "requests_per_second", "burst")
_SELECTOR_FIELDS = ("methods", "paths")
_KEY_NAMES = ("service", "source_identity", "client_ip")
_rate = number(0)
_burst = integer(1)
_max_keys = integer(1, 10_000_000)


def _rps(c: Checker, value: Any, path: Path) -> float | None:
    rate = _rate(c, value, path)
    if rate == 0:
        c.error(
            path, "must be greater than 0 (to refuse every request, use an AuthorizationPolicy)"
        )
        return None
    return rate


_KEY_ALIASES = {"ip": "client_ip", "source_ip": "client_ip", "identity": "source_identity"}
_KEY_CHOICES = "service, source_identity, client_ip or {header: NAME}"


def _rate_key(c: Checker, value: Any, path: Path) -> RateKey | None:
    if isinstance(value, str):
        if value in _KEY_NAMES:
            return RateKey(value)  # type: ignore[arg-type]
        close = _KEY_ALIASES.get(value)
        hint = f" (did you mean {close!r}?)" if close else did_you_mean(value, _KEY_NAMES)
        if value == "header":
            hint = " (a header key names its header: {header: x-api-key})"
        c.error(path, f"expected {_KEY_CHOICES}, found {describe(value)}{hint}")
        return None
    if isinstance(value, Mapping):
        m = check_mapping(c, value, path, ("header",))
        if m is None or "header" not in m:
            if m is not None:
                c.error((*path, "header"), "required field is missing")
            return None
        header = parse_header_name(c, m["header"], (*path, "header"))
        if header is not None and (why := _unseen_header(header)) is not None:
            c.error((*path, "header"), why)
            return None
        return None if header is None else RateKey("header", header)
    expected(c, path, _KEY_CHOICES, value)
    return None


def _overrides(c: Checker, value: Any, path: Path) -> tuple[RateOverride, ...] | None:
    items = check_list(c, value, path, "overrides", empty="overrides nothing; omit it")
    out: list[RateOverride] = []
    ok = bool(items)
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        ipath = (*path, i)
        m = check_mapping(c, item, ipath, _OVERRIDE_FIELDS)
        if m is None:
            ok = False
            continue
        key = required(c, m, ipath, "key_value", parse_string)
        rps = required(c, m, ipath, "requests_per_second", _rps)
        burst = (
            _burst(c, m["burst"], (*ipath, "burst"))
            if "burst" in m
            else (math.ceil(rps) if rps else None)
        )
        if key is None or rps is None or burst is None:
            ok = False
            continue
        if key in seen:
            c.error((*ipath, "key_value"), f"{key!r} is already overridden at [{seen[key]}]")
            ok = False
            continue
        seen[key] = i
        out.append(RateOverride(key, rps, burst))
    return tuple(out) if ok else None


def _selector(c: Checker, value: Any, path: Path) -> RequestSelector | None:
    m = check_mapping(c, value, path, _SELECTOR_FIELDS)
    if m is None:
        return None
    if not m:
        c.error(path, "an empty route selects every request; omit 'route' instead")
        return None
    methods = _methods(c, m["methods"], (*path, "methods")) if "methods" in m else frozenset()
    paths = (
        _strings(c, m["paths"], (*path, "paths"), "paths", _path_pattern) if "paths" in m else ()
    )
    if methods is None or paths is None:
        return None
    return RequestSelector(methods, paths)


def _limit(c: Checker, value: Any, path: Path, index: int) -> RateLimitRule | None:
    m = check_mapping(c, value, path, _LIMIT_FIELDS)
    if m is None:
        return None
    before = len(c.problems)
    name = parse_name(c, m["name"], (*path, "name")) if "name" in m else f"limit-{index}"
    rps = required(c, m, path, "requests_per_second", _rps)
    burst = _burst(c, m["burst"], (*path, "burst")) if "burst" in m else None
    key = _rate_key(c, m["key"], (*path, "key")) if "key" in m else RateKey()
    kw: dict[str, Any] = {}
    if "overrides" in m:
        kw["overrides"] = _overrides(c, m["overrides"], (*path, "overrides"))
        if key is not None and key.kind == "service":
            c.error(
                (*path, "overrides"),
                "a limit keyed by service has one bucket, no key values to override; "
                "set key: source_identity, client_ip or {header: NAME}",
            )
    if "route" in m:
        kw["route"] = _selector(c, m["route"], (*path, "route"))
    if "max_keys" in m:
        kw["max_keys"] = _max_keys(c, m["max_keys"], (*path, "max_keys"))
    if len(c.problems) != before or name is None or rps is None or key is None:
        return None
    # One second's worth by default, at least one token.
    burst = burst if burst is not None else max(1, math.ceil(rps))
    return RateLimitRule(name, rps, burst, key, **kw)


def _rate_limit(c: Checker, value: Any, name: str, namespace: str, where: str) -> RateLimit | None:
    path: Path = ("spec",)
    m = check_mapping(c, value, path, _RATE_FIELDS)
    if m is None:
        return None
    service = required(c, m, path, "service", parse_name)
    empty = "limits nothing; give at least one"
    items = required_list(c, m, path, "limits", "limits", empty=empty)
    limits, ok = _named_items(c, items, (*path, "limits"), _limit, "limit")
    if service is None or not items or not ok:
        return None
    return RateLimit(name, namespace, service, tuple(limits), source=where)


# --- across objects -------------------------------------------------------------------------


@dataclass(slots=True)
class _Found:
    obj: Any  # RequestAuthentication | AuthorizationPolicy | RateLimit
    where: str
    c: Checker


_ONE_PER_SERVICE = {
    "RequestAuthentication": "list every provider of the service in one RequestAuthentication",
    "RateLimit": "put every limit of the service in one RateLimit",
}


class SecurityCollector:
    """Security manifests of one policy set, parsed and cross-checked.

    `add` takes one manifest's spec (the envelope already checked by the
    caller); `check` runs the rules that span objects; `result` is every
    service's `SecurityPolicies`, meaningful only if no problem was recorded.
    """

    __slots__ = ("authn", "authz", "problems", "rates")

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        self.authn: dict[ServiceKey, _Found] = {}
        self.rates: dict[ServiceKey, _Found] = {}
        self.authz: dict[ServiceKey, list[_Found]] = {}

    def add(
        self, c: Checker, kind: str, spec: Any, name: str | None, namespace: str, where: str
    ) -> None:
        parse = {
            "RequestAuthentication": _request_authentication,
            "AuthorizationPolicy": _authorization_policy,
            "RateLimit": _rate_limit,
        }[kind]
        obj = parse(c, spec, name or "", namespace, where)
        if obj is None or name is None:
            return
        key = (namespace, obj.service)
        found = _Found(obj, where, c)
        if kind == "AuthorizationPolicy":
            self.authz.setdefault(key, []).append(found)
            return
        table = self.authn if kind == "RequestAuthentication" else self.rates
        first = table.get(key)
        if first is None:
            table[key] = found
            return
        c.error(
            ("spec", "service"),
            f"{kind} {name!r} is a second {kind} for service {obj.service!r} in namespace "
            f"{namespace!r}: {kind} {first.obj.name!r} ({first.where}) already covers it; "
            f"{_ONE_PER_SERVICE[kind]}",
        )

    def check(self) -> None:
        """Rules matching request principals or JWT claims need a RequestAuthentication:
        without one no request has them, so the rule could never match."""
        for key, policies in self.authz.items():
            if key in self.authn:
                continue
            for found in policies:
                for i, rule in enumerate(found.obj.rules):
                    what = _needs_token(rule)
                    if what is not None:
                        found.c.error(
                            ("spec", "rules", i),
                            f"rule {rule.name!r} matches {what}, but service {key[1]!r} has no "
                            f"RequestAuthentication in namespace {key[0]!r}: no request carries "
                            "a verified token, so the rule can never match",
                        )

    def result(self) -> Mapping[ServiceKey, SecurityPolicies]:
        keys = set(self.authn) | set(self.rates) | set(self.authz)
        out = {}
        for key in sorted(keys):
            authn, rate = self.authn.get(key), self.rates.get(key)
            authz = sorted(
                (f.obj for f in self.authz.get(key, ())), key=lambda p: (p.namespace, p.name)
            )
            out[key] = SecurityPolicies(
                authentication=authn.obj if authn else None,
                authorization=tuple(authz),
                rate_limit=rate.obj if rate else None,
            )
        return MappingProxyType(out)


def _needs_token(rule: AuthorizationRule) -> str | None:
    if any(s.principals for s in rule.sources):
        return "request principals"
    for cond in rule.conditions:
        if cond.values and cond.kind in ("claim", "principal", "audiences", "presenter"):
            return f"{cond.key}"
    return None


# --- back to data, for /config -------------------------------------------------------------------


def security_to_manifests(sec: SecurityPolicies) -> list[dict[str, Any]]:
    """One service's security policies as manifests; the loader gives back equal
    objects (except `source`). Inline JWKS are written out: they hold public keys only."""
    out = []
    if sec.authentication is not None:
        a = sec.authentication
        spec = {"service": a.service, "providers": [_provider_json(p) for p in a.providers]}
        out.append(envelope("RequestAuthentication", a.name, a.namespace, spec))
    for p in sec.authorization:
        spec = {
            "service": p.service,
            "action": p.action,
            "dry_run": p.dry_run,
            "rules": [_rule_json(r) for r in p.rules],
        }
        out.append(envelope("AuthorizationPolicy", p.name, p.namespace, spec))
    if sec.rate_limit is not None:
        r = sec.rate_limit
        spec = {"service": r.service, "limits": [_limit_json(lim) for lim in r.limits]}
        out.append(envelope("RateLimit", r.name, r.namespace, spec))
    return out


def _provider_json(p: JwtProvider) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.name, "issuer": p.issuer}
    if p.jwks_uri is not None:
        out["jwks_uri"] = p.jwks_uri
    elif p.jwks_file is not None:
        out["jwks_file"] = p.jwks_file
    elif p.jwks is not None:
        out["jwks"] = json.loads(p.jwks)
    out |= {
        "audiences": list(p.audiences),
        "algorithms": list(p.algorithms),
        "from_headers": [{"name": h.name, "prefix": h.prefix} for h in p.from_headers],
        "from_params": list(p.from_params),
        "from_cookies": list(p.from_cookies),
        "forward_original_token": p.forward_original_token,
        "claims_to_headers": [{"claim": x.claim, "header": x.header} for x in p.claims_to_headers],
        "clock_skew": p.clock_skew,
        "required": p.required,
        "jwks_refresh": p.jwks_refresh,
        "jwks_min_refresh": p.jwks_min_refresh,
        "jwks_timeout": p.jwks_timeout,
    }
    # Empty lists are how the model says "absent"; the loader refuses them written out.
    return {k: v for k, v in out.items() if v != [] or k == "from_headers"}


def _rule_json(r: AuthorizationRule) -> dict[str, Any]:
    out: dict[str, Any] = {"name": r.name}
    if r.sources:
        out["from"] = [_fields_json(s) for s in r.sources]
    if r.operations:
        out["to"] = [_fields_json(op) for op in r.operations]
    if r.conditions:
        out["when"] = [_condition_json(cond) for cond in r.conditions]
    return out


def _fields_json(obj: Source | Operation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not value:
            continue
        if isinstance(value, frozenset):
            out[f.name] = sorted(value)
        else:
            out[f.name] = [str(v) for v in value]
    return out


def _condition_json(cond: Condition) -> dict[str, Any]:
    out: dict[str, Any] = {"key": cond.key}
    if cond.values:
        out["values"] = list(cond.values)
    if cond.not_values:
        out["not_values"] = list(cond.not_values)
    return out


def _limit_json(lim: RateLimitRule) -> dict[str, Any]:
    key: Any = {"header": lim.key.header} if lim.key.kind == "header" else lim.key.kind
    out: dict[str, Any] = {
        "name": lim.name,
        "key": key,
        "requests_per_second": lim.requests_per_second,
        "burst": lim.burst,
        "max_keys": lim.max_keys,
    }
    if lim.overrides:
        out["overrides"] = [
            {
                "key_value": o.key_value,
                "requests_per_second": o.requests_per_second,
                "burst": o.burst,
            }
            for o in lim.overrides
        ]
    if lim.route is not None:
        route: dict[str, Any] = {}
        if lim.route.methods:
            route["methods"] = sorted(lim.route.methods)
        if lim.route.paths:
            route["paths"] = list(lim.route.paths)
        out["route"] = route
    return out
