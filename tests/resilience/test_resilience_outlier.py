"""OutlierDetector: consecutive failures eject, timers return, limits and decay.

Time is a fake loop's: `loop.advance(dt)` fires due timers at their own
deadlines, so every ejection's start and end is checked to the exact second.
"""

from __future__ import annotations

import asyncio

import pytest
from resilience_support import FakeLoop

from lepton_mesh.policy.sidecar_config import Address
from lepton_mesh.policy.traffic import OutlierDetection
from lepton_mesh.proxy.outbound.endpoints import EndpointState
from lepton_mesh.proxy.resilience.outlier import OutlierDetector


def endpoints(n: int) -> list[EndpointState]:
    return [EndpointState(Address("10.0.0.1", 8000 + i)) for i in range(n)]


def detector(
    n: int = 4, loop: FakeLoop | None = None, **config: float
) -> tuple[OutlierDetector, list[EndpointState], FakeLoop]:
    loop = loop or FakeLoop(1000.0)
    eps = endpoints(n)
    d = OutlierDetector(OutlierDetection(**config), loop)  # type: ignore[arg-type]
    d.set_endpoints(eps)
    return d, eps, loop


@pytest.mark.parametrize(
    ("c5xx", "cgw", "outcomes", "ejected"),
    [
        (3, 0, ["5xx"] * 3, True),
        (3, 0, ["5xx"] * 2, False),
        (3, 0, ["5xx", "5xx", "success", "5xx", "5xx"], False),  # success resets
        (3, 0, ["gateway"] * 3, True),  # gateway errors are 5xx too
        (3, 0, ["5xx", "gateway", "5xx"], True),
        (0, 2, ["gateway", "gateway"], True),
        (0, 2, ["gateway", "5xx", "gateway"], False),  # a plain 5xx resets the gateway run
        (0, 2, ["gateway", "success", "gateway"], False),
        (0, 2, ["5xx"] * 10, False),  # the 5xx trigger is off
        (5, 2, ["5xx", "5xx", "5xx", "gateway", "gateway"], True),  # gateway fires first
        (0, 0, ["gateway"] * 50, False),  # both off
        (1, 0, ["success", "5xx"], True),
    ],
)
def test_consecutive_failures_eject(
    c5xx: int, cgw: int, outcomes: list[str], ejected: bool
) -> None:
    d, (ep, *_), _ = detector(consecutive_5xx=c5xx, consecutive_gateway_errors=cgw)
    for outcome in outcomes:
        d.report(ep, outcome)  # type: ignore[arg-type]
    assert ep.ejected is ejected
    assert d.ejections_total == int(ejected)
    assert d.currently_ejected() == int(ejected)


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    d, (ep, *_), loop = detector(consecutive_5xx=1, base_ejection_time=10.0, max_ejection_time=25.0)
    for expected in (10.0, 20.0, 25.0, 25.0):
        start = loop.now
        d.report(ep, "5xx")
        assert ep.ejected
        assert d.describe(ep)["ejected_until"] == start + expected
        assert loop.pending() == [start + expected]  # one timer, no sleeping task
        loop.advance(expected - 0.001)
        assert ep.ejected
        loop.advance(0.001)
        assert not ep.ejected
        assert loop.pending() == []
    assert d.ejections_total == 4
    assert d.describe(ep)["times_ejected"] == 3  # stops at the count that reaches the cap


def test_times_ejected_decays_while_the_endpoint_stays_in_service() -> None:
    d, (ep, *_), loop = detector(
        consecutive_5xx=1, base_ejection_time=10.0, max_ejection_time=100.0
    )
    for _ in range(3):  # out for 10, 20, 30 s
        d.report(ep, "5xx")
        loop.advance(loop.pending()[0] - loop.now)
    assert d.describe(ep)["times_ejected"] == 3
    loop.advance(9.999)
    assert d.describe(ep)["times_ejected"] == 3
    loop.advance(0.001)
    assert d.describe(ep)["times_ejected"] == 2
    loop.advance(10.0)
    assert d.describe(ep)["times_ejected"] == 1
    d.report(ep, "5xx")  # the next ejection builds on the decayed count
    assert d.describe(ep)["times_ejected"] == 2
    assert d.describe(ep)["ejection_remaining"] == 20.0
    loop.advance(20.0)
    loop.advance(1000.0)
    assert d.describe(ep)["times_ejected"] == 0
    d.report(ep, "5xx")
    assert d.describe(ep)["ejection_remaining"] == 10.0


@pytest.mark.parametrize(
    ("n", "max_percent", "ejectable"),
    [
        (4, 50.0, 2),
        (4, 75.0, 3),
        (4, 100.0, 4),
        (4, 25.0, 1),
        (4, 10.0, 0),  # a hard cap: even one of four is 25% > 10%
        (4, 0.0, 0),
        (3, 50.0, 1),  # 2/3 > 50%
        (2, 50.0, 1),
        (1, 50.0, 0),  # the only endpoint of a service is never ejected at 50%
        (1, 100.0, 1),
        (10, 30.0, 3),
    ],
)
def test_max_ejection_percent(n: int, max_percent: float, ejectable: int) -> None:
    d, eps, _ = detector(n, consecutive_5xx=1, max_ejection_percent=max_percent)
    for ep in eps:
        d.report(ep, "5xx")
    assert [ep.ejected for ep in eps] == [True] * ejectable + [False] * (n - ejectable)
    assert d.currently_ejected() == ejectable
    assert d.ejections_total == ejectable
    assert d.ejections_overflow == n - ejectable


def test_a_refused_ejection_goes_ahead_on_the_next_failure_once_there_is_room() -> None:
    d, (a, b, *_), loop = detector(4, consecutive_5xx=2, max_ejection_percent=25.0)
    d.report(a, "5xx")
    d.report(a, "5xx")
    d.report(b, "5xx")
    d.report(b, "5xx")
    assert (a.ejected, b.ejected, d.ejections_overflow) == (True, False, 1)
    assert d.describe(b)["consecutive_5xx"] == 2  # kept: b is still an outlier
    loop.advance(30.0)  # a returns
    assert not a.ejected
    d.report(b, "5xx")
    assert b.ejected


def test_reports_while_ejected_are_ignored_and_ejection_resets_counts() -> None:
    d, (ep, *_), loop = detector(consecutive_5xx=2)
    d.report(ep, "5xx")
    d.report(ep, "5xx")
    for _ in range(10):  # the in-flight tail of the failing run
        d.report(ep, "gateway")
    assert d.ejections_total == 1
    info = d.describe(ep)
    assert (info["consecutive_5xx"], info["consecutive_gateway_errors"]) == (0, 0)
    loop.advance(30.0)
    assert not ep.ejected
    d.report(ep, "5xx")
    assert not ep.ejected  # a fresh run is needed


def test_reports_for_unknown_endpoints_are_ignored() -> None:
    d, _, loop = detector(consecutive_5xx=1)
    stranger = EndpointState(Address("10.9.9.9", 1))
    d.report(stranger, "5xx")
    assert not stranger.ejected
    assert loop.pending() == []
    assert d.describe(stranger)["tracked"] is False


def test_removed_endpoints_return_to_service_and_their_timers_are_cancelled() -> None:
    d, (a, b, c, _), loop = detector(4, consecutive_5xx=1, max_ejection_percent=100.0)
    for ep in (a, b):
        d.report(ep, "5xx")
    d.report(c, "gateway")
    d.set_endpoints([c])
    assert (a.ejected, b.ejected, c.ejected) == (False, False, True)
    assert len(loop.pending()) == 1
    assert d.currently_ejected() == 1
    d.report(a, "5xx")  # a late report for a removed endpoint
    assert not a.ejected
    assert d.endpoint_states() == [("10.0.0.1:8002", True)]


def test_a_rebuilt_endpoint_object_keeps_its_counts_and_ejection() -> None:
    d, (a, b), loop = detector(2, consecutive_5xx=2)
    d.report(a, "5xx")
    d.report(a, "5xx")
    d.report(b, "5xx")
    a2, b2 = endpoints(2)
    d.set_endpoints([a2, b2])
    assert a2.ejected  # carried to the new object
    assert d.describe(b2)["consecutive_5xx"] == 1
    loop.advance(30.0)
    assert not a2.ejected


def test_update_keeps_running_ejections_and_applies_new_thresholds() -> None:
    d, (a, b, *_), loop = detector(consecutive_5xx=1, base_ejection_time=30.0)
    d.report(a, "5xx")
    d.update(OutlierDetection(consecutive_5xx=3, base_ejection_time=5.0))
    assert d.describe(a)["ejected_until"] == 1030.0
    d.report(b, "5xx")
    d.report(b, "5xx")
    assert not b.ejected
    d.report(b, "5xx")
    assert b.ejected and d.describe(b)["ejected_until"] == 1005.0
    loop.advance(30.0)
    assert not a.ejected and not b.ejected


def test_update_to_none_returns_everyone_and_stops_detecting() -> None:
    d, (a, b, *_), loop = detector(consecutive_5xx=1)
    d.report(a, "5xx")
    d.report(b, "gateway")
    d.update(None)
    assert not a.ejected and not b.ejected
    assert loop.pending() == []
    assert d.currently_ejected() == 0
    d.report(a, "5xx")
    assert not a.ejected
    d.update(OutlierDetection(consecutive_5xx=1))
    d.report(a, "5xx")
    assert a.ejected and d.describe(a)["times_ejected"] == 1  # history forgotten


def test_close_cancels_timers_and_returns_everyone() -> None:
    d, eps, loop = detector(consecutive_5xx=1, max_ejection_percent=100.0)
    for ep in eps:
        d.report(ep, "gateway")
    d.close()
    assert not any(ep.ejected for ep in eps)
    assert loop.pending() == []
    assert d.endpoint_states() == []


def test_describe_and_endpoint_states() -> None:
    d, (a, b, *_), loop = detector(consecutive_5xx=3, consecutive_gateway_errors=5)
    d.report(a, "gateway")
    d.report(a, "gateway")
    assert d.describe(a) == {
        "tracked": True,
        "ejected": False,
        "consecutive_5xx": 2,
        "consecutive_gateway_errors": 2,
        "times_ejected": 0,
        "ejected_until": None,
        "ejection_remaining": None,
    }
    d.report(b, "5xx")
    d.report(b, "5xx")
    d.report(b, "5xx")
    loop.advance(12.5)
    assert d.describe(b) == {
        "tracked": True,
        "ejected": True,
        "consecutive_5xx": 0,
        "consecutive_gateway_errors": 0,
        "times_ejected": 1,
        "ejected_until": 1030.0,
        "ejection_remaining": 17.5,
    }
    assert d.endpoint_states() == [
        ("10.0.0.1:8000", False),
        ("10.0.0.1:8001", True),
        ("10.0.0.1:8002", False),
        ("10.0.0.1:8003", False),
    ]


def test_ejection_bumps_the_generation_the_balancer_watches() -> None:
    d, (a, *_), loop = detector(consecutive_5xx=1)
    before = a.generation.value
    d.report(a, "5xx")
    assert a.generation.value == before + 1 and not a.available
    loop.advance(30.0)
    assert a.generation.value == before + 2 and a.available


def test_unknown_outcome_is_a_caller_bug() -> None:
    d, (a, *_), _ = detector()
    with pytest.raises(ValueError, match="outcome"):
        d.report(a, "timeout")  # type: ignore[arg-type]


class SignallingEndpoint(EndpointState):
    """Sets `returned` when taken back into service."""

    def __init__(self, address: Address) -> None:
        super().__init__(address)
        self.returned = asyncio.Event()

    def set_ejected(self, ejected: bool) -> None:
        super().set_ejected(ejected)
        if not ejected:
            self.returned.set()


async def test_a_real_event_loop_returns_the_endpoint() -> None:
    loop = asyncio.get_running_loop()
    d = OutlierDetector(
        OutlierDetection(
            consecutive_5xx=1,
            base_ejection_time=0.01,
            max_ejection_time=0.01,
            max_ejection_percent=100,  # the only endpoint
        ),
        loop,
    )
    ep = SignallingEndpoint(Address("127.0.0.1", 1))
    d.set_endpoints([ep])
    d.report(ep, "5xx")
    assert ep.ejected
    await asyncio.wait_for(ep.returned.wait(), timeout=5.0)
    assert not ep.ejected
    assert d.currently_ejected() == 0
