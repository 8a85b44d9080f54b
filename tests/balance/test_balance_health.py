"""Which endpoints are candidates: health, ejection, panic mode, locality, avoid."""

from __future__ import annotations

import pytest
from balance_support import ALGORITHMS, balancer, counts, states

from lepton_mesh.proxy.outbound.endpoints import EndpointState


def picked(algorithm: str, eps: list[EndpointState], n: int = 400, **kw: object) -> set[int]:
    """Positions in `eps` that `n` picks (keyed for ring hash) returned."""
    c = counts(balancer(algorithm, eps, **kw), eps, n, keyed=algorithm == "ring_hash")  # type: ignore[arg-type]
    return {i for i, x in enumerate(c) if x}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_unavailable_endpoints_are_skipped(algorithm: str) -> None:
    _, eps = states((1, 1, 1, 1))
    eps[1].set_ejected(True)
    eps[3].set_healthy(False)
    assert picked(algorithm, eps) == {0, 2}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_endpoints_gives_none(algorithm: str) -> None:
    bal = balancer(algorithm, [])
    assert bal.pick(b"k") is None
    assert bal.pick(b"k", avoid=states((1,))[1][0]) is None
    assert bal.panic is False


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_live_balancer_follows_ejection_and_return(algorithm: str) -> None:
    _, eps = states((1, 1, 1))
    bal = balancer(algorithm, eps)
    keyed = algorithm == "ring_hash"
    assert {i for i, x in enumerate(counts(bal, eps, 300, keyed=keyed)) if x} == {0, 1, 2}
    eps[0].set_ejected(True)
    assert bal.candidates == (eps[1], eps[2])
    assert {i for i, x in enumerate(counts(bal, eps, 300, keyed=keyed)) if x} == {1, 2}
    eps[0].set_ejected(False)
    assert {i for i, x in enumerate(counts(bal, eps, 300, keyed=keyed)) if x} == {0, 1, 2}


# (endpoints, unavailable, panic_threshold %, panic?): panic when the available
# share is strictly below the threshold, or when nothing is available.
PANIC = [
    (4, 0, 50.0, False),
    (4, 2, 50.0, False),  # exactly 50% available: not below the threshold
    (4, 3, 50.0, True),
    (10, 5, 50.0, False),
    (10, 6, 50.0, True),
    (5, 1, 80.0, False),  # 80% available at an 80% threshold
    (5, 2, 80.0, True),
    (3, 0, 100.0, False),
    (3, 1, 100.0, True),
    (3, 2, 0.0, False),  # threshold 0: never panic while one is available...
    (3, 3, 0.0, False),  # ...nor with none: panic is off, no pick (503 no_healthy_endpoint)
    (3, 3, 50.0, True),
    (1, 1, 50.0, True),
]


@pytest.mark.parametrize(("n", "out", "threshold", "panic"), PANIC)
@pytest.mark.parametrize("algorithm", ["least_request", "random", "round_robin", "ring_hash"])
def test_panic_threshold(n: int, out: int, threshold: float, panic: bool, algorithm: str) -> None:
    _, eps = states((1,) * n)
    for i in range(out):
        # half ejected, half unhealthy: both count as unavailable
        (eps[i].set_ejected if i % 2 else eps[i].set_healthy)(bool(i % 2))
    bal = balancer(algorithm, eps, panic_threshold=threshold)
    assert bal.panic is panic  # up to date before any pick (the admin API reads it)
    if out == n and not panic:
        assert bal.pick(b"k") is None
        return
    c = counts(bal, eps, 600, keyed=algorithm == "ring_hash")
    want = set(range(n)) if panic else set(range(out, n))
    assert {i for i, x in enumerate(c) if x} == want


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_avoid_is_never_returned_when_another_candidate_exists(algorithm: str) -> None:
    _, eps = states((1, 5, 1))
    for bad in eps:
        bal = balancer(algorithm, eps)
        for k in range(300):
            e = bal.pick(str(k).encode(), avoid=bad)
            assert e is not None and e is not bad
    # The only candidate is returned even if it is the one to avoid.
    _, one = states((1,))
    assert balancer(algorithm, one).pick(b"k", avoid=one[0]) is one[0]
    _, two = states((1, 1))
    two[1].set_ejected(True)
    assert balancer(algorithm, two, panic_threshold=0).pick(b"k", avoid=two[0]) is two[0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_avoid_keeps_the_others_weighted(algorithm: str) -> None:
    _, eps = states((1, 1, 3))
    bal = balancer(algorithm, eps)
    c = counts(bal, eps, 20_000, avoid=eps[0], keyed=algorithm == "ring_hash")
    assert c[0] == 0
    if algorithm != "ring_hash":  # ring: the key decides, not the weight alone
        assert c[2] / (c[1] + c[2]) == pytest.approx(0.75, abs=0.02)


ZONES = ("a", "a", "b", "b", "c")


@pytest.mark.parametrize(
    ("locality", "local_zone", "out", "want"),
    [
        (True, "a", (), {0, 1}),
        (True, "b", (), {2, 3}),
        (True, "a", (0,), {1}),
        (True, "a", (0, 1), {2, 3, 4}),  # nothing local available: everyone
        (True, "z", (), {0, 1, 2, 3, 4}),  # no endpoint in our zone
        (True, None, (), {0, 1, 2, 3, 4}),  # we do not know our zone
        (False, "a", (), {0, 1, 2, 3, 4}),  # locality off
        (True, "a", (1, 2, 3), {0, 1, 2, 3, 4}),  # 40% available: panic, locality off
    ],
)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_locality(
    algorithm: str, locality: bool, local_zone: str | None, out: tuple[int, ...], want: set[int]
) -> None:
    _, eps = states((1,) * 5, zones=ZONES)
    for i in out:
        eps[i].set_ejected(True)
    assert picked(algorithm, eps, locality=locality, local_zone=local_zone) == want


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_retry_leaves_the_zone_rather_than_repeat_the_only_local_endpoint(algorithm: str) -> None:
    _, eps = states((1,) * 5, zones=ZONES)
    eps[1].set_ejected(True)
    bal = balancer(algorithm, eps, locality=True, local_zone="a")
    assert bal.pick(b"k") is eps[0]
    seen = {bal.pick(str(k).encode(), avoid=eps[0]) for k in range(200)}
    assert seen == {eps[2], eps[3], eps[4]}
