"""HTTP/1.1 edges left by review: a HEAD response after interim (1xx) responses
keeps its upstream connection."""

from __future__ import annotations

import pytest
from proxy_harness import (
    client,
    http,
    outbound,
    request_bytes,
)

HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"
HEAD_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


# -- 1. HEAD after 1xx ---------------------------------------------------------


def _head_app(interim: bytes, tail: bytes):
    async def app(req, conn) -> None:
        # One write: the interim heads, the final head (and `tail`) in one read.
        await conn.send(interim + HEAD_200 + tail)

    return http(app)


@pytest.mark.parametrize("interim", [HINTS, PROCESSING + HINTS], ids=["one-interim", "two-interim"])
async def test_head_after_interim_responses_reuses_the_upstream_connection(
    sidecars, upstreams, interim
) -> None:
    up = await upstreams(_head_app(interim, b""))
    sc = await sidecars(services={"svc": up.address})
    n_interim = interim.count(b"HTTP/1.1 ")
    async with client(outbound(sc)) as c:
        for i in range(3):
            resp = await c.request(request_bytes("HEAD", f"/h{i}"), method="HEAD")
            assert resp.status == 200
            assert len(resp.informational) == n_interim
            assert resp.get("content-length") == "5"
    assert [r.target for r in up.requests] == ["/h0", "/h1", "/h2"]
    assert up.connections == 1


@pytest.mark.parametrize(
    "tail",
    [b"x", b"x\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
    ids=["byte", "byte-crlfcrlf", "whole-response"],
)
async def test_bytes_after_a_head_response_after_interim_still_close(
    sidecars, upstreams, tail
) -> None:
    """Never trusted: surplus after the final head, even one ending in CRLFCRLF."""
    up = await upstreams(_head_app(HINTS, tail))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        for i in range(2):
            resp = await c.request(request_bytes("HEAD", f"/h{i}"), method="HEAD")
            assert resp.status == 200
    assert up.connections == 2
