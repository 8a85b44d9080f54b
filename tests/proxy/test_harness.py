"""The test harness checks itself: uvloop is in use and the strict reader reads what the echo
upstream writes. Without this, a harness bug would read as a proxy bug."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from proxy_harness import (
    ProtocolViolation,
    RawClient,
    chunked_body,
    client,
    get,
    parse_head,
    request_bytes,
)


async def test_runs_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_echo_upstream_direct(echo) -> None:
    async with client(echo.address) as c:
        resp = await c.request(get("/a", headers=[("X-A", "1")]))
        assert resp.status == 200
        assert resp.json()["target"] == "/a"
        body = chunked_body([b"ab", b"cde"], trailers=[("X-T", "t")])
        resp = await c.request(
            request_bytes("POST", "/b", headers=[("Transfer-Encoding", "chunked")]) + body
        )
        seen = resp.json()
        assert seen["body"] == "abcde"
        assert seen["chunked"] is True
        assert seen["trailers"] == [["X-T", "t"]]
    assert echo.connections == 1
    assert len(echo.requests) == 2


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: b\nc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A\r\n\r\n",
    ],
)
def test_strict_reader_rejects(head: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_head(head)


async def test_read_to_eof_sees_close(upstreams) -> None:
    async def closer(conn) -> None:
        await conn.read_request()

    up = await upstreams(closer)
    c = await RawClient.connect(up.address)
    await c.send(get())
    assert await c.closed_by_peer()
    await c.close()
