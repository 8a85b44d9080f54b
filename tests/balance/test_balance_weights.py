"""Every algorithm honors endpoint weights; round robin exactly and smoothly."""

from __future__ import annotations

import pytest
from balance_support import balancer, counts, shares, states

from lepton_mesh.proxy.outbound import balance

WEIGHTS = (1, 2, 3, 4)
PICKS = 100_000


@pytest.mark.parametrize("algorithm", ["random", "least_request", "peak_ewma"])
@pytest.mark.parametrize("weights", [(1, 1, 1), WEIGHTS, (1, 9), (5, 1, 1, 1, 1, 1)])
def test_idle_shares_follow_weights(algorithm: str, weights: tuple[int, ...]) -> None:
    # Idle P2C: both draws are idle and (for peak EWMA) untried, so the tie
    # goes to the first, weighted, draw. 100k picks: sd of a share <= 0.0016.
    _, eps = states(weights)
    got = shares(counts(balancer(algorithm, eps), eps, PICKS))
    want = [w / sum(weights) for w in weights]
    assert got == pytest.approx(want, abs=0.006)


@pytest.mark.parametrize(
    ("weights", "period"),
    [
        ((1, 1, 1), 3),
        (WEIGHTS, 10),
        ((5, 1, 1), 7),
        ((20, 30), 5),  # reduced by the gcd
        ((10000, 9999, 9998), 29997),  # past RR_MAX_WORK: the deadline heap
    ],
)
def test_round_robin_is_exact_over_each_period(weights: tuple[int, ...], period: int) -> None:
    _, eps = states(weights)
    bal = balancer("round_robin", eps, seed=3)
    g = sum(weights) // period
    for _ in range(3):  # from a random start, any whole period holds each weight exactly
        assert counts(bal, eps, period) == [w // g for w in weights]


def test_long_period_takes_the_heap_path() -> None:
    assert balance.RR_MAX_WORK < 29997 * 3


def test_round_robin_is_smooth() -> None:
    # nginx's sequence for weights 5,1,1 is a a b a c a a (then again): the
    # light endpoints are spread out, not bunched behind five a's.
    _, eps = states((5, 1, 1))
    bal = balancer("round_robin", eps)
    names = {eps[0]: "a", eps[1]: "b", eps[2]: "c"}
    seq = "".join(names[bal.pick()] for _ in range(14))  # type: ignore[index]
    assert seq in "aabacaa" * 3  # some rotation of one period, twice
    assert "aaaaa" not in seq


def test_round_robin_starts_differ_by_seed() -> None:
    # Many sidecars must not all begin on the same endpoint.
    _, eps = states((1,) * 10)
    firsts = {balancer("round_robin", eps, seed=s).pick() for s in range(40)}
    assert len(firsts) >= 5
