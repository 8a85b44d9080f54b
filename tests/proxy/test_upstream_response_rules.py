"""What the sidecar accepts from an upstream and how it frames it for the client.

Each upstream here is a raw socket server whose bytes the test writes: bytes
beyond a response, a 101 with tunnelled bytes in the same segment, an endless
response head, a bodyless status with Content-Length. (Transfer codings other
than chunked are in test_upstream_misbehaviour.py.)
"""

from __future__ import annotations

import asyncio

import pytest
from proxy_harness import (
    DEADLINE,
    assert_lepton_error,
    client,
    get,
    outbound,
    replies,
    request_bytes,
    response_bytes,
    wait_for,
)

from lepton_mesh.proxy.errors import Reason

pytestmark = pytest.mark.timeout(30)

GENUINE = response_bytes(200, b"genuine")


def _via_sidecar(resp) -> bool:
    """The response is one the outbound sidecar framed, not raw upstream bytes."""
    return resp.get("x-lepton-attempts") is not None


# -- bytes beyond the response ------------------------------------------------


async def test_partial_second_response_never_reaches_another_client(sidecars, upstreams) -> None:
    """A started second response in the same segment: the connection is closed,
    so the next request (from another client) gets a fresh connection."""

    first_then_evil = (
        b"HTTP/1.1 200 X\r\ncontent-length: 5\r\n\r\nfirst"
        b"HTTP/1.1 200 OK\r\ncontent-length: 60\r\n\r\nEVIL"
    )
    up = await upstreams(
        replies(lambda req: first_then_evil if req.target == "/first" else GENUINE)
    )
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as a:
        first = await a.request(get("/first"))
        assert (first.status, first.body) == (200, b"first")
    async with client(outbound(sc)) as b:
        second = await b.request(get("/second"))
    assert (second.status, second.body) == (200, b"genuine")
    assert _via_sidecar(second)
    assert up.connections == 2


async def test_pipelined_request_is_not_answered_by_surplus_response(sidecars, upstreams) -> None:
    """A complete extra response in the same segment as the first one must not
    answer the pipelined request that goes out on that connection next."""

    def answer(req) -> bytes:
        if req.target == "/1":
            return response_bytes(200, b"one") + response_bytes(200, b"spoofed")
        return response_bytes(200, req.target.encode())

    up = await upstreams(replies(answer))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        await c.send(get("/1") + get("/2"))
        one = await c.response()
        two = await c.response()
    assert one.body == b"one"
    assert (two.status, two.body) == (200, b"/2")
    assert [r.target for r in up.requests] == ["/1", "/2"]


async def test_head_response_with_body_bytes_closes_the_connection(sidecars, upstreams) -> None:
    """A HEAD response followed by bytes (its body, wrongly sent): not reused."""

    head_with_body = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    up = await upstreams(replies(lambda req: head_with_body if req.method == "HEAD" else GENUINE))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        head = await c.request(request_bytes("HEAD", "/h"), method="HEAD")
        assert (head.status, head.get("content-length")) == (200, "5")
        resp = await c.request(get("/after"))
    assert (resp.status, resp.body) == (200, b"genuine")
    assert up.connections == 2


# -- 101: the head before the tunnelled bytes -----------------------------------


async def test_101_head_precedes_bytes_sent_with_it(sidecars, upstreams) -> None:
    async def handler(conn) -> None:
        req = await conn.read_request()
        assert req is not None
        await conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\nRAWBYTES"
        )
        await conn.reader.read()  # until the tunnel closes

    up = await upstreams(handler)
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        await c.send(get("/ws", headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")]))
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert await asyncio.wait_for(c.reader.readexactly(8), DEADLINE) == b"RAWBYTES"


# -- the response head's size ---------------------------------------------------


async def test_endless_response_head_is_502_and_closed(sidecars, upstreams) -> None:
    """Header lines that never end: the sidecar gives up past the limit, not at EOF."""
    closed = asyncio.Event()

    async def handler(conn) -> None:
        req = await conn.read_request()
        assert req is not None
        line = b"x-filler: " + b"f" * 1000 + b"\r\n"
        try:
            await conn.send(b"HTTP/1.1 200 OK\r\n")
            for _ in range(16 * 1024):  # 16 MB at most
                await conn.send(line * 64)
        except ConnectionError:
            pass
        else:
            await conn.reader.read()  # the sidecar must close; EOF or reset
        closed.set()

    up = await upstreams(handler)
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(get("/"))
    assert_lepton_error(resp, 502, Reason.UPSTREAM_PROTOCOL_ERROR)
    assert "head" in resp.json()["error"]
    await asyncio.wait_for(closed.wait(), DEADLINE)


async def test_response_head_over_limit_in_one_segment_is_502(sidecars, upstreams) -> None:
    """The limit holds also when the whole head arrives at once; a head under it passes."""

    def head_of(size: int) -> bytes:
        lines = [(f"x-filler-{i}", "f" * 990) for i in range(size // 1000)]
        return response_bytes(200, b"body", lines)

    up = await upstreams(
        replies(lambda req: head_of(60_000 if req.target == "/small" else 100_000))
    )
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        small = await c.request(get("/small"))
        assert (small.status, small.body) == (200, b"body")
        big = await c.request(get("/big"))
    assert_lepton_error(big, 502, Reason.UPSTREAM_PROTOCOL_ERROR)
    await wait_for(lambda: up.closed_conns == up.connections, what="upstream closed")


# -- Content-Length on responses without a body -----------------------------------


async def test_content_length_dropped_on_204_and_1xx_kept_on_304(sidecars, upstreams) -> None:
    raw = {
        "/204": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nfirst",
        "/103": b"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\nLink: </a>\r\n\r\n"
        + response_bytes(200, b"final"),
        "/304": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    }
    up = await upstreams(replies(lambda req: raw.get(req.target, GENUINE)))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        no_content = await c.request(get("/204"))
        assert no_content.status == 204
        assert not no_content.has("content-length")
        # The stray bytes made that upstream connection unusable: not served, not retried.
        after = await c.request(get("/after"))
        assert (after.status, after.body) == (200, b"genuine")
        hinted = await c.request(get("/103"))
        assert (hinted.status, hinted.body) == (200, b"final")
        assert [m.status for m in hinted.informational] == [103]
        assert not hinted.informational[0].has("content-length")
        not_modified = await c.request(get("/304"))
        assert (not_modified.status, not_modified.get("content-length")) == (304, "5")
    assert [r.target for r in up.requests] == ["/204", "/after", "/103", "/304"]
