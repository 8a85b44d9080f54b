"""WebSocket upgrades tunneled through the sidecar, server-sent events with no
batching across two sidecars, and long requests that outlive the idle timer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from proxy_harness import (
    DEADLINE,
    LOCAL,
    Address,
    client,
    get,
    http,
    inbound,
    outbound,
    response_bytes,
)


@pytest.fixture
async def ws_echo() -> AsyncIterator[Address]:
    """An aiohttp WebSocket echo server at /ws."""

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, LOCAL, 0)
    await site.start()
    port = runner.addresses[0][1]
    yield Address(LOCAL, port)
    await runner.cleanup()


async def test_websocket_through_proxy(sidecars, ws_echo) -> None:
    sc = await sidecars(services={"chat": ws_echo})
    proxy = f"http://{outbound(sc).host}:{outbound(sc).port}"
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(
            "http://chat/ws", proxy=proxy, timeout=aiohttp.ClientWSTimeout(ws_close=DEADLINE)
        ) as ws,
    ):
        for i in range(5):
            await ws.send_str(f"m{i}")
            msg = await asyncio.wait_for(ws.receive(), DEADLINE)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, f"echo:m{i}")
        await ws.send_bytes(b"\x00\x01\x02" * 10_000)
        msg = await asyncio.wait_for(ws.receive(), DEADLINE)
        assert msg.data == (b"\x00\x01\x02" * 10_000)[::-1]


async def test_a_websocket_cut_by_a_stop_is_reset_not_ended(sidecars, ws_echo) -> None:
    """At the drain deadline a stop cuts open tunnels: the client must see a reset,
    never a clean end it could take for the server closing the stream normally."""
    sc = await sidecars(services={"chat": ws_echo}, timeouts={"drain": 0.2})
    reader, writer = await asyncio.open_connection(outbound(sc).host, outbound(sc).port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    assert head.startswith(b"HTTP/1.1 101 ")
    await asyncio.wait_for(sc.drain_and_stop(), DEADLINE)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), DEADLINE)
    writer.close()


async def test_websocket_through_two_hops_by_host_header(sidecars, ws_echo) -> None:
    b = await sidecars(app=ws_echo, name="b")
    a = await sidecars(services={"chat": inbound(b)}, name="a")
    url = f"http://{outbound(a).host}:{outbound(a).port}/ws"
    async with aiohttp.ClientSession() as s, s.ws_connect(url, headers={"Host": "chat"}) as ws:
        for i in range(3):
            await ws.send_str(f"hop{i}")
            msg = await asyncio.wait_for(ws.receive(), DEADLINE)
            assert msg.data == f"echo:hop{i}"


async def test_upgrade_declined_by_upstream_is_a_plain_response(sidecars, upstreams) -> None:
    """The upstream ignores the Upgrade and answers 200. The client gets that
    response intact; the connection then either stays usable for HTTP or is
    announced closed (`Connection: close`) and closed: never left ambiguous."""

    async def app(req, conn) -> None:
        await conn.send(response_bytes(200, req.target.encode()))

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(
            get("/u", headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")])
        )
        assert (resp.status, resp.body) == (200, b"/u")
        assert not resp.has("upgrade")
        if "close" in resp.connection_tokens():
            assert await c.closed_by_peer()
        else:
            resp = await c.request(get("/after"))
            assert (resp.status, resp.body) == (200, b"/after")


async def test_sse_events_arrive_unbatched_through_two_sidecars(sidecars, upstreams) -> None:
    events = 6

    async def sse(req, conn) -> bool:
        await conn.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(events):
            if i:
                await asyncio.sleep(0.1)  # the upstream's cadence: an event every 100 ms
            event = f"id: {i}\ndata: {time.monotonic():.6f}\n\n".encode()
            await conn.send(b"%x\r\n%s\r\n" % (len(event), event))
        await conn.send(b"0\r\n\r\n")
        return True

    up = await upstreams(http(sse))
    b = await sidecars(app=up.address, name="b")
    a = await sidecars(services={"events": inbound(b)}, name="a")
    lags: list[float] = []
    buf = b""
    async with client(outbound(a)) as c:
        await c.send(get("/stream", host="events", headers=[("Accept", "text/event-stream")]))
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert head.startswith(b"HTTP/1.1 200")
        while len(lags) < events:
            data = await asyncio.wait_for(c.reader.read(65536), DEADLINE)
            assert data, "stream ended early"
            now = time.monotonic()
            buf += data
            while b"\n\n" in buf:
                # Chunk framing lines are interleaved; find each `data:` stamp.
                event, _, buf = buf.partition(b"\n\n")
                stamp = float(event.rsplit(b"data: ", 1)[1].split(b"\n", 1)[0])
                lags.append(now - stamp)
    assert len(lags) == events
    assert max(lags) < 0.05, f"event lags (s): {[round(x, 4) for x in lags]}"


async def test_long_response_outlives_idle_timeout(sidecars, upstreams) -> None:
    """First byte after more than `timeouts.idle` but within `timeouts.request`:
    idle timers must not fire while a request is in flight, on either side."""

    async def slow(req, conn) -> None:
        await asyncio.sleep(0.6)  # longer than idle (0.25 s): this is what is under test
        await conn.send(response_bytes(200, b"finally"))

    up = await upstreams(http(slow))
    b = await sidecars(app=up.address, name="b", timeouts={"idle": 0.25, "request": 3.0})
    a = await sidecars(
        services={"svc": inbound(b)}, name="a", timeouts={"idle": 0.25, "request": 3.0}
    )
    async with client(outbound(a)) as c:
        resp = await c.request(get())
        assert (resp.status, resp.body) == (200, b"finally")


async def test_slow_upload_outlives_idle_timeout_while_body_flows(sidecars, echo) -> None:
    """A body that trickles in slower than nothing but spans several idle periods is not cut."""
    sc = await sidecars(services={"svc": echo.address}, timeouts={"idle": 0.2, "request": 5.0})
    async with client(outbound(sc)) as c:
        await c.send(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 8\r\n\r\n")
        for part in (b"ab", b"cd", b"ef", b"gh"):
            await asyncio.sleep(0.1)  # the client's pacing: well within idle per gap
            await c.send(part)
        resp = await c.response()
    assert resp.json()["body"] == "abcdefgh"
