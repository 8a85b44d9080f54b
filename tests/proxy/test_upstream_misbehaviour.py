"""Upstreams that misbehave, and connection semantics around errors: the
response side of smuggling (an upstream whose framing cannot be trusted must
not poison a pooled connection) and errors answered while a request body is
still arriving."""

from __future__ import annotations

import pytest
from proxy_harness import (
    assert_lepton_error,
    client,
    get,
    http,
    outbound,
    replies,
    request_bytes,
    response_bytes,
)

from lepton_mesh.proxy.errors import Reason


async def test_extra_bytes_after_a_response_are_never_a_response(sidecars, upstreams) -> None:
    """An upstream writes more than it declared: the surplus must not be served
    as the answer to the next request (response splitting through the pool)."""

    def answer(req) -> bytes:
        if req.target == "/first":
            return response_bytes(200, b"ok") + response_bytes(200, b"spoofed")
        return response_bytes(200, b"genuine")

    up = await upstreams(replies(answer))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        first = await c.request(get("/first"))
        assert first.body == b"ok"
        second = await c.request(get("/second"))
    assert second.body != b"spoofed"
    if second.status == 200:
        assert second.body == b"genuine"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nX-A: b\nX-B: c\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"garbage\r\n\r\n",
        # Codings we would drop when re-framing (RFC 9112 section 6.3): refused as nginx does.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00gzipped",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\n\x1f\x8b\x08\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
    ids=[
        "cl-and-te",
        "two-cl",
        "bare-lf",
        "bad-status",
        "not-http",
        "te-gzip-close-delimited",
        "te-gzip-chunked",
        "te-two-headers",
    ],
)
async def test_malformed_upstream_response_is_502_and_not_pooled(sidecars, upstreams, raw) -> None:
    async def app(req, conn) -> bool | None:
        if req.target == "/bad":
            await conn.send(raw)
            return None
        await conn.send(response_bytes(200, b"fine"))
        return None

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(get("/bad"))
        assert_lepton_error(resp, 502, (Reason.UPSTREAM_PROTOCOL_ERROR, Reason.UPSTREAM_RESET))
        if "close" not in resp.connection_tokens():
            resp = await c.request(get("/good"))
            assert (resp.status, resp.body) == (200, b"fine")


async def test_http10_upstream_close_delimited_body(sidecars, upstreams) -> None:
    async def app(req, conn) -> bool:
        await conn.send(
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"old-school " * 100
        )
        return False

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(get())
        assert resp.body == b"old-school " * 100
        if "close" not in resp.connection_tokens():
            assert (await c.request(get())).body == b"old-school " * 100
    assert up.connections >= 1


async def test_early_hints_then_final_response(sidecars, upstreams) -> None:
    async def app(req, conn) -> None:
        await conn.send(
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            + response_bytes(200, b"final")
        )

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(get())
        assert (resp.status, resp.body) == (200, b"final")
        assert (await c.request(get())).body == b"final"


async def test_no_route_with_body_in_flight_does_not_desync(proxy, echo) -> None:
    """An error answered before the request body arrived: the rest of that body
    must be discarded (or the connection closed), never parsed as a request."""
    smuggled = request_bytes("GET", "/smuggled")
    body = smuggled + b"x" * (4000 - len(smuggled))
    async with client(outbound(proxy)) as c:
        await c.send(
            request_bytes("POST", "/", host="nope", headers=[("Content-Length", str(len(body)))])
        )
        resp = await c.response()
        assert_lepton_error(resp, 404, Reason.NO_ROUTE)
        if "close" not in resp.connection_tokens():
            await c.send(body + get("/after"))
            resp = await c.response()
            assert (resp.status, resp.json()["target"]) == (200, "/after")
    assert all(r.target != "/smuggled" for r in echo.requests)


async def test_pipelined_after_connection_close_is_not_served(proxy, echo) -> None:
    async with client(outbound(proxy)) as c:
        await c.send(get("/1", headers=[("Connection", "close")]) + get("/2"))
        resp = await c.response()
        assert resp.json()["target"] == "/1"
        assert "close" in resp.connection_tokens()
        assert await c.closed_by_peer()
    assert [r.target for r in echo.requests] == ["/1"]


async def test_upstream_close_after_request_body_on_pooled_post_is_not_retried(
    sidecars, upstreams
) -> None:
    """A POST whose upstream dies after reading it must not be sent twice."""
    seen: list[str] = []

    async def handler(conn) -> None:
        req = await conn.read_request()
        if req is None:
            return
        seen.append(req.target)
        if req.target == "/warm":
            await conn.send(response_bytes(200, b"warm"))
            req = await conn.read_request()
            if req is not None:
                seen.append(req.target)
        # The POST: read it, then drop the connection without answering.

    up = await upstreams(handler)
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        assert (await c.request(get("/warm"))).status == 200
        resp = await c.request(request_bytes("POST", "/charge", body=b"$100"))
    assert_lepton_error(resp, (502, 503), Reason.UPSTREAM_RESET)
    assert seen.count("/charge") == 1, seen
