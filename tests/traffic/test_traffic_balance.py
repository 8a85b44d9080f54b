"""Traffic splits and load balancing, end to end, counted at the upstreams:
a 90/10 canary split over label-selected subsets, ring-hash stickiness and
its ~1/N movement when an endpoint leaves, and peak EWMA avoiding a slow
endpoint."""

from __future__ import annotations

from dataclasses import replace

import pytest
from proxy_harness import outbound, request_bytes
from traffic_support import (
    DELAY,
    RESET,
    Backend,
    clusters,
    destination,
    drive,
    endpoint,
    mesh_config,
    route,
    share,
    start_backend,
    start_backends,
)

from lepton_mesh.policy.sidecar_config import AccessLogConfig
from lepton_mesh.policy.traffic import Backend as RouteBackend
from lepton_mesh.policy.traffic import HashOn, LoadBalancer, RetryBudget, RouteRule, Subset


def quiet(cfg):  # type: ignore[no-untyped-def]
    """No access log: these tests send thousands of requests."""
    return replace(cfg, access_log=AccessLogConfig(False))


async def test_weighted_split_over_subsets(sidecars, upstreams) -> None:
    """90/10 over subsets v1 (two endpoints) and v2 (one), selected by labels."""
    v1 = await start_backends(upstreams, "v1-a", "v1-b")
    v2 = await start_backend(upstreams, "v2-a")
    policy = destination(
        "svc",
        subsets=(Subset("v1", {"version": "v1"}), Subset("v2", {"version": "v2"})),
    )
    split = RouteRule(
        name="canary",
        backends=(RouteBackend("svc", "v1", 90), RouteBackend("svc", "v2", 10)),
    )
    eps = [endpoint(b.address, version="v1") for b in v1] + [endpoint(v2.address, version="v2")]
    sc = await sidecars(
        quiet(mesh_config({"svc": eps}, routes=[route("svc", split)], destinations=[policy]))
    )
    view = (await clusters(sc))["svc"]
    assert view["subsets"] == {"v1": [str(b.address) for b in v1], "v2": [str(v2.address)]}

    n = 10_000
    results = await drive(outbound(sc), n, concurrency=16)
    assert {r.status for r in results} == {200}
    v1_hits, v2_hits = sum(b.hits for b in v1), v2.hits
    assert v1_hits + v2_hits == n
    v1_share, v2_share = v1_hits / n, v2_hits / n
    print(f"\nsplit over {n}: v1 {v1_share:.2%} (90%), v2 {v2_share:.2%} (10%)")
    assert abs(v1_share - 0.90) <= 0.03
    assert abs(v2_share - 0.10) <= 0.03
    # Within v1, its two endpoints share its traffic.
    assert min(b.hits for b in v1) > 0.4 * v1_hits
    # The responses agree with what the upstreams counted.
    served = share(r.served_by for r in results)
    assert abs(served["v2-a"] - v2_share) < 1e-9


async def _keys_to_backends(sc, keys: list[str]) -> dict[str, str]:
    results = await drive(
        outbound(sc),
        len(keys),
        concurrency=8,
        make=lambda i: request_bytes("GET", "/", host="svc", headers=[("x-user-id", keys[i])]),
    )
    assert {r.status for r in results} == {200}
    return {k: r.served_by for k, r in zip(keys, results, strict=True)}  # type: ignore[misc]


async def test_ring_hash_sticks_and_moves_one_nth(sidecars, upstreams) -> None:
    backends: list[Backend] = await start_backends(upstreams, "e0", "e1", "e2", "e3")
    policy = destination(
        "svc",
        load_balancer=LoadBalancer(algorithm="ring_hash", hash_on=HashOn(header="x-user-id")),
    )
    cfg = quiet(mesh_config({"svc": backends}, destinations=[policy]))
    sc = await sidecars(cfg)

    keys = [f"user-{i}" for i in range(1000)]
    first = await _keys_to_backends(sc, keys)
    again = await _keys_to_backends(sc, keys)
    assert again == first  # every key stays on its endpoint
    per_backend = share(first.values())
    assert set(per_backend) == {"e0", "e1", "e2", "e3"}
    assert all(0.1 < s < 0.4 for s in per_backend.values()), per_backend

    # e2 leaves: a config swap without it.
    leaving = "e2"
    sc.swap_config(
        quiet(
            mesh_config(
                {"svc": [b for b in backends if b.name != leaving]},
                destinations=[policy],
                listeners=cfg.listeners,
            )
        )
    )
    after = await _keys_to_backends(sc, keys)
    moved = {k for k in keys if after[k] != first[k]}
    # Exactly the keys that lived on e2 move; nobody else's does.
    assert moved == {k for k in keys if first[k] == leaving}
    assert leaving not in after.values()
    print(f"\nring hash: {len(moved) / len(keys):.1%} of keys moved when 1 of 4 endpoints left")
    assert 0.15 <= len(moved) / len(keys) <= 0.35


async def test_peak_ewma_steers_away_from_a_slow_endpoint(sidecars, upstreams) -> None:
    fast = await start_backends(upstreams, "fast-1", "fast-2")
    slow = await start_backend(upstreams, "slow", DELAY, delay=0.05)
    policy = destination("svc", load_balancer=LoadBalancer(algorithm="peak_ewma"))
    sc = await sidecars(quiet(mesh_config({"svc": [*fast, slow]}, destinations=[policy])))

    await drive(outbound(sc), 60, concurrency=4)  # warm-up: every endpoint gets measured
    before = slow.hits
    n = 600
    results = await drive(outbound(sc), n, concurrency=4)
    assert {r.status for r in results} == {200}
    slow_share = (slow.hits - before) / n
    print(f"\npeak EWMA: slow endpoint took {slow_share:.1%} after warm-up (1/3 without it)")
    assert slow_share < 0.05
    view = (await clusters(sc))["svc"]
    latency = {e["address"]: e["latency_ewma_ms"] for e in view["endpoints"]}
    assert latency[str(slow.address)] > 40
    assert all(latency[str(f.address)] < latency[str(slow.address)] for f in fast)


@pytest.mark.parametrize("hash_on", [HashOn(cookie="session"), HashOn(source_ip=True)])
async def test_ring_hash_on_cookie_or_source_ip(sidecars, upstreams, hash_on) -> None:
    backends = await start_backends(upstreams, "e0", "e1", "e2")
    policy = destination("svc", load_balancer=LoadBalancer("ring_hash", hash_on))
    sc = await sidecars(quiet(mesh_config({"svc": backends}, destinations=[policy])))
    sessions = [f"s{i:03d}" for i in range(200)]

    def make(i: int) -> bytes:
        cookie = f"theme=dark; session={sessions[i % 200]}; lang=en"
        return request_bytes("GET", "/", host="svc", headers=[("cookie", cookie)])

    results = await drive(outbound(sc), 400, concurrency=4, make=make)
    first, second = results[:200], results[200:]
    assert [r.served_by for r in first] == [r.served_by for r in second]
    used = {r.served_by for r in results}
    if hash_on.source_ip:
        assert len(used) == 1  # every request comes from 127.0.0.1
    else:
        assert used == {"e0", "e1", "e2"}


async def test_ring_hash_retry_goes_to_the_same_second_choice(sidecars, upstreams) -> None:
    """Keys whose endpoint resets are retried on the next endpoint clockwise,
    the same one every time; other keys never see the failing endpoint."""
    good = await start_backends(upstreams, "e0", "e1")
    bad = await start_backend(upstreams, "bad", RESET)
    policy = destination(
        "svc",
        load_balancer=LoadBalancer("ring_hash", HashOn(header="x-user-id")),
        outlier=None,
        # The failing endpoint may own ~45% of the keys: more retries than the
        # default budget's 20% + 100 allows over 600 requests. Not this test's topic.
        retry_budget=RetryBudget(percent=100.0),
    )
    sc = await sidecars(quiet(mesh_config({"svc": [*good, bad]}, destinations=[policy])))
    keys = [f"user-{i}" for i in range(300)]
    results = await drive(
        outbound(sc),
        600,
        concurrency=4,
        make=lambda i: request_bytes(
            "GET", "/", host="svc", headers=[("x-user-id", keys[i % 300])]
        ),
    )
    assert {r.status for r in results} == {200}
    first, second = results[:300], results[300:]
    assert [(r.served_by, r.attempts) for r in first] == [(r.served_by, r.attempts) for r in second]
    on_bad = sum(r.attempts == 2 for r in first)
    assert 0.15 * 300 < on_bad < 0.55 * 300
    assert bad.hits == 2 * on_bad
