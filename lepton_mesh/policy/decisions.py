"""Per-request traffic decisions: pure functions over the traffic model.

Everything here runs on the proxy's hot path, so it is written for speed:
routes are compiled once (`compile_route`) into closures with regexes
precompiled, and nothing allocates more than it returns. Randomness is an
argument (`u`, uniform in [0, 1)) so every decision is a plain function of
its inputs and tests can walk a grid of `u` values for exact results.

Match semantics (the same as Envoy's where Envoy has one):
- path `exact` compares the whole path, `prefix` is a plain string prefix
  (no segment rule: '/v1' matches '/v1x'), `regex` must match the whole path
  (Python `re`, `fullmatch`);
- the path is the request target as sent, without the query string and not
  percent-decoded;
- a header or query `regex` must match the whole value; a missing header or
  parameter matches no `exact` or `regex` condition; `present` only asks
  that it exists (an empty value counts);
- header names are compared lowercase; query parameter names as written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from lepton_mesh.policy.fields import to_seconds
from lepton_mesh.policy.traffic import (
    IDEMPOTENT_METHODS,
    Backend,
    Backoff,
    Fault,
    HeaderMatch,
    Mirror,
    PathMatch,
    QueryMatch,
    RetryPolicy,
    Route,
    RouteMatch,
    RouteRule,
    Subset,
)

__all__ = [
    "FAULT_ABORT_HEADER",
    "FAULT_DELAY_HEADER",
    "CompiledRoute",
    "Outcome",
    "RequestView",
    "backoff_delay",
    "choose_backend",
    "compile_route",
    "effective_backends",
    "fault_decision",
    "in_subset",
    "mirror_decision",
    "retry_allowed",
    "select_rule",
]


class RequestView(Protocol):
    """What route matching reads from a request; the proxy implements it lazily.

    `path` is the target without the query string, as sent. `header` takes
    a lowercase name and returns the first value or None. `query_param`
    returns the first value of a parameter (percent-decoded, '+' as space)
    or None; a parameter given without '=' has the value "".
    """

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...

    def header(self, name: str) -> str | None: ...

    def query_param(self, name: str) -> str | None: ...


# --- route matching ---------------------------------------------------------

_Test = Callable[[str], bool]
_ValueTest = Callable[[str | None], bool]
_Alternative = Callable[[RequestView], bool]


def _path_test(path: PathMatch) -> _Test:
    value = path.value
    if path.kind == "exact":
        return lambda p: p == value
    if path.kind == "prefix":
        return lambda p: p.startswith(value)
    fullmatch = re.compile(value).fullmatch
    return lambda p: fullmatch(p) is not None


def _value_test(cond: HeaderMatch | QueryMatch) -> _ValueTest:
    value = cond.value
    if cond.kind == "present":
        return lambda v: v is not None
    if cond.kind == "exact":
        return lambda v: v == value
    fullmatch = re.compile(value).fullmatch
    return lambda v: v is not None and fullmatch(v) is not None


def _compile_match(m: RouteMatch) -> _Alternative:
    # Cheapest checks first: a set lookup, then one string compare, then the
    # lazily parsed headers and query.
    methods = m.methods or None
    path = _path_test(m.path) if m.path is not None else None
    headers = tuple((h.name, _value_test(h)) for h in m.headers)
    query = tuple((q.name, _value_test(q)) for q in m.query)

    def matches(req: RequestView) -> bool:
        if methods is not None and req.method not in methods:
            return False
        if path is not None and not path(req.path):
            return False
        for name, test in headers:
            if not test(req.header(name)):
                return False
        for name, test in query:  # noqa: SIM110 -- a plain loop; all() builds a generator
            if not test(req.query_param(name)):
                return False
        return True

    return matches


class CompiledRoute:
    """A `Route` with its regexes compiled and its matchers built; reusable and immutable."""

    __slots__ = ("_rules", "route")

    def __init__(self, route: Route) -> None:
        self.route = route
        # A rule with no alternatives matches everything: stored as None.
        self._rules: tuple[tuple[RouteRule, tuple[_Alternative, ...] | None], ...] = tuple(
            (rule, tuple(_compile_match(m) for m in rule.matches) or None) for rule in route.rules
        )

    def select(self, req: RequestView) -> RouteRule | None:
        """The first rule with an alternative that matches `req`, or None."""
        for rule, alternatives in self._rules:
            if alternatives is None:
                return rule
            for matches in alternatives:
                if matches(req):
                    return rule
        return None


def compile_route(route: Route) -> CompiledRoute:
    """Build the matcher for `route` once (per config snapshot) and keep it."""
    return CompiledRoute(route)


# Routes seen by `select_rule`, keyed by id with the route kept alive in the
# entry (so the id cannot be reused while cached). Bounded: config swaps
# bring new Route objects, and old ones must not pile up.
_COMPILED: dict[int, CompiledRoute] = {}
_COMPILED_MAX = 256


def select_rule(route: Route, req: RequestView) -> RouteRule | None:
    """The first rule of `route` matching `req`; compiles and caches on first use.

    The proxy should hold `compile_route(route)` per snapshot instead; this
    is the convenient form, and costs a dict lookup more.
    """
    compiled = _COMPILED.get(id(route))
    if compiled is None or compiled.route is not route:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.clear()
        compiled = _COMPILED[id(route)] = CompiledRoute(route)
    return compiled.select(req)


# --- backends and subsets ---------------------------------------------------


def effective_backends(rule: RouteRule | None, destination: str) -> tuple[Backend, ...]:
    """A rule's backends; no rule or no backends means the destination itself."""
    if rule is not None and rule.backends:
        return rule.backends
    return (Backend(destination),)


def choose_backend(backends: tuple[Backend, ...], u: float) -> Backend:
    """Weighted pick: backend i owns the slice [c(i-1), c(i)) / total of [0, 1).

    Compared as `u < c / total` rather than `u * total < c` so a grid of u
    values `k / n` lands on exact shares (one rounding per side, no double
    rounding). Zero-weight backends are never chosen.
    """
    if len(backends) == 1:
        return backends[0]
    total = 0
    for b in backends:
        total += b.weight
    if total <= 0:
        raise ValueError("choose_backend needs at least one backend with a positive weight")
    cumulative = 0
    chosen = backends[0]
    for b in backends:
        if b.weight <= 0:
            continue
        cumulative += b.weight
        chosen = b
        if u < cumulative / total:
            return b
    return chosen  # u >= 1: out of contract; the last positive-weight backend


def in_subset(labels: Mapping[str, str], subset: Subset) -> bool:
    """Does an endpoint with `labels` belong to `subset` (all its labels equal)?"""
    return all(labels.get(key) == value for key, value in subset.labels.items())


# --- retries ----------------------------------------------------------------

OutcomeKind = Literal["connect_failure", "refused", "reset", "timeout", "status"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one try failed.

    `connect_failure`: no connection (timeout, unreachable, TLS handshake);
    `refused`: the endpoint refused the connection. Neither reached the app.
    `reset`: the connection closed or reset after the request was sent (it
    may have reached the app). `timeout`: the per-try timeout fired.
    `status`: a response arrived with `status` (set only for this kind).
    """

    kind: OutcomeKind
    status: int = 0


# Which retry_on values cover each failure kind. As in Envoy, `5xx` and
# `gateway-error` also cover failures with no response at all (a reset, a
# per-try timeout, a connect failure), and `reset` covers timeouts too
# ("disconnect/reset/read timeout"). `refused` is narrower than
# `connect-failure`: only refused connections, not connect timeouts.
_COVERS: dict[str, frozenset[str]] = {
    "connect_failure": frozenset({"connect-failure", "reset", "5xx", "gateway-error"}),
    "refused": frozenset({"refused", "connect-failure", "reset", "5xx", "gateway-error"}),
    "reset": frozenset({"reset", "5xx", "gateway-error"}),
    "timeout": frozenset({"reset", "5xx", "gateway-error"}),
}
_NEVER_SENT = frozenset({"connect_failure", "refused"})
_GATEWAY_STATUSES = frozenset({502, 503, 504})


def retry_allowed(policy: RetryPolicy, method: str, outcome: Outcome) -> bool:
    """May a try that ended with `outcome` be retried under `policy`?

    Only the condition and the method: attempts left, the retry budget and
    the body's replayability are the caller's to check. A request that never
    reached the app is safe to repeat whatever its method; otherwise only
    idempotent methods and `retriable_methods` are retried.
    """
    kind = outcome.kind
    retry_on = policy.retry_on
    if kind == "status":
        status = outcome.status
        if not (
            ("5xx" in retry_on and 500 <= status <= 599)
            or ("gateway-error" in retry_on and status in _GATEWAY_STATUSES)
            or ("retriable-status-codes" in retry_on and status in policy.retriable_status_codes)
        ):
            return False
    elif retry_on.isdisjoint(_COVERS[kind]):
        return False
    if kind in _NEVER_SENT:
        return True
    return method in IDEMPOTENT_METHODS or method in policy.retriable_methods


def backoff_delay(attempt: int, backoff: Backoff, u: float) -> float:
    """Seconds to wait before retry number `attempt` (1 = the first retry).

    Exponential with full jitter: uniform in [0, min(max, base * 2**(attempt-1))).
    Full jitter spreads a burst of synchronized failures instead of making
    every client retry at the same instants.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts retries from 1, got {attempt}")
    ceiling = backoff.base * (1 << min(attempt - 1, 62))
    if ceiling > backoff.max:
        ceiling = backoff.max
    return u * ceiling


# --- faults and mirroring ---------------------------------------------------

FAULT_DELAY_HEADER = "x-lepton-fault-delay"
FAULT_ABORT_HEADER = "x-lepton-fault-abort"


def fault_decision(
    fault: Fault, u_delay: float, u_abort: float, header: Callable[[str], str | None]
) -> tuple[float, int]:
    """(delay in seconds, abort status or 0) for one request.

    The configured delay and abort each apply to their percentage of
    requests. With `header_trigger`, a request header forces a fault:
    `x-lepton-fault-delay: 250ms` (a duration as in config files) and
    `x-lepton-fault-abort: 503` (200..599); a malformed value is ignored.
    The proxy delays first, then aborts (as Istio does).
    """
    delay = 0.0
    abort = 0
    if fault.delay is not None and u_delay < fault.delay.percent / 100:
        delay = fault.delay.fixed
    if fault.abort is not None and u_abort < fault.abort.percent / 100:
        abort = fault.abort.status
    if fault.header_trigger:
        raw = header(FAULT_DELAY_HEADER)
        if raw is not None and len(raw) <= 32:
            forced = to_seconds(raw)
            if forced is not None and 0 <= forced < float("inf"):
                delay = forced
        raw = header(FAULT_ABORT_HEADER)
        if raw is not None:
            raw = raw.strip()
            if len(raw) == 3 and raw.isascii() and raw.isdigit() and 200 <= int(raw) <= 599:
                abort = int(raw)
    return delay, abort


def mirror_decision(mirror: Mirror | None, u: float) -> bool:
    """Should this request be copied to `mirror.backend`?"""
    return mirror is not None and u < mirror.percent / 100
