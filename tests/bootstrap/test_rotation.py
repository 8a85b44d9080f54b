"""Rotation with traffic flowing: real sidecars (in this process) get their
certificates from a real control daemon and call each other over mTLS while a
request loop runs through both; no request may fail.

    load --> chat sidecar (outbound) --mTLS--> intent sidecar (inbound) --> intent app
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bootstrap_support import FAST, App, Load, Pki, Replicas, client_config, eventually
from cryptography import x509

from lepton_mesh.cli import main as cli
from lepton_mesh.control.daemon import ControlDaemon
from lepton_mesh.control.identity_service import key_id
from lepton_mesh.identity.bundle import fingerprint
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.spiffe import SpiffeId
from lepton_mesh.proxy.security import tls
from lepton_mesh.proxy.sidecar import Sidecar


@dataclass
class Mesh:
    control: ControlDaemon
    intent: Sidecar
    chat: Sidecar
    app: App

    @property
    def sidecars(self) -> dict[str, Sidecar]:
        return {"intent": self.intent, "chat": self.chat}

    def load(self, **kw: Any) -> Load:
        return Load(self.chat.addresses["outbound"], "intent", b"intent", **kw).start()


def leaf(sc: Sidecar) -> x509.Certificate:
    """The certificate the sidecar's data plane serves and calls with."""
    assert sc.identity is not None and sc.identity.current is not None
    return sc.identity.current.certificate


def roots(sc: Sidecar) -> tuple[str, ...]:
    assert sc.identity is not None and sc.identity.current is not None
    return sc.identity.current.bundle.fingerprints()


MakeMesh = Callable[..., Awaitable[Mesh]]


@pytest.fixture
async def make_mesh(replicas: Replicas, pki: Pki, tmp_path: Path) -> AsyncIterator[MakeMesh]:
    started: list[Any] = []

    async def make(cert_lifetime: float) -> Mesh:
        control = await replicas(cert_lifetime=cert_lifetime)
        app = await App("intent").start()
        started.append(app)
        port = control.listen_port
        intent_cfg = client_config(
            port, pki, "intent", token_file=pki.token_file("intent"), app=f"127.0.0.1:{app.port}",
            access_log=False, instance={"id": "intent-1"},
        )  # fmt: skip
        chat_cfg = client_config(
            port, pki, "chat", token_file=pki.token_file("chat"), dependencies=["intent"],
            access_log=False, instance={"id": "chat-1"},
        )  # fmt: skip
        sidecars = []
        for cfg in (intent_cfg, chat_cfg):
            sc = Sidecar(cfg)
            assert sc.control is not None
            sc.control.timing = FAST
            started.append(sc)
            await sc.start()
            sidecars.append(sc)
        intent, chat = sidecars

        def serving() -> bool:
            svc = chat.cfg.services.get("intent")
            return intent.ready and chat.ready and svc is not None and len(svc.endpoints) == 1

        await eventually(serving, 10, "both sidecars ready, chat knows intent")
        return Mesh(control, intent, chat, app)

    yield make
    for thing in reversed(started):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(thing.stop(), 5)


async def test_certificates_rotate_at_two_thirds_of_their_lifetime_under_load(
    make_mesh: MakeMesh,
) -> None:
    lifetime = 6.0
    mesh = await make_mesh(cert_lifetime=lifetime)
    load = mesh.load()
    await load.progress()
    first = {name: leaf(sc) for name, sc in mesh.sidecars.items()}

    def rotated() -> bool:
        return all(
            leaf(sc).serial_number != first[name].serial_number
            for name, sc in mesh.sidecars.items()
        )

    await eventually(rotated, 10, "both certificates re-issued")
    seen = time.time()
    for name, cert in first.items():
        issued_at = cert.not_valid_after_utc.timestamp() - lifetime
        after = seen - issued_at
        print(f"{name}: re-issued {after:.2f} s into a {lifetime:g} s lifetime")
        assert lifetime * 2 / 3 * 0.9 <= after <= lifetime * 0.9, after

    # New connections present the new certificate (chat's data plane dials intent).
    assert await served_certificate(mesh.chat, mesh.intent) == leaf(mesh.intent).serial_number
    await load.progress()
    await load.stop()
    print(f"rotation under load: {load.ok} requests, {len(load.failures)} failed")
    assert load.failures == []


async def test_a_new_trust_bundle_is_installed_with_a_new_certificate_at_once(
    make_mesh: MakeMesh, pki: Pki
) -> None:
    mesh = await make_mesh(cert_lifetime=3600.0)
    load = mesh.load()
    await load.progress()
    before = {name: leaf(sc).serial_number for name, sc in mesh.sidecars.items()}

    started = time.monotonic()
    assert cli(["certs", "rotate-root", "prepare", "--dir", str(pki.ca.directory)]) == 0

    def reissued_with_both_roots() -> bool:
        return all(
            len(roots(sc)) == 2 and leaf(sc).serial_number != before[name]
            for name, sc in mesh.sidecars.items()
        )

    await eventually(reissued_with_both_roots, 5, "both sidecars re-issued with two roots")
    took = time.monotonic() - started
    print(f"bundle change -> both sidecars re-issued and installed: {took * 1000:.0f} ms")
    assert took < 5  # the two-thirds timer is 40 minutes away: this was the bundle change
    await load.progress()
    await load.stop()
    assert load.failures == []


async def test_root_rotation_prepare_activate_finish_under_load(
    make_mesh: MakeMesh, pki: Pki
) -> None:
    mesh = await make_mesh(cert_lifetime=3600.0)
    old_root = fingerprint(_cert(pki.ca.root_cert))
    # A workload certificate from the old root, to show it is refused at the end.
    stale = _issue(pki, "chat")
    load = mesh.load()
    await load.progress()
    ca = str(pki.ca.directory)

    step = time.monotonic()
    assert cli(["certs", "rotate-root", "prepare", "--dir", ca]) == 0
    new_root = fingerprint(_cert(pki.ca.next.root_cert))
    await eventually(
        lambda: all(roots(sc) == (old_root, new_root) for sc in mesh.sidecars.values()),
        5,
        "both roots on every sidecar",
    )
    await _statuses_show(mesh, lambda row: len(row["certificate"]["roots"]) == 2)
    print(f"prepare -> both sidecars trust both roots: {time.monotonic() - step:.2f} s")
    await load.progress(200)

    step = time.monotonic()
    assert cli(["certs", "rotate-root", "activate", "--dir", ca]) == 0
    new_ca = _cert(pki.ca.ca_cert)
    await eventually(
        lambda: all(_issuer(sc) == fingerprint(new_ca) for sc in mesh.sidecars.values()),
        5,
        "every sidecar re-issued by the new intermediate",
    )
    await _statuses_show(mesh, lambda row: row["certificate"]["issuer_key_id"] == key_id(new_ca))
    print(f"activate -> both sidecars hold new-root certificates: {time.monotonic() - step:.2f} s")
    await load.progress(200)

    step = time.monotonic()
    full = _full_handshakes(mesh.intent)
    assert cli(["certs", "rotate-root", "finish", "--dir", ca]) == 0
    await eventually(
        lambda: all(roots(sc) == (new_root,) for sc in mesh.sidecars.values()),
        5,
        "only the new root on every sidecar",
    )
    print(f"finish -> both sidecars trust only the new root: {time.monotonic() - step:.2f} s")
    await load.progress(200)
    # Traffic moved to new connections verified under the new bundle (the pools
    # retire the old ones), and none of those requests failed.
    assert _full_handshakes(mesh.intent) > full
    await load.stop()
    print(f"root rotation under load: {load.ok} requests, {len(load.failures)} failed")
    assert load.failures == []

    # The old root's certificates are refused now; the new ones work.
    assert await served_certificate(mesh.chat, mesh.intent) == leaf(mesh.intent).serial_number
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(mesh.intent, tls.client_context(*stale, pki.bundle_pem), read=True)


# --- helpers ------------------------------------------------------------------------------


async def served_certificate(caller: Sidecar, callee: Sidecar) -> int:
    """The serial of the certificate `callee` presents to a new connection from `caller`."""
    assert caller.identity is not None and caller.identity.current is not None
    sslobj = await _handshake(callee, caller.identity.current.http.context)
    der = sslobj.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def _handshake(callee: Sidecar, ctx: ssl.SSLContext, *, read: bool = False) -> Any:
    inbound = callee.addresses["inbound"]
    reader, writer = await asyncio.open_connection(inbound.host, inbound.port, ssl=ctx)
    try:
        if read:  # TLS 1.3: a refused client certificate shows on the first read
            writer.write(b"GET / HTTP/1.1\r\nHost: intent\r\n\r\n")
            if not await reader.read(1):
                raise ConnectionResetError("closed by the server")
        return writer.get_extra_info("ssl_object")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def _issuer(sc: Sidecar) -> str:
    """The fingerprint of the CA certificate that signed the sidecar's certificate."""
    assert sc.control is not None and sc.control.identity is not None
    return sc.control.identity.issuer


def _full_handshakes(sc: Sidecar) -> int:
    assert sc.identity is not None
    return sc.identity.handshakes["inbound", False]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _issue(pki: Pki, service: str) -> tuple[bytes, bytes]:
    key = generate_key()
    sid = SpiffeId("cluster.local", "default", service)
    issued = pki.ca.load_authority().issue(build_csr(key, sid), sid)
    return issued.chain_pem, private_key_pem(key)


async def _statuses_show(mesh: Mesh, cond: Callable[[dict[str, Any]], bool]) -> None:
    """`lepton-mesh get sidecars` (the registry's rows) shows `cond` for every sidecar."""
    registry = mesh.control.ctx.registry  # type: ignore[union-attr]

    def shown() -> bool:
        rows = registry.sidecars()
        return len(rows) == 2 and all(r.get("certificate") and cond(r) for r in rows)

    await eventually(shown, 5, "sidecar statuses")
