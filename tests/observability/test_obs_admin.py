"""The admin server over real sockets: every route, keep-alive, and each refusal."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
import requests
from obs_support import Admin, FakeHooks, StartAdmin, read_response

from lepton_mesh.proxy.observe.admin import ROUTES, AdminLimits, AdminProtocol

JSON = "application/json"


def get(method: str, url: str, **kw: Any) -> requests.Response:
    with requests.Session() as s:
        return s.request(method, url, timeout=5, **kw)


# (method, path, hooks, status, json body or raw bytes, content type)
ROUTE_CASES = [
    ("GET", "/live", FakeHooks(), 200, {"live": True}, JSON),
    ("GET", "/ready", FakeHooks(), 200, {"ready": True}, JSON),
    (
        "GET",
        "/ready",
        FakeHooks(ready=(False, "no config yet")),
        503,
        {"ready": False, "reason": "no config yet"},
        JSON,
    ),
    ("GET", "/config", FakeHooks(), 200, {"service": "ratings", "port": 9080}, JSON),
    (
        "GET",
        "/clusters",
        FakeHooks(clusters={"clusters": [{"name": "reviews", "endpoints": 3}]}),
        200,
        {"clusters": [{"name": "reviews", "endpoints": 3}]},
        JSON,
    ),
    (
        "GET",
        "/metrics",
        FakeHooks(metrics=(b"lepton_up 1\n", "text/plain; version=0.0.4; charset=utf-8")),
        200,
        b"lepton_up 1\n",
        "text/plain; version=0.0.4; charset=utf-8",
    ),
    ("GET", "/metrics?format=text", FakeHooks(), 200, b"# metrics\n", None),
    ("POST", "/drain", FakeHooks(), 202, {"draining": True}, JSON),
    ("POST", "/quit", FakeHooks(), 202, {"quitting": True}, JSON),
    (
        "GET",
        "/nope",
        FakeHooks(),
        404,
        {"error": "no admin endpoint /nope", "reason": "not_found"},
        JSON,
    ),
    (
        "GET",
        "/drain",
        FakeHooks(),
        405,
        {"error": "GET not allowed on /drain", "reason": "method_not_allowed"},
        JSON,
    ),
    (
        "DELETE",
        "/metrics",
        FakeHooks(),
        405,
        {"error": "DELETE not allowed on /metrics", "reason": "method_not_allowed"},
        JSON,
    ),
    (
        "GET",
        "/config",
        FakeHooks(fail="config_json"),
        500,
        {"error": "RuntimeError: config_json broke", "reason": "admin_hook_failed"},
        JSON,
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "hooks", "status", "body", "content_type"),
    ROUTE_CASES,
    ids=[f"{m} {p} {s}" for m, p, _, s, _, _ in ROUTE_CASES],
)
async def test_routes(
    start_admin: StartAdmin,
    method: str,
    path: str,
    hooks: FakeHooks,
    status: int,
    body: object,
    content_type: str | None,
) -> None:
    admin = await start_admin(hooks=FakeHooks(**vars(hooks)))  # a fresh copy per run
    r = await asyncio.to_thread(get, method, admin.url + path)
    assert r.status_code == status
    if isinstance(body, bytes):
        assert r.content == body
    elif "error" in body:  # the server's own errors say which request and why, as the proxy's
        got = r.json()
        assert got.pop("request_id") == r.headers["x-request-id"]
        assert got == body and r.headers["x-lepton-reason"] == body["reason"]  # type: ignore[index]
    else:
        assert r.json() == body
    if content_type is not None:
        assert r.headers["content-type"] == content_type
    assert r.headers["content-length"] == str(len(r.content))


async def test_index_lists_every_endpoint(admin: Admin) -> None:
    r = await asyncio.to_thread(get, "GET", admin.url + "/")
    assert r.status_code == 200
    endpoints = r.json()["endpoints"]
    assert set(endpoints) == set(ROUTES)
    assert endpoints["/drain"]["methods"] == ["POST"]
    assert endpoints["/metrics"]["methods"] == ["GET"]
    assert all(e["help"] for e in endpoints.values())


async def test_drain_and_quit_call_their_hooks_once(admin: Admin) -> None:
    assert (await asyncio.to_thread(get, "POST", admin.url + "/drain")).status_code == 202
    assert (admin.hooks.drains, admin.hooks.quits) == (1, 0)
    assert (await asyncio.to_thread(get, "POST", admin.url + "/quit")).status_code == 202
    assert (admin.hooks.drains, admin.hooks.quits) == (1, 1)


async def test_method_not_allowed_names_the_allowed_ones(admin: Admin) -> None:
    r = await asyncio.to_thread(get, "POST", admin.url + "/metrics")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    r = await asyncio.to_thread(get, "PUT", admin.url + "/quit")
    assert r.headers["allow"] == "POST"


async def test_head_has_get_headers_and_no_body(admin: Admin) -> None:
    admin.hooks.metrics = (b"x" * 1000, "text/plain")
    reader, writer = await admin.connect()
    writer.write(b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\nGET /live HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await read_response(reader, head=True)
    assert (head.status, head.headers["content-length"], head.body) == (200, "1000", b"")
    live = await read_response(reader)  # the next bytes are the next response
    assert (live.status, json.loads(live.body)) == (200, {"live": True})
    writer.close()


async def test_keep_alive_serves_many_requests_on_one_connection(admin: Admin) -> None:
    reader, writer = await admin.connect()
    for path, status in [("/live", 200), ("/nope", 404), ("/drain", 405), ("/ready", 200)]:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        resp = await read_response(reader)
        assert resp.status == status
        assert resp.keep_alive  # no `connection: close` after a 404 or 405
    writer.close()


async def test_pipelined_requests_are_answered_in_order(admin: Admin) -> None:
    reader, writer = await admin.connect()
    writer.write(
        b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /drain HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    statuses = [(await read_response(reader)).status for _ in range(3)]
    assert statuses == [200, 202, 200]
    assert await reader.read() == b""  # closed as the last request asked
    writer.close()


async def test_requests_keep_alive_session_reuses_its_connection(admin: Admin) -> None:
    def three_on_one_session() -> list[tuple[int, Any]]:
        out = []
        with requests.Session() as s:
            for path in ("/live", "/ready", "/config"):
                r = s.get(admin.url + path, timeout=5, stream=True)
                peer = r.raw._connection.sock.getsockname()
                r.content  # noqa: B018 - read the body so the connection is reused
                out.append((r.status_code, peer))
        return out

    results = await asyncio.to_thread(three_on_one_session)
    assert [s for s, _ in results] == [200, 200, 200]
    assert len({peer for _, peer in results}) == 1


async def test_http10_closes_unless_asked_to_keep_alive(admin: Admin) -> None:
    reader, writer = await admin.connect()
    writer.write(b"GET /live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    resp = await read_response(reader)
    assert resp.status == 200 and resp.headers["connection"] == "keep-alive"
    writer.write(b"GET /live HTTP/1.0\r\n\r\n")
    resp = await read_response(reader)
    assert resp.status == 200 and resp.headers["connection"] == "close"
    assert await reader.read() == b""
    writer.close()


async def expect_refusal(admin: Admin, request: bytes, status: int, reason: str) -> dict[str, str]:
    reader, writer = await admin.connect()
    writer.write(request)
    resp = await read_response(reader)
    assert resp.status == status
    assert json.loads(resp.body)["reason"] == reason
    assert resp.headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and the server closed
    writer.close()
    return resp.headers


async def test_body_over_the_limit_by_content_length_is_413(admin: Admin) -> None:
    await expect_refusal(
        admin,
        b"POST /drain HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n",
        413,
        "body_too_large",
    )
    assert admin.hooks.drains == 0


async def test_chunked_body_over_the_limit_is_413(start_admin: StartAdmin) -> None:
    admin = await start_admin(AdminLimits(max_body_bytes=100))
    chunk = b"%x\r\n%s\r\n" % (60, b"x" * 60)
    await expect_refusal(
        admin,
        b"POST /drain HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2,
        413,
        "body_too_large",
    )
    assert admin.hooks.drains == 0


async def test_body_at_the_limit_is_accepted(start_admin: StartAdmin) -> None:
    admin = await start_admin(AdminLimits(max_body_bytes=100))
    r = await asyncio.to_thread(get, "POST", admin.url + "/drain", data=b"x" * 100)
    assert r.status_code == 202


async def test_headers_over_the_limit_are_431(admin: Admin) -> None:
    big = b"X-Big: " + b"a" * 17000 + b"\r\n"
    await expect_refusal(
        admin, b"GET /live HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n", 431, "headers_too_large"
    )


async def test_a_header_line_that_never_ends_is_431(start_admin: StartAdmin) -> None:
    admin = await start_admin(AdminLimits(max_header_bytes=1024))
    reader, writer = await admin.connect()
    writer.write(b"GET /live HTTP/1.1\r\nX-Endless: ")
    for _ in range(4):  # each write is one read on the server at most; no CRLF ever
        writer.write(b"a" * 600)
        await writer.drain()
    resp = await read_response(reader)
    assert resp.status == 431
    assert await reader.read() == b""
    writer.close()


async def test_a_long_url_counts_toward_the_header_limit(start_admin: StartAdmin) -> None:
    admin = await start_admin(AdminLimits(max_header_bytes=256))
    await expect_refusal(
        admin, b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n", 431, "headers_too_large"
    )


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT AN HTTP REQUEST\r\n\r\n",
        b"GET /live HTTP/1.1\r\nHost a\r\n\r\n",  # header without a colon
        b"GET /live HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
    ],
)
async def test_unparseable_requests_are_400_and_closed(admin: Admin, request_bytes: bytes) -> None:
    await expect_refusal(admin, request_bytes, 400, "bad_request")


async def test_an_error_after_good_pipelined_requests_comes_last(admin: Admin) -> None:
    reader, writer = await admin.connect()
    writer.write(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\nBROKEN\r\n\r\n")
    assert (await read_response(reader)).status == 200
    assert (await read_response(reader)).status == 400
    assert await reader.read() == b""
    writer.close()


async def test_expect_100_continue(admin: Admin) -> None:
    reader, writer = await admin.connect()
    writer.write(
        b"POST /drain HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await read_response(reader)
    assert interim.status == 100
    writer.write(b"body")
    assert (await read_response(reader)).status == 202
    writer.close()


async def test_an_upgrade_is_answered_plainly_then_closed(admin: Admin) -> None:
    reader, writer = await admin.connect()
    writer.write(
        b"GET /live HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x05hello"
    )
    resp = await read_response(reader)
    assert resp.status == 200 and resp.headers["connection"] == "close"
    assert await reader.read() == b""
    writer.close()


async def test_an_idle_connection_is_closed(start_admin: StartAdmin) -> None:
    admin = await start_admin(AdminLimits(idle_timeout=0.05))
    reader, writer = await admin.connect()
    writer.write(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await read_response(reader)).status == 200
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


# -- write backpressure, with a fake transport -----------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


async def test_while_writes_are_paused_requests_wait_and_reading_stops() -> None:
    proto = AdminProtocol(FakeHooks(), AdminLimits(), asyncio.get_running_loop())
    t = FakeTransport()
    proto.connection_made(t)  # type: ignore[arg-type]
    proto.pause_writing()
    assert not t.reading
    proto.data_received(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n" * 3)
    assert t.out == b"" and not t.reading
    proto.resume_writing()
    assert statuses(bytes(t.out)) == [200, 200, 200]
    assert t.reading
    proto.connection_lost(None)


async def test_too_many_waiting_pipelined_requests_end_the_connection() -> None:
    proto = AdminProtocol(FakeHooks(), AdminLimits(max_pipeline=2), asyncio.get_running_loop())
    t = FakeTransport()
    proto.connection_made(t)  # type: ignore[arg-type]
    proto.pause_writing()
    proto.data_received(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n" * 5)
    proto.resume_writing()
    # The two that fit are answered, then one 503, then the connection closes.
    assert statuses(bytes(t.out)) == [200, 200, 503]
    assert b'"reason":"overflow"' in t.out
    assert t.closed
    proto.connection_lost(None)


async def test_quit_is_called_after_its_answer_is_written() -> None:
    t = FakeTransport()
    written_at_quit: list[bytes] = []

    class Hooks(FakeHooks):
        def quit(self) -> None:
            written_at_quit.append(bytes(t.out))

    proto = AdminProtocol(Hooks(), AdminLimits(), asyncio.get_running_loop())
    proto.connection_made(t)  # type: ignore[arg-type]
    proto.data_received(b"POST /quit HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    (before,) = written_at_quit
    assert statuses(before) == [202] and before.endswith(b'{"quitting":true}')
    proto.connection_lost(None)


class _CountingHooks:
    """Records which stopping hooks ran; the read-only ones answer minimally."""

    def __init__(self) -> None:
        self.drains = 0
        self.quits = 0

    def readiness(self) -> tuple[bool, str]:
        return True, ""

    def start_drain(self) -> None:
        self.drains += 1

    def quit(self) -> None:
        self.quits += 1


@pytest.mark.parametrize(
    ("path", "local", "status"),
    [
        ("/drain", True, 202),
        ("/quit", True, 202),
        ("/drain", False, 403),
        ("/quit", False, 403),
        ("/ready", False, 200),  # probes and scrapes come from outside the pod
    ],
)
def test_stopping_the_sidecar_is_for_loopback_callers_only(
    path: str, local: bool, status: int
) -> None:
    from lepton_mesh.proxy.observe.admin import _is_loopback, dispatch

    hooks = _CountingHooks()
    method = "GET" if path == "/ready" else "POST"
    resp = dispatch(hooks, method, path, local=local)  # type: ignore[arg-type]
    if resp.after is not None:  # /quit acts once its answer is written
        resp.after()
    assert resp.status == status
    assert hooks.drains + hooks.quits == (1 if status == 202 else 0)
    assert [_is_loopback(h) for h in ("127.0.0.1", "::1", "10.0.0.5", "0.0.0.0")] == [
        True,
        True,
        False,
        False,
    ]
