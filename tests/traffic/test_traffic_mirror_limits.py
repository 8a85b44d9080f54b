"""Mirrored copies go through their backend's circuit breaker, as Envoy's shadow
requests: a copy takes a `max_requests` slot (and `max_pending`, and the pool's
room) without waiting; when none is free it is dropped and counted as
`overflow`. The primary request never waits for a copy, and copies cannot fill
a connection pool the primary traffic shares."""

from __future__ import annotations

import asyncio

from proxy_harness import Conn, Message, Upstream, http, outbound, response_bytes, wait_for
from traffic_support import (
    HOLD,
    call,
    clusters,
    destination,
    mesh_config,
    metric,
    route,
    scrape,
    start_backend,
)

from lepton_mesh.policy.traffic import (
    Backend,
    CircuitLimits,
    Mirror,
    PathMatch,
    RetryPolicy,
    RouteMatch,
    RouteRule,
)

TIMEOUT = 3.0
OUTCOMES = ("ok", "failed", "timeout", "dropped", "overflow")


def mirrored() -> RouteRule:
    """Every request under /m copied to `shadow`; a copy times out after 30 s."""
    return RouteRule(
        name="mirrored",
        matches=(RouteMatch(path=PathMatch("prefix", "/m")),),
        mirror=Mirror(Backend("shadow"), 100.0),
        timeout=30.0,
    )


async def outcomes(sc) -> dict[str, float]:
    samples = await scrape(sc)
    name = "lepton_mirror_requests_total"
    return {
        o: metric(samples, name, destination_service="shadow", outcome=o) or 0 for o in OUTCOMES
    }


async def wait_outcomes(sc, want: dict[str, float]) -> dict[str, float]:
    seen: dict[str, float] = {}

    async def matches() -> bool:
        seen.update(await outcomes(sc))
        return all(seen[k] == v for k, v in want.items())

    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not await matches():
        assert asyncio.get_running_loop().time() < deadline, f"mirror outcomes {seen}, want {want}"
        await asyncio.sleep(0.005)
    return seen


async def circuit(sc, service: str) -> dict[str, int]:
    view = (await clusters(sc))[service]["circuit"]
    return {limit: view[limit]["used"] for limit in ("requests", "pending", "connections")}


async def test_copies_over_max_requests_are_dropped_as_overflow(sidecars, upstreams) -> None:
    primary = await start_backend(upstreams, "primary")
    shadow = await start_backend(upstreams, "shadow", HOLD)  # slow: answers when released
    cfg = mesh_config(
        {"svc": [primary], "shadow": [shadow]},
        routes=[route("svc", mirrored())],
        destinations=[destination("shadow", limits=CircuitLimits(max_requests=1))],
    )
    sc = await sidecars(cfg)
    n = 10
    # Concurrent, while the one admitted copy hangs: each primary still answers
    # at once (the whole burst is bounded well below the copy's 30 s timeout).
    burst = await asyncio.wait_for(
        asyncio.gather(*(call(outbound(sc), target=f"/m/{i}") for i in range(n))), TIMEOUT
    )
    assert {(r.status, r.served_by) for r in burst} == {(200, "primary")}
    seen = await wait_outcomes(sc, {"overflow": n - 1})
    assert seen["ok"] == seen["failed"] == seen["timeout"] == seen["dropped"] == 0
    await wait_for(lambda: shadow.in_flight == 1, TIMEOUT, "the admitted copy at the shadow")
    assert shadow.hits == 1
    assert primary.hits == n
    assert (await circuit(sc, "shadow"))["requests"] == 1

    # The copy ends: its slot comes back, and the next copy is admitted.
    shadow.release()
    await wait_outcomes(sc, {"ok": 1})
    assert await circuit(sc, "shadow") == {"requests": 0, "pending": 0, "connections": 1}
    assert (await call(outbound(sc), target="/m/after")).status == 200
    await wait_outcomes(sc, {"ok": 2, "overflow": n - 1})
    assert shadow.hits == 2
    assert (await circuit(sc, "shadow"))["requests"] == 0


class SharedEndpoint:
    """One upstream that is both the primary and the mirror target: it answers the
    primary at once and holds every copy (Host `svc-shadow`) until released."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.copies = 0

    async def app(self, req: Message, conn: Conn) -> bool | None:
        if (req.get("host") or "").startswith("svc-shadow"):
            self.copies += 1
            await self.released.wait()
        await conn.send(response_bytes(200, b"ok", [("x-served-by", "shared")]))
        return None


async def test_copies_cannot_fill_a_pool_the_primary_shares(sidecars, upstreams) -> None:
    shared = SharedEndpoint()
    up: Upstream = await upstreams(http(shared.app))
    cfg = mesh_config(
        {"svc": [up.address], "shadow": [up.address]},
        routes=[route("svc", mirrored())],
        destinations=[
            destination("svc", retry=RetryPolicy(attempts=1), outlier=None),
            destination("shadow", limits=CircuitLimits(max_requests=1), outlier=None),
        ],
        pool={"max_per_endpoint": 3},
    )
    sc = await sidecars(cfg)
    n = 4
    results = [await call(outbound(sc), target=f"/m/{i}", timeout=TIMEOUT) for i in range(n)]
    # Then two at once: they need two connections of the three. Without the
    # breaker, hanging copies would hold two of them and one request would
    # get 503 overflow; with it, one copy holds one.
    results += await asyncio.gather(
        *(call(outbound(sc), target=f"/m/pair{i}", timeout=TIMEOUT) for i in range(2))
    )
    assert [r.status for r in results] == [200] * (n + 2), [r.reason for r in results]
    await wait_outcomes(sc, {"overflow": n + 1})
    assert shared.copies == 1
    shared.released.set()
    await wait_outcomes(sc, {"ok": 1})
    used = await circuit(sc, "shadow")
    assert (used["requests"], used["pending"]) == (0, 0)
