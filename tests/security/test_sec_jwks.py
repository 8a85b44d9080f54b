"""JWKS parsing (keys pinned to algorithms), the small HTTP(S) client, and how sources
stay fresh: on staleness, on an unknown kid at most once per period, last good
keys kept when a fetch fails. Time is a controlled clock; the network is real."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import ssl
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from security_support import (
    LOCAL,
    JwksServer,
    ec_key,
    ed_key,
    jwks,
    public_jwk,
    rsa_key,
    wait_for,
)

from lepton_mesh.proxy.security.jwks import (
    MAX_JWKS_BYTES,
    FileKeys,
    JwksError,
    RemoteKeys,
    StaticKeys,
    http_get,
    parse_jwks,
)

ALL = frozenset({"RS256", "PS256", "ES256", "ES384", "EdDSA"})


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- parsing ------------------------------------------------------------------------


def _rsa_small() -> dict:
    return public_jwk(rsa.generate_private_key(65537, 1024), "small")


@pytest.mark.parametrize(
    ("jwk", "allowed", "algorithms", "skipped"),
    [
        pytest.param(
            public_jwk(rsa_key(), "r"), ALL, {"RS256", "PS256"}, None, id="rsa-all-rsa-algs"
        ),
        pytest.param(
            public_jwk(rsa_key(), "r", "RS256"), ALL, {"RS256"}, None, id="rsa-pinned-by-jwk-alg"
        ),
        pytest.param(public_jwk(ec_key(), "e"), ALL, {"ES256"}, None, id="ec-p256-es256-only"),
        pytest.param(public_jwk(ed_key(), "d"), ALL, {"EdDSA"}, None, id="ed25519"),
        pytest.param(
            public_jwk(ec_key(), "e"),
            frozenset({"RS256"}),
            None,
            "no allowed algorithm",
            id="ec-key-rsa-only-provider",
        ),
        pytest.param(
            public_jwk(rsa_key(), "r", "HS256"),
            frozenset({"RS256", "HS256"}),
            None,
            "no allowed algorithm",
            id="rsa-key-claiming-hs256",
        ),
        pytest.param(
            {"kty": "oct", "k": "c2VjcmV0", "kid": "o"},
            ALL | {"HS256"},
            None,
            "private or symmetric",
            id="symmetric-key-refused",
        ),
        pytest.param(
            {**public_jwk(rsa_key(), "p"), "d": "AQAB"},
            ALL,
            None,
            "private or symmetric",
            id="private-key-refused",
        ),
        pytest.param(
            public_jwk(rsa_key(), "u", use="enc"), ALL, None, "not 'sig'", id="encryption-key"
        ),
        pytest.param(
            public_jwk(rsa_key(), "ops", key_ops=["encrypt"]),
            ALL,
            None,
            "key_ops",
            id="key-ops-without-verify",
        ),
        pytest.param(_rsa_small(), ALL, None, "at least 2048", id="rsa-1024-refused"),
        pytest.param(
            {"kty": "RSA", "kid": "bad", "n": "!!", "e": "AQAB"},
            ALL,
            None,
            "invalid RSA key",
            id="garbage-modulus",
        ),
        pytest.param({"kid": "x"}, ALL, None, "not an asymmetric", id="no-kty"),
    ],
)
def test_parse_jwks_pins_each_key_to_its_algorithms(jwk, allowed, algorithms, skipped):
    keys = parse_jwks(orjson.dumps(jwks(jwk)), allowed)
    if algorithms is None:
        assert keys.all == ()
        assert len(keys.skipped) == 1 and skipped in keys.skipped[0], keys.skipped
    else:
        assert keys.skipped == ()
        (key,) = keys.all
        assert key.algorithms == algorithms
        assert keys.by_kid[jwk["kid"]] is key


@pytest.mark.parametrize(
    ("document", "error"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", '"keys" list'),
        (b'{"keys": {}}', '"keys" list'),
        (orjson.dumps({"keys": [{"kty": "RSA"}] * 65}), "more than 64"),
        (b" " * (MAX_JWKS_BYTES + 1), "larger than"),
    ],
)
def test_parse_jwks_refuses_what_is_not_a_jwks(document, error):
    with pytest.raises(JwksError, match=error):
        parse_jwks(document, ALL)


def test_duplicate_kids_keep_the_first():
    a, b = public_jwk(rsa_key(), "same"), public_jwk(ec_key(), "same")
    keys = parse_jwks(orjson.dumps(jwks(a, b)), ALL)
    assert keys.by_kid["same"].algorithms == {"RS256", "PS256"}
    assert any("more than once" in s for s in keys.skipped)


def test_static_keys_with_a_broken_document_verify_nothing_and_say_why():
    src = StaticKeys("{", ALL, Clock())
    assert src.keys.all == () and "not valid JSON" in (src.last_error or "")


# -- the HTTP client ----------------------------------------------------------------------


async def _serve_once(response: bytes) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, LOCAL, 0)
    return server, f"http://{LOCAL}:{server.sockets[0].getsockname()[1]}/jwks"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", (200, b"{}")),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\n{\r\n1\r\n}\r\n0\r\n\r\n",
            (200, b"{}"),
        ),
        (b"HTTP/1.0 200 OK\r\n\r\n{}", (200, b"{}")),  # delimited by the close
        (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", (404, b"")),
    ],
    ids=["length", "chunked", "close-delimited", "404"],
)
async def test_http_get_reads_every_framing(response, expected):
    server, url = await _serve_once(response)
    try:
        assert await http_get(url, timeout=2) == expected
    finally:
        server.close()


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}", "before the response was complete"),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (MAX_JWKS_BYTES + 10)
            + b"x" * (MAX_JWKS_BYTES + 10),
            "larger than",
        ),
        (b"NOT HTTP\r\n\r\n", "invalid HTTP"),
    ],
    ids=["truncated", "too-large", "garbage"],
)
async def test_http_get_refuses_incomplete_or_oversized_responses(response, error):
    server, url = await _serve_once(response)
    try:
        with pytest.raises(JwksError, match=error):
            await http_get(url, timeout=2)
    finally:
        server.close()


async def test_http_get_times_out_and_fails_on_refused_connections(jwks_server: JwksServer):
    jwks_server.mode = "hang"
    uri = jwks_server.uri
    with pytest.raises(JwksError, match=r"within 0\.2s"):
        await http_get(uri, timeout=0.2)
    await jwks_server.stop()
    with pytest.raises(JwksError):
        await http_get(uri, timeout=2)
    with pytest.raises(JwksError, match="not an http"):
        await http_get("ftp://x/jwks", timeout=2)


def _self_signed(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOCAL))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_https_fetch_verifies_the_server(tmp_path: Path):
    server_ctx, client_ctx = _self_signed(tmp_path)
    document = orjson.dumps(jwks(public_jwk(ec_key(), "e")))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(document), document))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, LOCAL, 0, ssl=server_ctx)
    url = f"https://{LOCAL}:{server.sockets[0].getsockname()[1]}/jwks"
    try:
        assert await http_get(url, timeout=2, ssl_context=client_ctx) == (200, document)
        # The system trust store does not know this certificate: refused.
        with pytest.raises(JwksError, match=r"TLS failed|certificate"):
            await http_get(url, timeout=2)
    finally:
        server.close()


# -- sources ------------------------------------------------------------------------------


async def test_remote_keys_refresh_when_stale_and_keep_the_last_good_keys(
    jwks_server: JwksServer,
):
    clock = Clock()
    jwks_server.document = jwks(public_jwk(rsa_key(), "k1"))
    src = RemoteKeys(jwks_server.uri, ALL, 60.0, clock)
    await src.start_refresh(clock())
    assert list(src.keys.by_kid) == ["k1"] and src.generation == 1
    src.maybe_refresh(clock())  # fresh: nothing to do
    assert src.pending() is None and jwks_server.hits == 1

    # Stale: the next use starts one fetch and goes on with the keys it has.
    clock.now += 61
    jwks_server.mode = "error"
    src.maybe_refresh(clock())
    fut = src.pending()
    assert fut is not None and list(src.keys.by_kid) == ["k1"]
    await fut
    assert jwks_server.hits == 2
    assert list(src.keys.by_kid) == ["k1"], "a failed refresh keeps the last good keys"
    assert src.last_error == f"GET {jwks_server.uri} answered 500" and src.failures == 1
    # After a failure, not retried on every request: only after RETRY_AFTER_FAILURE.
    src.maybe_refresh(clock())
    assert src.pending() is None
    clock.now += 5
    jwks_server.mode = "ok"
    jwks_server.document = jwks(public_jwk(rsa_key(), "k1"), public_jwk(ec_key(), "k2"))
    src.maybe_refresh(clock())
    await src.pending()
    assert sorted(src.keys.by_kid) == ["k1", "k2"] and src.last_error is None
    assert src.generation == 2
    described = src.describe()
    assert described["kids"] == ["k1", "k2"] and described["fetches"] == 3
    assert described["uri"] == jwks_server.uri


async def test_unknown_kid_refreshes_at_most_once_per_period(jwks_server: JwksServer):
    clock = Clock()
    jwks_server.document = jwks(public_jwk(rsa_key(), "k1"))
    src = RemoteKeys(jwks_server.uri, ALL, 300.0, clock, min_refresh=30.0)
    await src.start_refresh(clock())
    first = src.refresh_for_unknown_kid(clock())
    assert first is not None
    # Callers while it is in flight share it.
    assert src.refresh_for_unknown_kid(clock()) is first
    await first
    for _ in range(100):
        assert src.refresh_for_unknown_kid(clock()) is None
        clock.now += 0.25
    assert clock.now - 1000.0 >= 25 and jwks_server.hits == 2
    clock.now = 1030.0
    again = src.refresh_for_unknown_kid(clock())
    assert again is not None
    await again
    assert jwks_server.hits == 3


async def test_concurrent_waiters_share_one_fetch(jwks_server: JwksServer):
    jwks_server.document = jwks(public_jwk(rsa_key(), "k1"))
    src = RemoteKeys(jwks_server.uri, ALL, 300.0, Clock())
    futures = {id(src.start_refresh(1000.0)) for _ in range(20)}
    assert len(futures) == 1
    await src.pending()
    assert jwks_server.hits == 1


async def test_a_hung_jwks_server_costs_one_timeout_not_a_stuck_source(jwks_server: JwksServer):
    jwks_server.mode = "hang"
    src = RemoteKeys(jwks_server.uri, ALL, 300.0, Clock(), timeout=0.2)
    await asyncio.wait_for(src.start_refresh(1000.0), 2)
    assert "within 0.2s" in (src.last_error or "") and src.pending() is None


def test_file_keys_reload_when_the_file_changes(tmp_path: Path):
    clock = Clock()
    path = tmp_path / "jwks.json"
    path.write_bytes(orjson.dumps(jwks(public_jwk(rsa_key(), "k1"))))
    src = FileKeys(str(path), ALL, 10.0, clock)
    assert list(src.keys.by_kid) == ["k1"]
    path.write_bytes(orjson.dumps(jwks(public_jwk(ec_key(), "k2"))))
    os.utime(path, (1, 1))  # a different mtime whatever the filesystem's resolution
    src.maybe_refresh(clock())  # not stale yet
    assert list(src.keys.by_kid) == ["k1"]
    clock.now += 10
    src.maybe_refresh(clock())
    assert list(src.keys.by_kid) == ["k2"] and src.generation == 2
    path.unlink()
    clock.now += 10
    src.maybe_refresh(clock())
    assert list(src.keys.by_kid) == ["k2"] and "cannot read" in (src.last_error or "")


async def test_a_source_down_from_the_start_is_retried_on_a_period(jwks_server: JwksServer):
    clock = Clock()
    jwks_server.mode = "error"
    src = RemoteKeys(jwks_server.uri, ALL, 300.0, clock)
    await src.start_refresh(clock())
    assert not src.loaded and src.failures == 1
    for _ in range(50):  # requests keep coming: no fetch each
        src.maybe_refresh(clock())
        assert src.pending() is None
        clock.now += 0.05
    clock.now += 5
    jwks_server.mode = "ok"
    jwks_server.document = jwks(public_jwk(rsa_key(), "k1"))
    src.maybe_refresh(clock())
    await src.pending()
    assert src.loaded and jwks_server.hits == 2


async def test_close_cancels_a_fetch_in_flight_and_releases_its_waiters(jwks_server: JwksServer):
    jwks_server.mode = "hang"
    src = RemoteKeys(jwks_server.uri, ALL, 300.0, Clock())
    waiter = src.start_refresh(1000.0)
    await wait_for(lambda: jwks_server.hits == 1, what="the fetch reached the server")
    src.close()
    assert waiter is not None and waiter.done() and src.pending() is None
    await asyncio.sleep(0)
    assert src.last_error == "refresh cancelled"
    assert "user" not in RemoteKeys("http://user:pw@h/x", ALL, 1, Clock()).describe()["uri"]
