"""HTTP/1.1 edges left by review: a HEAD response after interim (1xx) responses
keeps its upstream connection, and an `Expect: 100-continue` upload is not
timed out while the upstream has not yet asked for its body."""

from __future__ import annotations

import asyncio

import pytest
from proxy_harness import (
    DEADLINE,
    assert_lepton_error,
    client,
    http,
    outbound,
    read_head,
    request_bytes,
    response_bytes,
    wait_for,
)

from lepton_mesh.proxy.errors import Reason

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


# -- 2. Expect: 100-continue -----------------------------------------------------

IDLE = 0.2
SLOW = 3 * IDLE  # the upstream takes longer than `idle` to answer the head


def _expect_head(length: int) -> bytes:
    return request_bytes(
        "POST", "/up", headers=[("Expect", "100-continue"), ("Content-Length", str(length))]
    )


async def test_expect_continue_body_is_not_timed_out_before_the_100(sidecars, upstreams) -> None:
    async def app(conn) -> None:
        head = await conn.read_request(body=False)
        if head is None:
            return
        await asyncio.sleep(SLOW)  # a slow upstream, the case under test
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await conn.reader.readexactly(5)
        await conn.send(response_bytes(200, body))

    up = await upstreams(app)
    sc = await sidecars(services={"svc": up.address}, timeouts={"request": 0, "idle": IDLE})
    async with client(outbound(sc)) as c:
        await c.send(_expect_head(5))
        interim = await asyncio.wait_for(read_head(c.reader), DEADLINE)
        assert interim is not None and interim.startswith(b"HTTP/1.1 100 "), interim
        resp = await c.request(b"hello")
        assert (resp.status, resp.body) == (200, b"hello")


async def test_expect_continue_slow_final_answer_is_not_a_body_timeout(sidecars, upstreams) -> None:
    """The upstream answers without asking for the body (here 401), later than `idle`."""

    async def app(conn) -> None:
        await conn.read_request(body=False)
        await asyncio.sleep(SLOW)
        await conn.send(response_bytes(401, b"no"))

    up = await upstreams(app)
    sc = await sidecars(services={"svc": up.address}, timeouts={"request": 0, "idle": IDLE})
    async with client(outbound(sc)) as c:
        resp = await c.request(_expect_head(5))
        assert (resp.status, resp.body) == (401, b"no")


async def test_expect_continue_body_stall_after_the_100_is_timed_out(sidecars, upstreams) -> None:
    async def app(conn) -> None:
        if await conn.read_request(body=False) is not None:
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await conn.reader.read()  # until the proxy gives up

    up = await upstreams(app)
    sc = await sidecars(services={"svc": up.address}, timeouts={"request": 0, "idle": IDLE})
    async with client(outbound(sc)) as c:
        await c.send(_expect_head(5))
        resp = await c.response()
        assert [m.status for m in resp.informational] == [100]
        assert_lepton_error(resp, 408, Reason.BODY_TIMEOUT)
        assert await c.closed_by_peer()


async def test_expect_continue_still_has_the_route_timeout(sidecars, upstreams) -> None:
    async def app(conn) -> None:
        if await conn.read_request(body=False) is not None:
            await conn.reader.read()  # never answers

    up = await upstreams(app)
    sc = await sidecars(services={"svc": up.address}, timeouts={"request": 0.4, "idle": 30})
    async with client(outbound(sc)) as c:
        resp = await c.request(_expect_head(5))
        assert_lepton_error(resp, 504, Reason.UPSTREAM_TIMEOUT)


async def test_expect_continue_body_sent_without_a_100_is_timed_from_its_first_byte(
    sidecars, upstreams
) -> None:
    async def app(conn) -> None:
        if await conn.read_request(body=False) is not None:
            await conn.reader.read()  # never asks for the body, never answers

    up = await upstreams(app)
    sc = await sidecars(services={"svc": up.address}, timeouts={"request": 0, "idle": IDLE})
    async with client(outbound(sc)) as c:
        await c.send(_expect_head(5))
        await wait_for(lambda: up.requests, what="the head to reach the upstream")
        await c.send(b"he")  # the client stops waiting for a 100, then stalls
        resp = await c.response()
        assert_lepton_error(resp, 408, Reason.BODY_TIMEOUT)
