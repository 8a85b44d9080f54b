"""The sidecar's admin listener answers its own errors as the proxy does
(`x-lepton-reason`, `x-request-id`, and a JSON body with error, reason and
request_id), and refuses an HTTP/1.1 request without exactly one Host."""

from __future__ import annotations

import pytest
from proxy_harness import assert_lepton_error, client

from lepton_mesh.proxy.errors import Reason

CASES = [
    # (id, request bytes, status, reason, connection kept)
    ("not-found", b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n", 404, "not_found", True),
    ("method-not-allowed", b"DELETE /metrics HTTP/1.1\r\nHost: a\r\n\r\n", 405, "method_not_allowed", True),
    ("unparseable", b"GET /live HTTP/1.1\r\nHost a\r\n\r\n", 400, Reason.BAD_REQUEST, False),
    ("body-too-large", b"POST /drain HTTP/1.1\r\nHost: a\r\nContent-Length: 999999\r\n\r\n", 413, Reason.BODY_TOO_LARGE, False),
    ("headers-too-large", b"GET /live HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, Reason.HEADERS_TOO_LARGE, False),
    ("no-host-http11", b"GET /live HTTP/1.1\r\n\r\n", 400, Reason.BAD_REQUEST, False),
    ("two-hosts", b"GET /live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, Reason.BAD_REQUEST, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case_id", "data", "status", "reason", "kept"), CASES, ids=[c[0] for c in CASES]
)
async def test_admin_errors_carry_reason_and_request_id(
    sidecars, case_id, data, status, reason, kept
) -> None:
    sc = await sidecars()
    async with client(sc.addresses["admin"]) as c:
        resp = await c.request(data)
        body = assert_lepton_error(resp, status, reason)
        assert body["request_id"] == resp.get("x-request-id")
        if status == 405:
            assert resp.get("allow") == "GET, HEAD"
        if kept:
            assert (await c.request(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
        else:
            assert "close" in resp.connection_tokens()
            assert await c.closed_by_peer()


async def test_admin_http10_without_host_is_answered(sidecars) -> None:
    sc = await sidecars()
    async with client(sc.addresses["admin"]) as c:
        resp = await c.request(b"GET /live HTTP/1.0\r\n\r\n")
        assert (resp.status, resp.json()) == (200, {"live": True})
