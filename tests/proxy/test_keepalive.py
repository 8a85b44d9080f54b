"""Connection reuse on both sides, pipelining, and the timers that close idle
connections (and never a connection with a request in flight)."""

from __future__ import annotations

import asyncio

import pytest
from proxy_harness import (
    DEADLINE,
    RawClient,
    client,
    get,
    http,
    outbound,
    request_bytes,
    response_bytes,
    wait_for,
)


async def test_100_sequential_requests_reuse_one_connection_each_side(proxy, echo) -> None:
    async with client(outbound(proxy)) as c:
        for i in range(100):
            body = b"x" * (i % 7)
            method = "POST" if i % 2 else "GET"
            resp = await c.request(request_bytes(method, f"/r/{i}", body=body if i % 2 else None))
            assert resp.status == 200
            assert resp.json()["target"] == f"/r/{i}"
            assert "close" not in resp.connection_tokens()
    assert echo.connections == 1
    assert len(echo.requests) == 100


async def test_sequential_clients_share_the_upstream_pool(proxy, echo) -> None:
    for i in range(5):
        async with client(outbound(proxy)) as c:
            resp = await c.request(get(f"/c/{i}"))
            assert resp.status == 200
    assert echo.connections == 1


async def test_pipelined_requests_answered_in_order(sidecars, upstreams) -> None:
    async def app(req, conn) -> None:
        # The first request is the slowest: a proxy that answered in
        # completion order would reorder.
        delay = {"/1": 0.05, "/2": 0.02, "/3": 0.0}[req.target]
        await asyncio.sleep(delay)
        await conn.send(response_bytes(200, req.target.encode()))

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        await c.send(get("/1") + request_bytes("POST", "/2", body=b"two") + get("/3"))
        bodies = [(await c.response()).body for _ in range(3)]
    assert bodies == [b"/1", b"/2", b"/3"]
    assert [r.target for r in up.requests] == ["/1", "/2", "/3"]
    assert up.requests[1].body == b"two"


async def test_pipelined_head_and_get_keep_framing(proxy) -> None:
    async with client(outbound(proxy)) as c:
        await c.send(request_bytes("HEAD", "/h") + get("/g"))
        head = await c.response(method="HEAD")
        assert head.status == 200 and head.body == b""
        resp = await c.response()
        assert resp.json()["target"] == "/g"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_idle_pooled_connection_closed_by_upstream_is_not_reused(
    sidecars, upstreams, method
) -> None:
    """The upstream closes each connection once it is idle in the pool; every
    next request must still succeed. POST too: it cannot be retried safely, so
    the proxy must notice the close before it picks the connection."""

    async def app(req, conn) -> bool:
        await conn.send(response_bytes(200, req.target.encode()))
        return False  # close right after answering, while the proxy pools it

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        for i in range(20):
            body = b"payload" if method == "POST" else None
            resp = await c.request(request_bytes(method, f"/{i}", body=body))
            assert (resp.status, resp.body) == (200, f"/{i}".encode())
            await wait_for(lambda i=i: up.closed_conns == i + 1, what="upstream closed its side")
    assert len(up.requests) == 20


async def test_idle_pooled_connection_reset_by_upstream_is_not_reused(sidecars, upstreams) -> None:
    async def app(req, conn) -> bool:
        await conn.send(response_bytes(200, req.target.encode()))
        conn.reset()
        return False

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        for i in range(10):
            resp = await c.request(request_bytes("GET", f"/{i}"))
            assert (resp.status, resp.body) == (200, f"/{i}".encode())
            await wait_for(lambda i=i: up.closed_conns == i + 1, what="upstream reset its side")


async def test_upstream_connection_close_header_is_honoured(sidecars, upstreams) -> None:
    """`Connection: close` from the upstream means the proxy must not reuse it."""

    async def app(req, conn) -> None:
        # The socket stays open: only the header says close.
        await conn.send(response_bytes(200, b"ok", [("Connection", "close")]))

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        for _ in range(3):
            resp = await c.request(get())
            assert resp.status == 200
            # Client side is not affected by the upstream's hop-by-hop choice.
            assert "close" not in resp.connection_tokens()
    assert up.connections == 3


async def test_idle_client_connection_closed_after_idle_timeout(sidecars, echo) -> None:
    sc = await sidecars(services={"svc": echo.address}, timeouts={"idle": 0.3, "header_read": 5})
    loop = asyncio.get_running_loop()
    async with client(outbound(sc)) as c:
        resp = await c.request(get())
        assert resp.status == 200
        t0 = loop.time()
        rest = await c.read_to_eof(timeout=DEADLINE)
        waited = loop.time() - t0
    assert rest == b"", "an idle keep-alive connection is closed silently"
    assert 0.2 <= waited < 2.0, waited


async def test_pooled_upstream_connection_closed_after_pool_idle_timeout(sidecars, echo) -> None:
    sc = await sidecars(services={"svc": echo.address}, pool={"idle_timeout": 0.3})
    async with client(outbound(sc)) as c:
        assert (await c.request(get())).status == 200
        await wait_for(
            lambda: echo.closed_conns == 1, what="pool closes the idle upstream connection"
        )
        # And the next request opens a fresh one.
        assert (await c.request(get())).status == 200
    assert echo.connections == 2


async def test_client_connections_are_independent(proxy, echo) -> None:
    clients = [await RawClient.connect(outbound(proxy)) for _ in range(5)]
    try:
        for i, c in enumerate(clients):
            await c.send(get(f"/{i}"))
        for i, c in enumerate(clients):
            assert (await c.response()).json()["target"] == f"/{i}"
    finally:
        for c in clients:
            await c.close()
