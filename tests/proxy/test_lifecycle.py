"""Graceful drain with requests in flight, atomic config swaps, and bind failures."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
from proxy_harness import (
    DEADLINE,
    LOCAL,
    Address,
    Listeners,
    RawClient,
    assert_lepton_error,
    client,
    get,
    http,
    make_config,
    outbound,
    response_bytes,
    wait_for,
)

from lepton_mesh.proxy.errors import Reason


async def refuses(addr: Address) -> bool:
    try:
        _, w = await asyncio.open_connection(addr.host, addr.port)
    except OSError:
        return True
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return False


async def test_drain_finishes_in_flight_and_refuses_new_connections(sidecars, upstreams) -> None:
    n = 20
    release = asyncio.Event()

    async def held(req, conn) -> None:
        await release.wait()  # the upstream holds every request until the test lets go
        await conn.send(response_bytes(200, req.target.encode()))

    up = await upstreams(http(held))
    sc = await sidecars(services={"svc": up.address}, timeouts={"drain": 10.0})
    addr = outbound(sc)
    clients = [await RawClient.connect(addr) for _ in range(n)]
    try:
        for i, c in enumerate(clients):
            await c.send(get(f"/{i}"))
        await wait_for(lambda: len(up.requests) == n, what="all requests reached the upstream")

        drain = asyncio.ensure_future(sc.drain())
        try:
            end = asyncio.get_running_loop().time() + DEADLINE
            while not await refuses(addr):
                assert asyncio.get_running_loop().time() < end, (
                    "new connections still accepted while draining"
                )
                await asyncio.sleep(0.01)
            assert not drain.done(), "drain returned while requests were still in flight"
            release.set()
            responses = [await c.response() for c in clients]
            await asyncio.wait_for(drain, DEADLINE)
        finally:
            release.set()
            if not drain.done():
                drain.cancel()
                with contextlib.suppress(BaseException):
                    await drain
    finally:
        for c in clients:
            await c.close()
    assert [r.status for r in responses] == [200] * n
    assert sorted(r.body for r in responses) == sorted(f"/{i}".encode() for i in range(n))
    assert all("close" in r.connection_tokens() for r in responses), [r.headers for r in responses]


async def test_drain_closes_idle_keepalive_connections(sidecars, echo) -> None:
    sc = await sidecars(services={"svc": echo.address}, timeouts={"drain": 5.0})
    async with client(outbound(sc)) as c:
        assert (await c.request(get())).status == 200
        await asyncio.wait_for(sc.drain(), DEADLINE)
        assert await c.closed_by_peer()


async def test_drain_gives_up_after_drain_timeout(sidecars, upstreams) -> None:
    release = asyncio.Event()

    async def never(req, conn) -> None:
        await release.wait()

    up = await upstreams(http(never))
    sc = await sidecars(services={"svc": up.address}, timeouts={"drain": 0.3, "request": 0})
    async with client(outbound(sc)) as c:
        await c.send(get())
        await wait_for(lambda: len(up.requests) == 1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(sc.drain(), DEADLINE)
        assert loop.time() - t0 < 2.0
        release.set()


async def test_swap_config_new_requests_use_new_snapshot(sidecars, upstreams) -> None:
    release = asyncio.Event()

    def named(name: bytes, hold: bool):
        async def app(req, conn) -> None:
            if hold and req.target == "/held":
                await release.wait()
            await conn.send(response_bytes(200, name))

        return http(app)

    old = await upstreams(named(b"old", hold=True))
    new = await upstreams(named(b"new", hold=False))
    cfg = make_config(services={"svc": old.address})
    sc = await sidecars(cfg)
    async with client(outbound(sc)) as held, client(outbound(sc)) as other:
        await held.send(get("/held"))
        await wait_for(lambda: len(old.requests) == 1, what="held request at the old upstream")
        sc.swap_config(make_config(services={"svc": new.address}, app=cfg.app))
        resp = await other.request(get("/fresh"))
        assert resp.body == b"new"
        release.set()
        resp = await held.response()
        assert resp.body == b"old", "an in-flight request keeps the snapshot it started with"


async def test_swap_config_removes_a_service(sidecars, echo) -> None:
    cfg = make_config(services={"svc": echo.address})
    sc = await sidecars(cfg)
    async with client(outbound(sc)) as c:
        assert (await c.request(get())).status == 200
        sc.swap_config(make_config(services={}, app=cfg.app))
        assert_lepton_error(await c.request(get()), 404, Reason.NO_ROUTE)


async def test_start_raises_when_a_port_is_taken(sidecars) -> None:
    with socket.socket() as taken:
        taken.bind((LOCAL, 0))
        taken.listen()
        port = taken.getsockname()[1]
        listeners = Listeners(
            outbound=Address(LOCAL, port), inbound=Address(LOCAL, 0), admin=Address(LOCAL, 0)
        )
        with pytest.raises(OSError):
            await sidecars(make_config(listeners=listeners))
