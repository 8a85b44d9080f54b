"""RetryBudget: percent of requests plus a floor per second, over a sliding window."""

from __future__ import annotations

import pytest
from resilience_support import FakeClock

from lepton_mesh.policy.traffic import RetryBudget as BudgetConfig
from lepton_mesh.proxy.resilience.retry_budget import RetryBudget, RetryBudgetStats


def failing_upstream(
    budget: RetryBudget, clock: FakeClock, rate: float, seconds: float, wanted: int
) -> tuple[int, int]:
    """Send `rate` requests/s for `seconds`; each fails and wants `wanted` retries,
    each of which fails too; a refused retry ends the request. Returns
    (retries granted, retries refused)."""
    granted = refused = 0
    for i in range(round(rate * seconds)):
        clock.now = i / rate
        budget.record_request()
        for _ in range(wanted):
            if not budget.try_retry():
                refused += 1
                break
            granted += 1
    return granted, refused


@pytest.mark.parametrize(
    ("percent", "min_per_second", "window", "rate", "wanted"),
    [
        (20.0, 10.0, 10.0, 100.0, 3),  # the defaults: 0.2 + 10/100 = 0.3
        (20.0, 0.0, 10.0, 100.0, 3),  # no floor: 0.2
        (20.0, 10.0, 10.0, 1000.0, 2),  # floor matters less at high rates: 0.21
        (50.0, 1.0, 5.0, 20.0, 1),  # 0.5 + 1/20 = 0.55
        (100.0, 0.0, 10.0, 50.0, 1),  # every request may retry once: exactly 1.0
        (0.0, 5.0, 2.0, 50.0, 4),  # only the floor: 5/50 = 0.1
        (0.0, 0.0, 10.0, 100.0, 2),  # nothing
    ],
)
def test_retries_converge_to_percent_plus_floor_under_a_failing_upstream(
    percent: float, min_per_second: float, window: float, rate: float, wanted: int
) -> None:
    """Saturated, every window's retries are its deposits plus the reserve, less
    under one token left over, so over k whole windows
    `expected - k < retries <= expected` with
    `expected = percent% of requests + min_per_second * seconds`."""
    clock = FakeClock()
    budget = RetryBudget(BudgetConfig(percent, min_per_second, window), clock=clock)
    windows = 40
    seconds = windows * window
    requests = round(rate * seconds)

    granted, refused = failing_upstream(budget, clock, rate, seconds, wanted)

    expected = percent / 100 * requests + min_per_second * seconds
    assert expected - windows < granted <= expected
    assert granted / requests == pytest.approx(percent / 100 + min_per_second / rate, abs=0.005)
    stats = budget.stats()
    assert stats.requests_total == requests
    assert stats.retries_total == granted
    assert stats.exhausted_total == refused


def test_a_quiet_service_gets_every_retry_it_wants_under_the_floor() -> None:
    # 1 request/s wanting 2 retries: 2 retries/s, under the 10/s floor.
    clock = FakeClock()
    budget = RetryBudget(BudgetConfig(20.0, 10.0, 10.0), clock=clock)
    assert failing_upstream(budget, clock, rate=1.0, seconds=300.0, wanted=2) == (600, 0)


def test_five_deposits_of_twenty_percent_make_exactly_one_retry() -> None:
    clock = FakeClock()
    budget = RetryBudget(BudgetConfig(20.0, 0.0, 10.0), clock=clock)
    for _ in range(4):
        budget.record_request()
    assert budget.stats().available == 0
    assert not budget.try_retry()
    budget.record_request()
    assert budget.stats().available == 1
    assert budget.try_retry()
    assert not budget.try_retry()


@pytest.mark.parametrize(
    ("deposited_at", "checked_at", "available"),
    [
        (0.0, 0.0, 5),
        (0.0, 9.999, 5),  # still in the window
        (0.0, 10.0, 0),  # its bucket is reused: gone
        (0.5, 9.999, 5),
        (0.5, 10.0, 0),  # expires 0.9..1 window after the deposit (bucket granularity)
        (5.5, 14.999, 5),
        (5.5, 15.0, 0),
        (3.0, 1000.0, 0),  # long idle: every bucket cleared at once
    ],
)
def test_deposits_expire_after_the_window(
    deposited_at: float, checked_at: float, available: int
) -> None:
    clock = FakeClock(deposited_at)
    budget = RetryBudget(BudgetConfig(100.0, 0.0, 10.0), clock=clock)
    for _ in range(5):
        budget.record_request()
    clock.now = checked_at
    assert budget.stats().available == available


def test_withdrawals_expire_too_so_the_floor_refills_each_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(BudgetConfig(0.0, 1.0, 10.0), clock=clock)  # 10 tokens per window
    assert [budget.try_retry() for _ in range(11)] == [True] * 10 + [False]
    clock.now = 9.999
    assert not budget.try_retry()
    clock.now = 10.0
    assert budget.stats().available == 10
    assert [budget.try_retry() for _ in range(11)] == [True] * 10 + [False]


def test_a_clock_stepping_back_frees_nothing() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(BudgetConfig(0.0, 1.0, 10.0), clock=clock)
    while budget.try_retry():
        pass
    clock.now = 50.0
    assert not budget.try_retry()
    clock.now = 109.999
    assert not budget.try_retry()
    clock.now = 110.0
    assert budget.try_retry()


def test_stats_snapshot() -> None:
    clock = FakeClock()
    budget = RetryBudget(BudgetConfig(50.0, 0.0, 10.0), clock=clock)
    for _ in range(4):
        budget.record_request()
    assert budget.try_retry()
    assert budget.try_retry()
    assert not budget.try_retry()
    assert budget.stats() == RetryBudgetStats(
        available=0, requests_total=4, retries_total=2, exhausted_total=1
    )


def test_update_keeps_the_window_and_applies_new_rates() -> None:
    clock = FakeClock()
    budget = RetryBudget(BudgetConfig(100.0, 0.0, 10.0), clock=clock)
    for _ in range(3):
        budget.record_request()
    budget.update(BudgetConfig(10.0, 1.0, 10.0))
    assert budget.stats().available == 3 + 10  # old deposits kept, new reserve
    budget.record_request()  # now deposits 0.1
    assert budget.stats().available == 13
    clock.now = 10.0
    assert budget.stats().available == 10  # old deposits expired on schedule


def test_update_with_a_new_window_carries_the_balance_without_a_burst() -> None:
    clock = FakeClock(3.0)
    budget = RetryBudget(BudgetConfig(0.0, 1.0, 10.0), clock=clock)
    for _ in range(8):
        assert budget.try_retry()
    assert budget.stats().available == 2
    budget.update(BudgetConfig(0.0, 1.0, 20.0))  # reserve 20, 8 still withdrawn
    assert budget.stats().available == 12
    clock.now = 3.0 + 17.9  # within 0.9 x the new window: still withdrawn
    assert budget.stats().available == 12
    clock.now = 3.0 + 20.0
    assert budget.stats().available == 20


@pytest.mark.parametrize(
    "config",
    [BudgetConfig(window=0.0), BudgetConfig(window=-1.0), BudgetConfig(percent=-1.0)],
)
def test_impossible_configs_are_refused(config: BudgetConfig) -> None:
    with pytest.raises(ValueError, match="retry budget"):
        RetryBudget(config)
