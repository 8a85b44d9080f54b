"""Inbound (STRICT or PERMISSIVE over TLS): a client certificate the bundle
verifies is not enough, it must name a workload of our trust domain.

Authorization matches a caller's namespace and service, not its trust
domain, so a certificate for `spiffe://other.td/ns/default/svc/web` (a
bundle that also holds another trust domain's root) must not pass as
`web`; and a certificate with no mesh identity (several URI SANs, or none
that is a SPIFFE ID) must not reach the app as an anonymous caller that
DENY rules cannot name.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from mtls_support import (
    App,
    Creds,
    HttpClient,
    Pki,
    client_context,
    metric,
    sidecar_config,
    spiffe,
    wait_for,
    write_tls,
)

from lepton_mesh.identity.bundle import TrustBundle, certificates_pem
from lepton_mesh.identity.ca import CertificateAuthority, create_intermediate, create_root
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.spiffe import SpiffeId

XFCC = "x-forwarded-client-cert"


def other_domain_creds(service: str) -> tuple[Creds, bytes]:
    """A certificate from another trust domain's CA, and that CA's root (PEM)."""
    root = create_root("other.td")
    inter = create_intermediate(root)
    ca = CertificateAuthority(inter.cert, inter.key, TrustBundle((root.cert,)))
    key = generate_key()
    sid = SpiffeId("other.td", "default", service)
    issued = ca.issue(build_csr(key, sid), sid)
    return Creds(issued.chain_pem, private_key_pem(key), issued.serial), certificates_pem(
        [root.cert]
    )


def crafted(pki: Pki, names: list[x509.GeneralName]) -> Creds:
    """A leaf our intermediate signed with `names` as its SAN (a CA mistake)."""
    key = generate_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.intermediate.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.intermediate.key.public_key()),
            critical=False,
        )
        .sign(pki.intermediate.key, hashes.SHA256())
    )
    return Creds(certificates_pem([cert, pki.intermediate.cert]), private_key_pem(key), 0)


async def refused(b, creds: Creds, bundle_pem: bytes) -> None:
    client = HttpClient(b.addresses["inbound"], client_context(creds, bundle_pem))
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
        try:
            await client.request("chat")
        finally:
            await client.close()


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
async def test_a_certificate_from_another_trust_domain_is_refused(
    tmp_path: Path, pki: Pki, sidecars, app: App, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    creds, other_root = other_domain_creds("web")
    bundle = pki.bundle_pem + other_root  # the bundle verifies the chain
    b = await sidecars(
        sidecar_config(
            "chat", app.address, tls_cfg=write_tls(tmp_path, pki.issue("chat"), bundle, mode=mode)
        )
    )
    await refused(b, creds, bundle)
    assert app.seen == []
    await wait_for(
        lambda: metric(b, "lepton_tls_handshake_failures_total", reason="identity_mismatch") == 1
    )
    assert metric(b, "lepton_tls_handshakes_total", side="inbound", resumed="false") == 0
    line = next(r.getMessage() for r in caplog.records if "handshake failed" in r.getMessage())
    assert "spiffe://other.td/ns/default/svc/web" in line and "cluster.local" in line
    # A caller of our own trust domain still gets through.
    client = HttpClient(b.addresses["inbound"], client_context(pki.issue("web"), bundle))
    try:
        assert (await client.request("chat")).status == 200
    finally:
        await client.close()
    assert app.seen[-1].all(XFCC) == [f"By={spiffe('chat')};URI={spiffe('web')}"]


@pytest.mark.parametrize(
    "names",
    [
        [
            x509.UniformResourceIdentifier(spiffe("web")),
            x509.UniformResourceIdentifier(spiffe("admin")),
        ],
        [x509.DNSName("web.default.svc")],
        [x509.UniformResourceIdentifier("https://cluster.local/ns/default/svc/web")],
    ],
    ids=["two-uri-sans", "dns-only", "not-spiffe"],
)
async def test_a_certificate_without_a_mesh_identity_is_refused(
    tmp_path: Path, pki: Pki, sidecars, app: App, names: list[x509.GeneralName]
) -> None:
    b = await sidecars(
        sidecar_config(
            "chat", app.address, tls_cfg=write_tls(tmp_path, pki.issue("chat"), pki.bundle_pem)
        )
    )
    await refused(b, crafted(pki, names), pki.bundle_pem)
    assert app.seen == []
    await wait_for(
        lambda: metric(b, "lepton_tls_handshake_failures_total", reason="identity_mismatch") == 1
    )
