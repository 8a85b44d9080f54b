"""Load-aware choice: P2C on requests in flight, peak EWMA on latency."""

from __future__ import annotations

from math import exp

import pytest
from balance_support import FakeClock, balancer, counts, shares, states

from lepton_mesh.policy.sidecar_config import Address
from lepton_mesh.proxy.outbound.balance import Balancer
from lepton_mesh.proxy.outbound.endpoints import (
    DEFAULT_RTT,
    FAILURE_PENALTY_CAP,
    EndpointState,
)

# -- least request: power of two choices -------------------------------------


@pytest.mark.parametrize(
    ("weights", "active", "want"),
    [
        # both always drawn: the idle one always wins
        ((1, 1), (5, 0), (0.0, 1.0)),
        ((1, 3), (0, 5), (1.0, 0.0)),
        # C wins whenever drawn (2 of 3 pairs); A and B tie, first draw wins
        ((1, 1, 1), (10, 10, 0), (1 / 6, 1 / 6, 2 / 3)),
        # pairs {0,1} -> 0, {0,2} -> 0, {1,2} -> 1; 2 never wins
        ((1, 1, 1), (0, 1, 2), (2 / 3, 1 / 3, 0.0)),
        # six pairs: the idle one wins its three, the busiest none; {1,2} ties
        ((1, 1, 1, 1), (0, 3, 3, 9), (1 / 2, 1 / 4, 1 / 4, 0.0)),
    ],
)
def test_p2c_prefers_the_less_loaded(
    weights: tuple[int, ...], active: tuple[int, ...], want: tuple[float, ...]
) -> None:
    _, eps = states(weights)
    for e, a in zip(eps, active, strict=True):
        e.active = a
    got = shares(counts(balancer("least_request", eps), eps, 30_000))
    assert got == pytest.approx(want, abs=0.012)


def test_p2c_follows_begin_and_end() -> None:
    _, eps = states((1, 1))
    bal = balancer("least_request", eps)
    first = bal.pick()
    assert first is not None
    started = first.begin()
    # While `first` has a request in flight, the other one takes every pick.
    assert {bal.pick() for _ in range(50)} == {eps[1] if first is eps[0] else eps[0]}
    first.end(started, ok=True)
    assert {bal.pick() for _ in range(200)} == set(eps)


# -- the peak-EWMA estimate --------------------------------------------------


def _state(clock: FakeClock) -> EndpointState:
    return EndpointState(Address("10.0.0.1", 80), clock=clock, decay=10.0)


def _run(e: EndpointState, clock: FakeClock, steps: list[tuple[float, float, bool]]) -> None:
    """(idle seconds before, latency, ok) per request, one after another."""
    for idle, latency, ok in steps:
        clock.advance(idle)
        t0 = e.begin()
        clock.advance(latency)
        e.end(t0, ok)


D = DEFAULT_RTT


@pytest.mark.parametrize(
    ("steps", "later", "want"),
    [
        ([], 0.0, D),
        ([], 10.0, D * exp(-1)),  # untried: decays from the default
        ([(0, 0.1, True)], 0.0, 0.1),  # peak: a higher sample replaces at once
        ([(0, 0.5, True), (0, 0.01, True)], 0.0, 0.5 * exp(-0.001) + 0.01 * (1 - exp(-0.001))),
        ([(0, 0.5, True)], 10.0, 0.5 * exp(-1)),  # decays with the time constant
        # a lower sample after 10 s blends by e^-1
        (
            [(0, 0.5, True), (9.99, 0.01, True)],
            0.0,
            0.5 * exp(-1) + 0.01 * (1 - exp(-1)),
        ),
        # a fast failure counts as at least twice the estimate, or the default
        ([(0, 0.001, False)], 0.0, 2 * D * exp(-0.0001)),
        ([(0, 0.1, True), (0, 0.001, False)], 0.0, 2 * 0.1 * exp(-0.0001)),
        # ...capped; a slow failure counts as its own latency
        ([(0, 4.0, True), (0, 0.001, False)], 0.0, FAILURE_PENALTY_CAP),
        ([(0, 7.0, False)], 0.0, 7.0),
    ],
)
def test_peak_ewma_estimate(
    steps: list[tuple[float, float, bool]], later: float, want: float
) -> None:
    clock = FakeClock()
    e = _state(clock)
    _run(e, clock, steps)
    clock.advance(later)
    assert e.latency() == pytest.approx(want, rel=1e-9)
    assert e.cost(clock()) == pytest.approx(want, rel=1e-9)  # nothing in flight
    e.active = 3
    assert e.cost(clock()) == pytest.approx(4 * want, rel=1e-9)


def test_begin_end_count_requests() -> None:
    e = _state(FakeClock())
    t0, t1 = e.begin(), e.begin()
    assert (e.active, e.total) == (2, 2)
    e.end(t0, True)
    e.end(t1, False)
    e.end(t1, False)  # an unpaired end must not make the endpoint look idler than idle
    assert (e.active, e.total) == (0, 2)


# -- peak EWMA balancing ------------------------------------------------------


def _serve(
    bal: Balancer, eps: list[EndpointState], clock: FakeClock, latency: list[float], n: int
) -> list[int]:
    """n requests one after another; endpoint i answers in latency[i] (negative: fails that fast)."""
    c = [0] * len(eps)
    for _ in range(n):
        e = bal.pick()
        assert e is not None
        i = eps.index(e)
        c[i] += 1
        t0 = e.begin()
        clock.advance(abs(latency[i]))
        e.end(t0, latency[i] >= 0)
    return c


def test_peak_ewma_steers_away_from_a_slow_endpoint() -> None:
    clock = FakeClock()
    _, eps = states((1, 1, 1), clock=clock)
    latency = [0.010, 0.010, 0.200]
    ewma = _serve(balancer("peak_ewma", eps), eps, clock, latency, 3000)
    assert ewma[2] / 3000 < 0.02
    assert ewma[0] > 1000 and ewma[1] > 1000
    # least_request cannot tell: done one at a time, nothing is ever in flight.
    clock2 = FakeClock()
    _, eps2 = states((1, 1, 1), clock=clock2)
    lr = _serve(balancer("least_request", eps2), eps2, clock2, latency, 3000)
    assert lr[2] / 3000 == pytest.approx(1 / 3, abs=0.03)


def test_peak_ewma_probes_again_and_takes_back_a_recovered_endpoint() -> None:
    clock = FakeClock()
    _, eps = states((1, 1, 1), clock=clock)
    bal = balancer("peak_ewma", eps)
    _serve(bal, eps, clock, [0.010, 0.010, 0.200], 3000)
    # The slow one's estimate decays while it is avoided, so it is tried
    # again within ~decay*ln(20) s of traffic; now it is fast, and stays in.
    _serve(bal, eps, clock, [0.010, 0.010, 0.010], 6000)
    last = shares(_serve(bal, eps, clock, [0.010, 0.010, 0.010], 3000))
    assert last[2] > 0.2


def test_peak_ewma_avoids_an_endpoint_that_fails_fast() -> None:
    # Timed like a success, a 0.5 ms failure would look like the best endpoint.
    clock = FakeClock()
    _, eps = states((1, 1, 1), clock=clock)
    failing = _serve(balancer("peak_ewma", eps), eps, clock, [0.010, 0.010, -0.0005], 3000)
    assert failing[2] / 3000 < 0.03
    clock2 = FakeClock()
    _, eps2 = states((1, 1, 1), clock=clock2)
    as_ok = _serve(balancer("peak_ewma", eps2), eps2, clock2, [0.010, 0.010, 0.0005], 3000)
    assert as_ok[2] / 3000 > 0.5


def test_peak_ewma_weighs_requests_in_flight() -> None:
    # Equal latency, A has 3 in flight: B's cost 1x vs A's 4x, B always wins.
    clock = FakeClock()
    _, eps = states((1, 1), clock=clock)
    eps[0].active = 3
    assert counts(balancer("peak_ewma", eps), eps, 200) == [0, 200]
