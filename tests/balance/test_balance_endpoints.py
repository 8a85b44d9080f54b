"""EndpointTable keeps live state across config swaps; the generation tracks what balancers cache."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from balance_support import FakeClock, addr, balancer, endpoint

from lepton_mesh.policy.sidecar_config import Address, Endpoint
from lepton_mesh.proxy.outbound.endpoints import EndpointState, EndpointTable


def test_sync_keeps_state_objects_across_swaps() -> None:
    clock = FakeClock()
    table = EndpointTable(clock=clock)
    s0, s1 = table.sync([endpoint(0), endpoint(1)])
    s0.set_ejected(True)
    started = s0.begin()  # in flight across the swap
    t = s0.begin()
    clock.advance(0.5)
    s0.end(t, True)  # a 0.5 s sample: the estimate is 0.5 s
    v = table.version

    t0, t2 = table.sync([endpoint(0, weight=3, zone="a"), endpoint(2)])
    assert t0 is s0  # same object: ejection, load and estimate survive
    assert (t0.weight, t0.zone, t0.ejected, t0.active, t0.total) == (3, "a", True, 1, 2)
    assert t0.latency() == 0.5
    assert t2 is not s1 and t2.address == addr(2) and t2.available
    assert table.get(addr(1)) is None
    assert len(table) == 2 and list(table) == [t0, t2]
    assert table.version > v
    # A request still in flight on a forgotten endpoint ends without trouble.
    s0.end(started, True)
    s1.end(s1.begin(), False)


@pytest.mark.parametrize(
    ("second", "bumps"),
    [
        ([endpoint(0), endpoint(1)], False),  # nothing changed
        ([endpoint(1), endpoint(0)], False),  # order alone changes nothing cached
        ([endpoint(0, weight=2), endpoint(1)], True),
        ([endpoint(0, zone="a"), endpoint(1)], True),
        ([endpoint(0, healthy=False), endpoint(1)], True),
        ([endpoint(0)], True),  # one removed
        ([endpoint(0), endpoint(1), endpoint(2)], True),  # one added
    ],
)
def test_sync_bumps_the_version_only_on_change(second: list[Endpoint], bumps: bool) -> None:
    table = EndpointTable()
    table.sync([endpoint(0), endpoint(1)])
    v = table.version
    table.sync(second)
    assert (table.version > v) is bumps


def test_sync_returns_states_in_config_order_and_drops_repeats() -> None:
    table = EndpointTable()
    got = table.sync([endpoint(2), endpoint(0), Endpoint(addr(2), 5)])
    assert [s.address for s in got] == [addr(2), addr(0)]
    assert got[0].weight == 1


def test_setters_bump_only_on_change() -> None:
    table = EndpointTable()
    (s,) = table.sync([endpoint(0)])
    v = table.version
    s.set_ejected(False)
    s.set_healthy(True)
    assert table.version == v
    s.set_ejected(True)
    s.set_ejected(True)
    assert table.version == v + 1
    assert not s.available
    s.set_healthy(False)
    s.set_ejected(False)
    assert table.version == v + 3
    assert not s.available and s.ejected is False and s.healthy is False


def test_a_balancer_over_a_synced_table_sees_config_changes() -> None:
    table = EndpointTable()
    eps = table.sync([endpoint(0), endpoint(1)])
    bal = balancer("random", eps)
    assert {bal.pick() for _ in range(100)} == set(eps)
    table.sync([endpoint(0, healthy=False), endpoint(1)])  # same objects, new health
    assert {bal.pick() for _ in range(100)} == {eps[1]}


def test_balancer_over_states_of_several_tables() -> None:
    a, b = EndpointTable(), EndpointTable()
    (sa,) = a.sync([endpoint(0)])
    (sb,) = b.sync([endpoint(1)])
    bal = balancer("round_robin", [sa, sb], panic_threshold=0)
    assert {bal.pick() for _ in range(4)} == {sa, sb}
    sb.set_ejected(True)
    assert {bal.pick() for _ in range(4)} == {sa}


@pytest.mark.parametrize("weight", [0, -1])
def test_weight_must_be_positive(weight: int) -> None:
    with pytest.raises(ValueError, match="weight"):
        EndpointState(Address("10.0.0.1", 80), weight)
    (s,) = EndpointTable().sync([endpoint(0)])
    with pytest.raises(ValueError, match="weight"):
        s.update(weight, MappingProxyType({}), True)
