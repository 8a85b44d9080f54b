"""Helpers for the load-balancing tests: a fake clock, endpoint sets, pick counts."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from lepton_mesh.policy.sidecar_config import Address, Endpoint
from lepton_mesh.policy.traffic import HashOn, LoadBalancer
from lepton_mesh.proxy.outbound.balance import Balancer, make_balancer
from lepton_mesh.proxy.outbound.endpoints import EndpointState, EndpointTable

ALGORITHMS = ("least_request", "peak_ewma", "round_robin", "random", "ring_hash")


class FakeClock:
    """Monotonic time that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def addr(i: int) -> Address:
    return Address(f"10.0.0.{i}", 8080)


def endpoint(i: int, weight: int = 1, zone: str | None = None, healthy: bool = True) -> Endpoint:
    labels: Mapping[str, str] = MappingProxyType({"zone": zone} if zone else {})
    return Endpoint(addr(i), weight, labels, healthy)


def states(
    weights: Sequence[int] = (1, 1, 1),
    *,
    zones: Sequence[str | None] | None = None,
    clock: FakeClock | None = None,
) -> tuple[EndpointTable, list[EndpointState]]:
    table = EndpointTable(clock=clock or FakeClock())
    zs = zones if zones is not None else [None] * len(weights)
    eps = [endpoint(i, w, z) for i, (w, z) in enumerate(zip(weights, zs, strict=True))]
    return table, table.sync(eps)


def lb(algorithm: str, *, panic_threshold: float = 50.0, locality: bool = False) -> LoadBalancer:
    hash_on = HashOn(header="x-user") if algorithm == "ring_hash" else None
    return LoadBalancer(algorithm, hash_on, panic_threshold, locality)  # type: ignore[arg-type]


def balancer(
    algorithm: str,
    eps: Sequence[EndpointState],
    *,
    seed: int = 7,
    panic_threshold: float = 50.0,
    locality: bool = False,
    local_zone: str | None = None,
) -> Balancer:
    return make_balancer(
        lb(algorithm, panic_threshold=panic_threshold, locality=locality),
        eps,
        rng=random.Random(seed),
        local_zone=local_zone,
    )


def counts(
    bal: Balancer,
    eps: Sequence[EndpointState],
    picks: int,
    *,
    avoid: EndpointState | None = None,
    keyed: bool = False,
) -> list[int]:
    """How many of `picks` went to each of `eps` (by position)."""
    index = {e: i for i, e in enumerate(eps)}
    c: Counter[int] = Counter()
    for k in range(picks):
        e = bal.pick(str(k).encode() if keyed else None, avoid)
        assert e is not None
        c[index[e]] += 1
    return [c[i] for i in range(len(eps))]


def shares(c: Sequence[int]) -> list[float]:
    total = sum(c)
    return [x / total for x in c]
