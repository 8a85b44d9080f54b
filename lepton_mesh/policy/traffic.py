"""The traffic-management policy model: routes, destination policies, external services.

Three kinds of object, as the YAML manifests declare them (docs/policy-reference.md):

- a `Route` says, for one destination service, which ordered rules pick
  which weighted backends (the service or a subset of it), and with what
  timeout, retry policy, header edits, fault injection and mirroring;
- a `DestinationPolicy` says, for one service, how its endpoints are
  balanced, its subsets, its default timeout and retry policy, its retry
  budget, its circuit-breaker limits and its outlier detection;
- an `ExternalService` declares static endpoints for a service outside the
  mesh (an external database, a third-party API), as Istio's ServiceEntry:
  the control daemon serves them to sidecars as that service's endpoints.

Every object is frozen: a `TrafficPolicies` is part of the sidecar's config
snapshot and is swapped as a whole. This module only declares shapes and
defaults; `traffic_loader` turns manifests into these objects and enforces
the invariants stated in the comments here, and `decisions` holds the pure
per-request functions over them. Durations are float seconds, percentages
floats in 0..100.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # sidecar_config imports this module: the name is only needed for typing
    from lepton_mesh.policy.endpoints import Endpoint

PathKind = Literal["exact", "prefix", "regex"]
ValueKind = Literal["exact", "regex", "present"]
Algorithm = Literal["least_request", "peak_ewma", "round_robin", "random", "ring_hash"]

# Values `RetryPolicy.retry_on` may hold (x-envoy-retry-on names, where Envoy has them).
RETRY_ON = frozenset(
    {"connect-failure", "refused", "reset", "5xx", "gateway-error", "retriable-status-codes"}
)
# RFC 9110 9.2.2: repeating these has the same effect as sending once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def _empty_map() -> Mapping[str, str]:
    return MappingProxyType({})


# --- matching ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathMatch:
    """`prefix` is a plain string prefix (as Envoy's `prefix`): '/v1' matches '/v1x'."""

    kind: PathKind
    value: str


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """`name` is lowercase. For `present`, `value` is unused (and "")."""

    name: str
    kind: ValueKind
    value: str = ""


@dataclass(frozen=True, slots=True)
class QueryMatch:
    """Query parameter names are case-sensitive, unlike header names."""

    name: str
    kind: ValueKind
    value: str = ""


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One alternative: every condition set here must hold (AND).

    `path` None matches any path; `methods` empty matches any method
    (uppercase otherwise).
    """

    path: PathMatch | None = None
    methods: frozenset[str] = frozenset()
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()


# --- what a rule does -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backend:
    """A service, or a subset of it; `weight` is a share of 100 among a rule's backends."""

    service: str
    subset: str | None = None
    weight: int = 100


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Applied in order: remove, then set (replace), then add (append). Names lowercase."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential with full jitter between retries; invariant: 0 < base <= max."""

    base: float = 0.025
    max: float = 0.25


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed try may be repeated.

    `attempts` counts every try including the first (1 = no retry), 1..10.
    `retry_on` holds values of `RETRY_ON`; `retriable_status_codes` is
    non-empty exactly when `retry_on` has "retriable-status-codes".
    Non-idempotent methods are retried only when the request never reached
    the app (connect-failure, refused) unless listed in `retriable_methods`.
    `per_try_timeout` 0 means none (only the rule's overall timeout).
    """

    attempts: int = 2
    retry_on: frozenset[str] = frozenset({"connect-failure", "refused", "reset"})
    retriable_status_codes: frozenset[int] = frozenset()
    retriable_methods: frozenset[str] = frozenset()
    per_try_timeout: float = 0.0
    backoff: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True, slots=True)
class FaultDelay:
    percent: float
    fixed: float


@dataclass(frozen=True, slots=True)
class FaultAbort:
    """`status` is 200..599: the proxy answers it instead of calling upstream."""

    percent: float
    status: int


@dataclass(frozen=True, slots=True)
class Fault:
    """Injected before the request goes upstream. With `header_trigger`, the
    `x-lepton-fault-delay` / `x-lepton-fault-abort` request headers force a fault too."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    header_trigger: bool = False


@dataclass(frozen=True, slots=True)
class Mirror:
    """Copy `percent` of requests to `backend`, fire and forget (its weight is unused)."""

    backend: Backend
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One rule of a route. `matches` are alternatives (OR); () matches everything.

    `backends` () means the route's destination itself, no subset, weight
    100; otherwise their weights sum to 100. `timeout` None and `retry`
    None defer to the destination's policy; `timeout` 0 means none.
    """

    name: str
    matches: tuple[RouteMatch, ...] = ()
    backends: tuple[Backend, ...] = ()
    timeout: float | None = None
    retry: RetryPolicy | None = None
    request_headers: HeaderOps = field(default_factory=HeaderOps)
    response_headers: HeaderOps = field(default_factory=HeaderOps)
    fault: Fault | None = None
    mirror: Mirror | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """The ordered rules for calls to `destination`; the first matching rule wins.

    A request that matches no rule goes to the destination, no subset, with
    the destination policy's timeout and retry. `source` names the manifest
    file (and document) it came from.
    """

    name: str
    namespace: str
    destination: str
    rules: tuple[RouteRule, ...]
    source: str = "<memory>"


# --- destinations -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subset:
    """The endpoints of a service whose labels include all of `labels`."""

    name: str
    labels: Mapping[str, str] = field(default_factory=_empty_map)


@dataclass(frozen=True, slots=True)
class HashOn:
    """What ring_hash hashes: exactly one of these is set."""

    header: str | None = None
    cookie: str | None = None
    source_ip: bool = False


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    """`hash_on` is set exactly when `algorithm` is ring_hash.

    `panic_threshold`: when fewer than this percentage of endpoints are
    available (healthy and not ejected), balance over all of them instead.
    `locality`: prefer endpoints in the caller's zone.
    """

    algorithm: Algorithm = "least_request"
    hash_on: HashOn | None = None
    panic_threshold: float = 50.0
    locality: bool = False


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Retries may add at most `percent` on top of requests over `window`
    seconds, but at least `min_per_second` retries per second are allowed."""

    percent: float = 20.0
    min_per_second: float = 10.0
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class CircuitLimits:
    """Per destination, per sidecar; every limit is at least 1. Overflow answers 503."""

    max_connections: int = 1024
    max_pending: int = 1024
    max_requests: int = 1024
    max_retries: int = 64


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Eject an endpoint after consecutive failures (0 disables that trigger).

    Gateway errors are 502/503/504, connect failures and resets. An ejection
    lasts `base_ejection_time` times the endpoint's ejection count, capped
    at `max_ejection_time` (base <= max); at most `max_ejection_percent`
    of a destination's endpoints are ejected at once.
    """

    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 50.0


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """How calls to `service` are balanced and protected. `outlier` None disables ejection."""

    name: str
    namespace: str
    service: str
    subsets: tuple[Subset, ...] = ()
    load_balancer: LoadBalancer = field(default_factory=LoadBalancer)
    timeout: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retry_budget: RetryBudget = field(default_factory=RetryBudget)
    limits: CircuitLimits = field(default_factory=CircuitLimits)
    outlier: OutlierDetection | None = field(default_factory=OutlierDetection)
    source: str = "<memory>"


def default_destination_policy(service: str, namespace: str) -> DestinationPolicy:
    """The policy of a service nobody wrote one for: every default."""
    return DestinationPolicy(name=service, namespace=namespace, service=service, source="<default>")


# --- services outside the mesh ------------------------------------------------

ExternalProtocol = Literal["http", "tcp"]


@dataclass(frozen=True, slots=True)
class ExternalService:
    """Static endpoints for `service`, which has no sidecars (Istio's ServiceEntry).

    `endpoints` is never empty and has no address twice. Callers reach it as
    any other service: routes and destination policies apply to it by name.
    For `tcp`, the caller's sidecar config still declares the local `listen`.
    """

    name: str
    namespace: str
    service: str
    endpoints: tuple[Endpoint, ...]
    protocol: ExternalProtocol = "http"
    source: str = "<memory>"


@dataclass(frozen=True, slots=True)
class TrafficPolicies:
    """Everything a sidecar knows about traffic: at most one route, one
    destination policy and one external service per service, keyed by service name."""

    routes: Mapping[str, Route] = field(default_factory=lambda: MappingProxyType({}))
    destinations: Mapping[str, DestinationPolicy] = field(
        default_factory=lambda: MappingProxyType({})
    )
    external: Mapping[str, ExternalService] = field(default_factory=lambda: MappingProxyType({}))
