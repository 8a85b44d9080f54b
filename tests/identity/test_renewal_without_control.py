"""A sidecar whose renewal falls due while no control replica is reachable:
it keeps the certificate it has, says so in its log and status, says again
when that certificate expires, and renews as soon as a stream is back."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from lepton_mesh import meshproto as mp
from lepton_mesh.identity.ca import CertificateAuthority
from lepton_mesh.identity.spiffe import SpiffeId
from lepton_mesh.identity.store import init_ca
from lepton_mesh.proxy.mesh.identity_client import IdentityClient

CHAT = SpiffeId("cluster.local", "default", "chat")
DEADLINE = 10.0


async def until(predicate: Any, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def answer(ca: CertificateAuthority, csr: mp.Csr, lifetime: float) -> mp.Certificate:
    issued = ca.issue(csr.csr_pem.encode(), CHAT, lifetime=dt.timedelta(seconds=lifetime))
    return mp.Certificate(
        issued.chain_pem.decode(), ca.bundle.to_pem().decode(), issued.not_after.timestamp()
    )


async def test_renewal_due_without_control_keeps_the_certificate_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = init_ca(tmp_path / "certs").load_authority()
    installs: list[Any] = []
    sent: list[mp.Message] = []
    ic = IdentityClient(
        CHAT, lambda *m: installs.append(m), rng=lambda: 0.0, renew_fraction=0.5, retry_delay=0.05
    )
    ic.connected(lambda m: sent.append(m) is None)
    (csr,) = sent
    ic.on_certificate(answer(ca, csr, 1.5))  # renewal due in ~0.75 s, expiry in 1.5 s
    assert ic.has_certificate and ic.last_error is None
    ic.disconnected()  # control unreachable from now on
    with caplog.at_level(logging.WARNING):
        await until(lambda: ic.last_error is not None, "the renewal falling due")
        assert "no control" in ic.last_error and "keeping" in ic.last_error
        status = ic.status_json()
        assert status["renewal_overdue"] is True and status["last_error"] == ic.last_error
        assert ic.has_certificate and len(installs) == 1
        await until(lambda: "expired" in (ic.last_error or ""), "the certificate expiring")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("keeping" in line for line in lines)
    assert any("expired" in line for line in lines)
    # Control is back: a CSR at once, and the error clears once installed.
    sent.clear()
    ic.connected(lambda m: sent.append(m) is None)
    (csr,) = sent
    ic.on_certificate(answer(ca, csr, 3600))
    assert ic.last_error is None and ic.status_json()["renewal_overdue"] is False
    ic.close()
