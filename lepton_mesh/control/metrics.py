"""The control daemon's Prometheus metrics, served at GET /metrics on the admin port.

Everything is read from the replica's state at scrape time: no code path of
the daemon does metrics work (the counters are the push server's own plain
integers), and a scrape costs one pass over this replica's streams. The
families (deploy/observability/alerts.yml alerts on them; docs/monitoring.md
explains each):

- lepton_control_connected_sidecars: sidecars registered on this replica's streams.
- lepton_control_etcd_up: 1 while this replica's watch on etcd is healthy, else 0
  (it keeps serving from its cache meanwhile; writes fail).
- lepton_control_store_revision: the etcd revision this replica's cache is at.
- lepton_control_policy_revision: the policy revision this replica serves.
- lepton_control_is_leader: 1 on the replica that runs the singleton jobs.
- lepton_control_sidecars_not_acked: sidecars on this replica whose applied
  config version is behind the snapshot version control wants them at (not
  acked yet, NACKed, or not sent yet because the stream is backed up).
- lepton_control_sidecar_ack_lag_seconds{node_id,service,namespace}: for each
  of those only, how long it has been behind without a break. A series exists
  only while its sidecar is behind, so the family stays small in a healthy
  mesh whatever its size.
- lepton_control_pushes_total: snapshots sent to sidecars (one per sidecar per push).
- lepton_control_push_builds_total: snapshot builds (one per group build), so
  coalescing shows: builds rise by groups per flush, not by applies, and pushes
  by the sidecars of the groups whose snapshot changed.
- lepton_control_nacks_total: snapshots sidecars rejected (NACKs received).
- lepton_control_info{replica}: 1, naming the replica.

Ack lag is measured from the first scrape that saw the sidecar behind, so it
reads up to one scrape interval short; alerts wait minutes, which that does
not change. The clock is monotonic. A sidecar that catches up (or leaves) is
forgotten at the next scrape.

Invariants: runs on the event loop, like the admin API that calls it; a
component the context lacks (a fake in a test, a daemon still starting) omits
its families' samples rather than failing the scrape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["AckRow", "ControlMetrics", "ack_rows"]

LAG_LABELS = ("node_id", "service", "namespace")


class AckRow(NamedTuple):
    """One sidecar stream's config state: the version control wants it at, and
    the version it last acked (0: none yet)."""

    node_id: str
    service: str
    namespace: str
    wanted: int
    applied: int


def ack_rows(push: Any) -> list[AckRow]:
    """Every welcomed stream's `AckRow`, from the push server."""
    return [AckRow(*row) for row in push.ack_rows()]


class ControlMetrics:
    """The families above for one replica, in a registry of their own (never the global one).

    `ctx` is the daemon's ControlContext (or anything with the same attributes).
    """

    def __init__(self, ctx: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ctx = ctx
        self._clock = clock
        self._behind_since: dict[str, float] = {}  # node_id -> first scrape that saw it behind
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> tuple[bytes, str]:
        """The text exposition (format 0.0.4) and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def collect(self) -> Iterator[Metric]:
        ctx = self._ctx
        replica = str(getattr(ctx, "replica_id", "") or "")
        yield _gauge("info", "This control replica (value 1).", [((replica,), 1)], ("replica",))
        registry = getattr(ctx, "registry", None)
        yield _gauge(
            "connected_sidecars",
            "Sidecars registered on this replica's streams.",
            [((), len(registry.local()))] if registry is not None else [],
        )
        cache = getattr(ctx, "cache", None)
        yield _gauge(
            "etcd_up",
            "1 while this replica's watch on etcd is healthy, else 0 (it serves from its cache).",
            [((), int(bool(cache.healthy)))] if cache is not None else [],
        )
        yield _gauge(
            "store_revision",
            "The etcd revision this replica's cache is at.",
            [((), cache.revision)] if cache is not None else [],
        )
        policies = getattr(ctx, "policies", None)
        yield _gauge(
            "policy_revision",
            "The policy revision this replica serves.",
            [((), policies.revision())] if policies is not None else [],
        )
        election = getattr(ctx, "election", None)
        yield _gauge(
            "is_leader",
            "1 on the replica that leads (runs history and etcd compaction), else 0.",
            [((), int(bool(election.is_leader)))] if election is not None else [],
        )
        push = getattr(ctx, "push", None)
        yield from self._ack_families(push)
        yield from _push_counters(push)

    def _ack_families(self, push: Any) -> Iterator[Metric]:
        behind = [r for r in ack_rows(push) if r.applied < r.wanted] if push is not None else []
        now = self._clock()
        since = {r.node_id: self._behind_since.get(r.node_id, now) for r in behind}
        self._behind_since = since  # caught up or gone: forgotten
        yield _gauge(
            "sidecars_not_acked",
            "Sidecars on this replica whose applied config version is behind the one "
            "control wants them at.",
            [((), len(behind))] if push is not None else [],
        )
        yield _gauge(
            "sidecar_ack_lag_seconds",
            "How long a sidecar has been behind the config version control wants it at "
            "(a series only while it is behind).",
            [((r.node_id, r.service, r.namespace), now - since[r.node_id]) for r in behind],
            LAG_LABELS,
        )


# (family, PushServer attribute, help): the push server's counters since it started.
_PUSH_COUNTERS = (
    ("pushes", "pushes", "Snapshots sent to sidecars (one per sidecar per push)."),
    ("push_builds", "builds", "Snapshot builds (one per sidecar group per build)."),
    ("nacks", "nacks", "Snapshots sidecars rejected (NACKs received)."),
)


def _push_counters(push: Any) -> Iterator[Metric]:
    for name, attr, help_text in _PUSH_COUNTERS:
        family = CounterMetricFamily(f"lepton_control_{name}", help_text)
        count = getattr(push, attr, None)  # a fake push server may not count
        if count is not None:
            family.add_metric((), count)
        yield family


def _gauge(
    name: str,
    help_text: str,
    rows: Iterable[tuple[tuple[str, ...], float]],
    labels: tuple[str, ...] = (),
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"lepton_control_{name}", help_text, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family
