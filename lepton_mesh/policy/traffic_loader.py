"""Turn Route, DestinationPolicy and ExternalService manifests into a validated `TrafficPolicies`.

The request-security kinds (RequestAuthentication, AuthorizationPolicy,
RateLimit) share the envelope and are dispatched from here to
`security_loader`, so every loader of policy sets validates them too;
`collect_policies` gives both results.

Manifests use the Kubernetes envelope (`apiVersion: lepton-mesh/v1`, `kind`,
`metadata: {name, namespace}`, `spec`), several `---` documents per file;
docs/policy-reference.md describes every field. `load_policy_files` reads
files; `traffic_from_documents` takes documents as `yaml_source` gives them,
from any origin (later the control daemon); `traffic_to_manifests` goes back
to plain data for the admin `/config` endpoint and round-trips.

As in the sidecar loader, nothing stops at the first problem: every parser
records what is wrong (file, line, field path, why) and returns None or a
default, and one `ConfigError` lists everything at the end. Rules that need
more than one field or more than one object (weights summing to 100,
subsets that exist, one Route per destination, one ExternalService per
service, rules that can never match) run after parsing, over the parsed objects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from lepton_mesh.policy.endpoint_fields import parse_endpoints, parse_protocol
from lepton_mesh.policy.errors import ConfigError, Path, Problem
from lepton_mesh.policy.fields import (
    Checker,
    Parser,
    check_list,
    check_mapping,
    describe,
    did_you_mean,
    duration,
    expected,
    integer,
    name_reused,
    number,
    parse_boolean,
    parse_fields,
    parse_name,
    parse_percent,
    parse_string,
    required,
    section,
    string_entries,
    string_map,
    valid_items,
)
from lepton_mesh.policy.http_fields import (
    PROXY_OWNED_HEADERS,
    field_value,
    parse_cookie_name,
    parse_header_name,
    parse_method,
)
from lepton_mesh.policy.manifest_fields import (
    API_VERSION,
    ENVELOPE_FIELDS,
    envelope,
    parse_metadata,
)
from lepton_mesh.policy.security import SECURITY_KINDS, SecurityPolicies
from lepton_mesh.policy.security_loader import SecurityCollector, ServiceKey
from lepton_mesh.policy.traffic import (
    RETRY_ON,
    Backend,
    Backoff,
    CircuitLimits,
    DestinationPolicy,
    ExternalService,
    Fault,
    FaultAbort,
    FaultDelay,
    HashOn,
    HeaderMatch,
    HeaderOps,
    LoadBalancer,
    Mirror,
    OutlierDetection,
    PathMatch,
    QueryMatch,
    RetryBudget,
    RetryPolicy,
    Route,
    RouteMatch,
    RouteRule,
    Subset,
    TrafficPolicies,
)
from lepton_mesh.policy.yaml_source import Document, load_file

__all__ = [
    "API_VERSION",
    "KINDS",
    "collect_policies",
    "collect_traffic",
    "load_policy_files",
    "traffic_from_documents",
    "traffic_to_manifests",
]

KINDS = ("Route", "DestinationPolicy", "ExternalService", *SECURITY_KINDS)


def load_policy_files(paths: Iterable[str | os.PathLike[str]]) -> TrafficPolicies:
    """Read and validate every manifest in `paths`, as one set. Raises `ConfigError`."""
    problems: list[Problem] = []
    docs: list[Document] = []
    sources = [os.fspath(path) for path in paths]
    for source in sources:
        try:
            docs.extend(load_file(source))
        except ConfigError as e:  # unreadable or not YAML: still check the other files
            problems.extend(e.problems)
    policies = collect_traffic(((doc, ()) for doc in docs), problems)
    _raise_if_any(problems, sources)
    return policies


def traffic_from_documents(docs: Iterable[Document]) -> TrafficPolicies:
    """Validate parsed documents (each one manifest) as one set. Raises `ConfigError`."""
    problems: list[Problem] = []
    policies = collect_traffic(((doc, ()) for doc in docs), problems)
    _raise_if_any(problems)
    return policies


def collect_traffic(
    entries: Iterable[tuple[Document, Path]], problems: list[Problem]
) -> TrafficPolicies:
    """Parse and cross-check manifests, appending problems to `problems`.

    Each entry is a document and the path where it sits in its file (`()`
    for a document of its own; `("policies", 2)` for a manifest inline in a
    sidecar config). The result is meaningful only if no problem was added;
    this is the building block for loaders that report more than manifests.
    Security manifests are validated too (`collect_policies` returns them).
    """
    return collect_policies(entries, problems)[0]


def collect_policies(
    entries: Iterable[tuple[Document, Path]], problems: list[Problem]
) -> tuple[TrafficPolicies, Mapping[ServiceKey, SecurityPolicies]]:
    """As `collect_traffic`, with every service's security policies keyed by (namespace, service)."""
    col = _Collector(problems)
    for doc, prefix in entries:
        _manifest(col, Checker(doc.source, doc.lines, problems, prefix), doc.data)
    col.check_references()
    col.security.check()
    traffic = TrafficPolicies(
        routes=MappingProxyType({k: found.obj for k, found in col.routes.items()}),
        destinations=MappingProxyType({k: found.obj for k, found in col.destinations.items()}),
        external=MappingProxyType({k: found.obj for k, found in col.external.items()}),
    )
    return traffic, col.security.result()


def _raise_if_any(problems: list[Problem], sources: Iterable[str] = ()) -> None:
    if problems:
        raise ConfigError.in_reading_order(problems, sources)


# --- what is kept across documents -------------------------------------------


@dataclass(slots=True)
class _Found:
    """A parsed object and where it came from, for messages naming both sides."""

    obj: Any  # Route | DestinationPolicy | ExternalService
    where: str
    kind: str
    name: str


@dataclass(slots=True)
class _SubsetRef:
    """A backend or mirror naming a subset: checked once every policy is known."""

    c: Checker
    path: Path
    service: str
    subset: str


# Why a second object of a kind for the same service is refused, by kind.
_ONE_PER_SERVICE = {
    "Route": "the order between rules of two Routes would be undefined, so all rules "
    "for one destination go in one Route",
    "DestinationPolicy": "their settings would conflict, so one service has one DestinationPolicy",
    "ExternalService": "callers would not know which endpoints are the service's, so one "
    "service has one ExternalService listing all of them",
}


class _Collector:
    __slots__ = ("destinations", "external", "problems", "refs", "routes", "security")

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        self.routes: dict[str, _Found] = {}
        self.destinations: dict[str, _Found] = {}
        self.external: dict[str, _Found] = {}
        self.refs: list[_SubsetRef] = []
        self.security = SecurityCollector(problems)

    def add(self, c: Checker, key_path: Path, found: _Found, key: str) -> None:
        """Keep the first object for `key`; a second one is a conflict, never a merge."""
        tables = {"Route": self.routes, "DestinationPolicy": self.destinations}
        table = tables.get(found.kind, self.external)
        first = table.get(key)
        if first is None:
            table[key] = found
            return
        what = "destination" if found.kind == "Route" else "service"
        why = _ONE_PER_SERVICE[found.kind]
        c.error(
            key_path,
            f"{found.kind} {found.name!r} is a second {found.kind} for {what} {key!r}: "
            f"{first.kind} {first.name!r} ({first.where}) already covers it; {why}",
        )

    def check_references(self) -> None:
        for ref in self.refs:
            found = self.destinations.get(ref.service)
            if found is None:
                ref.c.error(
                    ref.path,
                    f"subset {ref.subset!r} of service {ref.service!r} is not defined: "
                    f"no DestinationPolicy for {ref.service!r} defines subsets",
                )
                continue
            names = [s.name for s in found.obj.subsets]
            if ref.subset not in names:
                defined = f"it defines {', '.join(map(repr, names))}" if names else "it has none"
                ref.c.error(
                    ref.path,
                    f"subset {ref.subset!r} is not defined by DestinationPolicy "
                    f"{found.name!r} ({found.where}) for service {ref.service!r}; "
                    f"{defined}{did_you_mean(ref.subset, names)}",
                )


# --- the envelope --------------------------------------------------------------

# People arrive from Istio: name our kind for theirs instead of a spelling guess.
_ISTIO_KINDS = {
    "VirtualService": "Route",
    "DestinationRule": "DestinationPolicy",
    "ServiceEntry": "ExternalService",
}


def _manifest(col: _Collector, c: Checker, data: Any) -> None:
    if not isinstance(data, Mapping):
        expected(c, (), "a manifest (a mapping with apiVersion, kind, metadata, spec)", data)
        return
    m = check_mapping(c, data, (), ENVELOPE_FIELDS)
    assert m is not None
    for key in ENVELOPE_FIELDS:
        if key not in m:
            c.error((key,), "required field is missing")
    if "apiVersion" in m and m["apiVersion"] != API_VERSION:
        c.error(("apiVersion",), f"must be {API_VERSION!r}, found {describe(m['apiVersion'])}")
    kind = m.get("kind")
    if "kind" in m and kind not in KINDS:
        known = f"the kinds of {API_VERSION} are {', '.join(KINDS[:-1])} and {KINDS[-1]}"
        if isinstance(kind, str):
            hint = _ISTIO_KINDS.get(kind)
            hint = f" (Istio's {kind} is our {hint})" if hint else did_you_mean(kind, KINDS)
            c.error(("kind",), f"unknown kind {kind!r}{hint}; {known}")
        else:
            c.error(("kind",), f"expected a kind name, found {describe(kind)}; {known}")
        return
    name, namespace = parse_metadata(c, m["metadata"]) if "metadata" in m else (None, "default")
    if kind is None or "spec" not in m:
        return
    where = f"{c.source}:{c.line(())}" if c.line(()) is not None else c.source
    if kind in SECURITY_KINDS:
        col.security.add(c, kind, m["spec"], name, namespace, where)
    elif kind == "Route":
        route = _route(col, c, m["spec"], name or "", namespace, where)
        if route is not None and name is not None:
            col.add(c, ("spec", "destination"), _Found(route, where, kind, name), route.destination)
    elif kind == "ExternalService":
        ext = _external_service(c, m["spec"], name or "", namespace, where)
        if ext is not None and name is not None:
            col.add(c, ("spec", "service"), _Found(ext, where, kind, name), ext.service)
    else:
        policy = _destination_policy(col, c, m["spec"], name or "", namespace, where)
        if policy is not None and name is not None:
            col.add(c, ("spec", "service"), _Found(policy, where, kind, name), policy.service)


# --- small parsers ---------------------------------------------------------------

_header_value = field_value("header values")


def _methods(c: Checker, value: Any, path: Path) -> frozenset[str] | None:
    hint = "matches nothing; omit it for any"
    return frozenset(valid_items(c, value, path, "HTTP methods", parse_method, empty=hint)) or None


def _regex(c: Checker, value: Any, path: Path) -> str | None:
    text = parse_string(c, value, path)
    if text is None:
        return None
    try:
        re.compile(text)
    except re.error as e:
        where = f" at position {e.pos}" if e.pos is not None else ""
        c.error(
            path,
            f"invalid regex {text!r}: {e.msg}{where} (regexes use Python's re syntax "
            "and must match the whole value)",
        )
        return None
    return text


def _string_map(c: Checker, value: Any, path: Path) -> dict[str, str] | None:
    return string_map(c, value, path, "names to strings", "names")


def _exactly_one(c: Checker, m: Mapping[str, Any], path: Path, keys: tuple[str, ...]) -> str | None:
    given = [k for k in keys if k in m]
    if len(given) == 1:
        return given[0]
    options = ", ".join(keys[:-1]) + f" or {keys[-1]}"
    found = f"found {' and '.join(given)}" if given else "found none"
    c.error(path, f"exactly one of {options} is needed, {found}")
    return None


# --- Route ------------------------------------------------------------------------

_ROUTE_FIELDS = ("destination", "rules")
_RULE_FIELDS = (
    "name",
    "match",
    "backends",
    "timeout",
    "retry",
    "request_headers",
    "response_headers",
    "fault",
    "mirror",
)
_MATCH_FIELDS = ("path", "methods", "headers", "query")
_PATH_KINDS = ("exact", "prefix", "regex")
_VALUE_FIELDS = ("name", "exact", "regex", "present")
_VALUE_KINDS = ("exact", "regex", "present")
_BACKEND_FIELDS = ("service", "subset", "weight")
_MIRROR_FIELDS = ("service", "subset", "percent")
_timeout = duration(zero_ok=True)


def _route(
    col: _Collector, c: Checker, value: Any, name: str, namespace: str, where: str
) -> Route | None:
    path: Path = ("spec",)
    m = check_mapping(c, value, path, _ROUTE_FIELDS)
    if m is None:
        return None
    destination = required(c, m, path, "destination", parse_name)
    rules: tuple[RouteRule, ...] = ()
    if "rules" not in m:
        c.error((*path, "rules"), "required field is missing")
    else:
        rules = _rules(col, c, m["rules"], (*path, "rules"))
    if destination is None:
        return None
    return Route(name, namespace, destination, rules, source=where)


def _rules(col: _Collector, c: Checker, value: Any, path: Path) -> tuple[RouteRule, ...]:
    items = check_list(c, value, path, "rules", empty="routes nothing; give at least one rule")
    rules: list[RouteRule] = []
    # Rules whose `match` parsed without any problem: only those take part in
    # the shadowing check (a dropped condition would make a rule look broader).
    clean: list[tuple[int, RouteRule]] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        rule, match_ok = _rule(col, c, item, (*path, i), i)
        if rule is None:
            continue
        name_reused(c, seen, rule.name, path, i, "rule")
        rules.append(rule)
        if match_ok:
            clean.append((i, rule))
    _check_shadowing(c, path, clean)
    return tuple(rules)


def _rule(
    col: _Collector, c: Checker, value: Any, path: Path, index: int
) -> tuple[RouteRule | None, bool]:
    m = check_mapping(c, value, path, _RULE_FIELDS)
    if m is None:
        return None, False
    name = parse_name(c, m["name"], (*path, "name")) if "name" in m else None
    matches: tuple[RouteMatch, ...] = ()
    match_ok = True
    if "match" in m:
        before = len(c.problems)
        matches = _matches(c, m["match"], (*path, "match"))
        match_ok = len(c.problems) == before
    rule = RouteRule(
        name=name or f"rule-{index}",
        matches=matches,
        backends=_backends(col, c, m["backends"], (*path, "backends")) if "backends" in m else (),
        timeout=_timeout(c, m["timeout"], (*path, "timeout")) if "timeout" in m else None,
        retry=_retry(c, m["retry"], (*path, "retry")) if "retry" in m else None,
        request_headers=_header_ops(c, m.get("request_headers"), (*path, "request_headers")),
        response_headers=_header_ops(c, m.get("response_headers"), (*path, "response_headers")),
        fault=_fault(c, m["fault"], (*path, "fault")) if "fault" in m else None,
        mirror=_mirror(col, c, m["mirror"], (*path, "mirror")) if "mirror" in m else None,
    )
    return rule, match_ok


def _matches(c: Checker, value: Any, path: Path) -> tuple[RouteMatch, ...]:
    hint = "matches nothing; omit 'match' to match every request"
    return tuple(valid_items(c, value, path, "alternatives", _alternative, empty=hint))


def _alternative(c: Checker, value: Any, path: Path) -> RouteMatch | None:
    m = check_mapping(c, value, path, _MATCH_FIELDS)
    if m is None:
        return None
    return RouteMatch(
        path=_path_match(c, m["path"], (*path, "path")) if "path" in m else None,
        methods=(_methods(c, m["methods"], (*path, "methods")) or frozenset())
        if "methods" in m
        else frozenset(),
        headers=_value_matches(c, m, path, "headers"),
        query=_value_matches(c, m, path, "query"),
    )


def _path_match(c: Checker, value: Any, path: Path) -> PathMatch | None:
    m = check_mapping(c, value, path, _PATH_KINDS)
    if m is None:
        return None
    kind = _exactly_one(c, m, path, _PATH_KINDS)
    if kind is None:
        return None
    vpath = (*path, kind)
    text = _regex(c, m[kind], vpath) if kind == "regex" else parse_string(c, m[kind], vpath)
    if text is None:
        return None
    if kind != "regex":
        if not text.startswith("/"):
            c.error(vpath, f"must start with '/', found {text!r}: request paths always do")
            return None
        if "?" in text:
            c.error(vpath, "paths are matched without the query string; match it with 'query'")
            return None
    return PathMatch(kind, text)  # type: ignore[arg-type]


def _value_matches(c: Checker, m: Mapping[str, Any], path: Path, key: str) -> tuple[Any, ...]:
    if key not in m:
        return ()
    lpath = (*path, key)
    what = "header conditions" if key == "headers" else "query conditions"
    items = check_list(c, m[key], lpath, what, empty=f"adds no condition; omit '{key}'")
    out: list[HeaderMatch | QueryMatch] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        cond = _value_match(c, item, (*lpath, i), header=key == "headers")
        if cond is None:
            continue
        if cond.name in seen:
            c.error(
                (*lpath, i),
                f"a second condition on {cond.name!r} (first at [{seen[cond.name]}]): "
                "give one condition per name (a regex can express alternatives)",
            )
            continue
        seen[cond.name] = i
        out.append(cond)
    return tuple(out)


def _value_match(
    c: Checker, value: Any, path: Path, *, header: bool
) -> HeaderMatch | QueryMatch | None:
    m = check_mapping(c, value, path, _VALUE_FIELDS)
    if m is None:
        return None
    if "name" not in m:
        c.error((*path, "name"), "required field is missing")
        name = None
    elif header:
        name = parse_header_name(c, m["name"], (*path, "name"))
    else:
        name = parse_string(c, m["name"], (*path, "name"))
        if name == "":
            c.error((*path, "name"), "must not be empty")
            name = None
    kind = _exactly_one(c, m, path, _VALUE_KINDS)
    if kind is None or name is None:
        return None
    vpath = (*path, kind)
    text: str | None = ""
    if kind == "exact":
        text = parse_string(c, m[kind], vpath)
    elif kind == "regex":
        text = _regex(c, m[kind], vpath)
    elif m[kind] is not True:
        c.error(
            vpath,
            f"must be true, found {describe(m[kind])}: conditions select requests that "
            "have a value; there is no 'absent' condition",
        )
        return None
    if text is None:
        return None
    cls = HeaderMatch if header else QueryMatch
    return cls(name, kind, text)  # type: ignore[arg-type]


def _backends(col: _Collector, c: Checker, value: Any, path: Path) -> tuple[Backend, ...]:
    hint = "sends nowhere; omit 'backends' to send to the destination"
    items = check_list(c, value, path, "backends", empty=hint)
    out: list[Backend] = []
    weights: list[int] = []
    seen: dict[tuple[str, str | None], int] = {}
    complete = True  # every weight known, so their sum means something
    for i, item in enumerate(items):
        bpath = (*path, i)
        m = check_mapping(c, item, bpath, _BACKEND_FIELDS)
        if m is None:
            complete = False
            continue
        service = required(c, m, bpath, "service", parse_name)
        subset = parse_name(c, m["subset"], (*bpath, "subset")) if "subset" in m else None
        weight: int | None = 100
        if "weight" in m:
            weight = _weight(c, m["weight"], (*bpath, "weight"))
        elif len(items) > 1:
            c.error((*bpath, "weight"), "required when a rule has more than one backend")
            weight = None
        if weight is None or service is None:
            complete = False
            continue
        key = (service, subset)
        if key in seen:
            c.error(
                bpath, f"{_backend_name(service, subset)} is listed twice (also at [{seen[key]}])"
            )
            complete = False
            continue
        seen[key] = i
        if subset is not None:
            col.refs.append(_SubsetRef(c, (*bpath, "subset"), service, subset))
        weights.append(weight)
        out.append(Backend(service, subset, weight))
    if complete and out and sum(weights) != 100:
        shown = " + ".join(map(str, weights))
        c.error(path, f"backend weights must add up to 100, found {sum(weights)} ({shown})")
    return tuple(out)


_weight = integer(0, 100)


def _backend_name(service: str, subset: str | None) -> str:
    return f"{service}/{subset}" if subset else service


def _mirror(col: _Collector, c: Checker, value: Any, path: Path) -> Mirror | None:
    m = check_mapping(c, value, path, _MIRROR_FIELDS)
    if m is None:
        return None
    service = required(c, m, path, "service", parse_name)
    subset = parse_name(c, m["subset"], (*path, "subset")) if "subset" in m else None
    percent = parse_percent(c, m["percent"], (*path, "percent")) if "percent" in m else 100.0
    if service is None or percent is None:
        return None
    if subset is not None:
        col.refs.append(_SubsetRef(c, (*path, "subset"), service, subset))
    return Mirror(Backend(service, subset), percent)


# --- retries, headers, faults ---------------------------------------------------

_RETRY_FIELDS = (
    "attempts",
    "retry_on",
    "retriable_status_codes",
    "retriable_methods",
    "per_try_timeout",
    "backoff",
)
_RETRY_ON_ORDER = (
    "connect-failure",
    "refused",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
)
assert frozenset(_RETRY_ON_ORDER) == RETRY_ON
_positive_duration = duration(zero_ok=False)
_status_code = integer(100, 599)


def _retry(c: Checker, value: Any, path: Path) -> RetryPolicy | None:
    m = check_mapping(c, value, path, _RETRY_FIELDS)
    if m is None:
        return None
    fields: dict[str, Any] = {}
    if "attempts" in m:
        fields["attempts"] = integer(1, 10)(c, m["attempts"], (*path, "attempts"))
    if "retry_on" in m:
        fields["retry_on"] = _retry_on(c, m["retry_on"], (*path, "retry_on"))
    if "retriable_status_codes" in m:
        cpath = (*path, "retriable_status_codes")
        codes = valid_items(c, m["retriable_status_codes"], cpath, "status codes", _status_code)
        fields["retriable_status_codes"] = frozenset(codes)
    if "retriable_methods" in m:
        mpath = (*path, "retriable_methods")
        methods = valid_items(c, m["retriable_methods"], mpath, "HTTP methods", parse_method)
        fields["retriable_methods"] = frozenset(methods)
    if "per_try_timeout" in m:
        fields["per_try_timeout"] = _timeout(c, m["per_try_timeout"], (*path, "per_try_timeout"))
    if "backoff" in m:
        fields["backoff"] = _backoff(c, m["backoff"], (*path, "backoff"))
    policy = RetryPolicy(**{k: v for k, v in fields.items() if v is not None})
    listed = "retriable-status-codes" in policy.retry_on
    if listed and not policy.retriable_status_codes and "retry_on" in fields:
        c.error(
            (*path, "retry_on"),
            "'retriable-status-codes' needs a non-empty retriable_status_codes list",
        )
    if policy.retriable_status_codes and not listed:
        c.error(
            (*path, "retriable_status_codes"),
            "these codes are retried only with 'retriable-status-codes' in retry_on; add it",
        )
    return policy


def _retry_on(c: Checker, value: Any, path: Path) -> frozenset[str] | None:
    items = check_list(c, value, path, "retry conditions")
    out: set[str] = set()
    for i, item in enumerate(items):
        text = parse_string(c, item, (*path, i))
        if text is None:
            continue
        if text not in RETRY_ON:
            c.error(
                (*path, i),
                f"unknown retry condition {text!r}{did_you_mean(text, _RETRY_ON_ORDER)}; "
                f"allowed: {', '.join(_RETRY_ON_ORDER)}",
            )
            continue
        out.add(text)
    return frozenset(out)


def _backoff(c: Checker, value: Any, path: Path) -> Backoff | None:
    backoff = section(Backoff, {"base": _positive_duration, "max": _positive_duration})(
        c, value, path
    )
    if backoff is not None and backoff.base > backoff.max:
        c.error(
            (*path, "base"),
            f"base ({_seconds_text(backoff.base)}) must not exceed max "
            f"({_seconds_text(backoff.max)}{'' if 'max' in value else ', the default'})",
        )
    return backoff


def _seconds_text(value: float) -> str:
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


_HEADER_OPS_FIELDS = ("set", "add", "remove")


def _header_ops(c: Checker, value: Any, path: Path) -> HeaderOps:
    if value is None:
        return HeaderOps()
    m = check_mapping(c, value, path, _HEADER_OPS_FIELDS)
    if m is None:
        return HeaderOps()
    set_ = _header_pairs(c, m["set"], (*path, "set"), many=False) if "set" in m else ()
    add = _header_pairs(c, m["add"], (*path, "add"), many=True) if "add" in m else ()
    remove: list[str] = []
    if "remove" in m:
        rpath = (*path, "remove")
        for i, item in enumerate(check_list(c, m["remove"], rpath, "header names")):
            name = _owned_header_name(c, item, (*rpath, i))
            if name is None:
                continue
            if name in {n for n, _ in set_}:
                c.error((*rpath, i), f"{name!r} is also in 'set': set already replaces it")
                continue
            remove.append(name)
    return HeaderOps(set=set_, add=add, remove=tuple(remove))


def _owned_header_name(c: Checker, value: Any, path: Path) -> str | None:
    name = parse_header_name(c, value, path)
    if name in PROXY_OWNED_HEADERS:
        c.error(path, f"{name!r} frames the message or belongs to one hop: the proxy owns it")
        return None
    return name


def _header_pairs(c: Checker, value: Any, path: Path, *, many: bool) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        expected(c, path, "a mapping of header name to value", value)
        return ()
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, item in string_entries(c, value, path, "header names"):
        name = _owned_header_name(c, key, (*path, key))
        if name is None:
            continue
        if name in seen:
            c.error((*path, key), f"header {name!r} is given twice (names ignore case)")
            continue
        seen.add(name)
        # `add` may append several values of one header: `x-a: [one, two]`.
        values = item if many and isinstance(item, list) else [item]
        for j, v in enumerate(values):
            vpath = (*path, key, j) if values is item else (*path, key)
            text = _header_value(c, v, vpath)
            if text is not None:
                out.append((name, text))
    return tuple(out)


_FAULT_FIELDS = ("delay", "abort", "header_trigger")


def _fault(c: Checker, value: Any, path: Path) -> Fault | None:
    m = check_mapping(c, value, path, _FAULT_FIELDS)
    if m is None:
        return None
    delay = abort = None
    if "delay" in m:
        dpath = (*path, "delay")
        d = check_mapping(c, m["delay"], dpath, ("percent", "fixed"))
        if d is not None:
            percent = required(c, d, dpath, "percent", parse_percent)
            fixed = required(c, d, dpath, "fixed", _positive_duration)
            if percent is not None and fixed is not None:
                delay = FaultDelay(percent, fixed)
    if "abort" in m:
        apath = (*path, "abort")
        a = check_mapping(c, m["abort"], apath, ("percent", "status"))
        if a is not None:
            percent = required(c, a, apath, "percent", parse_percent)
            status = required(c, a, apath, "status", integer(200, 599))
            if percent is not None and status is not None:
                abort = FaultAbort(percent, status)
    trigger = False
    if "header_trigger" in m:
        trigger = bool(parse_boolean(c, m["header_trigger"], (*path, "header_trigger")))
    if not m.keys() & {"delay", "abort"} and not trigger:
        c.error(path, "injects nothing: give delay, abort or header_trigger: true")
    return Fault(delay, abort, trigger)


# --- DestinationPolicy ---------------------------------------------------------

_DESTINATION_FIELDS = (
    "service",
    "subsets",
    "load_balancer",
    "timeout",
    "retry",
    "retry_budget",
    "limits",
    "outlier",
)
_ALGORITHMS = ("least_request", "peak_ewma", "round_robin", "random", "ring_hash")
_LB_FIELDS = ("algorithm", "hash_on", "panic_threshold", "locality")
_HASH_ON_FIELDS = ("header", "cookie", "source_ip")
_OUTLIER_FIELDS = (
    "enabled",
    "consecutive_5xx",
    "consecutive_gateway_errors",
    "base_ejection_time",
    "max_ejection_time",
    "max_ejection_percent",
)
_retry_budget = section(
    RetryBudget,
    {"percent": parse_percent, "min_per_second": number(0), "window": _positive_duration},
)
_limits = section(
    CircuitLimits,
    {
        "max_connections": integer(1),
        "max_pending": integer(1),
        "max_requests": integer(1),
        "max_retries": integer(1),
    },
)
_OUTLIER_PARSERS: dict[str, Parser] = {
    "consecutive_5xx": integer(0),
    "consecutive_gateway_errors": integer(0),
    "base_ejection_time": _positive_duration,
    "max_ejection_time": _positive_duration,
    "max_ejection_percent": parse_percent,
}


def _destination_policy(
    col: _Collector, c: Checker, value: Any, name: str, namespace: str, where: str
) -> DestinationPolicy | None:
    path: Path = ("spec",)
    m = check_mapping(c, value, path, _DESTINATION_FIELDS)
    if m is None:
        return None
    service = required(c, m, path, "service", parse_name)
    fields: dict[str, Any] = {}
    if "subsets" in m:
        fields["subsets"] = _subsets(c, m["subsets"], (*path, "subsets"))
    if "load_balancer" in m:
        fields["load_balancer"] = _load_balancer(c, m["load_balancer"], (*path, "load_balancer"))
    if "timeout" in m:
        fields["timeout"] = _timeout(c, m["timeout"], (*path, "timeout"))
    if "retry" in m:
        fields["retry"] = _retry(c, m["retry"], (*path, "retry"))
    if "retry_budget" in m:
        fields["retry_budget"] = _retry_budget(c, m["retry_budget"], (*path, "retry_budget"))
    if "limits" in m:
        fields["limits"] = _limits(c, m["limits"], (*path, "limits"))
    if "outlier" in m:
        outlier = _outlier(c, m["outlier"], (*path, "outlier"))
        if outlier is not False:
            fields["outlier"] = outlier  # None disables ejection
    if service is None:
        return None
    fields = {k: v for k, v in fields.items() if v is not None or k == "outlier"}
    return DestinationPolicy(name, namespace, service, **fields, source=where)


def _subsets(c: Checker, value: Any, path: Path) -> tuple[Subset, ...]:
    out: list[Subset] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(check_list(c, value, path, "subsets")):
        spath = (*path, i)
        m = check_mapping(c, item, spath, ("name", "labels"))
        if m is None:
            continue
        name = required(c, m, spath, "name", parse_name)
        labels = required(c, m, spath, "labels", _string_map)
        if labels == {}:
            c.error((*spath, "labels"), "must select on at least one label")
            continue
        if name is None or labels is None:
            continue
        if name in seen:
            c.error((*spath, "name"), f"subset {name!r} is already defined at [{seen[name]}]")
            continue
        seen[name] = i
        out.append(Subset(name, MappingProxyType(labels)))
    return tuple(out)


def _load_balancer(c: Checker, value: Any, path: Path) -> LoadBalancer | None:
    m = check_mapping(c, value, path, _LB_FIELDS)
    if m is None:
        return None
    fields: dict[str, Any] = {}
    if "algorithm" in m:
        algorithm = m["algorithm"]
        if algorithm in _ALGORITHMS:
            fields["algorithm"] = algorithm
        else:
            hint = did_you_mean(algorithm, _ALGORITHMS) if isinstance(algorithm, str) else ""
            c.error(
                (*path, "algorithm"),
                f"unknown algorithm: found {describe(algorithm)}{hint}; "
                f"expected one of: {', '.join(_ALGORITHMS)}",
            )
    if "hash_on" in m:
        fields["hash_on"] = _hash_on(c, m["hash_on"], (*path, "hash_on"))
    if "panic_threshold" in m:
        fields["panic_threshold"] = parse_percent(
            c, m["panic_threshold"], (*path, "panic_threshold")
        )
    if "locality" in m:
        fields["locality"] = parse_boolean(c, m["locality"], (*path, "locality"))
    algorithm = fields.get("algorithm", "least_request" if "algorithm" not in m else None)
    if algorithm == "ring_hash" and "hash_on" not in m:
        c.error(
            (*path, "algorithm"),
            "ring_hash needs hash_on: {header: NAME}, {cookie: NAME} or {source_ip: true}",
        )
    if algorithm not in (None, "ring_hash") and "hash_on" in m:
        c.error(
            (*path, "hash_on"),
            f"only ring_hash uses hash_on; the algorithm is {algorithm!r}",
        )
    return LoadBalancer(**{k: v for k, v in fields.items() if v is not None})


def _hash_on(c: Checker, value: Any, path: Path) -> HashOn | None:
    m = check_mapping(c, value, path, _HASH_ON_FIELDS)
    if m is None:
        return None
    header = parse_header_name(c, m["header"], (*path, "header")) if "header" in m else None
    cookie = parse_cookie_name(c, m["cookie"], (*path, "cookie")) if "cookie" in m else None
    source_ip = (
        bool(parse_boolean(c, m["source_ip"], (*path, "source_ip"))) if "source_ip" in m else False
    )
    chosen = [k for k in _HASH_ON_FIELDS if k in m and (k != "source_ip" or m[k] is True)]
    if len(chosen) != 1:
        found = " and ".join(chosen) if chosen else "none"
        c.error(path, f"exactly one of header, cookie or source_ip: true is needed, found {found}")
        return None
    return HashOn(header=header, cookie=cookie, source_ip=source_ip)


def _outlier(c: Checker, value: Any, path: Path) -> OutlierDetection | bool | None:
    """The policy, None to disable, or False if invalid (the default stays)."""
    if value is None:
        return None
    m = check_mapping(c, value, path, _OUTLIER_FIELDS)
    if m is None:
        return False
    if "enabled" in m:
        enabled = parse_boolean(c, m.pop("enabled"), (*path, "enabled"))
        if enabled is False:
            if m:
                c.error(path, f"'enabled: false' disables outlier detection; remove {', '.join(m)}")
            return None
    outlier = OutlierDetection(**parse_fields(c, m, path, _OUTLIER_PARSERS))
    if outlier.base_ejection_time > outlier.max_ejection_time:
        c.error(
            (*path, "base_ejection_time"),
            f"base_ejection_time ({outlier.base_ejection_time:g}s) must not exceed "
            f"max_ejection_time ({outlier.max_ejection_time:g}s"
            f"{'' if 'max_ejection_time' in m else ', the default'})",
        )
    return outlier


# --- ExternalService ------------------------------------------------------------

_EXTERNAL_FIELDS = ("service", "protocol", "endpoints")


def _external_service(
    c: Checker, value: Any, name: str, namespace: str, where: str
) -> ExternalService | None:
    # Endpoints are written exactly as a sidecar config's static endpoints
    # ('host:port' or {address, weight, labels, healthy}), and the protocol
    # as a sidecar's own service's: one syntax, one parser.
    path: Path = ("spec",)
    m = check_mapping(c, value, path, _EXTERNAL_FIELDS)
    if m is None:
        return None
    service = required(c, m, path, "service", parse_name)
    protocol = parse_protocol(c, m.get("protocol", "http"), (*path, "protocol")) or "http"
    endpoints = ()
    if "endpoints" not in m:
        c.error((*path, "endpoints"), "required field is missing")
    else:
        before = len(c.problems)
        endpoints = parse_endpoints(c, m["endpoints"], (*path, "endpoints"))
        if not endpoints and len(c.problems) == before:
            c.error(
                (*path, "endpoints"),
                "an empty list: an external service needs at least one endpoint",
            )
    if service is None or not endpoints:
        return None
    return ExternalService(name, namespace, service, endpoints, protocol, source=where)


# --- rules that can never match ----------------------------------------------
#
# Rule B is unreachable when every alternative of B is covered by some
# alternative of a rule before it (one rule or several together). Alternative
# a covers b when every request b matches, a matches too; we only claim it
# when it is provable from the conditions' text:
# - path: a has none; or a's prefix p is a prefix of b's exact or prefix
#   value; or both are the same exact/regex; or a's regex fully matches b's
#   exact path;
# - methods: a has none, or b has some and they are all in a's;
# - headers and query: each condition of a is implied by one of b on the
#   same name: the same condition, or a's `present` by any b condition, or
#   a's regex fully matching b's exact value.
# Anything else (two regexes, say) is assumed not to cover: a rule is only
# rejected when it certainly can never match.

_CATCH_ALL = RouteMatch()


def _path_covers(a: PathMatch | None, b: PathMatch | None) -> bool:
    if a is None:
        return True
    if b is None:
        return False
    if a.kind == "prefix":
        return b.kind in ("exact", "prefix") and b.value.startswith(a.value)
    if a.kind == b.kind:
        return a.value == b.value
    return a.kind == "regex" and b.kind == "exact" and re.fullmatch(a.value, b.value) is not None


def _value_implied(a: HeaderMatch | QueryMatch, conds: tuple[Any, ...]) -> bool:
    for b in conds:
        if b.name != a.name:
            continue
        if a.kind == "present" or a == b:
            return True
        if a.kind == "regex" and b.kind == "exact":
            return re.fullmatch(a.value, b.value) is not None
    return False


def _covers(a: RouteMatch, b: RouteMatch) -> bool:
    if a.methods and not (b.methods and b.methods <= a.methods):
        return False
    if not _path_covers(a.path, b.path):
        return False
    return all(_value_implied(h, b.headers) for h in a.headers) and all(
        _value_implied(q, b.query) for q in a.query
    )


def _check_shadowing(c: Checker, path: Path, rules: list[tuple[int, RouteRule]]) -> None:
    for j, (index, rule) in enumerate(rules):
        covering: list[tuple[int, RouteRule]] = []
        for b in rule.matches or (_CATCH_ALL,):
            by = next(
                (
                    (i, earlier)
                    for i, earlier in rules[:j]
                    if any(_covers(a, b) for a in earlier.matches or (_CATCH_ALL,))
                ),
                None,
            )
            if by is None:
                break
            if by not in covering:
                covering.append(by)
        else:
            if covering:
                c.error((*path, index), _shadow_message(rule, covering))


def _shadow_message(rule: RouteRule, covering: list[tuple[int, RouteRule]]) -> str:
    if len(covering) == 1 and not covering[0][1].matches:
        i, first = covering[0]
        return (
            f"rule {rule.name!r} can never match: rule {first.name!r} (rules[{i}]) comes "
            "first and has no 'match', so it takes every request; put catch-all rules last"
        )
    names = " and ".join(f"{r.name!r} (rules[{i}])" for i, r in sorted(covering))
    subject = "rule" if len(covering) == 1 else "rules"
    return (
        f"rule {rule.name!r} can never match: every request it matches is already "
        f"matched by {subject} {names} before it; put the narrower rule first or remove it"
    )


# --- back to data, for the admin /config endpoint ----------------------------


def traffic_to_manifests(policies: TrafficPolicies) -> list[dict[str, Any]]:
    """Every route and destination policy as a manifest; durations in seconds.

    `traffic_from_documents` (or a sidecar config's inline `policies:`)
    accepts the result and gives back equal objects, except `source`.
    """
    out = [_route_manifest(r) for r in policies.routes.values()]
    out += [_destination_manifest(d) for d in policies.destinations.values()]
    out += [_external_manifest(e) for e in policies.external.values()]
    return out


def _external_manifest(e: ExternalService) -> dict[str, Any]:
    endpoints = [
        {"address": str(ep.address), "weight": ep.weight, "labels": dict(ep.labels)}
        | ({} if ep.healthy else {"healthy": False})
        for ep in e.endpoints
    ]
    spec = {"service": e.service, "protocol": e.protocol, "endpoints": endpoints}
    return envelope("ExternalService", e.name, e.namespace, spec)


def _route_manifest(route: Route) -> dict[str, Any]:
    rules = [_rule_json(rule) for rule in route.rules]
    spec = {"destination": route.destination, "rules": rules}
    return envelope("Route", route.name, route.namespace, spec)


def _rule_json(rule: RouteRule) -> dict[str, Any]:
    out: dict[str, Any] = {"name": rule.name}
    if rule.matches:
        out["match"] = [_match_json(m) for m in rule.matches]
    if rule.backends:
        out["backends"] = [_backend_json(b) | {"weight": b.weight} for b in rule.backends]
    if rule.timeout is not None:
        out["timeout"] = rule.timeout
    if rule.retry is not None:
        out["retry"] = _retry_json(rule.retry)
    for key in ("request_headers", "response_headers"):
        ops = getattr(rule, key)
        if ops != HeaderOps():
            out[key] = _header_ops_json(ops)
    if rule.fault is not None:
        out["fault"] = _fault_json(rule.fault)
    if rule.mirror is not None:
        out["mirror"] = _backend_json(rule.mirror.backend) | {"percent": rule.mirror.percent}
    return out


def _match_json(m: RouteMatch) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.path is not None:
        out["path"] = {m.path.kind: m.path.value}
    if m.methods:
        out["methods"] = sorted(m.methods)
    if m.headers:
        out["headers"] = [_value_json(h) for h in m.headers]
    if m.query:
        out["query"] = [_value_json(q) for q in m.query]
    return out


def _value_json(cond: HeaderMatch | QueryMatch) -> dict[str, Any]:
    return {"name": cond.name, cond.kind: True if cond.kind == "present" else cond.value}


def _backend_json(b: Backend) -> dict[str, Any]:
    return {"service": b.service} | ({"subset": b.subset} if b.subset else {})


def _retry_json(r: RetryPolicy) -> dict[str, Any]:
    return {
        "attempts": r.attempts,
        "retry_on": [x for x in _RETRY_ON_ORDER if x in r.retry_on],
        "retriable_status_codes": sorted(r.retriable_status_codes),
        "retriable_methods": sorted(r.retriable_methods),
        "per_try_timeout": r.per_try_timeout,
        "backoff": {"base": r.backoff.base, "max": r.backoff.max},
    }


def _header_ops_json(ops: HeaderOps) -> dict[str, Any]:
    add: dict[str, list[str]] = {}
    for name, value in ops.add:
        add.setdefault(name, []).append(value)
    return {"set": dict(ops.set), "add": add, "remove": list(ops.remove)}


def _fault_json(f: Fault) -> dict[str, Any]:
    out: dict[str, Any] = {"header_trigger": f.header_trigger}
    if f.delay is not None:
        out["delay"] = {"percent": f.delay.percent, "fixed": f.delay.fixed}
    if f.abort is not None:
        out["abort"] = {"percent": f.abort.percent, "status": f.abort.status}
    return out


def _destination_manifest(d: DestinationPolicy) -> dict[str, Any]:
    lb = d.load_balancer
    lb_json: dict[str, Any] = {
        "algorithm": lb.algorithm,
        "panic_threshold": lb.panic_threshold,
        "locality": lb.locality,
    }
    if lb.hash_on is not None:
        h = lb.hash_on
        lb_json["hash_on"] = (
            {"header": h.header}
            if h.header is not None
            else {"cookie": h.cookie}
            if h.cookie is not None
            else {"source_ip": True}
        )
    o = d.outlier
    spec = {
        "service": d.service,
        "subsets": [{"name": s.name, "labels": dict(s.labels)} for s in d.subsets],
        "load_balancer": lb_json,
        "timeout": d.timeout,
        "retry": _retry_json(d.retry),
        "retry_budget": {
            "percent": d.retry_budget.percent,
            "min_per_second": d.retry_budget.min_per_second,
            "window": d.retry_budget.window,
        },
        "limits": {
            "max_connections": d.limits.max_connections,
            "max_pending": d.limits.max_pending,
            "max_requests": d.limits.max_requests,
            "max_retries": d.limits.max_retries,
        },
        "outlier": None
        if o is None
        else {
            "consecutive_5xx": o.consecutive_5xx,
            "consecutive_gateway_errors": o.consecutive_gateway_errors,
            "base_ejection_time": o.base_ejection_time,
            "max_ejection_time": o.max_ejection_time,
            "max_ejection_percent": o.max_ejection_percent,
        },
    }
    return envelope("DestinationPolicy", d.name, d.namespace, spec)
