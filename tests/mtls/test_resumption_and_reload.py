"""Pooled mTLS connections: session resumption on reconnects, and swapping the
certificate or bundle while requests flow (zero failures, new connections get
the new certificate)."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from mtls_support import (
    App,
    HttpClient,
    Pki,
    client_context,
    get,
    joint_bundle,
    metric,
    sidecar_config,
    wait_for,
    write_tls,
)

from lepton_mesh.proxy.security.mtls import TlsCredentialsError


async def two_sidecars(tmp_path: Path, pki: Pki, sidecars, app: App):
    b = await sidecars(
        sidecar_config(
            "chat",
            app.address,
            tls_cfg=write_tls(tmp_path / "b", pki.issue("chat"), pki.bundle_pem),
        )
    )
    a = await sidecars(
        sidecar_config(
            "web",
            app.address,
            tls_cfg=write_tls(tmp_path / "a", pki.issue("web"), pki.bundle_pem),
            services={"chat": [b.addresses["inbound"]]},
        )
    )
    return a, b


async def test_pool_reconnects_resume_the_session(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    a, b = await two_sidecars(tmp_path, pki, sidecars, app)
    client = HttpClient(a.addresses["outbound"])
    try:
        for _ in range(3):  # keep-alive: one connection, one handshake
            assert (await client.request("chat")).status == 200
        assert metric(a, "lepton_tls_handshakes_total", side="outbound", resumed="false") == 1
        for round_ in range(1, 3):
            a.pools.close()  # the pooled connection goes; the session stays
            assert (await client.request("chat")).status == 200
            assert (
                metric(a, "lepton_tls_handshakes_total", side="outbound", resumed="true") == round_
            )
            await wait_for(
                lambda r=round_: (
                    metric(b, "lepton_tls_handshakes_total", side="inbound", resumed="true") == r
                )
            )
    finally:
        await client.close()
    assert metric(a, "lepton_tls_handshakes_total", side="outbound", resumed="false") == 1


async def test_reload_under_load_fails_no_request(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    a, b = await two_sidecars(tmp_path, pki, sidecars, app)
    new_ca = Pki()  # a root rotation's middle step: both roots trusted, then new leaves
    both_roots = joint_bundle(pki, new_ca)
    results: list[int] = []
    stop = asyncio.Event()

    async def load(fresh_connections: bool) -> None:
        client = HttpClient(a.addresses["outbound"])
        try:
            while not stop.is_set():
                try:
                    results.append((await client.request("chat")).status)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    results.append(-1)
                    raise AssertionError(f"request failed: {exc!r}") from None
                if fresh_connections:
                    await client.close()
        finally:
            await client.close()

    workers = [asyncio.create_task(load(fresh_connections=i % 2 == 0)) for i in range(4)]
    try:
        await wait_for(lambda: len(results) >= 20)
        old_serial = b.identity.current.certificate.serial_number
        # 1. The bundle gains the new root (trust generation changes: idle pooled
        #    connections are closed, new ones handshake under the new bundle).
        for sc, svc in ((b, "chat"), (a, "web")):
            c = pki.issue(svc)
            sc.identity.reload(c.chain_pem, c.key_pem, both_roots)
        mark = len(results)
        await wait_for(lambda: len(results) >= mark + 20)
        # 2. Leaves from the new CA, same bundle.
        new_b = new_ca.issue("chat")
        b.identity.reload(new_b.chain_pem, new_b.key_pem, both_roots)
        new_a = new_ca.issue("web")
        a.identity.reload(new_a.chain_pem, new_a.key_pem, both_roots)
        a.pools.close_idle_tls()  # force fresh A -> B handshakes with the new leaves
        mark = len(results)
        await wait_for(lambda: len(results) >= mark + 20)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert set(results) == {200}, f"{results.count(-1)} failed"
    assert b.identity.current.certificate.serial_number == new_b.serial != old_serial

    # A new connection sees B's new certificate.
    loop = asyncio.get_running_loop()
    ctx = client_context(new_ca.issue("web"), both_roots)
    transport, _ = await loop.create_connection(
        asyncio.Protocol, b.addresses["inbound"].host, b.addresses["inbound"].port, ssl=ctx
    )
    try:
        der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert x509.load_der_x509_certificate(der).serial_number == new_b.serial
    finally:
        transport.close()
    assert metric(a, "lepton_tls_handshake_failures_total", reason="unknown_ca") == 0


async def test_bundle_without_the_old_root_refuses_old_leaves(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    """The last step of a root rotation: only the new root is trusted."""
    _, b = await two_sidecars(tmp_path, pki, sidecars, app)
    new_ca = Pki()
    fresh = new_ca.issue("chat")
    b.identity.reload(fresh.chain_pem, fresh.key_pem, new_ca.bundle_pem)
    old_leaf = client_context(pki.issue("web"), joint_bundle(pki, new_ca))
    client = HttpClient(b.addresses["inbound"], old_leaf)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
        try:
            await client.request("chat")
        finally:
            await client.close()
    await wait_for(
        lambda: metric(b, "lepton_tls_handshake_failures_total", reason="unknown_ca") == 1
    )


@pytest.mark.parametrize(
    "bad",
    ["wrong_service", "key_of_another_cert", "ca_not_in_bundle", "garbage_bundle"],
)
async def test_reload_refuses_bad_material_and_keeps_the_current(
    tmp_path: Path, pki: Pki, foreign_pki: Pki, sidecars, app: App, bad: str
) -> None:
    a, _ = await two_sidecars(tmp_path, pki, sidecars, app)
    before = a.identity.current
    good, other = pki.issue("web"), pki.issue("web")
    material = {
        "wrong_service": (pki.issue("intent").chain_pem, good.key_pem, pki.bundle_pem),
        "key_of_another_cert": (good.chain_pem, other.key_pem, pki.bundle_pem),
        "ca_not_in_bundle": (foreign_pki.issue("web").chain_pem, good.key_pem, pki.bundle_pem),
        "garbage_bundle": (good.chain_pem, good.key_pem, b"not a pem"),
    }[bad]
    with pytest.raises(TlsCredentialsError) as err:
        a.identity.reload(*material)
    assert a.identity.current is before
    assert b"PRIVATE KEY" not in str(err.value).encode()
    assert (await get(a.addresses["outbound"], "chat")).status == 200


async def test_config_shows_identity_and_expiry_without_key_material(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    a, _ = await two_sidecars(tmp_path, pki, sidecars, app)
    shown = a.config_json()
    ident = shown["identity"]
    cert = a.identity.current.certificate
    assert ident["spiffe_id"] == "spiffe://cluster.local/ns/default/svc/web"
    assert ident["mode"] == "STRICT"
    assert ident["certificate"]["serial"] == f"{cert.serial_number:x}"
    assert ident["certificate"]["not_after"] == f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    assert shown["tls"]["key"].endswith("key.pem")  # the path, for the operator
    key_pem = (tmp_path / "a" / "key.pem").read_bytes()
    text = json.dumps(shown)
    assert "PRIVATE KEY" not in text
    for line in key_pem.splitlines()[1:-1]:
        assert line.decode() not in text
    assert (
        metric(a, "lepton_identity_cert_expiration_timestamp_seconds")
        == cert.not_valid_after_utc.timestamp()
    )


async def test_identity_from_control_waits_for_its_first_certificate(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    """`tls.source: control`: no certificate at start; TLS is refused both ways
    until the bootstrap installs one through the same reload hook."""
    from lepton_mesh.policy.sidecar_config import TlsConfig

    pending = TlsConfig(source="control")
    b = await sidecars(sidecar_config("chat", app.address, tls_cfg=pending))
    a = await sidecars(
        sidecar_config(
            "web", app.address, tls_cfg=pending, services={"chat": [b.addresses["inbound"]]}
        )
    )
    assert a.identity.current is None and a.config_json()["identity"]["certificate"] is None
    assert metric(a, "lepton_identity_cert_expiration_timestamp_seconds") == 0
    resp = await get(a.addresses["outbound"], "chat")
    assert (resp.status, resp.get("x-lepton-reason")) == (503, "upstream_connect_failed")
    assert "no certificate yet" in resp.json()["error"]

    creds = pki.issue("chat")
    b.identity.reload(creds.chain_pem, creds.key_pem, pki.bundle_pem)
    creds = pki.issue("web")
    a.identity.reload(creds.chain_pem, creds.key_pem, pki.bundle_pem)
    resp = await get(a.addresses["outbound"], "chat")
    assert resp.status == 200
    assert app.seen[-1].all("x-forwarded-client-cert") == [
        "By=spiffe://cluster.local/ns/default/svc/chat;URI=spiffe://cluster.local/ns/default/svc/web"
    ]
