"""Upgrade requests on the client side: one answered by the sidecar itself gets
exactly that answer, and an upgrade request's body is forwarded as its body
(RFC 9110 section 7.8: the whole request is read before the switch)."""

from __future__ import annotations

import asyncio

import pytest
from proxy_harness import (
    DEADLINE,
    Conn,
    assert_lepton_error,
    client,
    echo_app,
    get,
    http,
    outbound,
    request_bytes,
    service,
)

from lepton_mesh.proxy.errors import Reason

UPGRADE = [("Connection", "Upgrade"), ("Upgrade", "websocket")]


async def switch_and_echo(conn: Conn) -> None:
    """Answers 101 naming the request's body, then echoes the tunnel's bytes."""
    req = await conn.read_request()
    if req is None:
        return
    await conn.send(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        + b"body="
        + req.body
        + b";"
    )
    while data := await conn.reader.read(65536):
        await conn.send(data)


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), DEADLINE)


@pytest.mark.parametrize(
    ("host", "status", "reason"),
    [("nosuch", 404, Reason.NO_ROUTE), ("empty", 503, Reason.NO_HEALTHY_ENDPOINT)],
)
async def test_upgrade_answered_by_the_sidecar_gets_one_response(
    sidecars, echo, capsys, host, status, reason
) -> None:
    sc = await sidecars(services={"svc": echo.address, "empty": service("empty")})
    async with client(outbound(sc)) as c:
        # The next request follows in the same write: it is HTTP, as no switch happened.
        await c.send(get("/ws", host=host, headers=UPGRADE) + get("/after"))
        assert_lepton_error(await c.response(), status, reason)
        resp = await c.response()
        assert (resp.status, resp.json()["target"]) == (200, "/after")
        resp = await c.request(get("/again"))
        assert (resp.status, resp.json()["target"]) == (200, "/again")
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "split"])
async def test_upgrade_request_body_is_forwarded_before_the_switch(
    sidecars, upstreams, split
) -> None:
    up = await upstreams(switch_and_echo)
    sc = await sidecars(services={"svc": up.address})
    head = request_bytes("POST", "/echo", headers=UPGRADE, body=b"abc")[:-3]
    async with client(outbound(sc)) as c:
        if split:
            await c.send(head + b"a")
            await c.send(b"b")
            await c.send(b"cXYZ")
        else:
            await c.send(head + b"abcXYZ")
        resp = await c.response()
        assert resp.status == 101
        assert await read_exactly(c.reader, len(b"body=abc;XYZ")) == b"body=abc;XYZ"
        await c.send(b"more")
        assert await read_exactly(c.reader, 4) == b"more"
    assert up.requests[0].get("content-length") == "3"
    assert up.requests[0].body == b"abc"


async def test_declined_upgrade_with_a_body_keeps_the_connection_http(sidecars, upstreams) -> None:
    up = await upstreams(http(echo_app))
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        await c.send(request_bytes("POST", "/u", headers=UPGRADE, body=b"abc") + get("/after"))
        resp = await c.response()
        assert (resp.status, resp.json()["body"]) == (200, "abc")
        if "close" not in resp.connection_tokens():
            resp = await c.response()
            assert (resp.status, resp.json()["target"]) == (200, "/after")


async def test_upgrade_request_with_a_chunked_body_is_refused(sidecars, echo) -> None:
    sc = await sidecars(services={"svc": echo.address})
    async with client(outbound(sc)) as c:
        await c.send(
            request_bytes("POST", "/u", headers=[*UPGRADE, ("Transfer-Encoding", "chunked")])
            + b"3\r\nabc\r\n0\r\n\r\n"
        )
        assert_lepton_error(await c.response(), 501, Reason.UNSUPPORTED)
        assert await c.closed_by_peer()
    assert echo.bytes_received == 0
