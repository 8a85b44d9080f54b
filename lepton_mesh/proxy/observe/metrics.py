"""The sidecar's Prometheus metrics, named as Istio names them.

Names and labels follow Istio's standard metrics (`istio_requests_total` ->
`lepton_requests_total`, ...) so existing dashboards carry over by renaming the
prefix.

Hot path. prometheus-client's `labels(...).inc()` costs ~2-4 us and a histogram
`observe()` ~1-4 us, so four request metrics would eat a large share of the
~60 us per-request CPU budget (bench/micro_observability.py prints the
figures). Instead each distinct label tuple owns one plain `__slots__` object
holding counts, sums and per-bucket counts (bucket found with `bisect`):
`observe_request` updates all four metrics in well under 1 us.

Scrape. The same data is exposed two ways from one snapshot (`_families()`):
- `registry`, a private `CollectorRegistry` whose collector yields
  prometheus-client metric families, for anything that wants the library's
  tooling (tests compare against it);
- `render()`, which writes the text format itself. prometheus-client's
  `generate_latest` validates and escapes every label of every sample
  (~9 us per sample): ~0.6 ms per request label tuple, a 60 ms event-loop
  stall at 100 tuples and seconds at the cardinality cap. Here each tuple's
  escaped label text is built once, when the tuple is first seen, and a
  scrape only formats numbers (~25x faster). Its output is checked in the
  tests by parsing it back with prometheus-client's parser and comparing to
  what `generate_latest` says.

Invariants:
- Everything here runs on the event-loop thread; no locks.
- Bucket lists hold per-bucket (non-cumulative) counts, one slot per finite
  bound plus a last slot for +Inf; the scrape accumulates them. A value equal
  to a bound belongs to that bound's bucket (`le` is "less or equal"), which
  is exactly what `bisect_left` returns.
- Label cardinality is bounded: at most `max_series` label tuples per table
  (requests, tcp). A new tuple beyond that is folded into
  `destination_service="overflow"` and every observation so folded counts in
  `lepton_metrics_label_overflow_total`. Folded tuples keep reporter, source
  workload, code and flags while the table is under twice the cap. Past
  that, source_workload is folded to "overflow" too: on a plaintext inbound
  port it is whatever the caller's `x-lepton-peer` header (or L4 tunnel
  header) says, so a client sending a new name per request would otherwise
  grow the overflow series without bound. What is left (reporter, code,
  flags) is a small set, so a table never holds much more than twice
  `max_series` tuples.
  The mirror table (`observe_mirror`) is capped the same way; its overflow
  counter row appears on its first fold.

TLS. Handshake counts and failures and the certificate's expiry live on the
sidecar's identity (mtls.MeshIdentity) and are pulled at scrape time
through `set_tls_source`; a handshake costs one dict increment there.

Security. Authorization decisions, JWT outcomes and rate-limit refusals are
counted by the inbound policy's state (inbound_policy.InboundState, one dict
increment per request) and pulled at scrape time through
`set_security_source`. Their labels are bounded by config (policy and rule
names, provider names, a fixed set of results), not by traffic.

Resilience. Outlier ejections, circuit-breaker state, retry outcomes and the
retry budget live on the per-destination resilience objects (outlier.py,
circuit.py, retry_budget.py); they are pulled at scrape time through one
source, `set_resilience_source`, so the hot path pays nothing for them. Only
mirroring, which has no other home, is counted here on the hot path.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from lepton_mesh.proxy.resilience.circuit import CircuitBreaker
    from lepton_mesh.proxy.resilience.outlier import OutlierDetector
    from lepton_mesh.proxy.resilience.retry_budget import RetryBudget

_log = logging.getLogger(__name__)

# Istio's request-duration buckets, in milliseconds.
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
    30000, 60000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip
# Istio's request/response size buckets, in bytes: 1, 10, ..., 1e9.
BYTES_BUCKETS: tuple[float, ...] = tuple(float(10**i) for i in range(10))

DEFAULT_MAX_SERIES = 10_000
OVERFLOW = "overflow"
NO_FLAGS = "-"
# What render() writes: the classic text format.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "destination_service",
    "response_code",
    "response_flags",
)
TCP_LABELS = ("reporter", "source_workload", "destination_service")
POOL_LABELS = ("destination_service", "endpoint")
LISTENER_LABELS = ("listener",)
OVERFLOW_LABELS = ("table",)
SERVICE_LABELS = ("destination_service",)
LIMIT_LABELS = ("destination_service", "limit")
OUTCOME_LABELS = ("destination_service", "outcome")

# (destination_service, endpoint, active, idle, pending)
PoolRow = tuple[str, str, int, int, int]
PoolSource = Callable[[], Iterable[PoolRow]]
# (listener_name, active_connections)
ListenerSource = Callable[[], Iterable[tuple[str, int]]]

RequestKey = tuple[str, str, str, int, str]
TcpKey = tuple[str, str, str]
MirrorKey = tuple[str, str]


class ResilienceRow(NamedTuple):
    """One destination's resilience state, as the resilience source yields it.

    A plain tuple works too; the exact shape, field by field:
    `(destination_service: str,
      ejections_total: int,                    # lepton_outlier_ejections_total
      endpoints: Iterable[tuple[str, bool]],   # (endpoint address, ejected now)
      circuit: Iterable[tuple[str, bool, int]],  # (limit, at its max now, overflows_total)
      retries_attempted: int,                  # retries the budget granted
      retries_budget_exhausted: int,           # retries the budget refused
      retries_limit: int,                      # retries refused by the max_retries limit
      budget_available: int | float)`          # retries the budget would grant now
    `limit` is one of "connections", "pending", "requests", "retries".
    `resilience_row()` builds one from the three resilience objects.
    """

    destination_service: str
    ejections_total: int
    endpoints: Iterable[tuple[str, bool]]
    circuit: Iterable[tuple[str, bool, int]]
    retries_attempted: int
    retries_budget_exhausted: int
    retries_limit: int
    budget_available: int | float


ResilienceSource = Callable[[], Iterable[ResilienceRow]]


class TlsSource(Protocol):
    """What the TLS families are read from at scrape time (mtls.MeshIdentity)."""

    def failure_rows(self) -> Iterable[tuple[str, int]]: ...  # (reason, failures_total)
    def handshake_rows(self) -> Iterable[tuple[str, str, int]]: ...  # (side, resumed, total)
    def expiry_timestamp(self) -> float | None: ...  # the certificate's notAfter (None: none yet)


class SecuritySource(Protocol):
    """What the security families are read from at scrape time (inbound_policy.InboundState)."""

    def authz_rows(self) -> Iterable[tuple[str, str, str, int]]: ...  # (decision, policy, rule, n)
    def jwt_rows(self) -> Iterable[tuple[str, str, int]]: ...  # (provider, result, n)
    def rate_limited_rows(self) -> Iterable[tuple[str, int]]: ...  # (limit, n)


def resilience_row(
    destination_service: str,
    breaker: CircuitBreaker,
    budget: RetryBudget,
    detector: OutlierDetector | None = None,
) -> ResilienceRow:
    """A destination's row from its breaker, retry budget and (if any) outlier detector."""
    stats = budget.stats()
    return ResilienceRow(
        destination_service,
        detector.ejections_total if detector is not None else 0,
        detector.endpoint_states() if detector is not None else (),
        breaker.limit_states(),
        stats.retries_total,
        stats.exhausted_total,
        breaker.retries_overflows,
        stats.available,
    )


@dataclass(frozen=True, slots=True)
class _Spec:
    """One metric family's name, help, type, label names and buckets."""

    name: str
    help: str
    kind: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


REQUESTS_TOTAL = _Spec(
    "lepton_requests_total", "Requests handled by the sidecar.", "counter", REQUEST_LABELS
)
REQUEST_DURATION = _Spec(
    "lepton_request_duration_milliseconds",
    "Request duration, first request byte to last response byte.",
    "histogram",
    REQUEST_LABELS,
    DURATION_BUCKETS_MS,
)
REQUEST_BYTES = _Spec(
    "lepton_request_bytes",
    "Request body size in bytes.",
    "histogram",
    REQUEST_LABELS,
    BYTES_BUCKETS,
)
RESPONSE_BYTES = _Spec(
    "lepton_response_bytes",
    "Response body size in bytes.",
    "histogram",
    REQUEST_LABELS,
    BYTES_BUCKETS,
)
TCP_OPENED = _Spec(
    "lepton_tcp_connections_opened_total", "TCP connections opened.", "counter", TCP_LABELS
)
TCP_CLOSED = _Spec(
    "lepton_tcp_connections_closed_total", "TCP connections closed.", "counter", TCP_LABELS
)
TCP_SENT = _Spec(
    "lepton_tcp_sent_bytes_total",
    "Bytes sent during response (upstream to downstream) on TCP connections.",
    "counter",
    TCP_LABELS,
)
TCP_RECEIVED = _Spec(
    "lepton_tcp_received_bytes_total",
    "Bytes received during request (downstream to upstream) on TCP connections.",
    "counter",
    TCP_LABELS,
)
UPSTREAM_ACTIVE = _Spec(
    "lepton_upstream_connections_active",
    "Upstream connections carrying a request.",
    "gauge",
    POOL_LABELS,
)
UPSTREAM_IDLE = _Spec(
    "lepton_upstream_connections_idle",
    "Upstream connections kept alive, idle.",
    "gauge",
    POOL_LABELS,
)
UPSTREAM_PENDING = _Spec(
    "lepton_upstream_requests_pending",
    "Requests waiting for an upstream connection.",
    "gauge",
    POOL_LABELS,
)
DOWNSTREAM_ACTIVE = _Spec(
    "lepton_downstream_connections_active",
    "Open downstream connections per listener.",
    "gauge",
    LISTENER_LABELS,
)
OUTLIER_EJECTIONS = _Spec(
    "lepton_outlier_ejections_total",
    "Endpoints ejected by outlier detection.",
    "counter",
    SERVICE_LABELS,
)
ENDPOINT_EJECTED = _Spec(
    "lepton_endpoint_ejected",
    "1 while outlier detection keeps the endpoint out of load balancing.",
    "gauge",
    POOL_LABELS,
)
CIRCUIT_OPEN = _Spec(
    "lepton_circuit_open",
    "1 while the circuit-breaker limit is at its max (new work overflows).",
    "gauge",
    LIMIT_LABELS,
)
CIRCUIT_OVERFLOWS = _Spec(
    "lepton_circuit_overflows_total",
    "Work refused because a circuit-breaker limit was at its max.",
    "counter",
    LIMIT_LABELS,
)
RETRIES = _Spec(
    "lepton_retries_total",
    "Retries by outcome: attempted, budget_exhausted (refused by the retry budget), "
    "limit (refused by the max_retries circuit limit).",
    "counter",
    OUTCOME_LABELS,
)
RETRY_BUDGET_AVAILABLE = _Spec(
    "lepton_retry_budget_available",
    "Retries the retry budget would grant now.",
    "gauge",
    SERVICE_LABELS,
)
MIRROR_REQUESTS = _Spec(
    "lepton_mirror_requests_total",
    "Mirrored (shadow) requests by outcome.",
    "counter",
    OUTCOME_LABELS,
)
TLS_HANDSHAKE_FAILURES = _Spec(
    "lepton_tls_handshake_failures_total",
    "TLS handshakes that failed, inbound or outbound, by reason (unknown_ca, expired, "
    "not_yet_valid, identity_mismatch, no_client_certificate, protocol_version, plaintext, "
    "other).",
    "counter",
    ("reason",),
)
TLS_HANDSHAKES = _Spec(
    "lepton_tls_handshakes_total",
    "TLS handshakes completed, by side (inbound, outbound) and whether a session was resumed.",
    "counter",
    ("side", "resumed"),
)
CERT_EXPIRATION = _Spec(
    "lepton_identity_cert_expiration_timestamp_seconds",
    "When this sidecar's workload certificate expires, in Unix time.",
    "gauge",
    (),
)
AUTHZ_DECISIONS = _Spec(
    "lepton_authz_decisions_total",
    "Inbound authorization decisions: decision is allow or deny (enforced), audit (an AUDIT "
    "rule matched), dry_run_allow or dry_run_deny (the decision with dry-run policies "
    "enforced too); policy and rule name what decided ('-' when no rule did).",
    "counter",
    ("decision", "policy", "rule"),
)
JWT_AUTHENTICATIONS = _Spec(
    "lepton_jwt_authentications_total",
    "Inbound requests that carried a JWT (or needed one), by provider and result: ok or the "
    "cause of the refusal (expired, bad_signature, wrong_issuer, wrong_audience, unknown_key, "
    "malformed, not_yet_valid, algorithm_not_allowed, oversized, missing).",
    "counter",
    ("provider", "result"),
)
RATE_LIMITED = _Spec(
    "lepton_rate_limited_total",
    "Inbound requests refused with 429 by a local rate limit, by limit name.",
    "counter",
    ("limit",),
)
LABEL_OVERFLOW = _Spec(
    "lepton_metrics_label_overflow_total",
    "Observations folded into destination_service=overflow because the label "
    "cardinality limit was reached.",
    "counter",
    OVERFLOW_LABELS,
)


class _Labels:
    """A label tuple's values and its escaped exposition text, built once."""

    __slots__ = ("text", "values")

    def __init__(self, names: tuple[str, ...], values: tuple[str, ...]) -> None:
        self.values = values
        self.text = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))


class _RequestSeries:
    """One label tuple's request count, duration and size histograms."""

    __slots__ = (
        "count",
        "duration_buckets",
        "duration_sum",
        "labels",
        "request_bytes_buckets",
        "request_bytes_sum",
        "response_bytes_buckets",
        "response_bytes_sum",
    )

    def __init__(self, labels: _Labels) -> None:
        self.labels = labels
        self.count = 0
        self.duration_sum = 0.0
        self.duration_buckets = [0] * (len(DURATION_BUCKETS_MS) + 1)
        self.request_bytes_sum = 0
        self.request_bytes_buckets = [0] * (len(BYTES_BUCKETS) + 1)
        self.response_bytes_sum = 0
        self.response_bytes_buckets = [0] * (len(BYTES_BUCKETS) + 1)


class _TcpSeries:
    """One label tuple's TCP connection and byte counters."""

    __slots__ = ("closed", "labels", "opened", "received", "sent")

    def __init__(self, labels: _Labels) -> None:
        self.labels = labels
        self.opened = 0
        self.closed = 0
        self.sent = 0
        self.received = 0


class _CountSeries:
    """One label tuple's counter."""

    __slots__ = ("count", "labels")

    def __init__(self, labels: _Labels) -> None:
        self.labels = labels
        self.count = 0


# A family at scrape time: counters and gauges carry (labels, value) rows,
# histograms (labels, per-bucket counts, sum) rows.
_Row = tuple[_Labels, int | float] | tuple[_Labels, list[int], int | float]


class ProxyMetrics:
    """All of one sidecar's metrics, in its own registry (never the global one)."""

    __slots__ = (
        "_listener_source",
        "_max_series",
        "_mirror",
        "_overflow",
        "_pool_source",
        "_requests",
        "_resilience_source",
        "_tcp",
        "_security_source",
        "_tls_source",
        "registry",
    )

    def __init__(self, max_series: int = DEFAULT_MAX_SERIES) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be >= 1, got {max_series}")
        self._max_series = max_series
        self._requests: dict[RequestKey, _RequestSeries] = {}
        self._tcp: dict[TcpKey, _TcpSeries] = {}
        self._mirror: dict[MirrorKey, _CountSeries] = {}
        # Observations folded into an overflow series, per table.
        self._overflow = {"requests": 0, "tcp": 0}
        self._pool_source: PoolSource | None = None
        self._listener_source: ListenerSource | None = None
        self._resilience_source: ResilienceSource | None = None
        self._tls_source: TlsSource | None = None
        self._security_source: SecuritySource | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # -- sources pulled at scrape time -------------------------------------

    def set_pool_source(self, fn: PoolSource | None) -> None:
        """`fn()` yields (destination_service, endpoint, active, idle, pending)."""
        self._pool_source = fn

    def set_listener_source(self, fn: ListenerSource | None) -> None:
        """`fn()` yields (listener_name, active_connections)."""
        self._listener_source = fn

    def set_resilience_source(self, fn: ResilienceSource | None) -> None:
        """`fn()` yields one `ResilienceRow` per destination (see its docstring).

        It feeds lepton_outlier_ejections_total, lepton_endpoint_ejected,
        lepton_circuit_open, lepton_circuit_overflows_total,
        lepton_retries_total and lepton_retry_budget_available. Typically:
        `lambda: [resilience_row(svc, d.breaker, d.budget, d.detector) for svc, d in ...]`.
        """
        self._resilience_source = fn

    def set_tls_source(self, source: TlsSource | None) -> None:
        """Feeds lepton_tls_handshake_failures_total, lepton_tls_handshakes_total and
        lepton_identity_cert_expiration_timestamp_seconds (see `TlsSource`)."""
        self._tls_source = source

    def set_security_source(self, source: SecuritySource | None) -> None:
        """Feeds lepton_authz_decisions_total, lepton_jwt_authentications_total and
        lepton_rate_limited_total (see `SecuritySource`)."""
        self._security_source = source

    # -- hot path ------------------------------------------------------------

    def observe_request(
        self,
        reporter: str,
        source_workload: str,
        destination_service: str,
        code: int,
        flags: str,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """Count one finished HTTP request. `flags` is the reason code or "-"."""
        key = (reporter, source_workload, destination_service, code, flags)
        s = self._requests.get(key)
        if s is None:
            s = self._new_request_series(key)
        s.count += 1
        ms = duration_s * 1000.0
        s.duration_sum += ms
        s.duration_buckets[bisect_left(DURATION_BUCKETS_MS, ms)] += 1
        s.request_bytes_sum += request_bytes
        s.request_bytes_buckets[bisect_left(BYTES_BUCKETS, request_bytes)] += 1
        s.response_bytes_sum += response_bytes
        s.response_bytes_buckets[bisect_left(BYTES_BUCKETS, response_bytes)] += 1

    def tcp_opened(self, reporter: str, source_workload: str, destination_service: str) -> None:
        key = (reporter, source_workload, destination_service)
        s = self._tcp.get(key)
        if s is None:
            s = self._new_tcp_series(key)
        s.opened += 1

    def tcp_closed(
        self,
        reporter: str,
        source_workload: str,
        destination_service: str,
        sent: int,
        received: int,
    ) -> None:
        """Count one closed TCP connection.

        `sent` is what went to the upstream, `received` what came back from
        it. Istio's `tcp_sent_bytes_total` means "bytes sent during response"
        (upstream -> downstream) and `tcp_received_bytes_total` "bytes
        received during request" (downstream -> upstream); we keep Istio's
        meaning so dashboards read the same, hence the crossed assignment.
        """
        key = (reporter, source_workload, destination_service)
        s = self._tcp.get(key)
        if s is None:
            s = self._new_tcp_series(key)
        s.closed += 1
        s.sent += received
        s.received += sent

    def observe_mirror(self, destination_service: str, outcome: str) -> None:
        """Count one mirrored request. `outcome` is a small fixed set the caller
        owns, e.g. "sent", "failed" (error or 5xx), "dropped" (not sent: over
        a limit)."""
        key = (destination_service, outcome)
        s = self._mirror.get(key)
        if s is None:
            s = self._new_mirror_series(key)
        s.count += 1

    # -- slow path: a label tuple seen for the first time ---------------------

    def _new_request_series(self, key: RequestKey) -> _RequestSeries:
        if len(self._requests) >= self._max_series:
            self._overflow["requests"] += 1
            key = (key[0], key[1], OVERFLOW, key[3], key[4])
            s = self._requests.get(key)
            if s is not None:
                return s
            if len(self._requests) >= 2 * self._max_series:
                key = (key[0], OVERFLOW, OVERFLOW, key[3], key[4])
                s = self._requests.get(key)
                if s is not None:
                    return s
        values = (key[0], key[1], key[2], str(key[3]), key[4])
        s = self._requests[key] = _RequestSeries(_Labels(REQUEST_LABELS, values))
        return s

    def _new_tcp_series(self, key: TcpKey) -> _TcpSeries:
        if len(self._tcp) >= self._max_series:
            self._overflow["tcp"] += 1
            key = (key[0], key[1], OVERFLOW)
            s = self._tcp.get(key)
            if s is not None:
                return s
            if len(self._tcp) >= 2 * self._max_series:
                key = (key[0], OVERFLOW, OVERFLOW)
                s = self._tcp.get(key)
                if s is not None:
                    return s
        s = self._tcp[key] = _TcpSeries(_Labels(TCP_LABELS, key))
        return s

    def _new_mirror_series(self, key: MirrorKey) -> _CountSeries:
        if len(self._mirror) >= self._max_series:
            self._overflow["mirror"] = self._overflow.get("mirror", 0) + 1
            key = (OVERFLOW, key[1])
            s = self._mirror.get(key)
            if s is not None:
                return s
        s = self._mirror[key] = _CountSeries(_Labels(OUTCOME_LABELS, key))
        return s

    # -- scrape ------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition (format 0.0.4) of every metric, and its content type."""
        out: list[str] = []
        for spec, rows in self._families():
            _write_family(out, spec, rows)
        return "".join(out).encode(), CONTENT_TYPE

    def _families(self) -> Iterator[tuple[_Spec, list]]:
        """Every family with its rows: the one snapshot both exposition paths use."""
        # Snapshot the values: the scrape must not see a dict change size.
        req = list(self._requests.values())
        yield REQUESTS_TOTAL, [(s.labels, s.count) for s in req]
        yield REQUEST_DURATION, [(s.labels, s.duration_buckets, s.duration_sum) for s in req]
        yield REQUEST_BYTES, [(s.labels, s.request_bytes_buckets, s.request_bytes_sum) for s in req]
        yield (
            RESPONSE_BYTES,
            [(s.labels, s.response_bytes_buckets, s.response_bytes_sum) for s in req],
        )
        tcp = list(self._tcp.values())
        yield TCP_OPENED, [(s.labels, s.opened) for s in tcp]
        yield TCP_CLOSED, [(s.labels, s.closed) for s in tcp]
        yield TCP_SENT, [(s.labels, s.sent) for s in tcp]
        yield TCP_RECEIVED, [(s.labels, s.received) for s in tcp]
        pools = [(_Labels(POOL_LABELS, (svc, ep)), a, i, p) for svc, ep, a, i, p in self._pools()]
        yield UPSTREAM_ACTIVE, [(lb, a) for lb, a, _, _ in pools]
        yield UPSTREAM_IDLE, [(lb, i) for lb, _, i, _ in pools]
        yield UPSTREAM_PENDING, [(lb, p) for lb, _, _, p in pools]
        yield (
            DOWNSTREAM_ACTIVE,
            [(_Labels(LISTENER_LABELS, (name,)), n) for name, n in self._listeners()],
        )
        yield from self._resilience_families()
        yield MIRROR_REQUESTS, [(s.labels, s.count) for s in list(self._mirror.values())]
        yield from self._tls_families()
        yield from self._security_families()
        yield (
            LABEL_OVERFLOW,
            [(_Labels(OVERFLOW_LABELS, (table,)), n) for table, n in self._overflow.items()],
        )

    def _resilience_families(self) -> Iterator[tuple[_Spec, list]]:
        """The six resilience families from one pull of the source.

        The rows (and the iterables inside them) are read in full before any
        family is yielded, so a malformed row costs the resilience families
        of this scrape, never the scrape.
        """
        families: dict[_Spec, list] = {spec: [] for spec in _RESILIENCE_SPECS}
        try:
            for row in _pull(self._resilience_source, "resilience"):
                _add_resilience_row(families, row)
        except Exception:
            _log.exception("metrics resilience source gave a bad row; its metrics are left out")
            families = {spec: [] for spec in _RESILIENCE_SPECS}
        yield from families.items()

    def _tls_families(self) -> Iterator[tuple[_Spec, list]]:
        src = self._tls_source
        yield (
            TLS_HANDSHAKE_FAILURES,
            [
                (_Labels(("reason",), (r,)), n)
                for r, n in _pull(_method(src, "failure_rows"), "tls")
            ],
        )
        yield (
            TLS_HANDSHAKES,
            [
                (_Labels(("side", "resumed"), (side, resumed)), n)
                for side, resumed, n in _pull(_method(src, "handshake_rows"), "tls")
            ],
        )
        expiry = _pull(_method(src, "expiry_timestamp", single=True), "tls")
        yield CERT_EXPIRATION, [(_Labels((), ()), v) for v in expiry if v is not None]

    def _security_families(self) -> Iterator[tuple[_Spec, list]]:
        src = self._security_source
        yield (
            AUTHZ_DECISIONS,
            [
                (_Labels(AUTHZ_DECISIONS.labels, (d, p, r)), n)
                for d, p, r, n in _pull(_method(src, "authz_rows"), "security")
            ],
        )
        yield (
            JWT_AUTHENTICATIONS,
            [
                (_Labels(JWT_AUTHENTICATIONS.labels, (p, r)), n)
                for p, r, n in _pull(_method(src, "jwt_rows"), "security")
            ],
        )
        yield (
            RATE_LIMITED,
            [
                (_Labels(RATE_LIMITED.labels, (lim,)), n)
                for lim, n in _pull(_method(src, "rate_limited_rows"), "security")
            ],
        )

    def _pools(self) -> list[PoolRow]:
        return _pull(self._pool_source, "pool")

    def _listeners(self) -> list[tuple[str, int]]:
        return _pull(self._listener_source, "listener")


_RESILIENCE_SPECS = (
    OUTLIER_EJECTIONS,
    ENDPOINT_EJECTED,
    CIRCUIT_OPEN,
    CIRCUIT_OVERFLOWS,
    RETRIES,
    RETRY_BUDGET_AVAILABLE,
)


def _add_resilience_row(families: dict[_Spec, list], row: ResilienceRow) -> None:
    svc, ejections, endpoints, circuit, attempted, exhausted, limited, available = row
    service = _Labels(SERVICE_LABELS, (svc,))
    families[OUTLIER_EJECTIONS].append((service, ejections))
    families[ENDPOINT_EJECTED].extend(
        (_Labels(POOL_LABELS, (svc, ep)), int(ejected)) for ep, ejected in endpoints
    )
    for limit, at_max, overflows in circuit:
        labels = _Labels(LIMIT_LABELS, (svc, limit))
        families[CIRCUIT_OPEN].append((labels, int(at_max)))
        families[CIRCUIT_OVERFLOWS].append((labels, overflows))
    families[RETRIES].extend(
        (_Labels(OUTCOME_LABELS, (svc, outcome)), n)
        for outcome, n in (
            ("attempted", attempted),
            ("budget_exhausted", exhausted),
            ("limit", limited),
        )
    )
    families[RETRY_BUDGET_AVAILABLE].append((service, available))


def _method(obj: object, name: str, *, single: bool = False) -> Callable[[], Iterable] | None:
    """`obj.name` as a row source for `_pull` (one value -> one row when `single`)."""
    if obj is None:
        return None
    fn = getattr(obj, name)
    return (lambda: (fn(),)) if single else fn


def _pull(source: Callable[[], Iterable[tuple]] | None, what: str) -> list:
    """Rows from a scrape-time source; a failing source costs its rows, not the scrape."""
    if source is None:
        return []
    try:
        return list(source())
    except Exception:
        _log.exception("metrics %s source failed; its gauges are left out of this scrape", what)
        return []


# -- the text writer ----------------------------------------------------------


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _num(v: int | float) -> str:
    if isinstance(v, int) or math.isfinite(v):
        return repr(v)
    return floatToGoString(v)  # +Inf, -Inf, NaN as Prometheus spells them


def _le_suffixes(buckets: tuple[float, ...]) -> tuple[str, ...]:
    """`,le="<bound>"} ` for each bucket, +Inf last: the tail of a bucket line's labels."""
    return tuple(f',le="{floatToGoString(b)}"}} ' for b in (*buckets, math.inf))


_LE_SUFFIXES = {b: _le_suffixes(b) for b in (DURATION_BUCKETS_MS, BYTES_BUCKETS)}


def _write_family(out: list[str], spec: _Spec, rows: list) -> None:
    name = spec.name
    out.append(f"# HELP {name} {spec.help}\n# TYPE {name} {spec.kind}\n")
    if spec.kind != "histogram":
        out.extend([f"{name}{{{lb.text}}} {_num(v)}\n" for lb, v in rows])
        return
    bucket = name + "_bucket{"
    suffixes = _LE_SUFFIXES[spec.buckets]
    for lb, counts, total in rows:
        text = lb.text
        out.extend(
            [
                f"{bucket}{text}{suffix}{acc}\n"
                for suffix, acc in zip(suffixes, accumulate(counts), strict=True)
            ]
        )
        out.append(f"{name}_count{{{text}}} {sum(counts)}\n{name}_sum{{{text}}} {_num(total)}\n")


# -- the prometheus-client view -------------------------------------------------


class _Collector:
    """Yields the same snapshot as prometheus-client metric families."""

    __slots__ = ("_metrics",)

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for spec, rows in self._metrics._families():
            yield _to_family(spec, rows)


def _to_family(spec: _Spec, rows: list) -> Metric:
    if spec.kind == "histogram":
        les = [floatToGoString(b) for b in (*spec.buckets, math.inf)]
        hist = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
        for lb, counts, total in rows:
            hist.add_metric(lb.values, list(zip(les, accumulate(counts), strict=True)), total)
        return hist
    cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
    family = cls(spec.name, spec.help, labels=spec.labels)
    for lb, v in rows:
        family.add_metric(lb.values, v)
    return family
