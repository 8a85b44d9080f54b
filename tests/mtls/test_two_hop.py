"""Two sidecars with mTLS between them: app -> outbound A -> TLS -> inbound B -> app.

What the app behind B sees (the verified caller in x-forwarded-client-cert,
never a forged one), what callers in plaintext get in each inbound mode, and
what the metrics say about who called.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from mtls_support import (
    App,
    HttpClient,
    Pki,
    client_context,
    get,
    metric,
    sidecar_config,
    spiffe,
    wait_for,
    write_tls,
)

XFCC = "x-forwarded-client-cert"


async def mesh(tmp_path: Path, pki: Pki, sidecars, app: App, *, mode: str = "STRICT"):
    """B (service chat, inbound `mode`) in front of `app`; A (service web) calling chat."""
    b = await sidecars(
        sidecar_config(
            "chat",
            app.address,
            tls_cfg=write_tls(tmp_path / "b", pki.issue("chat"), pki.bundle_pem, mode=mode),
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


async def test_app_sees_the_callers_verified_identity(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    a, b = await mesh(tmp_path, pki, sidecars, app)
    resp = await get(a.addresses["outbound"], "chat")
    assert resp.status == 200, resp.body
    assert app.seen[-1].all(XFCC) == [f"By={spiffe('chat')};URI={spiffe('web')}"]
    # Who called is what the certificate says (the workload of its SPIFFE ID).
    assert metric(b, "lepton_requests_total", reporter="destination", source_workload="web") == 1
    assert metric(a, "lepton_tls_handshakes_total", side="outbound", resumed="false") == 1
    assert metric(b, "lepton_tls_handshakes_total", side="inbound", resumed="false") == 1


async def test_forged_xfcc_from_the_app_is_dropped(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    a, _ = await mesh(tmp_path, pki, sidecars, app)
    forged = f"By={spiffe('chat')};URI={spiffe('admin')}"
    resp = await get(
        a.addresses["outbound"],
        "chat",
        headers=[(XFCC, forged), ("X-Forwarded-Client-Cert", forged)],
    )
    assert resp.status == 200
    assert app.seen[-1].all(XFCC) == [f"By={spiffe('chat')};URI={spiffe('web')}"]


async def test_plaintext_to_a_strict_port_is_refused(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    _, b = await mesh(tmp_path, pki, sidecars, app)
    resp = await get(b.addresses["inbound"], "chat")  # answered, not cut (test_plaintext_to_strict)
    assert (resp.status, resp.get("x-lepton-reason")) == (400, "mtls_required")
    assert app.seen == []
    await wait_for(
        lambda: metric(b, "lepton_tls_handshake_failures_total", reason="plaintext") == 1
    )


async def test_permissive_accepts_tls_and_plaintext_on_one_port(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    a, b = await mesh(tmp_path, pki, sidecars, app, mode="PERMISSIVE")
    # Plaintext: served; the unverified x-lepton-peer and a forged XFCC count for nothing.
    forged = f"By={spiffe('chat')};URI={spiffe('web')}"
    resp = await get(
        b.addresses["inbound"], "chat", headers=[("x-lepton-peer", "web"), (XFCC, forged)]
    )
    assert resp.status == 200
    assert app.seen[-1].all(XFCC) == []
    assert (
        metric(b, "lepton_requests_total", reporter="destination", source_workload="unknown") == 1
    )
    # mTLS through A on the same port: the caller is known.
    resp = await get(a.addresses["outbound"], "chat")
    assert resp.status == 200
    assert app.seen[-1].all(XFCC) == [f"By={spiffe('chat')};URI={spiffe('web')}"]
    assert metric(b, "lepton_requests_total", reporter="destination", source_workload="web") == 1
    assert b.identity.plaintext_accepted == 1


async def test_disable_serves_plaintext_and_trusts_the_peer_header(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    """DISABLE is today's plaintext inbound: x-lepton-peer names the caller, XFCC is still dropped."""
    b = await sidecars(
        sidecar_config(
            "chat",
            app.address,
            tls_cfg=write_tls(tmp_path / "b", pki.issue("chat"), pki.bundle_pem, mode="DISABLE"),
        )
    )
    resp = await get(
        b.addresses["inbound"], "chat", headers=[("x-lepton-peer", "web"), (XFCC, "URI=x")]
    )
    assert resp.status == 200
    assert app.seen[-1].all(XFCC) == []
    assert metric(b, "lepton_requests_total", reporter="destination", source_workload="web") == 1


async def test_a_tls_client_without_identity_header_games(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    """Directly over mTLS: the certificate decides, the x-lepton-peer header does not."""
    _, b = await mesh(tmp_path, pki, sidecars, app)
    client = HttpClient(b.addresses["inbound"], client_context(pki.issue("intent"), pki.bundle_pem))
    try:
        resp = await client.request("chat", headers=[("x-lepton-peer", "web")])
    finally:
        await client.close()
    assert resp.status == 200
    assert app.seen[-1].all(XFCC) == [f"By={spiffe('chat')};URI={spiffe('intent')}"]
    assert metric(b, "lepton_requests_total", reporter="destination", source_workload="intent") == 1
    assert metric(b, "lepton_requests_total", reporter="destination", source_workload="web") == 0


async def test_certificate_from_another_ca_is_refused_and_counted(
    tmp_path: Path, pki: Pki, foreign_pki: Pki, sidecars, app: App, caplog: pytest.LogCaptureFixture
) -> None:
    _, b = await mesh(tmp_path, pki, sidecars, app)
    intruder = client_context(foreign_pki.issue("web"), pki.bundle_pem)  # trusts our root
    client = HttpClient(b.addresses["inbound"], intruder)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
        try:
            await client.request("chat")
        finally:
            await client.close()
    assert app.seen == []
    await wait_for(
        lambda: metric(b, "lepton_tls_handshake_failures_total", reason="unknown_ca") == 1
    )
    line = next(r.getMessage() for r in caplog.records if "handshake failed" in r.getMessage())
    assert "side=inbound" in line and "reason=unknown_ca" in line and "peer=127.0.0.1:" in line


async def test_expired_client_certificate_is_refused(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    import datetime as dt

    _, b = await mesh(tmp_path, pki, sidecars, app)
    old = pki.issue(
        "web", now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2), lifetime=dt.timedelta(hours=1)
    )
    client = HttpClient(b.addresses["inbound"], client_context(old, pki.bundle_pem))
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
        try:
            await client.request("chat")
        finally:
            await client.close()
    await wait_for(lambda: metric(b, "lepton_tls_handshake_failures_total", reason="expired") == 1)


async def test_wrong_service_is_refused_by_the_caller_and_retried_elsewhere(
    tmp_path: Path, pki: Pki, sidecars, apps
) -> None:
    """A valid mesh certificate for another service is not the service meant."""
    chat_app, intent_app = await apps(), await apps()
    chat = await sidecars(
        sidecar_config(
            "chat",
            chat_app.address,
            tls_cfg=write_tls(tmp_path / "c", pki.issue("chat"), pki.bundle_pem),
        )
    )
    impostor = await sidecars(
        sidecar_config(
            "intent",
            intent_app.address,
            tls_cfg=write_tls(tmp_path / "i", pki.issue("intent"), pki.bundle_pem),
        )
    )
    only_wrong = await sidecars(
        sidecar_config(
            "web",
            chat_app.address,
            tls_cfg=write_tls(tmp_path / "a1", pki.issue("web"), pki.bundle_pem),
            services={"chat": [impostor.addresses["inbound"]]},
        )
    )
    resp = await get(only_wrong.addresses["outbound"], "chat")
    assert resp.status == 503
    assert resp.get("x-lepton-reason") == "upstream_identity_mismatch"
    assert spiffe("intent") in resp.json()["error"]
    assert intent_app.seen == []  # nothing was sent to it
    assert (
        metric(only_wrong, "lepton_tls_handshake_failures_total", reason="identity_mismatch") >= 1
    )

    # With a right endpoint too, the mismatch is a connect failure: retried there.
    both = await sidecars(
        sidecar_config(
            "web",
            chat_app.address,
            tls_cfg=write_tls(tmp_path / "a2", pki.issue("web"), pki.bundle_pem),
            services={"chat": [impostor.addresses["inbound"], chat.addresses["inbound"]]},
        )
    )
    for _ in range(6):
        assert (await get(both.addresses["outbound"], "chat")).status == 200
    assert intent_app.seen == []
    assert len(chat_app.seen) == 6


async def test_server_certificate_from_another_ca_fails_the_try(
    tmp_path: Path, pki: Pki, foreign_pki: Pki, sidecars, apps
) -> None:
    chat_app = await apps()
    rogue = await sidecars(
        sidecar_config(
            "chat",
            chat_app.address,
            tls_cfg=write_tls(tmp_path / "r", foreign_pki.issue("chat"), foreign_pki.bundle_pem),
        )
    )
    a = await sidecars(
        sidecar_config(
            "web",
            chat_app.address,
            tls_cfg=write_tls(tmp_path / "a", pki.issue("web"), pki.bundle_pem),
            services={"chat": [rogue.addresses["inbound"]]},
        )
    )
    resp = await get(a.addresses["outbound"], "chat")
    assert (resp.status, resp.get("x-lepton-reason")) == (503, "upstream_connect_failed")
    assert "unknown_ca" in resp.json()["error"]
    assert metric(a, "lepton_tls_handshake_failures_total", reason="unknown_ca") >= 1
    assert chat_app.seen == []


async def test_endpoints_labelled_plaintext_are_called_without_tls(
    tmp_path: Path, pki: Pki, sidecars, apps
) -> None:
    from mtls_support import plaintext

    external = await apps()  # no sidecar in front of it
    a = await sidecars(
        sidecar_config(
            "web",
            external.address,
            tls_cfg=write_tls(tmp_path / "a", pki.issue("web"), pki.bundle_pem),
            services={"payments": [plaintext(external.address)]},
        )
    )
    resp = await get(a.addresses["outbound"], "payments")
    assert resp.status == 200
    assert external.seen[-1].all(XFCC) == []
    assert metric(a, "lepton_tls_handshakes_total", side="outbound", resumed="false") == 0


async def test_drain_stops_accepting_tls_and_finishes(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    a, b = await mesh(tmp_path, pki, sidecars, app)
    assert (await get(a.addresses["outbound"], "chat")).status == 200
    inbound = b.addresses["inbound"]
    await asyncio.wait_for(b.drain(), 5)
    assert not b.inbound.server.is_serving()
    with pytest.raises(OSError):
        await asyncio.open_connection(inbound.host, inbound.port)
