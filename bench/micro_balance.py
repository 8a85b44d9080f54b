"""Micro-benchmark of the load balancers' per-request cost.

Run by hand (not by pytest):  python bench/micro_balance.py [--quick]

Prints microseconds per `pick()`, best of a few repeats, for every algorithm
over 3, 10 and 100 endpoints, with equal weights and with mixed weights
(1..4): plain picks, picks with `avoid` (a retry), and for ring hash picks
keyed by a rotating set of 1,024 user ids. Then, in milliseconds, what a
health change costs the next pick (the candidate set is recomputed, and for
ring hash the candidates' ring found) and what building a ring costs,
mixed weights throughout.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
import timeit
from collections.abc import Callable, Sequence

from lepton_mesh.policy.sidecar_config import Address, Endpoint
from lepton_mesh.policy.traffic import HashOn, LoadBalancer
from lepton_mesh.proxy.outbound.balance import Balancer, _node_hashes, make_balancer, ring_nodes
from lepton_mesh.proxy.outbound.endpoints import EndpointState, EndpointTable

ALGORITHMS = ("least_request", "peak_ewma", "round_robin", "random", "ring_hash")
SIZES = (3, 10, 100)


def per_call_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def endpoints(n: int, mixed: bool) -> list[EndpointState]:
    table = EndpointTable()
    return table.sync(
        [
            Endpoint(Address(f"10.0.{i // 250}.{i % 250}", 8080), 1 + i % 4 if mixed else 1)
            for i in range(n)
        ]
    )


def balancer(algorithm: str, eps: Sequence[EndpointState]) -> Balancer:
    hash_on = HashOn(header="x-user") if algorithm == "ring_hash" else None
    return make_balancer(LoadBalancer(algorithm, hash_on), eps, rng=random.Random(1))  # type: ignore[arg-type]


def pick_variants(algorithm: str, n: int, mixed: bool) -> dict[str, Callable[[], object]]:
    eps = endpoints(n, mixed)
    bal = balancer(algorithm, eps)
    # Some load, so P2C compares something real; in flight counts stay fixed.
    for i, e in enumerate(eps):
        e.active = i % 3
    pick = bal.pick
    avoid = eps[0]
    keys = itertools.cycle([f"user-{k}".encode() for k in range(1024)])
    out: dict[str, Callable[[], object]] = {
        "pick": pick,
        "pick avoid": lambda: pick(None, avoid),
    }
    if algorithm == "ring_hash":
        out["pick key"] = lambda: pick(next(keys))
        out["pick key avoid"] = lambda: pick(next(keys), avoid)
    return out


def refresh_ms(algorithm: str, n: int, repeat: int) -> float:
    """One health change, then one pick: the cost of recomputing candidates."""
    eps = endpoints(n, mixed=True)
    bal = balancer(algorithm, eps)
    bal.pick(b"warm")  # builds the ring once
    best = float("inf")
    for k in range(repeat * 5):
        eps[1].set_ejected(k % 2 == 0)
        t0 = time.perf_counter()
        bal.pick(b"k")
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def ring_build_ms(n: int, repeat: int, cached: bool) -> float:
    """The first keyed pick of a new balancer: node positions (cached across
    balancers, as after a config swap, or not) and the sorted ring."""
    eps = endpoints(n, mixed=True)
    best = float("inf")
    for _ in range(repeat):
        _node_hashes.cache_clear()
        if cached:
            ring_nodes(eps)
        bal = balancer("ring_hash", eps)
        t0 = time.perf_counter()
        bal.pick(b"k")
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    args = ap.parse_args(argv)
    number, repeat = (5_000, 3) if args.quick else (50_000, 5)

    print(f"python {sys.version.split()[0]}; us per pick, best of {repeat} x {number}")
    header = f"{'algorithm':<14} {'weights':<7} {'variant':<15}" + "".join(
        f"{f'n={n}':>9}" for n in SIZES
    )
    print(header)
    print("-" * len(header))
    for algorithm in ALGORITHMS:
        for mixed in (False, True):
            rows: dict[str, list[float]] = {}
            for n in SIZES:
                for name, fn in pick_variants(algorithm, n, mixed).items():
                    rows.setdefault(name, []).append(per_call_us(fn, number, repeat))
            for name, values in rows.items():
                cells = "".join(f"{v:9.2f}" for v in values)
                print(f"{algorithm:<14} {'mixed' if mixed else 'equal':<7} {name:<15}{cells}")

    print()
    print("ms for the first pick after a health change (candidate set recomputed)")
    for algorithm in ALGORITHMS:
        cells = "".join(f"{refresh_ms(algorithm, n, repeat):9.3f}" for n in SIZES)
        print(f"{algorithm:<38}{cells}")
    for cached in (False, True):
        cells = "".join(f"{ring_build_ms(n, repeat, cached):9.3f}" for n in SIZES)
        label = f"ring build, node hashes {'cached' if cached else 'cold'}"
        print(f"{label:<38}{cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
