"""Ring hash: sticky, consistent when endpoints come and go, weighted, the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from balance_support import balancer, counts, endpoint, shares, states

from lepton_mesh.proxy.outbound.endpoints import EndpointState, EndpointTable

KEYS = [f"user-{k}".encode() for k in range(10_000)]


def mapping(eps: list[EndpointState], keys: list[bytes] = KEYS) -> list[int]:
    """For each key, the endpoint number (last octet of the address) it lands on."""
    bal = balancer("ring_hash", eps)
    out = []
    for k in keys:
        e = bal.pick(k)
        assert e is not None
        out.append(int(e.address.host.rsplit(".", 1)[1]))
    return out


def test_same_key_same_endpoint() -> None:
    _, eps = states((1,) * 5)
    bal = balancer("ring_hash", eps)
    for k in KEYS[:200]:
        assert len({bal.pick(k) for _ in range(5)}) == 1
    # The ring depends on addresses, not on list order or the balancer's rng.
    assert mapping(eps) == mapping(list(reversed(eps)))


def test_same_ring_in_another_process() -> None:
    # Python's hash() is salted per process; the ring must not depend on it.
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from test_balance_ring import mapping, KEYS\n"
        "from balance_support import states\n"
        "print(mapping(states((1, 2, 1, 3))[1], KEYS[:500]))\n"
    )
    here = os.path.dirname(__file__)
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script, here],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        assert out.strip() == str(mapping(states((1, 2, 1, 3))[1], KEYS[:500]))


@pytest.mark.parametrize("n", [3, 5, 10, 20])
def test_removing_one_of_n_moves_about_one_nth(n: int) -> None:
    _, eps = states((1,) * n)
    before = mapping(eps)
    gone = n // 2
    after = mapping([e for i, e in enumerate(eps) if i != gone])
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    # Only the keys of the endpoint that left move...
    assert all(before[i] == gone for i in moved)
    assert len(moved) == before.count(gone)
    # ...and that is about 1/N of them (128 nodes each: sd of a share ~ 0.09/N).
    assert len(moved) / len(KEYS) == pytest.approx(1 / n, rel=0.3)


def test_adding_back_restores_every_key() -> None:
    table = EndpointTable()
    full = table.sync([endpoint(i) for i in range(6)])
    before = mapping(full)
    mapping(table.sync([endpoint(i) for i in range(5)]))
    assert mapping(table.sync([endpoint(i) for i in range(6)])) == before


@pytest.mark.parametrize(
    "weights", [(1, 1, 1, 1), (1, 1, 2), (1, 3), (2, 2, 4, 8), (10, 1, 1, 1, 1, 1)]
)
def test_weights_shift_ring_shares(weights: tuple[int, ...]) -> None:
    _, eps = states(weights)
    got = shares(counts(balancer("ring_hash", eps), eps, len(KEYS), keyed=True))
    want = [w / sum(weights) for w in weights]
    # 128 nodes per unit of weight: the sd of a unit's share is about
    # sqrt(128) / ring size (0.022 for four endpoints); allow three of it.
    assert got == pytest.approx(want, abs=0.07)


def test_raising_a_weight_only_pulls_keys_towards_that_endpoint() -> None:
    table = EndpointTable()
    before = mapping(table.sync([endpoint(i) for i in range(4)]))
    after = mapping(table.sync([endpoint(0, weight=2), *(endpoint(i) for i in range(1, 4))]))
    moved = [b for a, b in zip(before, after, strict=True) if a != b]
    assert moved and set(moved) == {0}
    assert after.count(0) / len(KEYS) == pytest.approx(2 / 5, abs=0.05)


def test_keys_of_an_ejected_endpoint_walk_to_the_next_one() -> None:
    _, eps = states((1,) * 5)
    bal = balancer("ring_hash", eps)
    before = [bal.pick(k) for k in KEYS]
    eps[1].set_ejected(True)
    during = [bal.pick(k) for k in KEYS]
    for b, d in zip(before, during, strict=True):
        assert d is not eps[1]
        if b is not eps[1]:
            assert d is b  # nobody else's keys move
    # Same as a ring built without it: walking the ring == removing its nodes.
    without = balancer("ring_hash", eps[:1] + eps[2:])
    assert during == [without.pick(k) for k in KEYS]
    eps[1].set_ejected(False)
    assert [bal.pick(k) for k in KEYS] == before


def test_avoid_takes_the_next_endpoint_on_the_ring_every_time() -> None:
    _, eps = states((1,) * 4)
    bal = balancer("ring_hash", eps)
    for k in KEYS[:300]:
        first = bal.pick(k)
        second = bal.pick(k, avoid=first)
        assert second is not first
        assert bal.pick(k, avoid=first) is second


def test_no_key_falls_back_to_weighted_random() -> None:
    _, eps = states((1, 3))
    got = shares(counts(balancer("ring_hash", eps), eps, 20_000))
    assert got == pytest.approx([0.25, 0.75], abs=0.02)


@pytest.mark.parametrize(
    ("zones", "path"),
    [
        ("aaaaaaaaaa", "full ring"),
        ("aaaaaabbbb", "full ring, walking past zone b"),
        ("aabbbbbbbb", "ring of zone a's nodes"),  # 20% of the weight: below RING_WALK_SHARE
    ],
)
def test_every_lookup_path_agrees_with_a_ring_of_the_candidates_only(zones: str, path: str) -> None:
    _, eps = states((1,) * 10, zones=list(zones))
    local = [e for e, z in zip(eps, zones, strict=True) if z == "a"]
    bal = balancer("ring_hash", eps, locality=True, local_zone="a")
    alone = balancer("ring_hash", local)
    keys = KEYS[:2000]
    assert [bal.pick(k) for k in keys] == [alone.pick(k) for k in keys], path
    for k in keys[:300]:
        first = bal.pick(k)
        second = bal.pick(k, avoid=first)
        assert second in local and second is not first
        assert second is alone.pick(k, avoid=first)
