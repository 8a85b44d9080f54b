"""Plaintext HTTP to a STRICT inbound port is answered, not cut.

Before, OpenSSL refused the "handshake" and the caller saw the connection
close ("Empty reply from server"): nothing said why. Now the first bytes are
peeked (PeekTLS, as PERMISSIVE does) and an HTTP/1.x request gets
`400` with `x-lepton-reason: mtls_required` and a JSON body, as nginx answers
plain HTTP on an HTTPS port. It is still counted as a failed handshake
(`plaintext`, `http_request`). A ClientHello goes to TLS untouched, and other
bytes are refused by TLS as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from mtls_support import (
    DEADLINE,
    LOCAL,
    App,
    HttpClient,
    Pki,
    client_context,
    metric,
    sidecar_config,
    wait_for,
    write_tls,
)

from lepton_mesh.proxy.errors import Reason
from lepton_mesh.proxy.security.mtls import is_http1_request

FAILURES = "lepton_tls_handshake_failures_total"
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


# --- the sans-IO decision ------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (REQUEST, True),
        (b"POST /orders HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}", True),
        (b"DELETE /x HTTP/1.1\n\n", True),  # bare LF, a method OpenSSL does not know
        (b"CONNECT db:5432 HTTP/1.1\r\n\r\n", True),
        (b"VERSION-CONTROL /doc HTTP/1.1\r\n", True),
        (b"GET /" + b"a" * 2000, True),  # a long target: the line is not complete yet
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False),  # h2c prior knowledge
        (b"GET /\r\n", False),  # HTTP/0.9
        (b"GET / HTTP/1.1 x\r\n", False),
        (b"\x16\x03\x01\x02\x00\x01", False),  # a ClientHello
        (b"\x00\x01garbage\r\n", False),
        (b"get / HTTP/1.1\r\n", False),
        (b"SSH-2.0-OpenSSH_9.6\r\n", False),
        (b"", False),
    ],
)
def test_is_http1_request(first: bytes, expected: bool) -> None:
    assert is_http1_request(first) is expected


def test_every_prefix_of_a_request_once_it_has_a_target() -> None:
    """'GET /' is enough; shorter prefixes are not (yet) plainly HTTP."""
    for n in range(len(REQUEST) + 1):
        assert is_http1_request(REQUEST[:n]) is (n >= len(b"GET /")), REQUEST[:n]


# --- a real STRICT sidecar ---------------------------------------------------------------


@pytest.fixture
async def strict(tmp_path: Path, pki: Pki, sidecars, app: App) -> Any:
    return await sidecars(
        sidecar_config(
            "chat", app.address, tls_cfg=write_tls(tmp_path, pki.issue("chat"), pki.bundle_pem)
        )
    )


async def send_raw(sidecar: Any, data: bytes) -> bytes:
    """Send `data` on a plain TCP connection; everything received until EOF
    (b"" if the connection was reset)."""
    addr = sidecar.addresses["inbound"]
    async with asyncio.timeout(DEADLINE):
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        try:
            writer.write(data)
            return await reader.read()
        except ConnectionResetError:
            return b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionResetError):
                await writer.wait_closed()


def parse(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    return status, headers, body


def assert_mtls_required(headers: Any, body: bytes) -> None:
    assert headers["x-lepton-reason"] == Reason.MTLS_REQUIRED
    assert headers["content-type"] == "application/json"
    doc = orjson.loads(body)
    assert set(doc) == {"error", "reason", "request_id"}
    assert doc["reason"] == "mtls_required"
    assert "requires mTLS from a mesh sidecar" in doc["error"]
    assert doc["request_id"] == headers["x-request-id"]


async def test_plaintext_http_gets_a_400_that_says_mtls_is_required(
    strict: Any, app: App, caplog: pytest.LogCaptureFixture
) -> None:
    raw = await send_raw(strict, REQUEST)
    status, headers, body = parse(raw)
    assert status == "HTTP/1.1 400 Bad Request"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert_mtls_required(headers, body)
    assert app.seen == []
    # Counted as before: a failed inbound handshake, reason plaintext.
    await wait_for(lambda: metric(strict, FAILURES, reason="plaintext") == 1)
    assert metric(strict, "lepton_tls_handshakes_total", side="inbound", resumed="false") == 0
    lines = [r.getMessage() for r in caplog.records if "handshake failed" in r.getMessage()]
    assert len(lines) == 1 and "reason=plaintext detail=http_request" in lines[0], lines


async def test_a_head_request_gets_no_body(strict: Any) -> None:
    status, headers, body = parse(await send_raw(strict, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == "HTTP/1.1 400 Bad Request"
    assert headers["x-lepton-reason"] == "mtls_required"
    assert body == b""


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_requests_sees_the_400(strict: Any, method: str) -> None:
    url = f"http://{LOCAL}:{strict.addresses['inbound'].port}/orders"

    def call() -> tuple[int, Any, bytes]:
        with requests.Session() as s:
            resp = s.request(method, url, data=b'{"n": 1}' if method == "POST" else None, timeout=5)
            return resp.status_code, resp.headers, resp.content

    code, headers, body = await asyncio.to_thread(call)
    assert code == 400
    assert headers["connection"] == "close"
    assert_mtls_required(headers, body)
    await wait_for(lambda: metric(strict, FAILURES, reason="plaintext") == 1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on PATH")
async def test_curl_no_longer_gets_an_empty_reply(strict: Any) -> None:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-i",
        "--max-time",
        "5",
        f"http://{LOCAL}:{strict.addresses['inbound'].port}/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err  # 52 was "Empty reply from server"
    status, headers, body = parse(out)
    assert status.startswith("HTTP/1.1 400")
    assert_mtls_required(headers, body)


# --- what must not change -------------------------------------------------------------------


async def test_an_mtls_client_is_served_as_before(strict: Any, pki: Pki, app: App) -> None:
    client = HttpClient(
        strict.addresses["inbound"], client_context(pki.issue("web"), pki.bundle_pem)
    )
    try:
        assert (await client.request("chat")).status == 200
        assert (await client.request("chat")).status == 200  # same connection
    finally:
        await client.close()
    assert len(app.seen) == 2
    assert metric(strict, "lepton_tls_handshakes_total", side="inbound", resumed="false") == 1
    assert metric(strict, FAILURES, reason="plaintext") == 0


@pytest.mark.parametrize(
    "first",
    [b"\x00\x01garbage\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"],
    ids=["garbage", "h2c-preface"],
)
async def test_other_plaintext_is_just_closed(strict: Any, app: App, first: bytes) -> None:
    assert await send_raw(strict, first) == b""
    await wait_for(lambda: metric(strict, FAILURES, reason="plaintext") == 1)
    assert app.seen == []
