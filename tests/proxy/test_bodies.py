"""Bodies stream through the sidecar in both directions without waiting for
the whole message: each test holds one side back until the other side has
seen the first part, so a proxy that buffered would time out here."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from proxy_harness import (
    DEADLINE,
    RawClient,
    chunked_body,
    client,
    get,
    http,
    outbound,
    read_body,
    request_bytes,
    response_bytes,
    wait_for,
)


async def test_request_body_streams_before_it_is_complete(sidecars, upstreams) -> None:
    """Content-Length and chunked: the upstream sees the first half while the client still holds the second."""
    received = bytearray()
    first_half_seen = asyncio.Event()

    async def handler(conn) -> None:
        while True:
            req = await conn.read_request(body=False)
            if req is None:
                return
            received.clear()

            def sink(data: bytes) -> None:
                received.extend(data)
                if len(received) >= 5000:
                    first_half_seen.set()

            await read_body(conn.reader, req, request=True, sink=sink)
            await conn.send(response_bytes(200, hashlib.sha256(received).hexdigest().encode()))

    up = await upstreams(handler)
    sc = await sidecars(services={"svc": up.address})
    payload = os.urandom(10_000)
    async with client(outbound(sc)) as c:
        for framing in ("length", "chunked"):
            first_half_seen.clear()
            if framing == "length":
                await c.send(
                    request_bytes("POST", "/up", headers=[("Content-Length", "10000")])
                    + payload[:5000]
                )
            else:
                head = request_bytes("POST", "/up", headers=[("Transfer-Encoding", "chunked")])
                await c.send(head + b"%x\r\n%s\r\n" % (5000, payload[:5000]))
            await asyncio.wait_for(first_half_seen.wait(), DEADLINE)
            if framing == "length":
                await c.send(payload[5000:])
            else:
                await c.send(chunked_body([payload[5000:]]))
            resp = await c.response()
            assert (resp.status, resp.body) == (
                200,
                hashlib.sha256(payload).hexdigest().encode(),
            ), framing


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_response_body_streams_before_it_is_complete(sidecars, upstreams, framing) -> None:
    release = asyncio.Event()

    async def app(req, conn) -> bool:
        if framing == "length":
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
            await release.wait()
            await conn.send(b"-last")
            return True
        if framing == "chunked":
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await release.wait()
            await conn.send(b"5\r\n-last\r\n0\r\n\r\n")
            return True
        # No length: the body ends when the upstream closes.
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\nfirst")
        await release.wait()
        await conn.send(b"-last")
        return False

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        await c.send(get())
        seen = bytearray()

        async def until(marker: bytes) -> None:
            while marker not in seen:
                data = await c.reader.read(65536)
                assert data, f"closed before {marker!r}"
                seen.extend(data)

        await asyncio.wait_for(until(b"first"), DEADLINE)
        release.set()
        await asyncio.wait_for(until(b"-last"), DEADLINE)
        everything = bytes(seen)
    head, _, body = everything.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        assert b"first" in body and b"-last" in body
    else:
        assert body.startswith(b"first-last")


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 1 << 20, 3 * (1 << 20) + 7])
async def test_bodies_of_many_sizes_roundtrip(proxy, size) -> None:
    payload = os.urandom(size)
    async with client(outbound(proxy)) as c:
        resp = await c.request(request_bytes("POST", "/", body=payload))
        assert resp.json()["body"].encode("latin-1") == payload
        chunks = [payload[i : i + 70_000] for i in range(0, size, 70_000)]
        req = request_bytes("POST", "/", headers=[("Transfer-Encoding", "chunked")]) + chunked_body(
            chunks
        )
        resp = await c.request(req)
        assert resp.json()["body"].encode("latin-1") == payload


async def test_large_response_with_slow_reader_completes(sidecars, upstreams) -> None:
    """Backpressure, not loss: the client reads slowly and still gets every byte."""
    total = 8 * (1 << 20)
    block = os.urandom(1 << 16)

    async def app(req, conn) -> None:
        await conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        for _ in range(total // len(block)):
            await conn.send(block)

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    digest = hashlib.sha256()
    async with client(outbound(sc)) as c:
        await c.send(get())
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert head.startswith(b"HTTP/1.1 200")
        got = 0
        pauses = 0
        while got < total:
            data = await asyncio.wait_for(c.reader.read(1 << 16), DEADLINE)
            assert data
            digest.update(data)
            got += len(data)
            if got > pauses * (2 << 20):
                pauses += 1
                await asyncio.sleep(0.05)  # pacing: a slow reader, not waiting for state
    assert got == total
    assert digest.digest() == hashlib.sha256(block * (total // len(block))).digest()


async def test_request_trailers_forwarded_when_chunked(proxy) -> None:
    body = chunked_body([b"abc", b"def"], trailers=[("X-Checksum", "sha-1234"), ("X-Other", "2")])
    async with client(outbound(proxy)) as c:
        resp = await c.request(
            request_bytes(
                "POST",
                "/t",
                headers=[("Transfer-Encoding", "chunked"), ("Trailer", "X-Checksum, X-Other")],
            )
            + body
        )
    seen = resp.json()
    assert seen["body"] == "abcdef"
    assert seen["chunked"] is True
    assert ["X-Checksum", "sha-1234"] in seen["trailers"]
    assert ["X-Other", "2"] in seen["trailers"]


async def test_response_trailers_forwarded_when_chunked(sidecars, upstreams) -> None:
    async def app(req, conn) -> None:
        await conn.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
            b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n"
        )

    up = await upstreams(http(app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(get(headers=[("TE", "trailers")]))
        assert resp.body == b"abc"
        assert resp.chunked
        assert ("grpc-status", "0") in resp.trailers
        assert ("grpc-message", "ok") in resp.trailers
        # And the connection is still in sync after a trailer section.
        again = await c.request(get())
        assert again.body == b"abc"


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_gone_mid_upload_releases_upstream(sidecars, upstreams, how) -> None:
    """A client that disappears mid-body must not leave the upstream waiting forever:
    the proxy closes (or resets) the upstream connection it was streaming into."""

    async def handler(conn) -> None:
        req = await conn.read_request(body=False)
        assert req is not None
        await read_body(conn.reader, req, request=True)

    up = await upstreams(handler)
    sc = await sidecars(services={"svc": up.address})
    c = await RawClient.connect(outbound(sc))
    await c.send(request_bytes("POST", "/", headers=[("Content-Length", "100000")]) + b"x" * 1000)
    await wait_for(lambda: up.bytes_received > 1000, what="upload started")
    if how == "rst":
        c.writer.transport.abort()
    await c.close()
    await wait_for(
        lambda: up.closed_conns == 1, what="upstream connection closed after client left"
    )
