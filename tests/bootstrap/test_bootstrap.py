"""Bootstrap: a sidecar proves its service with a join token over a
server-authenticated TLS stream, makes its key, sends a CSR, gets its
certificate; after that the stream is mTLS with that certificate.

Real etcd, real TLS, the real control daemon and control client.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import orjson
import pytest
from bootstrap_support import (
    FakeSidecar,
    Pki,
    Replicas,
    TlsPeer,
    client_config,
    contains_any,
    eventually,
    hello,
    key_secrets,
    start_client,
    until_certified,
)

from lepton_mesh import meshproto as mp
from lepton_mesh.control import push
from lepton_mesh.control.store import Store
from lepton_mesh.identity.bundle import TrustBundle, load_certificates
from lepton_mesh.identity.csr import build_csr, generate_key
from lepton_mesh.identity.spiffe import SpiffeId, spiffe_id_of_certificate
from lepton_mesh.identity.store import PRIVATE_MODE, init_ca

CHAT = SpiffeId("cluster.local", "default", "chat")
CONTROL = SpiffeId("cluster.local", "lepton-system", "control")


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every byte control receives from sidecars, after TLS decryption."""
    seen: list[bytes] = []
    original = push._Stream.data_received

    def recording(self: push._Stream, data: bytes) -> None:
        seen.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(push._Stream, "data_received", recording)
    return seen


async def test_join_token_gets_a_certificate_for_its_service_and_the_key_stays(
    replicas: Replicas, pki: Pki, wire: list[bytes]
) -> None:
    control = await replicas()
    cfg = client_config(control.listen_port, pki, "chat", token_file=pki.token_file("chat"))
    sidecar = FakeSidecar()
    client = await start_client(cfg, sidecar)
    try:
        took = await until_certified(client)
        print(f"time to first certificate: {took * 1000:.1f} ms")
        assert client.identity is not None
        await eventually(lambda: sidecar.ready, what="ready with config and certificate")

        chain_pem, key_pem, bundle_pem = sidecar.identity.installs[-1]
        chain = load_certificates(chain_pem)
        assert len(chain) == 2  # leaf, intermediate
        assert spiffe_id_of_certificate(chain[0]) == CHAT
        assert TrustBundle.from_pem(bundle_pem).verify(chain) == CHAT
        assert bundle_pem == pki.bundle_pem

        # Only the CSR left the sidecar: no form of its key was ever on the wire.
        sent = b"".join(wire)
        assert b'"type":"csr"' in sent
        assert not contains_any(sent, key_secrets(key_pem))
        assert client.status_json()["identity"]["spiffe_id"] == CHAT.uri
        assert not contains_any(orjson.dumps(client.status_json()), key_secrets(key_pem))
    finally:
        await client.aclose()


async def test_the_stream_is_tls_to_the_control_daemons_identity(
    replicas: Replicas, pki: Pki
) -> None:
    control = await replicas()
    peer = await TlsPeer.connect(control.listen_port, pki.bootstrap_context())
    assert peer.server_identity == CONTROL.uri
    version = peer.writer.get_extra_info("ssl_object").version()
    assert version in ("TLSv1.3", "TLSv1.2")


async def test_after_bootstrap_the_stream_is_mtls_and_needs_no_token(
    replicas: Replicas, pki: Pki, wire: list[bytes], store: Store
) -> None:
    control = await replicas()
    token = pki.token_file("chat")
    cfg = client_config(control.listen_port, pki, "chat", token_file=token)
    client = await start_client(cfg)
    try:
        await until_certified(client)
        token.unlink()  # the token is gone (and may have expired): the certificate is the proof
        wire.clear()
        assert control.ctx is not None
        for stream in list(control.ctx.push._streams):
            stream.close()  # the control drops the stream; the client reconnects
        await eventually(lambda: client.connected and b'"type":"hello"' in b"".join(wire))
        hellos = [m for m in _messages(wire) if isinstance(m, mp.Hello)]
        assert hellos[-1].token is None
        status = await _status(store, client.node_id)
        assert status["identity"] == CHAT.uri
        # Registered on the strength of the client certificate: its expiry is on record.
        assert status["certificate"]["not_after"] > time.time()
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("case", "hello_as", "token_for", "reason"),
    [
        ("chat token, hello as intent", "intent", "chat", "identity_mismatch"),
        ("token from another namespace", "chat", "other/chat", "identity_mismatch"),
        ("no token", "chat", None, "missing_token"),
        ("expired token", "chat", "expired", "expired_token"),
        ("token signed by another key", "chat", "foreign", "invalid_token"),
        ("admin token", "chat", "admin", "invalid_token"),
        ("garbage", "chat", "garbage", "invalid_token"),
        ("the control daemon's own identity", "lepton-system/control", "lepton-system/control",
         "identity_mismatch"),
    ],
)  # fmt: skip
async def test_a_hello_whose_identity_is_not_proven_is_refused_before_registering(
    replicas: Replicas,
    pki: Pki,
    store: Store,
    tmp_path: Path,
    case: str,
    hello_as: str,
    token_for: str | None,
    reason: str,
) -> None:
    control = await replicas()
    namespace, _, service = hello_as.rpartition("/")
    peer = await TlsPeer.connect(control.listen_port, pki.bootstrap_context())
    peer.send(hello(service, _token(pki, tmp_path, token_for), namespace=namespace or "default"))
    error = await peer.refusal()
    assert error.reason == reason, error
    assert (await store.get_prefix("/lepton/v1/instances/"))[0] == []
    assert (await store.get_prefix("/lepton/v1/sidecars/"))[0] == []


async def test_a_csr_for_another_service_is_refused(replicas: Replicas, pki: Pki) -> None:
    control = await replicas()
    peer = await TlsPeer.connect(control.listen_port, pki.bootstrap_context())
    peer.send(hello("chat", pki.token("chat")))
    await peer.until(mp.Welcome)
    intent = SpiffeId("cluster.local", "default", "intent")
    peer.send(mp.Csr(build_csr(generate_key(), intent).decode()))
    error = await peer.refusal()
    assert error.reason == "identity_mismatch"
    assert "intent" in error.detail
    assert control.ctx is not None and control.ctx.identity is not None
    assert control.ctx.identity.issued == 0


async def test_a_csr_for_its_own_service_is_signed_for_that_identity_only(
    replicas: Replicas, pki: Pki
) -> None:
    control = await replicas()
    peer = await TlsPeer.connect(control.listen_port, pki.bootstrap_context())
    peer.send(hello("chat", pki.token("chat")))
    trust = await peer.until(mp.Trust)
    assert trust.bundle_pem == pki.bundle_pem.decode()
    key = generate_key()
    peer.send(mp.Csr(build_csr(key, CHAT).decode()))
    cert = await peer.until(mp.Certificate)
    leaf = load_certificates(cert.chain_pem.encode())[0]
    assert spiffe_id_of_certificate(leaf) == CHAT
    assert leaf.public_key() == key.public_key()
    assert cert.not_after == leaf.not_valid_after_utc.timestamp()


async def test_a_sidecar_that_does_not_trust_control_never_sends_its_token(
    replicas: Replicas, pki: Pki, tmp_path: Path, wire: list[bytes]
) -> None:
    """A bundle from another CA: the handshake fails on the sidecar's side,
    so nothing (no hello, no token) reaches whoever answered."""
    control = await replicas()
    other = init_ca(tmp_path / "other")
    cfg = client_config(
        control.listen_port, pki, "chat", token_file=pki.token_file("chat"), ca_bundle=other.bundle
    )
    client = await start_client(cfg)
    try:
        await eventually(lambda: client._failures >= 2, what="failed attempts")
        assert "certificate verify failed" in (client.last_error or "")
        assert wire == []
        assert not client.identity.has_certificate  # type: ignore[union-attr]
    finally:
        await client.aclose()


async def test_the_ca_key_is_0600_and_its_bytes_appear_nowhere_else(
    replicas: Replicas,
    pki: Pki,
    store: Store,
    wire: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    control = await replicas()
    cfg = client_config(
        control.listen_port, pki, "chat", token_file=pki.token_file("chat"),
        state_dir=pki.tmp / "state",
    )  # fmt: skip
    sidecar = FakeSidecar()
    client = await start_client(cfg, sidecar)
    try:
        await until_certified(client)
        await eventually(lambda: client.persisted_version > 0, what="last-known-good written")
        await eventually(lambda: _has_certificate_status(control), what="status written")
    finally:
        await client.aclose()
    for path in (pki.ca.ca_key, pki.ca.root_key):
        assert path.stat().st_mode & 0o777 == PRIVATE_MODE
    ca_secrets = key_secrets(pki.ca.ca_key.read_bytes()) + key_secrets(pki.ca.root_key.read_bytes())
    workload_secrets = key_secrets(sidecar.identity.installs[-1][1])

    etcd = b"".join(kv.value for kv in (await store.get_prefix("/lepton/v1/"))[0])
    logs = "\n".join(r.getMessage() for r in caplog.records).encode()
    lkg = (pki.tmp / "state" / "last-known-good.json").read_bytes()
    others = [p.read_bytes() for p in pki.ca.directory.iterdir() if p.is_file()]
    others = [
        b for b in others if b not in (pki.ca.ca_key.read_bytes(), pki.ca.root_key.read_bytes())
    ]
    for where, data in [("etcd", etcd), ("logs", logs), ("wire", b"".join(wire)), ("lkg", lkg)]:
        assert not contains_any(data, ca_secrets), f"a CA key is in the {where}"
        assert not contains_any(data, workload_secrets), f"the workload key is in the {where}"
    for data in others:
        assert not contains_any(data, ca_secrets)
    assert b"issued spiffe://cluster.local/ns/default/svc/chat" in logs


async def test_get_sidecars_shows_identity_and_certificate_expiry(
    replicas: Replicas, pki: Pki
) -> None:
    control = await replicas(cert_lifetime=3600.0)
    cfg = client_config(control.listen_port, pki, "chat", token_file=pki.token_file("chat"))
    client = await start_client(cfg)
    try:
        await until_certified(client)
        await eventually(lambda: _has_certificate_status(control), what="status written")
        assert control.ctx is not None
        (row,) = control.ctx.registry.sidecars()
        assert row["identity"] == CHAT.uri
        leaf = client.identity.certificate  # type: ignore[union-attr]
        assert row["certificate"]["serial"] == f"{leaf.serial_number:x}"
        assert row["certificate"]["not_after"] == leaf.not_valid_after_utc.timestamp()
        assert 3500 < row["certificate"]["not_after"] - time.time() <= 3600
        assert row["certificate"]["issuer"].startswith("CN=lepton-mesh intermediate CA")
        assert len(row["certificate"]["roots"]) == 1
    finally:
        await client.aclose()


# --- helpers ---------------------------------------------------------------------------


def _token(pki: Pki, tmp_path: Path, spec: str | None) -> str | None:
    if spec is None:
        return None
    if spec == "expired":
        return pki.token("chat", ttl=60, now=time.time() - 3600)
    if spec == "admin":
        return pki.token("chat", role="admin")
    if spec == "garbage":
        return "not.a.jwt"
    if spec == "foreign":
        from lepton_mesh.control.auth import TokenIssuer, init_key

        return TokenIssuer(init_key(tmp_path / "foreign.key")).create(
            subject="x", role="join", ttl=60, service="chat"
        )
    namespace, _, service = spec.rpartition("/")
    return pki.token(service, namespace or "default")


def _messages(wire: list[bytes]) -> list[mp.Message]:
    decoder = mp.FrameDecoder()
    decoder.feed(b"".join(wire))
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


async def _status(store: Store, node_id: str) -> dict:
    kv = await store.get(f"/lepton/v1/sidecars/{node_id}")
    assert kv is not None
    return orjson.loads(kv.value)


def _has_certificate_status(control: object) -> bool:
    rows = control.ctx.registry.sidecars()  # type: ignore[attr-defined]
    return bool(rows) and all(r.get("certificate") for r in rows)


async def test_control_renews_its_own_certificate_and_open_streams_stay(
    replicas: Replicas, pki: Pki
) -> None:
    control = await replicas(cert_lifetime=3.0)
    assert control.ctx is not None and control.ctx.identity is not None
    service = control.ctx.identity
    peer = await TlsPeer.connect(control.listen_port, pki.bootstrap_context())
    peer.send(hello("chat", pki.token("chat")))
    await peer.until(mp.Welcome)
    first = _served_serial(peer)
    assert first == service.serving_serial

    await eventually(lambda: service.serving_serial != first, 5, "the serving certificate renewed")
    fresh = await TlsPeer.connect(control.listen_port, pki.bootstrap_context())
    assert _served_serial(fresh) == service.serving_serial
    assert fresh.server_identity == CONTROL.uri
    peer.send(mp.Ping(1.0))  # the stream opened under the old certificate is still served
    assert (await peer.until(mp.Pong)).time == 1.0


async def test_a_sidecar_whose_roots_are_all_replaced_rejoins_with_its_token(
    replicas: Replicas, pki: Pki
) -> None:
    """Its certificate and bundle are from a CA that is gone: the attempt with the
    certificate fails, the next one (token, the re-read ca_bundle file) succeeds."""
    first = await replicas()
    port = first.listen_port
    cfg = client_config(port, pki, "chat", token_file=pki.token_file("chat"))
    sidecar = FakeSidecar()
    client = await start_client(cfg, sidecar)
    try:
        await until_certified(client)
        old = sidecar.identity.serial
        await first.stop()
        init_ca(pki.ca.directory, force=True)  # a new root; the sidecar's file is rewritten
        await replicas(listen=("127.0.0.1", port))
        await eventually(
            lambda: sidecar.identity.serial != old, 10, "a certificate from the new CA"
        )
        assert sidecar.identity.installs[-1][2] == pki.bundle_pem
        assert client.connected
    finally:
        await client.aclose()


def _served_serial(peer: TlsPeer) -> int:
    from cryptography import x509

    der = peer.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_ca_bundle_file_turned_to_junk_is_retried_not_fatal(
    replicas: Replicas, pki: Pki
) -> None:
    control = await replicas()
    bundle = pki.tmp / "sidecar-bundle.pem"
    bundle.write_bytes(pki.bundle_pem)
    cfg = client_config(
        control.listen_port, pki, "chat", token_file=pki.token_file("chat"), ca_bundle=bundle
    )
    bundle.write_bytes(b"-----BEGIN CERTIFICATE-----\njunk\n-----END CERTIFICATE-----\n")
    client = await start_client(cfg)  # read at start: fine; re-read at the first attempt: junk
    try:
        await eventually(lambda: "cannot set up TLS" in (client.last_error or ""))
        bundle.write_bytes(pki.bundle_pem)
        await until_certified(client)
    finally:
        await client.aclose()
