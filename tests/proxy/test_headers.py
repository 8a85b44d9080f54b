"""Header rules end to end: hop-by-hop removal both ways, HTTP/1.0 clients,
HEAD / 204 / 304, Expect: 100-continue, and the headers the sidecar adds
(x-request-id, x-forwarded-*, traceparent)."""

from __future__ import annotations

import asyncio
import re

import pytest
from proxy_harness import (
    DEADLINE,
    client,
    get,
    http,
    outbound,
    read_body,
    request_bytes,
    response_bytes,
    seen_header,
)

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


async def test_request_hop_by_hop_headers_removed(proxy) -> None:
    headers = [
        ("Connection", "keep-alive, X-Secret, X-Other"),
        ("X-Secret", "s"),
        ("X-Other", "o"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "gzip;q=0.5"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("X-Kept", "k"),
    ]
    async with client(outbound(proxy)) as c:
        resp = await c.request(get("/hop", headers=headers))
    seen = resp.json()
    for name in (
        "x-secret",
        "x-other",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "proxy-authorization",
    ):
        assert seen_header(seen, name) == [], name
    assert seen_header(seen, "te") in ([], ["trailers"])
    conn_tokens = {t.strip().lower() for v in seen_header(seen, "connection") for t in v.split(",")}
    assert conn_tokens <= {"keep-alive", ""}, conn_tokens
    assert seen_header(seen, "x-kept") == ["k"]


async def test_response_hop_by_hop_headers_removed(sidecars, upstreams) -> None:
    async def app(req, conn) -> None:
        await conn.send(
            b"HTTP/1.1 200 OK\r\n"
            b"Connection: X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=3\r\n"
            b"Proxy-Connection: keep-alive\r\nUpgrade: foo\r\nX-Kept: k\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n"
        )

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(get())
        again = await c.request(get())
    assert resp.body == b"abcd" and again.body == b"abcd"
    for name in ("x-secret", "proxy-connection", "upgrade"):
        assert not resp.has(name), name
    assert resp.get("keep-alive") != "timeout=3"
    assert resp.get("x-kept") == "k"
    assert "x-secret" not in resp.connection_tokens()


@pytest.mark.parametrize("upstream_framing", ["length", "chunked"])
async def test_request_body_reframed_to_upstream(proxy, upstream_framing) -> None:
    """Whatever framing the client used, the upstream sees exactly one framing and the same bytes."""
    if upstream_framing == "length":
        data = request_bytes("POST", "/b", body=b"hello world")
    else:
        data = (
            request_bytes("POST", "/b", headers=[("Transfer-Encoding", "chunked")])
            + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
    async with client(outbound(proxy)) as c:
        resp = await c.request(data)
    seen = resp.json()
    assert seen["body"] == "hello world"
    te = seen_header(seen, "transfer-encoding")
    cl = seen_header(seen, "content-length")
    assert bool(te) != bool(cl), seen["headers"]


async def test_http10_client_gets_unchunked_response_and_close(sidecars, upstreams) -> None:
    async def app(req, conn) -> None:
        await conn.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        await c.send(get(version="1.0"))
        raw = await c.read_to_eof()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")
    assert b"chunked" not in head.lower()
    assert body == b"hello"


async def test_http10_keep_alive_honoured_with_a_length(proxy, echo) -> None:
    async with client(outbound(proxy)) as c:
        for i in range(3):
            resp = await c.request(
                get(f"/{i}", version="1.0", headers=[("Connection", "keep-alive")])
            )
            assert resp.status == 200
            assert resp.has("content-length")
            assert "keep-alive" in resp.connection_tokens()
    assert len(echo.requests) == 3


async def test_http10_without_keep_alive_is_closed(proxy) -> None:
    async with client(outbound(proxy)) as c:
        resp = await c.request(get(version="1.0"))
        assert resp.status == 200
        assert await c.closed_by_peer()


async def test_http11_connection_close_is_honoured(proxy) -> None:
    async with client(outbound(proxy)) as c:
        resp = await c.request(get(headers=[("Connection", "close")]))
        assert resp.status == 200
        assert "close" in resp.connection_tokens()
        assert await c.closed_by_peer()


async def test_head_keeps_content_length_and_sends_no_body(sidecars, upstreams) -> None:
    async def app(req, conn) -> None:
        assert req.method in ("HEAD", "GET")
        if req.method == "HEAD":
            await conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n"
            )
        else:
            await conn.send(response_bytes(200, b"after-head"))

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(request_bytes("HEAD", "/"), method="HEAD")
        assert (resp.status, resp.get("content-length"), resp.body) == (200, "1234", b"")
        # A body byte after the HEAD response would be read as the next status line.
        resp = await c.request(get())
        assert resp.body == b"after-head"


async def test_head_with_chunked_upstream_response(sidecars, upstreams) -> None:
    async def app(req, conn) -> None:
        if req.method == "HEAD":
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            await conn.send(response_bytes(200, b"next"))

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(request_bytes("HEAD", "/"), method="HEAD")
        assert resp.status == 200
        assert (await c.request(get())).body == b"next"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 50\r\n\r\n',
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
    ],
    ids=["204", "304-with-length", "304"],
)
async def test_bodiless_statuses(sidecars, upstreams, raw) -> None:
    async def app(req, conn) -> None:
        await conn.send(raw if req.target == "/first" else response_bytes(200, b"second"))

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(get("/first"))
        assert resp.status == int(raw[9:12])
        assert resp.body == b""
        resp = await c.request(get("/second"))
        assert (resp.status, resp.body) == (200, b"second")
    assert up.connections == 1


async def test_expect_100_continue_comes_from_upstream(sidecars, upstreams) -> None:
    async def handler(conn) -> None:
        req = await conn.read_request(body=False)
        assert req is not None
        assert req.get("expect") == "100-continue"
        await conn.send(b"HTTP/1.1 100 Continue\r\nX-From: upstream\r\n\r\n")
        await read_body(conn.reader, req, request=True)
        await conn.send(response_bytes(200, b"got " + req.body))

    up = await upstreams(handler)
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        await c.send(
            request_bytes(
                "POST", "/", headers=[("Expect", "100-continue"), ("Content-Length", "5")]
            )
        )
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert head.startswith(b"HTTP/1.1 100"), head
        assert b"x-from: upstream" in head.lower()
        await c.send(b"hello")
        resp = await c.response()
    assert (resp.status, resp.body) == (200, b"got hello")


async def test_expect_100_continue_upstream_answers_final_without_reading(
    sidecars, upstreams
) -> None:
    """The upstream refuses (417-style) without 100: the client gets the final
    response and never had to send the body; the connection is not desynced."""

    async def handler(conn) -> None:
        req = await conn.read_request(body=False)
        assert req is not None
        await conn.send(
            response_bytes(417, b"no", [("Connection", "close")], phrase="Expectation Failed")
        )

    up = await upstreams(handler)
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        await c.send(
            request_bytes(
                "POST", "/", headers=[("Expect", "100-continue"), ("Content-Length", "5")]
            )
        )
        resp = await c.response()
        assert (resp.status, resp.body) == (417, b"no")
        assert resp.informational == []


async def test_request_id_added_when_absent_and_kept_when_present(proxy) -> None:
    async with client(outbound(proxy)) as c:
        added = seen_header((await c.request(get())).json(), "x-request-id")
        other = seen_header((await c.request(get())).json(), "x-request-id")
        kept = seen_header(
            (await c.request(get(headers=[("X-Request-Id", "abc-123")]))).json(), "x-request-id"
        )
    assert len(added) == 1 and added[0]
    assert len(other) == 1 and other != added
    assert kept == ["abc-123"]


async def test_forwarded_for_and_proto(proxy) -> None:
    async with client(outbound(proxy)) as c:
        seen = (await c.request(get())).json()
        assert seen_header(seen, "x-forwarded-for") == ["127.0.0.1"]
        assert seen_header(seen, "x-forwarded-proto") == ["http"]
        seen = (await c.request(get(headers=[("X-Forwarded-For", "10.1.2.3")]))).json()
        assert [v.replace(" ", "") for v in seen_header(seen, "x-forwarded-for")] == [
            "10.1.2.3,127.0.0.1"
        ]


async def test_traceparent_created_when_absent(proxy) -> None:
    async with client(outbound(proxy)) as c:
        seen = (await c.request(get())).json()
    (value,) = seen_header(seen, "traceparent")
    m = TRACEPARENT.match(value)
    assert m, value
    assert m.group(1) != "0" * 32 and m.group(2) != "0" * 16


@pytest.mark.parametrize(
    "incoming",
    [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    ],
)
async def test_traceparent_keeps_trace_id(proxy, incoming) -> None:
    async with client(outbound(proxy)) as c:
        seen = (await c.request(get(headers=[("traceparent", incoming)]))).json()
    (value,) = seen_header(seen, "traceparent")
    m = TRACEPARENT.match(value)
    assert m, value
    assert m.group(1) == incoming[3:35]


async def test_invalid_traceparent_replaced_by_a_valid_one(proxy) -> None:
    async with client(outbound(proxy)) as c:
        seen = (await c.request(get(headers=[("traceparent", "00-zz-yy-01")]))).json()
    (value,) = seen_header(seen, "traceparent")
    assert TRACEPARENT.match(value), value


async def test_headers_added_through_two_hops_keep_identity(sidecars, echo) -> None:
    b = await sidecars(app=echo.address, name="b")
    a = await sidecars(services={"b": b.addresses["inbound"]}, name="a")
    async with client(outbound(a)) as c:
        seen = (await c.request(get(host="b"))).json()
    (rid,) = seen_header(seen, "x-request-id")
    assert rid
    (tp,) = seen_header(seen, "traceparent")
    assert TRACEPARENT.match(tp)
    # Both hops appended the address they saw.
    assert [v.replace(" ", "") for v in seen_header(seen, "x-forwarded-for")] == [
        "127.0.0.1,127.0.0.1"
    ]
