"""The concrete layer of outbound traffic: backends and the state that guards them.

A `Cluster` is what a route rule's backend names: a service, or a subset of
its endpoints selected by labels, with a balancer over them. All clusters of
one service share that service's `ServiceState`: endpoint states (load,
latency estimate, ejection), the circuit breaker, the retry budget and the
outlier detector. That state outlives config swaps (keyed by service name in
`ServiceStates`), so a new snapshot never forgets which endpoint was ejected
or how many requests are in flight; only its configuration is replaced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from lepton_mesh.policy.decisions import in_subset
from lepton_mesh.policy.sidecar_config import Endpoint
from lepton_mesh.policy.traffic import DestinationPolicy, HashOn, Subset
from lepton_mesh.proxy.observe.metrics import ResilienceRow, resilience_row
from lepton_mesh.proxy.outbound.balance import Balancer, make_balancer
from lepton_mesh.proxy.outbound.endpoints import EndpointState, EndpointTable
from lepton_mesh.proxy.resilience.circuit import CircuitBreaker
from lepton_mesh.proxy.resilience.outlier import OutlierDetector
from lepton_mesh.proxy.resilience.retry_budget import RetryBudget


class ServiceState:
    """What one destination service keeps across config swaps."""

    __slots__ = (
        "breaker",
        "budget",
        "name",
        "outlier",
        "table",
    )

    def __init__(
        self, name: str, policy: DestinationPolicy, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.name = name
        self.table = EndpointTable()
        self.breaker = CircuitBreaker(policy.limits)
        self.budget = RetryBudget(policy.retry_budget)
        self.outlier = OutlierDetector(policy.outlier, loop)

    def reconfigure(
        self, policy: DestinationPolicy, endpoints: Sequence[Endpoint]
    ) -> list[EndpointState]:
        self.breaker.update(policy.limits)
        self.budget.update(policy.retry_budget)
        self.outlier.update(policy.outlier)
        states = self.table.sync(endpoints)
        self.outlier.set_endpoints(states)
        return states


class ServiceStates:
    """All `ServiceState`s of a sidecar, by service name."""

    __slots__ = ("_loop", "by_name")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.by_name: dict[str, ServiceState] = {}

    def sync(
        self, name: str, policy: DestinationPolicy, endpoints: Sequence[Endpoint]
    ) -> tuple[ServiceState, list[EndpointState]]:
        state = self.by_name.get(name)
        if state is None:
            state = self.by_name[name] = ServiceState(name, policy, self._loop)
        return state, state.reconfigure(policy, endpoints)

    def retire(self, live: Iterable[str]) -> None:
        """Forget services no longer configured (their ejection timers stop)."""
        keep = set(live)
        for name in list(self.by_name):
            if name not in keep:
                self.by_name.pop(name).outlier.close()

    def resilience_rows(self) -> list[ResilienceRow]:
        """Rows for `ProxyMetrics.set_resilience_source`."""
        return [resilience_row(n, s.breaker, s.budget, s.outlier) for n, s in self.by_name.items()]


class Cluster:
    """A backend (service or subset) as the balancer sees it."""

    __slots__ = ("balancer", "endpoints", "hash_on", "label", "service", "state", "subset")

    def __init__(
        self,
        service: str,
        subset: str | None,
        state: ServiceState,
        endpoints: Sequence[EndpointState],
        policy: DestinationPolicy,
        local_zone: str | None,
    ) -> None:
        self.service = service
        self.subset = subset
        self.label = service if subset is None else f"{service}/{subset}"
        self.state = state
        self.endpoints = tuple(endpoints)
        self.hash_on: HashOn | None = policy.load_balancer.hash_on
        self.balancer: Balancer = make_balancer(
            policy.load_balancer, self.endpoints, local_zone=local_zone
        )


def subset_endpoints(states: Sequence[EndpointState], subset: Subset) -> list[EndpointState]:
    return [s for s in states if in_subset(s.labels, subset)]
