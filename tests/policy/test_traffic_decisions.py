"""Per-request traffic decisions, table-driven with exact results."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType

import pytest

from lepton_mesh.policy import decisions
from lepton_mesh.policy.decisions import (
    Outcome,
    backoff_delay,
    choose_backend,
    compile_route,
    effective_backends,
    fault_decision,
    in_subset,
    mirror_decision,
    retry_allowed,
    select_rule,
)
from lepton_mesh.policy.traffic import (
    Backend,
    Backoff,
    Fault,
    FaultAbort,
    FaultDelay,
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


@dataclass
class Req:
    """A RequestView over plain dicts; counts lookups to show matching is lazy."""

    method: str = "GET"
    path: str = "/"
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    lookups: int = 0

    def header(self, name: str) -> str | None:
        assert name == name.lower()
        self.lookups += 1
        return self.headers.get(name)

    def query_param(self, name: str) -> str | None:
        self.lookups += 1
        return self.query.get(name)


ROUTE = Route(
    name="dialog",
    namespace="default",
    destination="dialog",
    rules=(
        RouteRule(
            "beta",
            matches=(RouteMatch(headers=(HeaderMatch("x-user-group", "exact", "beta"),)),),
        ),
        RouteRule(
            "turn-post",
            matches=(
                RouteMatch(path=PathMatch("prefix", "/v1/turn"), methods=frozenset({"POST"})),
            ),
        ),
        RouteRule(
            "versioned",
            matches=(
                RouteMatch(path=PathMatch("regex", r"/v[0-9]+/session/[a-z]+")),
                RouteMatch(path=PathMatch("exact", "/legacy"), methods=frozenset({"GET", "HEAD"})),
            ),
        ),
        RouteRule(
            "debug",
            matches=(
                RouteMatch(
                    headers=(
                        HeaderMatch("x-debug", "present"),
                        HeaderMatch("x-trace", "regex", "t-[0-9]+"),
                    ),
                    query=(QueryMatch("verbose", "present"), QueryMatch("lang", "regex", "en|fr")),
                ),
                RouteMatch(query=(QueryMatch("Mode", "exact", "debug"),)),
            ),
        ),
    ),
)

SELECT = [
    # (request, expected rule name or None)
    (Req(headers={"x-user-group": "beta"}, path="/anything"), "beta"),
    (Req(headers={"x-user-group": "Beta"}), None),  # values are case-sensitive
    (Req(headers={"x-user-group": "beta2"}), None),  # exact is whole-value
    (Req("POST", "/v1/turn"), "turn-post"),
    (Req("POST", "/v1/turns/7"), "turn-post"),  # a string prefix, not a segment prefix
    (Req("POST", "/v1/tur"), None),
    (Req("GET", "/v1/turn"), None),
    (Req("post", "/v1/turn"), None),  # methods are case-sensitive; the loader uppercases
    (Req("GET", "/v12/session/abc"), "versioned"),
    (Req("GET", "/v12/session/abc/x"), None),  # regex must match the whole path
    (Req("GET", "/x/v1/session/abc"), None),
    (Req("HEAD", "/legacy"), "versioned"),
    (Req("POST", "/legacy"), None),
    (Req("GET", "/legacy/"), None),
    (
        Req(headers={"x-debug": "", "x-trace": "t-42"}, query={"verbose": "", "lang": "fr"}),
        "debug",
    ),
    (Req(headers={"x-debug": "", "x-trace": "t-42"}, query={"verbose": "", "lang": "de"}), None),
    (Req(headers={"x-debug": "", "x-trace": "t-42x"}, query={"verbose": "", "lang": "en"}), None),
    (Req(headers={"x-trace": "t-1"}, query={"verbose": "", "lang": "en"}), None),
    (Req(query={"Mode": "debug"}), "debug"),
    (Req(query={"mode": "debug"}), None),  # query names are case-sensitive
    (Req(), None),
]


@pytest.mark.parametrize(("req", "expected"), SELECT)
def test_select_rule(req: Req, expected: str | None) -> None:
    rule = select_rule(ROUTE, req)
    assert (rule.name if rule else None) == expected
    compiled = compile_route(ROUTE).select(req)
    assert compiled is rule


def test_rule_without_match_takes_everything_and_first_rule_wins() -> None:
    route = Route(
        "r",
        "default",
        "d",
        (
            RouteRule("get", matches=(RouteMatch(methods=frozenset({"GET"})),)),
            RouteRule("rest"),
            RouteRule("empty-alternative", matches=(RouteMatch(),)),
        ),
    )
    assert [select_rule(route, Req(m)).name for m in ("GET", "DELETE")] == ["get", "rest"]


def test_matching_checks_method_and_path_before_headers() -> None:
    req = Req("GET", "/v1/turn")
    compile_route(
        Route(
            "r",
            "default",
            "d",
            (
                RouteRule(
                    "a",
                    matches=(
                        RouteMatch(
                            path=PathMatch("prefix", "/v2"),
                            headers=(HeaderMatch("x", "present"),),
                        ),
                        RouteMatch(
                            methods=frozenset({"POST"}), query=(QueryMatch("q", "present"),)
                        ),
                    ),
                ),
            ),
        )
    ).select(req)
    assert req.lookups == 0


def test_select_rule_caches_one_compiled_route_per_route_object() -> None:
    decisions._COMPILED.clear()
    select_rule(ROUTE, Req())
    select_rule(ROUTE, Req())
    assert len(decisions._COMPILED) == 1
    other = Route("x", "default", "d", (RouteRule("only"),))
    assert select_rule(other, Req()).name == "only"
    assert len(decisions._COMPILED) == 2
    for i in range(decisions._COMPILED_MAX + 5):  # bounded across many config swaps
        select_rule(Route("x", "default", "d", (RouteRule(f"r{i}"),)), Req())
    assert len(decisions._COMPILED) <= decisions._COMPILED_MAX


# --- backends ------------------------------------------------------------------


def shares(backends: tuple[Backend, ...], n: int) -> dict[str, int]:
    """How many of the grid points u = k/n pick each backend."""
    picks = Counter(choose_backend(backends, k / n) for k in range(n))
    return {f"{b.service}/{b.subset}": picks[b] for b in backends}


@pytest.mark.parametrize(
    ("weights", "n"),
    [
        ((90, 10), 10_000),
        ((50, 50), 1_000),
        ((33, 33, 34), 10_000),
        ((1, 99), 100_000),
        ((0, 100), 1_000),
        ((70, 0, 30), 10_000),
        ((25, 25, 25, 25), 4_000),
    ],
)
def test_choose_backend_gives_exact_weight_shares(weights: tuple[int, ...], n: int) -> None:
    backends = tuple(Backend("dialog", f"v{i}", w) for i, w in enumerate(weights))
    assert shares(backends, n) == {f"dialog/v{i}": w * n // 100 for i, w in enumerate(weights)}


@pytest.mark.parametrize(
    ("u", "expected"),
    [(0.0, "v1"), (0.8999999, "v1"), (0.9, "v2"), (0.9999999, "v2")],
)
def test_choose_backend_boundaries(u: float, expected: str) -> None:
    backends = (Backend("dialog", "v1", 90), Backend("dialog", "v2", 10))
    assert choose_backend(backends, u).subset == expected


def test_choose_backend_edges() -> None:
    only = (Backend("dialog", weight=0),)
    assert choose_backend(only, 0.5) is only[0]  # one backend: nothing to weigh
    assert choose_backend((Backend("a", weight=100), Backend("b", weight=0)), 1.0).service == "a"
    with pytest.raises(ValueError):
        choose_backend((Backend("a", weight=0), Backend("b", weight=0)), 0.5)


def test_effective_backends() -> None:
    assert effective_backends(None, "dialog") == (Backend("dialog"),)
    assert effective_backends(RouteRule("r"), "dialog") == (Backend("dialog"),)
    split = (Backend("dialog", "v1", 90), Backend("dialog", "v2", 10))
    assert effective_backends(RouteRule("r", backends=split), "dialog") is split


@pytest.mark.parametrize(
    ("labels", "subset_labels", "expected"),
    [
        ({"version": "v1", "zone": "a"}, {"version": "v1"}, True),
        ({"version": "v2"}, {"version": "v1"}, False),
        ({}, {"version": "v1"}, False),
        ({"version": "v1"}, {"version": "v1", "track": "canary"}, False),
        ({"version": "v1"}, {}, True),
    ],
)
def test_in_subset(labels: dict[str, str], subset_labels: dict[str, str], expected: bool) -> None:
    assert in_subset(labels, Subset("s", MappingProxyType(subset_labels))) is expected


# --- retries -------------------------------------------------------------------

DEFAULT = RetryPolicy()  # connect-failure, refused, reset
GATEWAY = RetryPolicy(retry_on=frozenset({"gateway-error"}))
FIVE_XX = RetryPolicy(retry_on=frozenset({"5xx"}))
CODES = RetryPolicy(
    retry_on=frozenset({"retriable-status-codes"}), retriable_status_codes=frozenset({409, 429})
)
REFUSED = RetryPolicy(retry_on=frozenset({"refused"}))
CONNECT = RetryPolicy(retry_on=frozenset({"connect-failure"}))
NONE = RetryPolicy(retry_on=frozenset())
POST_OK = RetryPolicy(retry_on=frozenset({"5xx"}), retriable_methods=frozenset({"POST"}))

CF = Outcome("connect_failure")
RF = Outcome("refused")
RS = Outcome("reset")
TO = Outcome("timeout")


def status(code: int) -> Outcome:
    return Outcome("status", code)


RETRY = [
    # (policy, method, outcome, allowed)
    (DEFAULT, "GET", CF, True),
    (DEFAULT, "GET", RF, True),
    (DEFAULT, "GET", RS, True),
    (DEFAULT, "GET", TO, True),  # reset covers read timeouts, as Envoy's does
    (DEFAULT, "GET", status(503), False),
    (DEFAULT, "POST", CF, True),  # never reached the app: safe for any method
    (DEFAULT, "POST", RF, True),
    (DEFAULT, "POST", RS, False),  # may have reached the app
    (DEFAULT, "POST", TO, False),
    (DEFAULT, "PATCH", RS, False),
    (DEFAULT, "PUT", RS, True),
    (DEFAULT, "DELETE", RS, True),
    (DEFAULT, "HEAD", RS, True),
    (DEFAULT, "OPTIONS", RS, True),
    (DEFAULT, "TRACE", RS, True),
    (REFUSED, "GET", RF, True),
    (REFUSED, "GET", CF, False),  # refused is narrower than connect-failure
    (REFUSED, "GET", RS, False),
    (CONNECT, "POST", RF, True),  # a refused connection is a connect failure
    (CONNECT, "GET", CF, True),
    (CONNECT, "GET", RS, False),
    (CONNECT, "GET", TO, False),
    (CONNECT, "GET", status(503), False),
    (GATEWAY, "GET", status(502), True),
    (GATEWAY, "GET", status(503), True),
    (GATEWAY, "GET", status(504), True),
    (GATEWAY, "GET", status(500), False),
    (GATEWAY, "GET", status(501), False),
    (GATEWAY, "GET", RS, True),  # as Envoy: no response at all counts
    (GATEWAY, "GET", TO, True),
    (GATEWAY, "GET", CF, True),
    (GATEWAY, "POST", CF, True),
    (GATEWAY, "POST", status(503), False),
    (FIVE_XX, "GET", status(500), True),
    (FIVE_XX, "GET", status(599), True),
    (FIVE_XX, "GET", status(499), False),
    (FIVE_XX, "GET", status(200), False),
    (FIVE_XX, "GET", RS, True),
    (FIVE_XX, "GET", TO, True),
    (FIVE_XX, "DELETE", RF, True),
    (FIVE_XX, "POST", status(500), False),
    (POST_OK, "POST", status(500), True),  # listed in retriable_methods
    (POST_OK, "POST", RS, True),
    (POST_OK, "PATCH", status(500), False),
    (CODES, "GET", status(409), True),
    (CODES, "GET", status(429), True),
    (CODES, "GET", status(503), False),
    (CODES, "GET", RS, False),
    (CODES, "POST", status(409), False),
    (NONE, "GET", CF, False),
    (NONE, "GET", status(503), False),
]


@pytest.mark.parametrize(("policy", "method", "outcome", "allowed"), RETRY)
def test_retry_allowed(policy: RetryPolicy, method: str, outcome: Outcome, allowed: bool) -> None:
    assert retry_allowed(policy, method, outcome) is allowed


@pytest.mark.parametrize(
    ("attempt", "u", "expected"),
    [
        (1, 0.5, 0.0125),
        (2, 0.5, 0.025),
        (3, 0.5, 0.05),
        (4, 0.5, 0.1),
        (5, 0.5, 0.125),  # capped at max
        (9, 0.5, 0.125),
        (1000, 0.5, 0.125),  # no overflow for absurd attempt numbers
        (3, 0.0, 0.0),
        (4, 0.25, 0.05),
    ],
)
def test_backoff_delay(attempt: int, u: float, expected: float) -> None:
    assert backoff_delay(attempt, Backoff(0.025, 0.25), u) == expected


def test_backoff_delay_counts_retries_from_one() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, Backoff(), 0.5)


# --- faults and mirroring -----------------------------------------------------------

DELAY_ABORT = Fault(FaultDelay(10.0, 2.0), FaultAbort(5.0, 503))
TRIGGERED = Fault(header_trigger=True)
BOTH = Fault(FaultDelay(100.0, 1.0), FaultAbort(0.0, 500), header_trigger=True)


def headers(**values: str) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in values.items()}


FAULTS = [
    # (fault, u_delay, u_abort, request headers, (delay, abort))
    (DELAY_ABORT, 0.0, 0.0, {}, (2.0, 503)),
    (DELAY_ABORT, 0.0999, 0.0499, {}, (2.0, 503)),
    (DELAY_ABORT, 0.1, 0.05, {}, (0.0, 0)),
    (DELAY_ABORT, 0.5, 0.01, {}, (0.0, 503)),
    (DELAY_ABORT, 0.01, 0.5, {}, (2.0, 0)),
    # without header_trigger, the headers do nothing
    (
        DELAY_ABORT,
        0.9,
        0.9,
        headers(x_lepton_fault_delay="1s", x_lepton_fault_abort="500"),
        (0.0, 0),
    ),
    (TRIGGERED, 0.0, 0.0, {}, (0.0, 0)),
    (TRIGGERED, 0.0, 0.0, headers(x_lepton_fault_delay="250ms"), (0.25, 0)),
    (TRIGGERED, 0.0, 0.0, headers(x_lepton_fault_delay="1m30s"), (90.0, 0)),
    (TRIGGERED, 0.0, 0.0, headers(x_lepton_fault_delay="0.5"), (0.5, 0)),
    (TRIGGERED, 0.0, 0.0, headers(x_lepton_fault_abort="503"), (0.0, 503)),
    (TRIGGERED, 0.0, 0.0, headers(x_lepton_fault_abort=" 429 "), (0.0, 429)),
    (
        TRIGGERED,
        0.0,
        0.0,
        headers(x_lepton_fault_delay="soon", x_lepton_fault_abort="600"),
        (0.0, 0),
    ),
    (
        TRIGGERED,
        0.0,
        0.0,
        headers(x_lepton_fault_delay="-1s", x_lepton_fault_abort="199"),
        (0.0, 0),
    ),
    (TRIGGERED, 0.0, 0.0, headers(x_lepton_fault_abort="5" * 5000), (0.0, 0)),
    (TRIGGERED, 0.0, 0.0, headers(x_lepton_fault_delay="1" * 5000 + "s"), (0.0, 0)),
    # a header overrides the configured value when both apply
    (BOTH, 0.5, 0.5, {}, (1.0, 0)),
    (BOTH, 0.5, 0.5, headers(x_lepton_fault_delay="10ms", x_lepton_fault_abort="502"), (0.01, 502)),
]


@pytest.mark.parametrize(("fault", "u_delay", "u_abort", "hdrs", "expected"), FAULTS)
def test_fault_decision(
    fault: Fault, u_delay: float, u_abort: float, hdrs: dict[str, str], expected: tuple[float, int]
) -> None:
    assert fault_decision(fault, u_delay, u_abort, hdrs.get) == expected


def test_fault_percent_over_a_grid() -> None:
    fault = Fault(FaultDelay(12.5, 1.0), FaultAbort(3.0, 503))
    n = 10_000
    results = [fault_decision(fault, k / n, k / n, {}.get) for k in range(n)]
    assert sum(1 for d, _ in results if d) == 1250
    assert sum(1 for _, a in results if a) == 300


@pytest.mark.parametrize(
    ("mirror", "u", "expected"),
    [
        (None, 0.0, False),
        (Mirror(Backend("intent", "v2")), 0.0, True),
        (Mirror(Backend("intent", "v2")), 0.9999, True),
        (Mirror(Backend("intent", "v2"), 25.0), 0.2499, True),
        (Mirror(Backend("intent", "v2"), 25.0), 0.25, False),
        (Mirror(Backend("intent", "v2"), 0.0), 0.0, False),
    ],
)
def test_mirror_decision(mirror: Mirror | None, u: float, expected: bool) -> None:
    assert mirror_decision(mirror, u) is expected


def test_mirror_share_over_a_grid() -> None:
    mirror = Mirror(Backend("intent", "v2"), 20.0)
    assert sum(mirror_decision(mirror, k / 1000) for k in range(1000)) == 200
