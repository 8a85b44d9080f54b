"""Outbound routing by Host or absolute-form target, real HTTP clients through
HTTP_PROXY, the inbound listener, two hops, and the errors the sidecar
originates when it cannot route or reach an upstream."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable

import aiohttp
import orjson
import pytest
import requests
from proxy_harness import (
    DEADLINE,
    LOCAL,
    Address,
    ServiceConfig,
    assert_lepton_error,
    clean_proxy_env,
    client,
    free_port,
    get,
    http,
    inbound,
    outbound,
    request_bytes,
    response_bytes,
    seen_header,
    wait_for,
)

from lepton_mesh.proxy.errors import Reason


def proxy_url(sc) -> str:
    a = outbound(sc)
    return f"http://{a.host}:{a.port}"


@pytest.mark.parametrize(
    ("request_line", "host", "upstream_target"),
    [
        ("GET /v1/x HTTP/1.1", "intent", "/v1/x"),
        ("GET /v1/x?q=1 HTTP/1.1", "intent:8080", "/v1/x?q=1"),
        ("GET /v1/x HTTP/1.1", "INTENT", "/v1/x"),
        ("GET http://intent/v1/x HTTP/1.1", "intent", "/v1/x"),
        ("GET http://intent:8080/v1/x?q=1 HTTP/1.1", "intent:8080", "/v1/x?q=1"),
        # Absolute-form wins over Host (RFC 9112 section 3.2.2).
        ("GET http://intent/v1/x HTTP/1.1", "other", "/v1/x"),
    ],
)
async def test_outbound_routes_by_host_or_absolute_target(
    sidecars, echo, request_line, host, upstream_target
) -> None:
    sc = await sidecars(services={"intent": echo.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(f"{request_line}\r\nHost: {host}\r\n\r\n".encode())
    assert resp.status == 200
    seen = resp.json()
    assert seen["target"] == upstream_target
    assert len(echo.requests) == 1


async def test_routes_to_the_named_service_among_several(sidecars, upstreams) -> None:
    async def named(name: str):
        async def app(req, conn) -> None:
            await conn.send(response_bytes(200, name.encode()))

        return await upstreams(http(app))

    a, b = await named("a"), await named("b")
    sc = await sidecars(services={"alpha": a.address, "beta": b.address})
    async with client(outbound(sc)) as c:
        for host, want in [("alpha", b"a"), ("beta", b"b"), ("alpha:80", b"a")]:
            resp = await c.request(get(host=host))
            assert (resp.status, resp.body) == (200, want)


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


@needs_curl
async def test_curl_through_http_proxy(sidecars, echo) -> None:
    sc = await sidecars(services={"intent": echo.address})
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "5", "-x", proxy_url(sc), "http://intent/v1/x?curl=1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE * 2)
    assert proc.returncode == 0, err
    seen = orjson.loads(out)
    assert seen["target"] == "/v1/x?curl=1"
    assert seen_header(seen, "host") == ["intent"]


@needs_curl
async def test_curl_through_http_proxy_env(sidecars, echo) -> None:
    sc = await sidecars(services={"intent": echo.address})
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "http_proxy": proxy_url(sc)}
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", "http://intent/v1/x",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE * 2)
    assert (proc.returncode, out) == (0, b"200"), err
    assert echo.requests[0].target == "/v1/x"


async def test_requests_with_proxies_and_env(sidecars, echo, monkeypatch) -> None:
    sc = await sidecars(services={"intent": echo.address})
    clean_proxy_env(monkeypatch, None)

    def explicit() -> requests.Response:
        with requests.Session() as s:
            return s.get("http://intent/v1/x", proxies={"http": proxy_url(sc)}, timeout=5)

    resp = await asyncio.to_thread(explicit)
    assert resp.status_code == 200
    assert resp.json()["target"] == "/v1/x"

    clean_proxy_env(monkeypatch, proxy_url(sc))

    def from_env() -> requests.Response:
        with requests.Session() as s:
            return s.post("http://intent/v1/y", data=b"hello", timeout=5)

    resp = await asyncio.to_thread(from_env)
    assert resp.status_code == 200
    assert resp.json()["body"] == "hello"
    assert [r.target for r in echo.requests] == ["/v1/x", "/v1/y"]


async def test_aiohttp_trust_env(sidecars, echo, monkeypatch) -> None:
    sc = await sidecars(services={"intent": echo.address})
    clean_proxy_env(monkeypatch, proxy_url(sc))
    async with aiohttp.ClientSession(trust_env=True) as s:
        for i in range(3):
            async with s.get(f"http://intent/v1/x?i={i}") as resp:
                assert resp.status == 200
                seen = await resp.json()
                assert seen["target"] == f"/v1/x?i={i}"


async def test_unknown_service_is_404_no_route(proxy) -> None:
    async with client(outbound(proxy)) as c:
        resp = await c.request(get("/v1/x", host="nope"))
        assert_lepton_error(resp, 404, Reason.NO_ROUTE)
        # A routing miss is not a framing error: the connection stays usable.
        resp = await c.request(get("/v1/x", host="svc"))
        assert resp.status == 200


async def test_error_to_head_request_has_headers_but_no_body(proxy) -> None:
    async with client(outbound(proxy)) as c:
        resp = await c.request(request_bytes("HEAD", "/", host="nope"), method="HEAD")
        assert resp.status == 404
        assert resp.get("x-lepton-reason") == Reason.NO_ROUTE
        assert resp.body == b""
        # No stray body bytes: the next response parses cleanly.
        assert (await c.request(get())).status == 200


async def test_error_body_names_the_request_id(proxy) -> None:
    async with client(outbound(proxy)) as c:
        resp = await c.request(get(host="nope", headers=[("X-Request-Id", "req-123")]))
    body = assert_lepton_error(resp, 404, Reason.NO_ROUTE)
    assert body["request_id"] == "req-123"


async def test_service_without_endpoints_is_503(sidecars) -> None:
    sc = await sidecars(services={"empty": ServiceConfig(name="empty", endpoints=())})
    async with client(outbound(sc)) as c:
        resp = await c.request(get(host="empty"))
    assert_lepton_error(resp, 503, Reason.NO_HEALTHY_ENDPOINT)


async def test_dead_endpoint_is_upstream_connect_failed(sidecars) -> None:
    sc = await sidecars(services={"dead": Address(LOCAL, free_port())}, timeouts={"connect": 0.5})
    async with client(outbound(sc)) as c:
        resp = await c.request(get(host="dead"))
    assert_lepton_error(resp, (502, 503), Reason.UPSTREAM_CONNECT_FAILED)


async def test_upstream_closes_before_responding_is_upstream_reset(sidecars, upstreams) -> None:
    async def hang_up(conn) -> None:
        await conn.read_request()

    up = await upstreams(hang_up)
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(get())
    assert_lepton_error(resp, (502, 503), Reason.UPSTREAM_RESET)


async def test_upstream_closes_inside_response_head_is_upstream_reset(sidecars, upstreams) -> None:
    async def half_head(conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Le")

    up = await upstreams(half_head)
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        resp = await c.request(get())
    assert_lepton_error(resp, (502, 503), Reason.UPSTREAM_RESET)


def access_log_reason(capfd: pytest.CaptureFixture[str], path: str) -> Callable[[], str | None]:
    """A poller for the access-log reason of the request to `path` (the log is
    flushed on a timer, so the line appears a little after the response)."""
    seen: list[str] = []

    def poll() -> str | None:
        seen.append(capfd.readouterr().out)
        for line in "".join(seen).splitlines():
            if line.startswith("{"):
                record = orjson.loads(line)
                if record.get("path") == path:
                    return record.get("reason")
        return None

    return poll


async def test_upstream_closes_mid_body_truncates_and_closes_client(
    sidecars, upstreams, capfd
) -> None:
    """Once the head is forwarded, the only honest signal left is to close the
    client connection before the declared length: never a short 'complete' body.
    The reason still reaches the access log."""

    async def mid_body(conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40)

    up = await upstreams(mid_body)
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        await c.send(get("/mid-body"))
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert head.startswith(b"HTTP/1.1 200")
        rest = await c.read_to_eof()
        assert len(rest) < 100
    reason = access_log_reason(capfd, "/mid-body")
    await wait_for(lambda: reason() is not None, what="access log line for /mid-body")
    assert reason() == Reason.UPSTREAM_RESET


async def test_upstream_reset_mid_chunked_body_closes_client(sidecars, upstreams) -> None:
    async def mid_chunked(conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        conn.reset()

    up = await upstreams(mid_chunked)
    sc = await sidecars(services={"svc": up.address})
    async with client(outbound(sc)) as c:
        await c.send(get())
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert head.startswith(b"HTTP/1.1 200")
        rest = await c.read_to_eof()
        assert not rest.endswith(b"0\r\n\r\n"), "a reset upstream body must not be completed"


async def test_slow_upstream_is_504_upstream_timeout(sidecars, upstreams) -> None:
    release = asyncio.Event()

    async def never(conn) -> None:
        await conn.read_request()
        await release.wait()

    up = await upstreams(never)
    sc = await sidecars(services={"svc": up.address}, timeouts={"request": 0.3})
    loop = asyncio.get_running_loop()
    async with client(outbound(sc)) as c:
        t0 = loop.time()
        resp = await c.request(get())
        elapsed = loop.time() - t0
    release.set()
    assert_lepton_error(resp, 504, Reason.UPSTREAM_TIMEOUT)
    assert 0.25 <= elapsed < 2.0, elapsed


async def test_inbound_forwards_to_the_app(sidecars, echo) -> None:
    sc = await sidecars(app=echo.address)
    async with client(inbound(sc)) as c:
        resp = await c.request(get("/inbound", host="whatever.example:15006"))
    assert resp.status == 200
    assert resp.json()["target"] == "/inbound"
    assert echo.connections == 1


async def test_two_hops_outbound_to_inbound_to_app(sidecars, echo) -> None:
    b = await sidecars(app=echo.address, name="b")
    a = await sidecars(services={"b": inbound(b)}, name="a")
    async with client(outbound(a)) as c:
        for i in range(3):
            resp = await c.request(get(f"/hop/{i}", host="b", headers=[("X-Request-Id", f"r{i}")]))
            assert resp.status == 200
            seen = resp.json()
            assert seen["target"] == f"/hop/{i}"
            assert seen_header(seen, "x-request-id") == [f"r{i}"]
            # Only the calling side counts tries: one header, however many hops.
            assert [v for n, v in resp.headers if n.lower() == "x-lepton-attempts"] == ["1"]
    assert echo.connections == 1


async def test_two_hops_error_from_the_far_sidecar_passes_through(sidecars) -> None:
    """B's app is down: B answers 502/503 upstream_connect_failed and A relays it unchanged."""
    b = await sidecars(app=Address(LOCAL, free_port()), name="b", timeouts={"connect": 0.5})
    a = await sidecars(services={"b": inbound(b)}, name="a")
    async with client(outbound(a)) as c:
        resp = await c.request(get(host="b"))
    assert_lepton_error(resp, (502, 503), Reason.UPSTREAM_CONNECT_FAILED)
