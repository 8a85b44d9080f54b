"""Handshake failure reasons from exceptions (table), and how credentials
reach OpenSSL without a key file left behind."""

from __future__ import annotations

import os
import ssl
import tempfile

import pytest
from tls_support import Pki, client_ctx, connect, server_ctx, spiffe

from lepton_mesh.proxy.security import tls
from lepton_mesh.proxy.security.tls import HandshakeFailure as F


def _ssl_error(reason: str | None) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] test")
    exc.reason = reason  # type: ignore[misc]  # set by _ssl in real errors
    return exc


def _verify_error(code: int) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.reason = "CERTIFICATE_VERIFY_FAILED"  # type: ignore[misc]
    exc.verify_code = code
    return exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (_verify_error(20), F.UNKNOWN_CA),
        (_verify_error(19), F.UNKNOWN_CA),
        (_verify_error(18), F.UNKNOWN_CA),
        (_verify_error(2), F.UNKNOWN_CA),
        (_verify_error(21), F.UNKNOWN_CA),
        (_verify_error(10), F.EXPIRED),
        (_verify_error(9), F.NOT_YET_VALID),
        (_verify_error(7), F.OTHER),  # signature failure: not one of ours
        (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), F.UNKNOWN_CA),
        (_ssl_error("SSLV3_ALERT_CERTIFICATE_EXPIRED"), F.EXPIRED),
        (_ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), F.NO_CLIENT_CERTIFICATE),
        (_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), F.NO_CLIENT_CERTIFICATE),
        (_ssl_error("UNSUPPORTED_PROTOCOL"), F.PROTOCOL_VERSION),
        (_ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"), F.PROTOCOL_VERSION),
        (_ssl_error("NO_PROTOCOLS_AVAILABLE"), F.PROTOCOL_VERSION),
        (_ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), F.OTHER),
        (_ssl_error("HTTP_REQUEST"), F.PLAINTEXT),
        (_ssl_error("HTTPS_PROXY_REQUEST"), F.PLAINTEXT),
        (_ssl_error("WRONG_VERSION_NUMBER"), F.PLAINTEXT),
        (_ssl_error("UNEXPECTED_MESSAGE"), F.OTHER),  # a TLS record, just not a handshake
        (_ssl_error(None), F.OTHER),
        (tls.PeerIdentityError("spiffe://cluster.local/ns/a/svc/b", None), F.IDENTITY_MISMATCH),
        (ConnectionResetError(), F.OTHER),
        (TimeoutError(), F.OTHER),
        (ssl.SSLEOFError(8, "EOF"), F.OTHER),
    ],
)
def test_classify_handshake_error(exc: BaseException, reason: str) -> None:
    assert tls.classify_handshake_error(exc) == reason
    assert reason in F.ALL


def test_peer_identity_error_says_both_identities() -> None:
    err = tls.PeerIdentityError("spiffe://td/ns/a/svc/b", "spiffe://td/ns/a/svc/c")
    assert str(err) == "peer is spiffe://td/ns/a/svc/c, expected spiffe://td/ns/a/svc/b"
    assert err.reason == "identity_mismatch"


def test_contexts_are_hardened(pki: Pki) -> None:
    creds = pki.creds("chat")
    for ctx in (server_ctx(creds, pki.bundle_pem), client_ctx(creds, pki.bundle_pem)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert not ctx.options & ssl.OP_NO_TICKET  # tickets on: see the module docstring
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
        assert not ctx.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
        # Only the bundle is trusted: one root, no system store.
        assert ctx.cert_store_stats()["x509_ca"] == 1


def test_a_wrong_key_is_refused_at_load(pki: Pki) -> None:
    a, b = pki.creds("chat"), pki.creds("web")
    with pytest.raises(ssl.SSLError):
        tls.server_context(a.chain_pem, b.key_pem, pki.bundle_pem)


def test_memfd_loading_leaves_no_file(pki: Pki, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server_ctx(pki.creds("chat"), pki.bundle_pem)
    assert list(tmp_path.iterdir()) == []


async def test_without_memfd_the_key_file_is_private_and_removed(
    pki: Pki, tmp_path, monkeypatch, servers
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delattr(os, "memfd_create")
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            opened.append((str(path), mode))
            dir_mode = os.stat(os.path.dirname(path)).st_mode & 0o777
            assert dir_mode == 0o700
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    ctx = server_ctx(pki.creds("chat"), pki.bundle_pem)
    monkeypatch.undo()
    assert [mode for _, mode in opened] == [0o600]
    assert list(tmp_path.iterdir()) == []  # the file and its directory are gone
    srv = await servers(ctx)  # and the context works
    assert (
        await connect(srv.port, client_ctx(pki.creds("web"), pki.bundle_pem), expect=spiffe("chat"))
    ).identity
