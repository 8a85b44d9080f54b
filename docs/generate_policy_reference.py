#!/usr/bin/env python3
"""Generate the field tables of docs/policy-reference.md from the policy model.

    .venv/bin/python docs/generate_policy_reference.py           rewrite the tables in place
    .venv/bin/python docs/generate_policy_reference.py --check   exit 1, with a diff, if out of date

Both also exit 1 while a row still has TODO cells or an Example the loader
refuses, and 2 when the tables cannot be generated (the spec below and the
code disagree: the message says where).

Every table of fields in the reference sits between two comments:

    <!-- fields: rule -->
    | Field | Type | Default | Example | Meaning |
    ...
    <!-- /fields -->

Three columns are derived here from the code, because they are what a hand-kept
table gets wrong when the code moves on:

- Field: exactly the names the loader accepts at that place in a manifest. They
  are read from the loader itself (a probe field it does not know makes it list
  the ones it does), so a field added to or removed from the loader changes the
  table, and a documented field the loader refuses is an error here.
- Default: the model's dataclass default, written as YAML would write it
  (`250ms`, `[connect-failure, refused, reset]`), **required** where the field
  must be given, or a sentence kept in `TABLES` where the loader computes the
  default (`rule-<index>`).
- Type: written in `TABLES` per field and checked against the dataclass
  annotation of the attribute that holds it (a duration must be a float field;
  a choice lists the model's `Literal`). Every dataclass field of the model is
  either documented or named internal.

Example and Meaning are prose: the generator keeps them from the markdown (a row
is matched by the field names in its Field cell), so edit them there. A field
new to the loader arrives with TODO in both, which `--check` refuses. Every
Example is loaded through the real loader at the place `Table.host` says, so an
example that stops validating fails the check; tests/docs/ runs all of it.

Nothing in lepton_mesh imports this file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import re
import sys
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lepton_mesh.policy import security, traffic
from lepton_mesh.policy.errors import Problem
from lepton_mesh.policy.security import SecurityPolicies
from lepton_mesh.policy.traffic import TrafficPolicies
from lepton_mesh.policy.traffic_loader import API_VERSION, KINDS, collect_policies
from lepton_mesh.policy.yaml_source import Document

DOC = Path(__file__).with_name("policy-reference.md")
COMMAND = ".venv/bin/python docs/generate_policy_reference.py"
TODO = "TODO"
COLUMNS = ("Field", "Type", "Default", "Example", "Meaning")
KEPT = ("Example", "Meaning")  # the columns written by hand, kept from the markdown

Loaded = tuple[TrafficPolicies, Mapping[tuple[str, str], SecurityPolicies]]
PathKey = tuple[str | int, ...]


class GenerationError(Exception):
    """The tables cannot be generated: the spec below and the code disagree."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --- value kinds: the Type cell, the annotation it needs, how a default is written


def _duration_text(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0 and seconds > 60:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def _plain(value: Any) -> str:
    """A scalar or a collection of scalars as YAML flow text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value) if isinstance(value, (frozenset, set)) else value
        return "[" + ", ".join(_plain(v) for v in items) + "]"
    return str(value)


def _code(text: str) -> str:
    return f"`{text}`"


def _default_cell(value: Any, fmt: Callable[[Any], str]) -> str:
    """None and empty collections read as "none"; anything else as code."""
    if value is None or (isinstance(value, (tuple, frozenset)) and not value):
        return "none"
    return _code(fmt(value))


@dataclass(frozen=True)
class Kind:
    """What a field holds. `annotation` is a regex the model's annotation must
    fullmatch once an optional `| None` is removed."""

    text: str
    annotation: str
    fmt: Callable[[Any], str] = _plain


NAME = Kind("name", "str")
STRING = Kind("string", "str")
BOOLEAN = Kind("boolean", "bool")
PERCENT = Kind("percent", "float")
DURATION = Kind("duration ≥ 0", "float", _duration_text)
POSITIVE_DURATION = Kind("duration > 0", "float", _duration_text)
METHODS = Kind("list of methods", r"frozenset\[str\]")
PATTERNS = Kind("list of patterns", r"tuple\[str, \.\.\.\]")
STRINGS = Kind("list of strings", r"tuple\[str, \.\.\.\]")


def integer(lo: int, hi: int | None = None) -> Kind:
    return Kind(f"integer {lo}\u2013{hi}" if hi is not None else f"integer ≥ {lo}", "int")


def number(bound: str) -> Kind:
    return Kind(f"number {bound}", "float")


def choice(values: Sequence[str], annotation: str = "str") -> Kind:
    shown = [_code(v) for v in values]
    text = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + f" or {shown[-1]}"
    return Kind(text, annotation)


def literal(alias: Any, annotation: str) -> Kind:
    """A choice whose values are the model's `Literal` alias, in its order."""
    return choice(typing.get_args(alias), annotation)


def shape(text: str, annotation: str, fmt: Callable[[Any], str] = _plain) -> Kind:
    """A structured value: the Type cell says its shape in words."""
    return Kind(text, annotation, fmt)


def list_of(text: str, item: str) -> Kind:
    return Kind(text, rf"tuple\[{item}, \.\.\.\]")


def _token_headers(value: tuple[security.TokenHeader, ...]) -> str:
    return "[" + ", ".join(f'{{name: {h.name}, prefix: "{h.prefix}"}}' for h in value) + "]"


def _backoff(value: traffic.Backoff) -> str:
    return f"{{base: {_duration_text(value.base)}, max: {_duration_text(value.max)}}}"


# --- the tables ---------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One row. `names` are the YAML names it documents (a field and its `not_`
    form, or alternatives); `attrs` the model attributes holding them (dotted
    through nested dataclasses), None where the model has none. `default` is the
    Default cell when the model's own default is not what the loader applies;
    `context` holds sibling fields an Example needs to be valid."""

    names: tuple[str, ...]
    kind: Kind
    attrs: tuple[str, ...] | None = ()
    default: str | None = None
    required: bool = False
    context: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cell(self) -> str:
        return ", ".join(_code(n) for n in self.names)

    @property
    def key(self) -> frozenset[str]:
        return frozenset(self.names)

    def model_attrs(self) -> tuple[str, ...]:
        if self.attrs is None:
            return ()
        return self.attrs or self.names


def f(
    names: str | tuple[str, ...],
    kind: Kind,
    attrs: str | tuple[str, ...] | None = (),
    **kw: Any,
) -> Field:
    names = (names,) if isinstance(names, str) else names
    attrs = (attrs,) if isinstance(attrs, str) else attrs
    return Field(names, kind, attrs, **kw)


def _manifest(kind: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


@dataclass(frozen=True)
class Host:
    """A valid manifest set with the table's mapping at `path` of manifest `at`.

    The mapping found there is the table's base: every field a valid object
    needs, nothing more. Examples are tried by putting them in its place.
    """

    manifests: tuple[Mapping[str, Any], ...]
    path: PathKey
    at: int = 0

    def base(self) -> dict[str, Any]:
        node: Any = self.manifests[self.at]
        for key in self.path:
            node = node[key]
        return dict(node)

    def with_fields(
        self, fields: Mapping[str, Any], drop: Iterable[str] = (), under: PathKey = ()
    ) -> list[dict[str, Any]]:
        """The manifests with `drop` removed from, then `fields` put into, the
        mapping at `path` + `under`."""
        manifests = [copy.deepcopy(dict(m)) for m in self.manifests]
        node: Any = manifests[self.at]
        for key in (*self.path, *under):
            node = node[key]
        for name in drop:
            node.pop(name, None)
        node.update(copy.deepcopy(dict(fields)))
        return manifests


@dataclass(frozen=True)
class Table:
    id: str
    model: type | None
    fields: tuple[Field, ...]
    host: Host
    pick: Callable[[Loaded], Any]
    nested: tuple[str, ...] = ()  # fields documented by their own fields (`metadata.name`)
    internal: frozenset[str] = frozenset({"name", "namespace", "source"})

    def row(self, key: frozenset[str]) -> Field | None:
        return next((fd for fd in self.fields if fd.key == key), None)


# Valid neighbours for the hosts below.
_SUBSETS = [
    {"name": "v1", "labels": {"version": "v1"}},
    {"name": "v2", "labels": {"version": "v2"}},
]
_DIALOG_POLICY = _manifest(
    "DestinationPolicy", "dialog", {"service": "dialog", "subsets": _SUBSETS}
)
_PROVIDER = {
    "name": "corp-idp",
    "issuer": "https://idp.example.com",
    "jwks_uri": "https://idp.example.com/.well-known/jwks.json",
    "algorithms": ["RS256"],
}
_INTENT_AUTHN = _manifest(
    "RequestAuthentication", "intent", {"service": "intent", "providers": [_PROVIDER]}
)
_INTENT = ("default", "intent")


def _route_host(rule: Mapping[str, Any], path: PathKey) -> Host:
    route = _manifest("Route", "dialog", {"destination": "dialog", "rules": [dict(rule)]})
    return Host((route, _DIALOG_POLICY), ("spec", "rules", 0, *path))


def _dialog_host(spec: Mapping[str, Any], path: PathKey) -> Host:
    return Host(
        (_manifest("DestinationPolicy", "dialog", {"service": "dialog", **spec}),), ("spec", *path)
    )


def _authz_host(rule: Mapping[str, Any], path: PathKey, *, in_spec: bool = False) -> Host:
    policy = _manifest(
        "AuthorizationPolicy", "intent-callers", {"service": "intent", "rules": [dict(rule)]}
    )
    return Host((policy, _INTENT_AUTHN), ("spec",) if in_spec else ("spec", "rules", 0, *path))


def _limit_host(limit: Mapping[str, Any], path: PathKey) -> Host:
    policy = _manifest("RateLimit", "intent", {"service": "intent", "limits": [dict(limit)]})
    return Host((policy,), ("spec", "limits", 0, *path))


def _rule(loaded: Loaded) -> traffic.RouteRule:
    return loaded[0].routes["dialog"].rules[0]


def _authz_rule(loaded: Loaded) -> security.AuthorizationRule:
    return loaded[1][_INTENT].authorization[0].rules[0]


def _limit(loaded: Loaded) -> security.RateLimitRule:
    rate_limit = loaded[1][_INTENT].rate_limit
    assert rate_limit is not None
    return rate_limit.limits[0]


_RULE_LIST = list_of("list of rules", "RouteRule")
_RETRY = shape("retry policy", "RetryPolicy")
_HEADER_OPS = shape("header edits", "HeaderOps")
_HEADER_PAIRS = r"tuple\[tuple\[str, str\], \.\.\.\]"
_ENDPOINT_LIST = list_of("list", "Endpoint")

TABLES: tuple[Table, ...] = (
    Table(
        "envelope",
        None,
        (
            f("apiVersion", choice([API_VERSION]), None, required=True),
            f("kind", choice(KINDS), None, required=True),
            f("metadata.name", NAME, None, required=True),
            f("metadata.namespace", NAME, None, default=_code("default")),
            f(
                ("metadata.labels", "metadata.annotations"),
                shape("mapping of strings", ""),
                None,
                default="none",
            ),
            f("spec", shape("mapping", ""), None, required=True),
        ),
        Host((_manifest("Route", "dialog", {"destination": "dialog", "rules": [{}]}),), ()),
        lambda loaded: loaded[0].routes["dialog"],
        nested=("metadata",),
    ),
    Table(
        "route",
        traffic.Route,
        (
            f("destination", NAME, required=True),
            f("rules", _RULE_LIST, required=True, default="**required**, non-empty"),
        ),
        Host((_manifest("Route", "dialog", {"destination": "dialog", "rules": [{}]}),), ("spec",)),
        lambda loaded: loaded[0].routes["dialog"],
    ),
    Table(
        "rule",
        traffic.RouteRule,
        (
            f("name", NAME, default="`rule-<index>` (`rule-0` first)"),
            f(
                "match",
                list_of("list of alternatives", "RouteMatch"),
                "matches",
                default="match everything",
            ),
            f(
                "backends",
                list_of("list of backends", "Backend"),
                default="the destination, no subset, weight 100",
            ),
            f("timeout", DURATION, default="the DestinationPolicy's `timeout`"),
            f("retry", _RETRY, default="the DestinationPolicy's `retry`"),
            f("request_headers", _HEADER_OPS, default="none"),
            f("response_headers", _HEADER_OPS, default="none"),
            f("fault", shape("fault", "Fault")),
            f("mirror", shape("mirror", "Mirror")),
        ),
        _route_host({}, ()),
        _rule,
        internal=frozenset(),
    ),
    Table(
        "match",
        traffic.RouteMatch,
        (
            f(
                "path",
                shape("`{exact: P}`, `{prefix: P}` or `{regex: R}`", "PathMatch"),
                default="any path",
            ),
            f("methods", METHODS, default="any method"),
            f("headers", list_of("list of conditions", "HeaderMatch")),
            f("query", list_of("list of conditions", "QueryMatch")),
        ),
        _route_host({"match": [{}]}, ("match", 0)),
        lambda loaded: _rule(loaded).matches[0],
    ),
    Table(
        "backend",
        traffic.Backend,
        (
            f("service", NAME, required=True),
            f("subset", NAME, default="none: every endpoint"),
            f("weight", integer(0, 100), default="`100` when it is the only backend"),
        ),
        _route_host({"backends": [{"service": "dialog"}]}, ("backends", 0)),
        lambda loaded: _rule(loaded).backends[0],
    ),
    Table(
        "retry",
        traffic.RetryPolicy,
        (
            f("attempts", integer(1, 10)),
            f("retry_on", shape("list", r"frozenset\[str\]")),
            f(
                "retriable_status_codes",
                shape("list of status codes", r"frozenset\[int\]"),
                context={"retry_on": ["retriable-status-codes"]},
            ),
            f("retriable_methods", METHODS),
            f("per_try_timeout", DURATION),
            f("backoff", shape("`{base, max}` durations", "Backoff", _backoff)),
        ),
        _route_host({"retry": {}}, ("retry",)),
        lambda loaded: _rule(loaded).retry,
    ),
    Table(
        "header-edits",
        traffic.HeaderOps,
        (
            f("set", shape("mapping of header name to string", _HEADER_PAIRS)),
            f("add", shape("mapping of header name to string or list of strings", _HEADER_PAIRS)),
            f("remove", list_of("list of header names", "str")),
        ),
        _route_host({"request_headers": {}}, ("request_headers",)),
        lambda loaded: _rule(loaded).request_headers,
    ),
    Table(
        "fault",
        traffic.Fault,
        (
            f("delay", shape("`{percent, fixed}` (both required)", "FaultDelay")),
            f("abort", shape("`{percent, status}` (both required)", "FaultAbort")),
            f("header_trigger", BOOLEAN),
        ),
        _route_host({"fault": {"header_trigger": True}}, ("fault",)),
        lambda loaded: _rule(loaded).fault,
    ),
    Table(
        "mirror",
        traffic.Mirror,
        (
            f("service", NAME, "backend.service", required=True),
            f("subset", NAME, "backend.subset"),
            f("percent", PERCENT),
        ),
        _route_host({"mirror": {"service": "dialog"}}, ("mirror",)),
        lambda loaded: _rule(loaded).mirror,
    ),
    Table(
        "destination-policy",
        traffic.DestinationPolicy,
        (
            f("service", NAME, required=True),
            f("subsets", list_of("list of `{name, labels}`", "Subset")),
            f("load_balancer", shape("mapping", "LoadBalancer"), default="below"),
            f("timeout", DURATION),
            f("retry", _RETRY, default="the retry defaults above"),
            f("retry_budget", shape("mapping", "RetryBudget"), default="below"),
            f("limits", shape("mapping", "CircuitLimits"), default="below"),
            f(
                "outlier",
                shape("mapping, `null` or `{enabled: false}`", "OutlierDetection"),
                default="below",
            ),
        ),
        _dialog_host({}, ()),
        lambda loaded: loaded[0].destinations["dialog"],
    ),
    Table(
        "load-balancer",
        traffic.LoadBalancer,
        (
            f("algorithm", literal(traffic.Algorithm, "Algorithm")),
            f(
                "hash_on",
                shape("`{header: NAME}`, `{cookie: NAME}` or `{source_ip: true}`", "HashOn"),
                context={"algorithm": "ring_hash"},
            ),
            f("panic_threshold", PERCENT),
            f("locality", BOOLEAN),
        ),
        _dialog_host({"load_balancer": {}}, ("load_balancer",)),
        lambda loaded: loaded[0].destinations["dialog"].load_balancer,
    ),
    Table(
        "retry-budget",
        traffic.RetryBudget,
        (
            f("percent", PERCENT),
            f("min_per_second", number("≥ 0")),
            f("window", POSITIVE_DURATION),
        ),
        _dialog_host({"retry_budget": {}}, ("retry_budget",)),
        lambda loaded: loaded[0].destinations["dialog"].retry_budget,
    ),
    Table(
        "limits",
        traffic.CircuitLimits,
        tuple(
            f(name, integer(1))
            for name in ("max_connections", "max_pending", "max_requests", "max_retries")
        ),
        _dialog_host({"limits": {}}, ("limits",)),
        lambda loaded: loaded[0].destinations["dialog"].limits,
    ),
    Table(
        "outlier",
        traffic.OutlierDetection,
        (
            f("consecutive_5xx", integer(0)),
            f("consecutive_gateway_errors", integer(0)),
            f("base_ejection_time", POSITIVE_DURATION),
            f("max_ejection_time", POSITIVE_DURATION),
            f("max_ejection_percent", PERCENT),
            f("enabled", BOOLEAN, None, default=_code("true")),
        ),
        _dialog_host({"outlier": {}}, ("outlier",)),
        lambda loaded: loaded[0].destinations["dialog"].outlier,
    ),
    Table(
        "external-service",
        traffic.ExternalService,
        (
            f("service", NAME, required=True),
            f("protocol", literal(traffic.ExternalProtocol, "ExternalProtocol")),
            f("endpoints", _ENDPOINT_LIST, required=True, default="**required**, not empty"),
        ),
        Host(
            (
                _manifest(
                    "ExternalService",
                    "payments",
                    {"service": "payments", "endpoints": ["api.payments.example:443"]},
                ),
            ),
            ("spec",),
        ),
        lambda loaded: loaded[0].external["payments"],
    ),
    Table(
        "request-authentication",
        security.RequestAuthentication,
        (
            f("service", NAME, required=True),
            f(
                "providers",
                list_of("list of providers", "JwtProvider"),
                required=True,
                default="**required**, not empty",
            ),
        ),
        Host((_INTENT_AUTHN,), ("spec",)),
        lambda loaded: loaded[1][_INTENT].authentication,
    ),
    Table(
        "provider",
        security.JwtProvider,
        (
            f("name", NAME, required=True),
            f("issuer", STRING, required=True),
            f(
                ("jwks_uri", "jwks", "jwks_file"),
                shape("URL, JWKS or absolute path", "str"),
                required=True,
                default="exactly one **required**",
            ),
            f("algorithms", STRINGS, required=True),
            f("audiences", STRINGS),
            f(
                "from_headers",
                shape(
                    "list of `{name, prefix}` (or a bare name)",
                    r"tuple\[TokenHeader, \.\.\.\]",
                    _token_headers,
                ),
            ),
            f("from_params", STRINGS),
            f("from_cookies", list_of("list of cookie names", "str")),
            f("claims_to_headers", list_of("list of `{claim, header}`", "ClaimToHeader")),
            f("forward_original_token", BOOLEAN),
            f("clock_skew", DURATION),
            f("required", BOOLEAN),
            f("jwks_refresh", POSITIVE_DURATION),
            f("jwks_min_refresh", POSITIVE_DURATION),
            f("jwks_timeout", POSITIVE_DURATION),
        ),
        Host((_INTENT_AUTHN,), ("spec", "providers", 0)),
        lambda loaded: loaded[1][_INTENT].authentication.providers[0],  # type: ignore[union-attr]
    ),
    Table(
        "authorization-policy",
        security.AuthorizationPolicy,
        (
            f("service", NAME, required=True),
            f("action", literal(security.Action, "Action")),
            f("dry_run", BOOLEAN),
            f("rules", list_of("list of rules", "AuthorizationRule")),
        ),
        _authz_host({"from": [{"services": ["chat"]}]}, (), in_spec=True),
        lambda loaded: loaded[1][_INTENT].authorization[0],
    ),
    Table(
        "authorization-rule",
        security.AuthorizationRule,
        (
            f("name", NAME, default="`rule-<index>`"),
            f("from", list_of("list of sources", "Source"), "sources", default="any caller"),
            f(
                "to",
                list_of("list of operations", "Operation"),
                "operations",
                default="any request",
            ),
            f("when", list_of("list of `{key, values, not_values}`", "Condition"), "conditions"),
        ),
        _authz_host({}, ()),
        _authz_rule,
        internal=frozenset(),
    ),
    Table(
        "source",
        security.Source,
        (
            f(("identities", "not_identities"), PATTERNS),
            f(("services", "not_services"), PATTERNS),
            f(("namespaces", "not_namespaces"), PATTERNS),
            f(("principals", "not_principals"), PATTERNS),
            f(("ip_blocks", "not_ip_blocks"), list_of("list of CIDRs", "IPNetwork")),
        ),
        _authz_host({"from": [{"services": ["chat"]}]}, ("from", 0)),
        lambda loaded: _authz_rule(loaded).sources[0],
    ),
    Table(
        "operation",
        security.Operation,
        (
            f(("methods", "not_methods"), METHODS),
            f(("paths", "not_paths"), PATTERNS),
            f(("ports", "not_ports"), shape("list of ports", r"frozenset\[int\]")),
        ),
        _authz_host({"to": [{"methods": ["GET"]}]}, ("to", 0)),
        lambda loaded: _authz_rule(loaded).operations[0],
    ),
    Table(
        "condition",
        security.Condition,
        (
            f("key", shape("a key from the table below", "str"), required=True),
            f("values", PATTERNS, default="none (then `not_values` is required)"),
            f("not_values", PATTERNS),
        ),
        _authz_host(
            {"when": [{"key": "request.headers[x-tenant]", "values": ["acme"]}]}, ("when", 0)
        ),
        lambda loaded: _authz_rule(loaded).conditions[0],
        internal=frozenset({"kind", "arg", "claim_path", "networks", "not_networks"}),
    ),
    Table(
        "rate-limit",
        security.RateLimit,
        (
            f("service", NAME, required=True),
            f(
                "limits",
                list_of("list of limits", "RateLimitRule"),
                required=True,
                default="**required**, not empty",
            ),
        ),
        Host(
            (
                _manifest(
                    "RateLimit",
                    "intent",
                    {"service": "intent", "limits": [{"requests_per_second": 100}]},
                ),
            ),
            ("spec",),
        ),
        lambda loaded: loaded[1][_INTENT].rate_limit,
    ),
    Table(
        "limit",
        security.RateLimitRule,
        (
            f("name", NAME, default="`limit-<index>`"),
            f("requests_per_second", number("> 0"), required=True),
            f("burst", integer(1), default="one second's worth, rounded up (at least 1)"),
            f(
                "key",
                shape(
                    "`service`, `source_identity`, `client_ip` or `{header: NAME}`",
                    "RateKey",
                    lambda k: k.kind,
                ),
            ),
            f(
                "overrides",
                list_of("list of `{key_value, requests_per_second, burst}`", "RateOverride"),
                context={"key": "client_ip"},
            ),
            f("route", shape("`{methods, paths}`", "RequestSelector"), default="every request"),
            f("max_keys", integer(1, 10_000_000)),
        ),
        _limit_host({"requests_per_second": 100}, ()),
        _limit,
        internal=frozenset(),
    ),
    Table(
        "override",
        security.RateOverride,
        (
            f("key_value", STRING, required=True),
            f("requests_per_second", number("> 0"), required=True),
            f("burst", integer(1), default="its `requests_per_second`, rounded up"),
        ),
        _limit_host(
            {
                "requests_per_second": 100,
                "key": "source_identity",
                "overrides": [
                    {
                        "key_value": "spiffe://cluster.local/ns/default/svc/batch",
                        "requests_per_second": 10,
                    }
                ],
            },
            ("overrides", 0),
        ),
        lambda loaded: _limit(loaded).overrides[0],
    ),
    Table(
        "request-selector",
        security.RequestSelector,
        (
            f("methods", METHODS, default="any method"),
            f("paths", PATTERNS, default="any path"),
        ),
        _limit_host({"requests_per_second": 100, "route": {"methods": ["POST"]}}, ("route",)),
        lambda loaded: _limit(loaded).route,
    ),
)


# --- reading the loader and the model ---------------------------------------------------


def load(manifests: Sequence[Mapping[str, Any]]) -> tuple[Loaded, list[Problem]]:
    """The manifests through the real loader, as one set: (result, problems)."""
    problems: list[Problem] = []
    entries = [(Document(f"manifests[{i}]", m, {}), ()) for i, m in enumerate(manifests)]
    return collect_policies(entries, problems), problems


_PROBE = "qqqqqqqq"  # a field name nothing is close to, so the loader lists what it takes
_ACCEPTED = re.compile(r"unknown field '" + _PROBE + r"'; expected one of: (.*)")


def accepted_fields(table: Table) -> list[str]:
    """The field names the loader accepts at the table's place, in its order."""
    out: list[str] = []
    for prefix in ((), *((n,) for n in table.nested)):
        names = _probe(table, prefix)
        dotted = [".".join((*prefix, n)) for n in names]
        out += [n for n in dotted if n not in table.nested]
    return out


def _probe(table: Table, under: PathKey) -> list[str]:
    _, problems = load(table.host.with_fields({_PROBE: 1}, under=under))
    for p in problems:
        if m := _ACCEPTED.fullmatch(p.message):
            return m[1].split(", ")
    raise GenerationError(
        [
            f"{table.id}: the loader did not list its fields for {_PROBE!r}: {[str(p) for p in problems]}"
        ]
    )


def _module_class(owner: type, annotation: str) -> type:
    name = _strip_none(annotation)
    cls = vars(sys.modules[owner.__module__]).get(name)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise GenerationError([f"{owner.__name__}: cannot follow {annotation!r} to a dataclass"])
    return cls


def _strip_none(annotation: str) -> str:
    return re.sub(r"\s*\|\s*None$", "", annotation.strip())


def model_field(model: type, attr: str) -> dataclasses.Field[Any]:
    """The dataclass field at a dotted attribute path (`backend.subset`)."""
    owner = model
    *through, last = attr.split(".")
    for name in through:
        owner = _module_class(owner, _fields(owner)[name].type)  # type: ignore[arg-type]
    try:
        return _fields(owner)[last]
    except KeyError:
        raise GenerationError([f"{owner.__name__} has no field {last!r}"]) from None


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {fd.name: fd for fd in dataclasses.fields(cls)}


def model_default(model: type, attr: str) -> Any:
    """The dataclass default at `attr`; `dataclasses.MISSING` if there is none."""
    fd = model_field(model, attr)
    if fd.default is not dataclasses.MISSING:
        return fd.default
    if fd.default_factory is not dataclasses.MISSING:
        return fd.default_factory()
    return dataclasses.MISSING


def check_table(table: Table) -> list[str]:
    """Where the table's spec and the code disagree, in words."""
    problems: list[str] = []
    documented = [n for fd in table.fields for n in fd.names]
    accepted = accepted_fields(table)
    for name in accepted:
        if name not in documented:
            problems.append(f"{table.id}: the loader accepts {name!r}, which has no row")
    for name in documented:
        if name not in accepted:
            problems.append(f"{table.id}: {name!r} has a row, but the loader does not accept it")
    if table.model is None:
        for fd in table.fields:
            if not fd.required and fd.default is None:
                problems.append(
                    f"{table.id}.{fd.names[0]}: no model to read a default from: write one"
                )
        return problems
    held = set(table.internal)
    for fd in table.fields:
        problems += _check_row(table, fd)
        held.update(a.split(".")[0] for a in fd.model_attrs())
    for name in _fields(table.model):
        if name not in held:
            problems.append(
                f"{table.id}: {table.model.__name__}.{name} is in no row: document it or name it internal"
            )
    return problems


def _check_row(table: Table, fd: Field) -> list[str]:
    assert table.model is not None
    problems: list[str] = []
    for attr in fd.model_attrs():
        try:
            annotation = _strip_none(str(model_field(table.model, attr).type))
        except GenerationError as e:
            problems += [f"{table.id}.{attr}: {p}" for p in e.problems]
            continue
        if not re.fullmatch(fd.kind.annotation, annotation):
            problems.append(
                f"{table.id}.{attr}: documented as {fd.kind.text!r}, but the model holds {annotation!r}"
            )
        if (
            not fd.required
            and fd.default is None
            and model_default(table.model, attr) is dataclasses.MISSING
        ):
            problems.append(
                f"{table.id}.{attr}: the model has no default: mark it required or write one"
            )
    return problems


# --- rendering -----------------------------------------------------------------------


def default_cell(table: Table, fd: Field) -> str:
    if fd.default is not None:
        return fd.default
    if fd.required:
        return "**required**"
    assert table.model is not None
    return _default_cell(model_default(table.model, fd.model_attrs()[0]), fd.kind.fmt)


_START = re.compile(r"^<!-- fields: ([a-z0-9-]+) -->$")
_END = "<!-- /fields -->"
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_NAMES = re.compile(r"`([^`]+)`")


def split_row(line: str) -> list[str]:
    """The cells of a markdown table row (a `\\|` stays inside its cell)."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [cell.strip() for cell in _CELL_SPLIT.split(inner)]


def kept_cells(lines: Sequence[str]) -> dict[frozenset[str], dict[str, str]]:
    """Example and Meaning of each row of an existing table, by its field names."""
    rows = [split_row(line) for line in lines if line.strip().startswith("|")]
    if len(rows) < 2:
        return {}
    header, body = rows[0], rows[2:]
    out: dict[frozenset[str], dict[str, str]] = {}
    for cells in body:
        key = frozenset(_NAMES.findall(cells[0]))
        out[key] = {
            col: cells[header.index(col)]
            for col in KEPT
            if col in header and header.index(col) < len(cells)
        }
    return out


def render_table(table: Table, kept: Mapping[frozenset[str], Mapping[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for fd in table.fields:
        own = kept.get(fd.key, {})
        cells = [fd.cell, fd.kind.text, default_cell(table, fd)]
        cells += [own.get(col) or TODO for col in KEPT]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class Region:
    """A generated table in the document: its id and its line span (markers excluded)."""

    id: str
    start: int
    end: int


def regions(lines: Sequence[str]) -> list[Region]:
    out: list[Region] = []
    open_at: tuple[str, int] | None = None
    for i, line in enumerate(lines):
        if m := _START.match(line.strip()):
            if open_at is not None:
                raise GenerationError(
                    [f"line {i + 1}: table {m[1]!r} starts inside {open_at[0]!r}"]
                )
            open_at = (m[1], i + 1)
        elif line.strip() == _END:
            if open_at is None:
                raise GenerationError([f"line {i + 1}: {_END} without a start"])
            out.append(Region(open_at[0], open_at[1], i))
            open_at = None
    if open_at is not None:
        raise GenerationError([f"table {open_at[0]!r} has no {_END}"])
    return out


def render(text: str) -> str:
    """The document with every generated table rewritten; raises GenerationError."""
    lines = text.split("\n")
    found = regions(lines)
    by_id = {t.id: t for t in TABLES}
    problems = [f"a table marked {r.id!r} is not in TABLES" for r in found if r.id not in by_id]
    problems += [
        f"table {t.id!r} has no <!-- fields: {t.id} --> in {DOC.name}"
        for t in TABLES
        if t.id not in {r.id for r in found}
    ]
    for table in TABLES:
        problems += check_table(table)
    if problems:
        raise GenerationError(problems)
    for region in reversed(found):  # back to front, so earlier spans stay where they are
        table = by_id[region.id]
        body = render_table(table, kept_cells(lines[region.start : region.end]))
        lines[region.start : region.end] = body
    return "\n".join(lines)


def todos(text: str) -> list[str]:
    """Rows whose hand-written cells are still TODO, as `table: field` strings."""
    lines = text.split("\n")
    out: list[str] = []
    for region in regions(lines):
        for key, cells in kept_cells(lines[region.start : region.end]).items():
            missing = [col for col, value in cells.items() if value == TODO]
            if missing:
                out.append(f"{region.id}: {', '.join(sorted(key))} ({' and '.join(missing)})")
    return out


def examples(text: str) -> Iterator[tuple[Table, Field, str]]:
    """(table, row, Example cell) for every row of every generated table."""
    lines = text.split("\n")
    by_id = {t.id: t for t in TABLES}
    for region in regions(lines):
        table = by_id[region.id]
        kept = kept_cells(lines[region.start : region.end])
        for fd in table.fields:
            yield table, fd, kept.get(fd.key, {}).get("Example", "")


class ExampleError(Exception):
    """An Example cell that is not one `field: value` of its own row."""


def example_manifests(table: Table, fd: Field, cell: str) -> list[dict[str, Any]]:
    """The table's host with the row's Example in place of the row's fields.

    The cell is code (`` `timeout: 5s` ``, a `\\|` standing for `|`) holding a
    mapping of one or more of the row's names; dotted names (`metadata.name`)
    are written nested (`metadata: {name: x}`). The row's other names are
    removed first (an example of `jwks_file` replaces the host's `jwks_uri`),
    and the row's `context` is added.
    """
    m = re.fullmatch(r"`([^`]+)`", cell.strip())
    if m is None:
        raise ExampleError(
            f"{table.id}: {fd.cell}: the Example must be one code span, found {cell!r}"
        )
    try:
        value = yaml.safe_load(m[1].replace("\\|", "|"))
    except yaml.YAMLError as e:
        raise ExampleError(f"{table.id}: {fd.cell}: the Example is not YAML: {e}") from None
    prefixes = {n.rpartition(".")[0] for n in fd.names}
    if len(prefixes) != 1:
        raise ExampleError(f"{table.id}: {fd.cell}: a row's names share one parent")
    prefix = prefixes.pop()
    leaves = [n.rpartition(".")[2] for n in fd.names]
    under: PathKey = tuple(prefix.split(".")) if prefix else ()
    for key in under:
        if not (isinstance(value, dict) and list(value) == [key]):
            raise ExampleError(f"{table.id}: {fd.cell}: write the Example as `{key}: {{...}}`")
        value = value[key]
    if not (isinstance(value, dict) and value and set(value) <= set(leaves)):
        raise ExampleError(
            f"{table.id}: {fd.cell}: the Example must set {' or '.join(leaves)} and nothing else, "
            f"found {m[1]!r}"
        )
    return table.host.with_fields({**fd.context, **value}, drop=leaves, under=under)


def check_examples(text: str) -> list[str]:
    """Every Example through the loader: the problems, in words."""
    problems: list[str] = []
    for table, fd, cell in examples(text):
        try:
            manifests = example_manifests(table, fd, cell)
        except ExampleError as e:
            problems.append(str(e))
            continue
        _, found = load(manifests)
        problems += [f"{table.id}: {fd.cell}: Example {cell}: {p.path}: {p.message}" for p in found]
    return problems


def out_of_date_message(current: str, wanted: str) -> str:
    diff = difflib.unified_diff(
        current.splitlines(),
        wanted.splitlines(),
        "docs/policy-reference.md",
        "generated",
        lineterm="",
    )
    return (
        f"docs/policy-reference.md is out of date with the policy model: run `{COMMAND}` "
        "and commit the result.\n" + "\n".join(diff)
    )


def main(argv: Sequence[str] | None = None, doc: Path = DOC) -> int:
    """0: up to date (or rewritten); 1: out of date, TODOs or bad examples; 2: cannot generate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail with a diff if out of date")
    args = parser.parse_args(argv)
    current = doc.read_text(encoding="utf-8")
    try:
        wanted = render(current)
    except GenerationError as e:
        print("cannot generate the policy reference:", *e.problems, sep="\n  ", file=sys.stderr)
        return 2
    if args.check and wanted != current:
        print(out_of_date_message(current, wanted), file=sys.stderr)
        return 1
    if wanted != current:
        doc.write_text(wanted, encoding="utf-8")
        print(f"rewrote {doc}")
    status = 0
    if missing := todos(wanted):
        print("write the Example and Meaning of these rows:", *missing, sep="\n  ", file=sys.stderr)
        status = 1
    if bad := check_examples(wanted):
        print("these Examples do not validate:", *bad, sep="\n  ", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
