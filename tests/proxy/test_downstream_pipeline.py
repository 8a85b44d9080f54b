"""Pipelined requests followed by bad bytes: every valid request before the bad
bytes is forwarded and answered, in order, and only then the error (RFC 9112
section 9.3.2). Each case is one client write, so the valid requests and the bad
bytes arrive in one read."""

from __future__ import annotations

import pytest
from proxy_harness import (
    Upstream,
    assert_lepton_error,
    client,
    echo_app,
    get,
    http,
    outbound,
)

from lepton_mesh.proxy.errors import Reason

MAX_HEADER_BYTES = 8192

BAD_TAILS = [
    ("junk", b"junk\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("nul", b"\x00", 400, Reason.BAD_REQUEST),
    ("bad-header", b"GET /c HTTP/1.1\r\nHost up\r\n\r\n", 400, Reason.BAD_REQUEST),
    (
        "head-too-large",
        b"GET /c HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        Reason.HEADERS_TOO_LARGE,
    ),
]

bad_tails = pytest.mark.parametrize(
    ("case_id", "tail", "status", "reason"), BAD_TAILS, ids=[c[0] for c in BAD_TAILS]
)
pools = pytest.mark.parametrize("warm", [True, False], ids=["warm-pool", "cold-pool"])


async def _sidecar(sidecars, upstreams, *, warm: bool) -> tuple[object, Upstream]:
    up = await upstreams(http(echo_app))
    sc = await sidecars(services={"svc": up.address}, limits={"max_header_bytes": MAX_HEADER_BYTES})
    if warm:  # an idle pooled upstream connection: the first request attaches at once
        async with client(outbound(sc)) as c:
            assert (await c.request(get("/warm"))).status == 200
    return sc, up


@pools
@bad_tails
@pytest.mark.parametrize("targets", [["/a"], ["/slow", "/b", "/c"]], ids=["one", "three"])
async def test_bad_bytes_are_answered_after_every_request_before_them(
    sidecars, upstreams, warm, case_id, tail, status, reason, targets
) -> None:
    sc, up = await _sidecar(sidecars, upstreams, warm=warm)
    async with client(outbound(sc)) as c:
        await c.send(b"".join(get(t) for t in targets) + tail)
        for target in targets:
            resp = await c.response()
            assert (resp.status, resp.json()["target"]) == (200, target)
        resp = await c.response()
        assert_lepton_error(resp, status, reason)
        assert "close" in resp.connection_tokens()
        assert await c.closed_by_peer()
    assert [r.target for r in up.requests] == ["/warm"] * warm + targets


@pools
async def test_bytes_after_a_connection_close_request_are_ignored(
    sidecars, upstreams, warm
) -> None:
    """The server must not process requests after one with `Connection: close`
    (RFC 9112 section 9.6): the first is answered, the rest discarded, no error."""
    sc, up = await _sidecar(sidecars, upstreams, warm=warm)
    async with client(outbound(sc)) as c:
        await c.send(get("/x", headers=[("Connection", "close")]) + get("/y"))
        resp = await c.response()
        assert (resp.status, resp.json()["target"]) == (200, "/x")
        assert "close" in resp.connection_tokens()
        assert await c.closed_by_peer()
    assert [r.target for r in up.requests][-1] == "/x"
    assert "/y" not in [r.target for r in up.requests]
