"""The logical layer of outbound traffic: which service, which rule.

A `ServiceTarget` is a destination service as a request names it: its
compiled route (if any), its destination policy, and per rule the bytes we
precompute once per snapshot (header operations) so the hot path only joins.
Choosing the backend and endpoint is the concrete layer's job (clusters.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote_plus

from lepton_mesh.policy.decisions import CompiledRoute, compile_route
from lepton_mesh.policy.traffic import (
    Backend,
    DestinationPolicy,
    HashOn,
    RetryPolicy,
    Route,
    RouteRule,
)
from lepton_mesh.proxy.http.http1 import RequestFacts

# Response headers the outbound side sets itself, replacing any from upstream.
OUTBOUND_RESPONSE_HEADERS = frozenset({b"x-lepton-attempts"})


class RuleRuntime:
    """One route rule with everything the proxy derives from it, computed once."""

    __slots__ = (
        "backends",
        "fault",
        "mirror",
        "name",
        "req_add",
        "req_remove",
        "req_set",
        "resp_extra",
        "resp_remove",
        "resp_remove_outbound",
        "retry",
        "rule",
        "timeout",
    )

    def __init__(self, rule: RouteRule, destination: str, policy: DestinationPolicy) -> None:
        self.rule = rule
        self.name = rule.name
        self.backends: tuple[Backend, ...] = rule.backends or (Backend(destination),)
        self.timeout: float = rule.timeout if rule.timeout is not None else policy.timeout
        self.retry: RetryPolicy = rule.retry if rule.retry is not None else policy.retry
        self.fault = rule.fault
        self.mirror = rule.mirror
        req, resp = rule.request_headers, rule.response_headers
        self.req_set = _pairs(req.set)
        self.req_add = _pairs(req.add)
        self.req_remove = _names(req.remove)
        self.resp_remove = _names((*resp.remove, *(n for n, _ in resp.set)))
        self.resp_remove_outbound = self.resp_remove | OUTBOUND_RESPONSE_HEADERS
        self.resp_extra = b"".join(
            n + b": " + v + b"\r\n" for n, v in (*_pairs(resp.set), *_pairs(resp.add))
        )


# Header operations never touch framing, routing or our own identity headers:
# a route that could set Content-Length or Transfer-Encoding could desync the
# upstream connection. The policy validator refuses them; this is the proxy's
# own guard, so a config from anywhere cannot break the invariant.
_UNTOUCHABLE = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"x-lepton-peer",
    }
)
_BAD_VALUE_BYTES = (b"\r", b"\n", b"\x00")


def _names(names: Iterable[str]) -> frozenset[bytes]:
    out = {n.lower().encode("latin-1") for n in names}
    return frozenset(out - _UNTOUCHABLE)


def _pairs(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for n, v in pairs:
        name, value = n.lower().encode("latin-1"), v.encode("latin-1")
        if name in _UNTOUCHABLE or any(b in name or b in value for b in _BAD_VALUE_BYTES):
            continue
        out.append((name, value))
    return tuple(out)


class ServiceTarget:
    """A destination service: its route and policy, as of one snapshot."""

    __slots__ = ("_compiled", "_runtimes", "default", "name", "policy", "route")

    def __init__(self, name: str, policy: DestinationPolicy, route: Route | None) -> None:
        self.name = name
        self.policy = policy
        self.route = route
        self._compiled: CompiledRoute | None = compile_route(route) if route is not None else None
        self._runtimes: dict[int, RuleRuntime] = {}
        if route is not None:
            for rule in route.rules:
                self._runtimes[id(rule)] = RuleRuntime(rule, name, policy)
        # Without a Route, every request goes to the service itself.
        self.default = RuleRuntime(RouteRule(name="default"), name, policy)

    def select(self, facts: RequestFacts) -> RuleRuntime:
        compiled = self._compiled
        if compiled is None:
            return self.default
        rule = compiled.select(FactsView(facts))
        if rule is None:
            return self.default  # no rule matched: the destination itself (policy model)
        return self._runtimes[id(rule)]


class FactsView:
    """`policy.decisions.RequestView` over a request's raw head, decoded only on demand."""

    __slots__ = ("_facts", "_method", "_path", "_query")

    def __init__(self, facts: RequestFacts) -> None:
        self._facts = facts
        self._method: str | None = None
        self._path: str | None = None
        self._query: dict[str, str] | None = None

    @property
    def method(self) -> str:
        if self._method is None:
            self._method = self._facts.method.decode("latin-1")
        return self._method

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = self._facts.path.decode("latin-1")
        return self._path

    def header(self, name: str) -> str | None:
        return header_value(self._facts, name.encode("latin-1"))

    def query_param(self, name: str) -> str | None:
        if self._query is None:
            self._query = _parse_query(self._facts.target)
        return self._query.get(name)


def header_value(facts: RequestFacts, lname: bytes) -> str | None:
    if lname == b"host":
        return facts.host.decode("latin-1")
    for n, _, v in facts.kept:
        if n == lname:
            return v.decode("latin-1")
    return None


def _parse_query(target: bytes) -> dict[str, str]:
    q = target.find(b"?")
    out: dict[str, str] = {}
    if q < 0:
        return out
    for part in target[q + 1 :].decode("latin-1").split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = unquote_plus(name)
        if name not in out:  # first value wins
            out[name] = unquote_plus(value)
    return out


def hash_key(hash_on: HashOn, facts: RequestFacts, client_ip: bytes) -> bytes | None:
    """The ring-hash key a request carries: a header, a cookie, or the client address."""
    if hash_on.header is not None:
        lname = hash_on.header.lower().encode("latin-1")
        for n, _, v in facts.kept:
            if n == lname:
                return v
        return None
    if hash_on.cookie is not None:
        want = hash_on.cookie.encode("latin-1")
        for n, _, v in facts.kept:
            if n == b"cookie":
                for pair in v.split(b";"):
                    k, _, val = pair.strip().partition(b"=")
                    if k == want:
                        return val
        return None
    return client_ip if hash_on.source_ip else None
