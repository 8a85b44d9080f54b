"""`tls.source: files`: replaced certificate, key or bundle files are picked
up while the sidecar runs (a workload certificate lives 24 hours; a root
rotation changes the bundle), checked whole, and a half-replaced pair is
refused with the old credentials kept."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from mtls_support import (
    App,
    HttpClient,
    Pki,
    client_context,
    joint_bundle,
    sidecar_config,
    wait_for,
    write_tls,
)


def replace_file(path: Path, data: bytes) -> None:
    """As `certs` and secret mounts do: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def serial_seen(b, pki: Pki, bundle: bytes) -> int:
    """The serial of the certificate the inbound port presents now."""
    client = HttpClient(b.addresses["inbound"], client_context(pki.issue("web"), bundle))
    try:
        assert (await client.request("chat")).status == 200
        assert client.writer is not None
        der = client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        await client.close()
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


async def test_new_certificate_files_are_served_without_a_restart(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    first = pki.issue("chat")
    b = await sidecars(
        sidecar_config("chat", app.address, tls_cfg=write_tls(tmp_path, first, pki.bundle_pem))
    )
    b.identity.watch(interval=0.02)
    assert await serial_seen(b, pki, pki.bundle_pem) == first.serial
    second = pki.issue("chat")
    replace_file(tmp_path / "key.pem", second.key_pem)
    replace_file(tmp_path / "cert.pem", second.chain_pem)
    await wait_for(lambda: b.identity.current.certificate.serial_number == second.serial)
    assert await serial_seen(b, pki, pki.bundle_pem) == second.serial
    assert b.identity.describe()["files"]["last_error"] is None


async def test_a_half_replaced_pair_keeps_the_old_certificate(
    tmp_path: Path, pki: Pki, sidecars, app: App, caplog: pytest.LogCaptureFixture
) -> None:
    first = pki.issue("chat")
    b = await sidecars(
        sidecar_config("chat", app.address, tls_cfg=write_tls(tmp_path, first, pki.bundle_pem))
    )
    second = pki.issue("chat")
    replace_file(tmp_path / "cert.pem", second.chain_pem)  # the key is still the old one
    with caplog.at_level(logging.WARNING):
        assert b.identity.check_files() is False
        assert b.identity.check_files() is False  # unchanged since: not read, not logged again
    assert b.identity.current.certificate.serial_number == first.serial
    problems = [r.getMessage() for r in caplog.records if "keeping" in r.getMessage()]
    assert len(problems) == 1 and "PRIVATE KEY" not in problems[0]
    assert b.identity.describe()["files"]["last_error"] is not None
    replace_file(tmp_path / "key.pem", second.key_pem)
    assert b.identity.check_files() is True
    assert b.identity.current.certificate.serial_number == second.serial
    assert b.identity.describe()["files"]["last_error"] is None
    assert b.identity.check_files() is False  # nothing changed since


async def test_a_new_bundle_file_is_a_trust_change(
    tmp_path: Path, pki: Pki, foreign_pki: Pki, sidecars, app: App
) -> None:
    b = await sidecars(
        sidecar_config(
            "chat", app.address, tls_cfg=write_tls(tmp_path, pki.issue("chat"), pki.bundle_pem)
        )
    )
    before = b.identity.trust_generation()
    both = joint_bundle(pki, foreign_pki)
    replace_file(tmp_path / "bundle.pem", both)
    assert b.identity.check_files() is True
    assert b.identity.trust_generation() == before + 1
    # A caller from the other root is accepted now (root rotation, step 1).
    client = HttpClient(b.addresses["inbound"], client_context(foreign_pki.issue("web"), both))
    try:
        assert (await client.request("chat")).status == 200
    finally:
        await client.close()
