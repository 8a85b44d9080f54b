"""Edge cases found reviewing the HTTP/1.1 path: where pipelining, upgrades,
deferred errors and the connection's deadline meet."""

from __future__ import annotations

from proxy_harness import (
    client,
    echo_app,
    http,
    outbound,
    request_bytes,
)

UPGRADE = [("Connection", "Upgrade"), ("Upgrade", "websocket")]


async def test_declined_upgrade_followed_by_a_bare_crlf_still_times_out_idle(
    sidecars, upstreams
) -> None:
    # The upstream declines the upgrade; the client sent a CRLF after the request
    # (RFC 9112 section 2.2 lets it) and then nothing: the connection is idle and
    # must close after `timeouts.idle`, like any other.
    up = await upstreams(http(echo_app))
    sc = await sidecars(services={"svc": up.address}, timeouts={"idle": 0.3})
    async with client(outbound(sc)) as c:
        await c.send(request_bytes("GET", "/u", headers=UPGRADE) + b"\r\n")
        resp = await c.response()
        assert resp.status == 200
        assert await c.closed_by_peer(timeout=3)
