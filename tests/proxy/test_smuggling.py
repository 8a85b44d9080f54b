"""Request smuggling and abuse, as a table.

Each case is sent raw on a fresh socket to the outbound listener. The sidecar
must answer with the exact status and `x-lepton-reason`, close the
connection, and pass nothing on: for a bad head, not one byte reaches the
upstream; for a bad body (detected after the head), no complete request does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from proxy_harness import (
    DEADLINE,
    RawClient,
    assert_lepton_error,
    chunked_body,
    client,
    get,
    outbound,
    read_response,
    request_bytes,
    wait_for,
)

from lepton_mesh.proxy.errors import Reason

MAX_HEADER_BYTES = 4096
MAX_BODY_BYTES = 1000

BAD = Reason.BAD_REQUEST


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    status: int | tuple[int, ...]
    reason: str | tuple[str, ...]
    head_invalid: bool = True  # False: the head is fine, the body is not


H = b"Host: svc\r\n"

CASES = [
    Case("cl-and-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, BAD),
    Case("te-and-cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400, BAD),
    Case("two-differing-cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400, BAD),
    Case("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4, 5\r\n\r\nabcde", 400, BAD),
    Case("cl-plus-sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +4\r\n\r\nabcd", 400, BAD),
    Case("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400, BAD),
    Case("invalid-chunk-size", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400, BAD, head_invalid=False),
    Case("chunk-size-overflow", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400, BAD, head_invalid=False),
    Case("chunk-size-space", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3 ;a=b\r\nabc\r\n0\r\n\r\n", 400, BAD, head_invalid=False),
    Case("chunk-ext-control-char", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;\x01\r\nabc\r\n0\r\n\r\n", 400, BAD, head_invalid=False),
    Case("chunk-ext-unterminated-quote", b"POST / HTTP/1.1\r\n" + H + b'Transfer-Encoding: chunked\r\n\r\n3;a="b\r\nabc\r\n0\r\n\r\n', 400, BAD, head_invalid=False),
    Case("chunk-size-bare-lf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400, BAD, head_invalid=False),
    Case("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400, BAD),
    Case("bare-cr-in-header", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\rc\r\n\r\n", 400, BAD),
    Case("bare-lf-in-header", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\nX-B: c\r\n\r\n", 400, BAD),
    Case("nul-in-header", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n", 400, BAD),
    Case("space-before-colon", b"GET / HTTP/1.1\r\n" + b"Host : svc\r\n\r\n", 400, BAD),
    Case("te-space-before-colon", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400, BAD),
    Case("lf-only-lines", b"GET / HTTP/1.1\nHost: svc\n\n", 400, BAD),
    Case("invalid-method", b"G@T / HTTP/1.1\r\n" + H + b"\r\n", 400, BAD),
    Case("target-with-space", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400, BAD),
    Case("target-control-char", b"GET /a\x7fb HTTP/1.1\r\n" + H + b"\r\n", 400, BAD),
    Case("target-not-a-path", b"GET foo HTTP/1.1\r\n" + H + b"\r\n", 400, BAD),
    Case("invalid-version", b"GET / HTTP/1.2\r\n" + H + b"\r\n", (400, 505), (BAD, Reason.UNSUPPORTED)),
    Case("http-0.9", b"GET /\r\n\r\n", (400, 505), (BAD, Reason.UNSUPPORTED)),
    Case("te-in-http10", b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, BAD),
    Case("te-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", (400, 501), (BAD, Reason.UNSUPPORTED)),
    Case("te-gzip-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", (400, 501), (BAD, Reason.UNSUPPORTED)),
    Case("te-chunked-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", (400, 501), (BAD, Reason.UNSUPPORTED)),
    Case("te-xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", (400, 501), (BAD, Reason.UNSUPPORTED)),
    Case("te-twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n", (400, 501), (BAD, Reason.UNSUPPORTED)),
    Case("two-hosts", b"GET / HTTP/1.1\r\nHost: svc\r\nHost: other\r\n\r\n", 400, BAD),
    Case("two-identical-hosts", b"GET / HTTP/1.1\r\nHost: svc\r\nHost: svc\r\n\r\n", 400, BAD),
    Case("missing-host-http11", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400, BAD),
    Case("host-port-not-numeric", b"GET / HTTP/1.1\r\nHost: svc:abc\r\n\r\n", 400, BAD),
    Case("host-list", b"GET / HTTP/1.1\r\nHost: svc, dead\r\n\r\n", 400, BAD),
    Case("host-userinfo", b"GET / HTTP/1.1\r\nHost: x@svc\r\n\r\n", 400, BAD),
    Case("star-target-not-options", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400, BAD),
    Case("fragment-in-target", b"GET /echo#frag HTTP/1.1\r\n" + H + b"\r\n", 400, BAD),
    Case("http-2.0-request-line", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505, Reason.UNSUPPORTED),
    Case("header-block-too-large", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 100) + b"\r\n\r\n", 431, Reason.HEADERS_TOO_LARGE),
    Case("many-headers-too-large", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(200)) + b"\r\n", 431, Reason.HEADERS_TOO_LARGE),
    Case("body-over-limit-cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1) + b"a" * (MAX_BODY_BYTES + 1), 413, Reason.BODY_TOO_LARGE),
    Case("body-over-limit-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + chunked_body([b"a" * 600, b"b" * 600]), 413, Reason.BODY_TOO_LARGE, head_invalid=False),
]  # fmt: skip


@pytest.fixture
async def guarded(sidecars, echo):
    sc = await sidecars(
        services={"svc": echo.address},
        limits={"max_header_bytes": MAX_HEADER_BYTES, "max_body_bytes": MAX_BODY_BYTES},
        timeouts={"header_read": 2.0},
    )
    return sc, echo


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_abuse_corpus(guarded, case: Case) -> None:
    sc, echo = guarded
    async with client(outbound(sc)) as c:
        # One write: the worst case for a parser that might act on a prefix.
        c.writer.write(case.data)
        resp = await asyncio.wait_for(read_response(c.reader), DEADLINE)
        assert_lepton_error(resp, case.status, case.reason)
        assert "close" in resp.connection_tokens()
        assert await c.closed_by_peer(), "the connection must be closed after a framing error"
    # Nothing reached the upstream (or nothing complete, for a body error).
    if case.head_invalid:
        assert echo.bytes_received == 0, f"{echo.bytes_received} bytes reached the upstream"
    assert echo.requests == [], f"a request reached the upstream: {echo.requests}"


@pytest.mark.parametrize(
    ("case_id", "data"),
    [
        # CL.TE: a front end honouring CL would forward "0\r\n\r\nSMUGGLED" as one body;
        # a back end honouring TE would see a second request. We refuse both headers.
        ("cl.te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n"),
        ("te.cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n"),
        ("te.te-obfuscated", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-encoding: cow\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)  # fmt: skip
async def test_classic_desync_payloads_never_reach_upstream(guarded, case_id, data) -> None:
    sc, echo = guarded
    async with client(outbound(sc)) as c:
        c.writer.write(data)
        resp = await asyncio.wait_for(read_response(c.reader), DEADLINE)
        assert resp.status in (400, 501)
        assert resp.get("x-lepton-reason") in (BAD, Reason.UNSUPPORTED)
        assert await c.closed_by_peer()
    assert echo.requests == []


async def test_body_that_looks_like_a_request_stays_a_body(guarded) -> None:
    """After a valid request whose body contains a request, the upstream sees one request."""
    sc, echo = guarded
    inner = b"GET /admin HTTP/1.1\r\nHost: svc\r\n\r\n"
    async with client(outbound(sc)) as c:
        resp = await c.request(request_bytes("POST", "/outer", body=inner))
        assert resp.status == 200
        assert resp.json()["body"] == inner.decode()
        resp = await c.request(get("/next"))
        assert resp.json()["target"] == "/next"
    assert [r.target for r in echo.requests] == ["/outer", "/next"]


async def test_valid_request_then_garbage_does_not_desync(guarded) -> None:
    """A valid request followed in the same write by an invalid one: the first is
    answered, the second gets 400 and the connection closes; the upstream sees one."""
    sc, echo = guarded
    async with client(outbound(sc)) as c:
        c.writer.write(
            request_bytes("POST", "/ok", body=b"abc")
            + b"GET / HTTP/1.1\r\nHost: svc\r\nHost: x\r\n\r\n"
        )
        first = await c.response()
        assert first.status == 200 and first.json()["target"] == "/ok"
        second = await c.response()
        assert_lepton_error(second, 400, BAD)
        assert await c.closed_by_peer()
    assert [r.target for r in echo.requests] == ["/ok"]


async def test_oversized_head_refused_before_it_ends(guarded) -> None:
    """A head that grows past the limit over several reads is refused with 431
    as soon as it is too large, without waiting for its end."""
    sc, echo = guarded
    async with client(outbound(sc)) as c:
        sent = 0
        line = b"GET / HTTP/1.1\r\nHost: svc\r\n"
        # Stop writing once past the limit: more bytes after the sidecar closed
        # would draw a RST that could discard its answer in our receive queue.
        while sent <= MAX_HEADER_BYTES + 100:
            await c.send(line)
            sent += len(line)
            line = b"X-Pad-%d: %s\r\n" % (sent, b"p" * 480)
        resp = await asyncio.wait_for(read_response(c.reader), DEADLINE)
        assert_lepton_error(resp, 431, Reason.HEADERS_TOO_LARGE)
        assert await c.closed_by_peer()
    assert echo.bytes_received == 0


async def test_slowloris_headers_get_408_and_close(sidecars, echo) -> None:
    sc = await sidecars(services={"svc": echo.address}, timeouts={"header_read": 0.5})
    loop = asyncio.get_running_loop()
    data = get("/slow", headers=[("X-Pad", "p" * 40)])
    c = await RawClient.connect(outbound(sc))
    t0 = loop.time()
    answer = asyncio.ensure_future(read_response(c.reader))
    try:
        for i in range(len(data)):
            if answer.done():
                break
            try:
                c.writer.write(data[i : i + 1])
                await c.writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.1)  # the attacker's pacing: one byte every 100 ms
        resp = await asyncio.wait_for(answer, DEADLINE)
        elapsed = loop.time() - t0
        assert_lepton_error(resp, 408, Reason.HEADER_TIMEOUT)
        assert await c.closed_by_peer()
    finally:
        answer.cancel()
        await c.close()
    assert 0.4 <= elapsed < 2.0, elapsed
    assert echo.bytes_received == 0


async def test_connection_opened_but_silent_is_closed(sidecars, echo) -> None:
    """A connection that never sends a byte is closed by header_read (with or without a 408)."""
    sc = await sidecars(services={"svc": echo.address}, timeouts={"header_read": 0.3})
    async with client(outbound(sc)) as c:
        rest = await c.read_to_eof(timeout=DEADLINE)
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408")


async def test_body_over_limit_on_keepalive_after_good_request(guarded) -> None:
    sc, echo = guarded
    async with client(outbound(sc)) as c:
        assert (
            await c.request(request_bytes("POST", "/a", body=b"x" * MAX_BODY_BYTES))
        ).status == 200
        resp = await c.request(request_bytes("POST", "/b", body=b"x" * (MAX_BODY_BYTES + 1)))
        assert_lepton_error(resp, 413, Reason.BODY_TOO_LARGE)
        assert await c.closed_by_peer()
    await wait_for(lambda: len(echo.requests) >= 1)
    assert [r.target for r in echo.requests] == ["/a"]
