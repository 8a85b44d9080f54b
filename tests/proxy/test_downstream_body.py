"""Request bodies on the client side: a declared length over the limit is refused
before anything is forwarded, and a stalled upload is timed out by `timeouts.idle`
between its reads, whatever the route's overall timeout."""

from __future__ import annotations

import pytest
from proxy_harness import (
    assert_lepton_error,
    client,
    get,
    outbound,
    request_bytes,
    wait_for,
)

from lepton_mesh.proxy.errors import Reason

LIMIT = 1000


@pytest.mark.parametrize(
    "extra",
    [[("Expect", "100-continue")], []],
    ids=["expect-100-continue", "body-follows"],
)
async def test_declared_length_over_the_limit_is_refused_at_the_head(sidecars, echo, extra) -> None:
    sc = await sidecars(services={"svc": echo.address}, limits={"max_body_bytes": LIMIT})
    head = request_bytes("POST", "/up", headers=[*extra, ("Content-Length", str(4 * LIMIT))])
    async with client(outbound(sc)) as c:
        await c.send(head if extra else head + b"a" * (LIMIT // 2))
        resp = await c.response()
        assert not resp.informational, "no 100 Continue for a body that will be refused"
        body = assert_lepton_error(resp, 413, Reason.BODY_TOO_LARGE)
        assert str(LIMIT) in body["error"]
        assert await c.closed_by_peer()
    assert echo.bytes_received == 0


async def test_over_limit_request_after_a_valid_one_is_answered_in_order(sidecars, echo) -> None:
    sc = await sidecars(services={"svc": echo.address}, limits={"max_body_bytes": LIMIT})
    too_big = request_bytes("POST", "/big", headers=[("Content-Length", str(2 * LIMIT))])
    async with client(outbound(sc)) as c:
        await c.send(get("/a") + too_big)
        resp = await c.response()
        assert (resp.status, resp.json()["target"]) == (200, "/a")
        assert_lepton_error(await c.response(), 413, Reason.BODY_TOO_LARGE)
        assert await c.closed_by_peer()
    assert [r.target for r in echo.requests] == ["/a"]


@pytest.mark.parametrize("request_timeout", [0.0, 30.0], ids=["no-request-timeout", "long"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_stalled_request_body_is_timed_out(sidecars, echo, request_timeout, framing) -> None:
    sc = await sidecars(
        services={"svc": echo.address},
        timeouts={"request": request_timeout, "idle": 0.3},
    )
    if framing == "length":
        start = request_bytes("POST", "/up", headers=[("Content-Length", "10")]) + b"abc"
    else:
        start = request_bytes("POST", "/up", headers=[("Transfer-Encoding", "chunked")])
        start += b"3\r\nabc\r\n"
    async with client(outbound(sc)) as c:
        await c.send(start)
        await wait_for(lambda: echo.bytes_received > 0, what="the head to be forwarded")
        resp = await c.response()
        assert_lepton_error(resp, 408, Reason.BODY_TIMEOUT)
        assert await c.closed_by_peer()
    await wait_for(lambda: not sc.outbound.connections, what="the connection to be released")
    assert echo.requests == []


async def test_stalled_upgrade_request_body_is_timed_out(sidecars, echo) -> None:
    sc = await sidecars(services={"svc": echo.address}, timeouts={"request": 0, "idle": 0.3})
    head = request_bytes(
        "POST",
        "/ws",
        headers=[("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Content-Length", "10")],
    )
    async with client(outbound(sc)) as c:
        await c.send(head + b"abc")
        assert_lepton_error(await c.response(), 408, Reason.BODY_TIMEOUT)
        assert await c.closed_by_peer()


async def test_stalled_body_of_a_queued_request_is_timed_out(sidecars, echo) -> None:
    """The body's timer starts when the queued request gets its turn, not at its first read."""
    sc = await sidecars(services={"svc": echo.address}, timeouts={"request": 0, "idle": 0.3})
    queued = request_bytes("POST", "/b", headers=[("Content-Length", "10")]) + b"abc"
    async with client(outbound(sc)) as c:
        await c.send(get("/a") + queued)
        resp = await c.response()
        assert (resp.status, resp.json()["target"]) == (200, "/a")
        assert_lepton_error(await c.response(), 408, Reason.BODY_TIMEOUT)
        assert await c.closed_by_peer()
    assert [r.target for r in echo.requests] == ["/a"]
