"""CircuitBreaker: four counters against four limits, refusals counted, never negative."""

from __future__ import annotations

import random

import pytest

from lepton_mesh.policy.traffic import CircuitLimits
from lepton_mesh.proxy.resilience.circuit import LIMITS, CircuitAccountingError, CircuitBreaker

# limit name -> (acquire, release, limits with that one at 2)
KINDS = {
    "pending": (
        CircuitBreaker.try_acquire_pending,
        CircuitBreaker.release_pending,
        CircuitLimits(max_pending=2),
    ),
    "requests": (
        CircuitBreaker.try_acquire_request,
        CircuitBreaker.release_request,
        CircuitLimits(max_requests=2),
    ),
    "retries": (
        CircuitBreaker.try_acquire_retry,
        CircuitBreaker.release_retry,
        CircuitLimits(max_retries=2),
    ),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_acquire_up_to_the_limit_then_overflow_at_once(kind: str) -> None:
    acquire, release, limits = KINDS[kind]
    cb = CircuitBreaker(limits)
    assert cb.open_limits() == []
    assert [acquire(cb), acquire(cb)] == [True, True]
    assert cb.open_limits() == [kind]
    assert [acquire(cb), acquire(cb)] == [False, False]
    assert getattr(cb, kind) == 2
    assert cb.overflows() == {name: 2 if name == kind else 0 for name in LIMITS}
    release(cb)
    assert cb.open_limits() == []
    assert acquire(cb)
    release(cb)
    release(cb)
    assert getattr(cb, kind) == 0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_release_without_acquire_raises_and_stays_at_zero(kind: str) -> None:
    acquire, release, limits = KINDS[kind]
    cb = CircuitBreaker(limits)
    with pytest.raises(CircuitAccountingError):
        release(cb)
    assert getattr(cb, kind) == 0
    assert acquire(cb)  # the limit still counts honestly
    assert acquire(cb)
    assert not acquire(cb)


def test_connections_are_counted_and_gate_new_ones() -> None:
    cb = CircuitBreaker(CircuitLimits(max_connections=2))
    for _ in range(2):
        assert cb.can_open_connection()
        cb.connection_opened()
    assert cb.open_limits() == ["connections"]
    assert not cb.can_open_connection()
    assert cb.overflows()["connections"] == 1
    cb.connection_closed()
    assert cb.can_open_connection()
    cb.connection_closed()
    with pytest.raises(CircuitAccountingError):
        cb.connection_closed()
    assert cb.connections == 0
    assert cb.overflows()["connections"] == 1


def test_update_swaps_limits_and_keeps_counters() -> None:
    cb = CircuitBreaker(CircuitLimits(max_requests=4))
    for _ in range(3):
        assert cb.try_acquire_request()
    cb.update(CircuitLimits(max_requests=2))
    assert cb.requests == 3
    assert cb.open_limits() == ["requests"]
    assert not cb.try_acquire_request()
    cb.release_request()
    assert not cb.try_acquire_request()  # 2 in flight: still at the new max
    cb.release_request()
    assert cb.try_acquire_request()
    cb.update(CircuitLimits(max_requests=10))
    assert cb.open_limits() == []
    assert cb.overflows()["requests"] == 2  # overflow totals survive a swap


def test_several_limits_open_at_once_in_a_fixed_order() -> None:
    cb = CircuitBreaker(
        CircuitLimits(max_connections=1, max_pending=1, max_requests=1, max_retries=1)
    )
    assert cb.try_acquire_retry() and cb.try_acquire_request()
    cb.connection_opened()
    assert cb.open_limits() == ["connections", "requests", "retries"]
    assert cb.try_acquire_pending()
    assert cb.open_limits() == list(LIMITS)


def test_states_for_metrics_and_admin() -> None:
    cb = CircuitBreaker(
        CircuitLimits(max_connections=5, max_pending=1, max_requests=3, max_retries=2)
    )
    cb.connection_opened()
    assert cb.try_acquire_pending()
    assert not cb.try_acquire_pending()
    assert cb.try_acquire_request()
    assert cb.limit_states() == [
        ("connections", False, 0),
        ("pending", True, 1),
        ("requests", False, 0),
        ("retries", False, 0),
    ]
    assert cb.describe() == {
        "connections": {"used": 1, "max": 5, "open": False, "overflows": 0},
        "pending": {"used": 1, "max": 1, "open": True, "overflows": 1},
        "requests": {"used": 1, "max": 3, "open": False, "overflows": 0},
        "retries": {"used": 0, "max": 2, "open": False, "overflows": 0},
    }


def test_random_traffic_never_goes_negative_or_past_a_limit() -> None:
    """A seeded random mix of acquires and releases, as a sidecar would make
    them (every release pairs with a granted acquire): the counters always
    equal what is held and stay within [0, max]."""
    rng = random.Random(7)
    limits = CircuitLimits(max_connections=3, max_pending=4, max_requests=5, max_retries=2)
    cb = CircuitBreaker(limits)
    held = dict.fromkeys(LIMITS, 0)
    refused = dict.fromkeys(LIMITS, 0)
    ops = {
        "pending": (cb.try_acquire_pending, cb.release_pending),
        "requests": (cb.try_acquire_request, cb.release_request),
        "retries": (cb.try_acquire_retry, cb.release_retry),
    }
    for _ in range(5000):
        kind = rng.choice(LIMITS)
        if kind == "connections":
            if rng.random() < 0.5 and held[kind]:
                cb.connection_closed()
                held[kind] -= 1
            elif cb.can_open_connection():
                cb.connection_opened()
                held[kind] += 1
            else:
                refused[kind] += 1
        else:
            acquire, release = ops[kind]
            if rng.random() < 0.5 and held[kind]:
                release()
                held[kind] -= 1
            elif acquire():
                held[kind] += 1
            else:
                refused[kind] += 1
        used = {name: getattr(cb, name) for name in LIMITS}
        assert used == held
        assert all(n >= 0 for n in used.values())
        assert used["connections"] <= limits.max_connections
        assert used["pending"] <= limits.max_pending
        assert used["requests"] <= limits.max_requests
        assert used["retries"] <= limits.max_retries
    assert cb.overflows() == refused
    assert all(refused.values())  # every limit was hit at some point
