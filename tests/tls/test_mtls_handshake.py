"""Real mTLS between two endpoints on 127.0.0.1 with the sidecar's contexts:
what is accepted, what is refused, and the reason each side reports."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl

import pytest
from tls_support import (
    DEADLINE,
    Pki,
    client_ctx,
    connect,
    server_ctx,
    spiffe,
    tls11_client,
)

from lepton_mesh.proxy.security import tls
from lepton_mesh.proxy.security.tls import HandshakeFailure, PeerIdentityError

NOW = dt.datetime.now(dt.UTC)
EXPIRED = {"now": NOW - dt.timedelta(days=2), "lifetime": dt.timedelta(hours=1)}
NOT_YET_VALID = {"now": NOW + dt.timedelta(days=1)}


async def test_mesh_certificates_handshake_both_ways(pki: Pki, servers) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    result = await connect(
        srv.port, client_ctx(pki.creds("web"), pki.bundle_pem), expect=spiffe("chat")
    )
    assert result.identity == spiffe("chat").uri
    assert result.version == "TLSv1.3"
    outcome = await srv.next_outcome()
    assert (outcome.kind, outcome.identity) == ("tls", spiffe("web").uri)


async def test_tls12_negotiates_ecdhe_aead_only(pki: Pki, servers) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    ctx = client_ctx(pki.creds("web"), pki.bundle_pem)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    result = await connect(srv.port, ctx, expect=spiffe("chat"))
    assert result.version == "TLSv1.2"
    assert result.cipher is not None and result.cipher.startswith("ECDHE-ECDSA-")
    assert "GCM" in result.cipher or "CHACHA20" in result.cipher
    assert (await srv.next_outcome()).identity == spiffe("web").uri


def test_tls12_cipher_list_is_ecdhe_aead_only(pki: Pki) -> None:
    ctx = server_ctx(pki.creds("chat"), pki.bundle_pem)
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for c in tls12:
        assert c["kea"] == "kx-ecdhe" and c["aead"], c["name"]


@pytest.mark.parametrize(
    ("client_kwargs", "reason"),
    [
        pytest.param(EXPIRED, HandshakeFailure.EXPIRED, id="expired"),
        pytest.param(NOT_YET_VALID, HandshakeFailure.NOT_YET_VALID, id="not_yet_valid"),
    ],
)
async def test_server_refuses_client_certificate_outside_validity(
    pki: Pki, servers, client_kwargs: dict, reason: str
) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    with pytest.raises(ConnectionResetError):
        await connect(srv.port, client_ctx(pki.creds("web", **client_kwargs), pki.bundle_pem))
    outcome = await srv.next_outcome()
    assert (outcome.kind, outcome.reason) == ("failed", reason)


@pytest.mark.parametrize(
    ("server_kwargs", "reason"),
    [
        pytest.param(EXPIRED, HandshakeFailure.EXPIRED, id="expired"),
        pytest.param(NOT_YET_VALID, HandshakeFailure.NOT_YET_VALID, id="not_yet_valid"),
    ],
)
async def test_client_refuses_server_certificate_outside_validity(
    pki: Pki, servers, server_kwargs: dict, reason: str
) -> None:
    srv = await servers(server_ctx(pki.creds("chat", **server_kwargs), pki.bundle_pem))
    with pytest.raises(ssl.SSLCertVerificationError) as err:
        await connect(srv.port, client_ctx(pki.creds("web"), pki.bundle_pem))
    assert tls.classify_handshake_error(err.value) == reason
    assert (await srv.next_outcome()).kind == "failed"


async def test_certificate_from_another_ca_is_refused_by_server(
    pki: Pki, foreign_pki: Pki, servers
) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    # The intruder trusts our root, so its side of the handshake completes.
    with pytest.raises(ConnectionResetError):
        await connect(srv.port, client_ctx(foreign_pki.creds("web"), pki.bundle_pem))
    outcome = await srv.next_outcome()
    assert (outcome.kind, outcome.reason) == ("failed", HandshakeFailure.UNKNOWN_CA)


async def test_certificate_from_another_ca_is_refused_by_client(
    pki: Pki, foreign_pki: Pki, servers
) -> None:
    srv = await servers(server_ctx(foreign_pki.creds("chat"), pki.bundle_pem))
    with pytest.raises(ssl.SSLCertVerificationError) as err:
        await connect(srv.port, client_ctx(pki.creds("web"), pki.bundle_pem))
    assert tls.classify_handshake_error(err.value) == HandshakeFailure.UNKNOWN_CA


async def test_valid_mesh_certificate_for_the_wrong_service_is_refused_by_caller(
    pki: Pki, servers
) -> None:
    # "intent" holds a perfectly valid mesh certificate, but the caller meant "chat".
    srv = await servers(server_ctx(pki.creds("intent"), pki.bundle_pem))
    with pytest.raises(PeerIdentityError) as err:
        await connect(srv.port, client_ctx(pki.creds("web"), pki.bundle_pem), expect=spiffe("chat"))
    assert err.value.expected == spiffe("chat").uri
    assert err.value.actual == spiffe("intent").uri
    assert tls.classify_handshake_error(err.value) == HandshakeFailure.IDENTITY_MISMATCH


async def test_same_service_in_another_namespace_is_the_wrong_service(pki: Pki, servers) -> None:
    key_creds = pki.creds("chat")
    srv = await servers(server_ctx(key_creds, pki.bundle_pem))
    with pytest.raises(PeerIdentityError):
        await connect(
            srv.port,
            client_ctx(pki.creds("web"), pki.bundle_pem),
            expect=spiffe("chat", namespace="staging"),
        )


async def test_client_without_certificate_is_refused(pki: Pki, servers) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=pki.bundle_pem.decode())
    with pytest.raises(ConnectionResetError):
        await connect(srv.port, anonymous)
    outcome = await srv.next_outcome()
    assert (outcome.kind, outcome.reason) == ("failed", HandshakeFailure.NO_CLIENT_CERTIFICATE)


async def test_optional_client_certificate_admits_anonymous_but_still_verifies(
    pki: Pki, foreign_pki: Pki, servers
) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem, require_client_cert=False))
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=pki.bundle_pem.decode())
    await connect(srv.port, anonymous)
    outcome = await srv.next_outcome()
    assert (outcome.kind, outcome.identity) == ("tls", None)

    with pytest.raises(ConnectionResetError):
        await connect(srv.port, client_ctx(foreign_pki.creds("web"), pki.bundle_pem))
    assert (await srv.next_outcome()).reason == HandshakeFailure.UNKNOWN_CA


async def test_tls11_client_is_refused(pki: Pki, servers) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await connect(srv.port, tls11_client())
    outcome = await srv.next_outcome()
    assert (outcome.kind, outcome.reason) == ("failed", HandshakeFailure.PROTOCOL_VERSION)


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: chat\r\n\r\n",  # OpenSSL: HTTP_REQUEST
        b"CONNECT chat:443 HTTP/1.1\r\n\r\n",  # HTTPS_PROXY_REQUEST
        b"OPTIONS * HTTP/1.1\r\nHost: chat\r\n\r\n",  # a method OpenSSL does not name
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # h2c prior knowledge
        b"\x00\x01\x02\x03\x04\x05",  # not HTTP at all
    ],
    ids=["get", "connect", "options", "h2c", "binary"],
)
async def test_plaintext_to_a_tls_port_is_refused(pki: Pki, servers, payload: bytes) -> None:
    from tls_support import connect_plain

    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    with pytest.raises((ConnectionError, EOFError)):
        await connect_plain(srv.port, payload)
    outcome = await srv.next_outcome()
    assert (outcome.kind, outcome.reason) == ("failed", HandshakeFailure.PLAINTEXT)


async def test_a_plaintext_answer_to_our_client_hello_is_plaintext(pki: Pki) -> None:
    served: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(65536)  # the ClientHello, taken as a bad request
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            await reader.read()  # until the client gives up: no reset before it read the answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            served.set_result(None)

    srv = await asyncio.start_server(http_server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ssl.SSLError) as caught:
            await connect(port, client_ctx(pki.creds("web"), pki.bundle_pem))
        assert tls.classify_handshake_error(caught.value) == HandshakeFailure.PLAINTEXT
        async with asyncio.timeout(DEADLINE):
            await served
    finally:
        srv.close()
        await srv.wait_closed()
