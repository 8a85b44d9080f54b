"""Helpers for the identity tests: a CA in memory and hand-made CSRs and
certificates that the code under test must refuse."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from lepton_mesh.identity.bundle import TrustBundle
from lepton_mesh.identity.ca import (
    CaKeyPair,
    CertificateAuthority,
    create_intermediate,
    create_root,
)

TD = "cluster.local"


@dataclass(frozen=True)
class Pki:
    root: CaKeyPair
    intermediate: CaKeyPair
    bundle: TrustBundle
    ca: CertificateAuthority


def make_pki(trust_domain: str = TD, **ca_kwargs: object) -> Pki:
    root = create_root(trust_domain)
    inter = create_intermediate(root)
    bundle = TrustBundle((root.cert,))
    ca = CertificateAuthority(inter.cert, inter.key, bundle, **ca_kwargs)  # type: ignore[arg-type]
    return Pki(root, inter, bundle, ca)


def make_ca(trust_domain: str = TD) -> CertificateAuthority:
    return make_pki(trust_domain).ca


def crafted_csr(
    names: list[x509.GeneralName] | None,
    *,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> bytes:
    """A CSR asking for exactly `names` (no SAN extension if None)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")])
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM)


def self_signed_without_san() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no san")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
