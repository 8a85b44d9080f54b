"""The CA: what a workload certificate looks like, which CSRs are refused and
why, and which issuing CAs refuse to load."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from identity_support import TD, crafted_csr, make_pki

from lepton_mesh.identity.bundle import TrustBundle, load_certificates
from lepton_mesh.identity.ca import (
    CLOCK_SKEW,
    INTERMEDIATE_LIFETIME,
    ROOT_LIFETIME,
    WORKLOAD_LIFETIME,
    CertificateAuthority,
    create_intermediate,
    create_root,
)
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.errors import CaError, CsrReason, CsrRejected, InvalidSpiffeId
from lepton_mesh.identity.spiffe import SpiffeId

CHAT = SpiffeId(TD, "default", "chat")
URI = x509.UniformResourceIdentifier


def _ext(cert: x509.Certificate, cls: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


def test_root_and_intermediate_shape() -> None:
    pki = make_pki()
    root, inter = pki.root.cert, pki.intermediate.cert
    assert _ext(root, x509.BasicConstraints).value.path_length == 1
    assert _ext(inter, x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=0)
    assert _ext(inter, x509.BasicConstraints).critical
    for cert in (root, inter):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        assert _ext(cert, x509.KeyUsage).value.key_cert_sign
    inter.verify_directly_issued_by(root)
    root_life = root.not_valid_after_utc - root.not_valid_before_utc
    inter_life = inter.not_valid_after_utc - inter.not_valid_before_utc
    assert root_life == ROOT_LIFETIME + CLOCK_SKEW
    assert inter_life == INTERMEDIATE_LIFETIME + CLOCK_SKEW


def test_workload_certificate_shape() -> None:
    pki = make_pki()
    key = generate_key()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    issued = pki.ca.issue(build_csr(key, CHAT), CHAT, now=now)
    cert = issued.certificate
    assert issued.identity == CHAT
    assert cert.public_key() == key.public_key()
    assert cert.subject == x509.Name([])
    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [URI(CHAT.uri)]
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    assert set(_ext(cert, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert (issued.not_before, issued.not_after) == (now - CLOCK_SKEW, now + WORKLOAD_LIFETIME)
    assert issued.serial == cert.serial_number
    # The chain is leaf then intermediate, and verifies against the bundle.
    chain = load_certificates(issued.chain_pem)
    assert chain == [cert, pki.intermediate.cert]
    assert pki.bundle.verify(chain) == CHAT


def test_lifetime_is_configurable_per_ca_and_per_call() -> None:
    pki = make_pki(workload_lifetime=dt.timedelta(hours=1))
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    csr = build_csr(generate_key(), CHAT)
    assert pki.ca.issue(csr, CHAT, now=now).not_after == now + dt.timedelta(hours=1)
    short = pki.ca.issue(csr, CHAT, now=now, lifetime=dt.timedelta(minutes=10))
    assert short.not_after == now + dt.timedelta(minutes=10)


@pytest.mark.parametrize(
    "lifetime", [dt.timedelta(0), dt.timedelta(seconds=-1), dt.timedelta(days=31)]
)
def test_unreasonable_lifetimes_are_refused(lifetime: dt.timedelta) -> None:
    pki = make_pki()
    with pytest.raises(CaError):
        pki.ca.issue(build_csr(generate_key(), CHAT), CHAT, lifetime=lifetime)
    with pytest.raises(CaError):
        CertificateAuthority(
            pki.intermediate.cert, pki.intermediate.key, pki.bundle, workload_lifetime=lifetime
        )


def test_leaf_never_outlives_its_issuer() -> None:
    root = create_root(TD)
    inter = create_intermediate(root, lifetime=dt.timedelta(hours=2))
    ca = CertificateAuthority(inter.cert, inter.key, TrustBundle((root.cert,)))
    issued = ca.issue(build_csr(generate_key(), CHAT), CHAT)
    assert issued.not_after == inter.cert.not_valid_after_utc


def test_issue_accepts_the_authorized_identity_as_a_string() -> None:
    pki = make_pki()
    assert pki.ca.issue(build_csr(generate_key(), CHAT), CHAT.uri).identity == CHAT


def _tampered_csr() -> bytes:
    """A CSR whose signature does not match its content (no proof of possession)."""
    der = bytearray(
        x509.load_pem_x509_csr(build_csr(generate_key(), CHAT)).public_bytes(Encoding.DER)
    )
    der[-5] ^= 0x01  # inside the signature value
    return x509.load_der_x509_csr(bytes(der)).public_bytes(Encoding.PEM)


@pytest.mark.parametrize(
    ("make_csr", "reason"),
    [
        (
            lambda: build_csr(generate_key(), SpiffeId(TD, "default", "intent")),
            CsrReason.IDENTITY_MISMATCH,
        ),
        (
            lambda: build_csr(generate_key(), SpiffeId(TD, "staging", "chat")),
            CsrReason.IDENTITY_MISMATCH,
        ),
        (
            lambda: build_csr(generate_key(), SpiffeId("other.td", "default", "chat")),
            CsrReason.IDENTITY_MISMATCH,
        ),
        (
            lambda: crafted_csr(
                [URI(CHAT.uri), URI("spiffe://cluster.local/ns/default/svc/intent")]
            ),
            CsrReason.UNEXPECTED_NAMES,
        ),
        (lambda: crafted_csr([URI(CHAT.uri), URI(CHAT.uri)]), CsrReason.UNEXPECTED_NAMES),
        (
            lambda: crafted_csr([URI(CHAT.uri), x509.DNSName("chat.default.svc")]),
            CsrReason.UNEXPECTED_NAMES,
        ),
        (lambda: crafted_csr([x509.DNSName("chat.default.svc")]), CsrReason.MISSING_IDENTITY),
        (lambda: crafted_csr(None), CsrReason.MISSING_IDENTITY),
        (
            lambda: crafted_csr([URI(CHAT.uri)], key=ec.generate_private_key(ec.SECP384R1())),
            CsrReason.UNSUPPORTED_KEY,
        ),
        (
            lambda: crafted_csr([URI(CHAT.uri)], key=rsa.generate_private_key(65537, 2048)),
            CsrReason.UNSUPPORTED_KEY,
        ),
        (_tampered_csr, CsrReason.BAD_SIGNATURE),
        (
            lambda: (
                b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"
            ),
            CsrReason.MALFORMED,
        ),
        (lambda: b"", CsrReason.MALFORMED),
    ],
    ids=[
        "other-service",
        "other-namespace",
        "other-trust-domain",
        "two-uris",
        "same-uri-twice",
        "uri-and-dns",
        "dns-only",
        "no-san",
        "p384-key",
        "rsa-key",
        "bad-signature",
        "garbage-pem",
        "empty",
    ],
)
def test_csr_refused(make_csr, reason: str) -> None:
    pki = make_pki()
    with pytest.raises(CsrRejected) as err:
        pki.ca.issue(make_csr(), CHAT)
    assert err.value.reason == reason


def test_crafted_csr_for_exactly_the_authorized_uri_is_accepted() -> None:
    # Subject and other CSR content are ignored: the leaf is built from scratch.
    pki = make_pki()
    issued = pki.ca.issue(crafted_csr([URI(CHAT.uri)]), CHAT)
    assert issued.certificate.subject == x509.Name([])


def test_authorized_identity_outside_the_trust_domain_is_refused() -> None:
    pki = make_pki()
    other = SpiffeId("other.td", "default", "chat")
    with pytest.raises(CsrRejected) as err:
        pki.ca.issue(build_csr(generate_key(), other), other)
    assert err.value.reason == CsrReason.IDENTITY_MISMATCH
    with pytest.raises(InvalidSpiffeId):
        pki.ca.issue(build_csr(generate_key(), CHAT), "spiffe://cluster.local/chat")


def test_repr_and_errors_never_show_the_key() -> None:
    pki = make_pki()
    secret = pki.intermediate.key_pem()
    body = b"".join(secret.splitlines()[1:-1]).decode()
    assert body[:20] not in repr(pki.ca)
    assert body[:20] not in repr(pki.intermediate)
    assert "key=" not in repr(pki.intermediate)


def test_load_from_files(tmp_path) -> None:
    pki = make_pki()
    (tmp_path / "ca-cert.pem").write_bytes(pki.intermediate.cert_pem())
    (tmp_path / "ca-key.pem").write_bytes(pki.intermediate.key_pem())
    (tmp_path / "bundle.pem").write_bytes(pki.bundle.to_pem())
    ca = CertificateAuthority.load(
        tmp_path / "ca-cert.pem", tmp_path / "ca-key.pem", tmp_path / "bundle.pem"
    )
    assert ca.trust_domain == TD
    assert ca.certificate == pki.intermediate.cert
    issued = ca.issue(build_csr(generate_key(), CHAT), CHAT)
    assert pki.bundle.verify(load_certificates(issued.chain_pem)) == CHAT


def _files(tmp_path, cert: bytes, key: bytes, bundle: bytes):
    paths = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "b.pem"
    for path, data in zip(paths, (cert, key, bundle), strict=True):
        path.write_bytes(data)
    return paths


@pytest.mark.parametrize(
    "case",
    [
        "key of another CA",
        "bundle of another CA",
        "a leaf as issuer",
        "not a certificate",
        "not a key",
        "an RSA key",
    ],
)
def test_load_refuses_inconsistent_files(tmp_path, case: str) -> None:
    pki, other = make_pki(), make_pki()
    cert, key, bundle = pki.intermediate.cert_pem(), pki.intermediate.key_pem(), pki.bundle.to_pem()
    leaf_key = generate_key()
    leaf = pki.ca.issue(build_csr(leaf_key, CHAT), CHAT)
    rsa_pem = private_key_pem(rsa.generate_private_key(65537, 2048))  # type: ignore[arg-type]
    files = {
        "key of another CA": (cert, other.intermediate.key_pem(), bundle),
        "bundle of another CA": (cert, key, other.bundle.to_pem()),
        "a leaf as issuer": (leaf.chain_pem, private_key_pem(leaf_key), bundle),
        "not a certificate": (b"garbage", key, bundle),
        "not a key": (cert, b"garbage", bundle),
        "an RSA key": (cert, rsa_pem, bundle),
    }[case]
    with pytest.raises(CaError):
        CertificateAuthority.load(*_files(tmp_path, *files))


def test_load_names_a_missing_file(tmp_path) -> None:
    with pytest.raises(CaError, match=r"ca-cert\.pem"):
        CertificateAuthority.load(tmp_path / "ca-cert.pem", tmp_path / "k", tmp_path / "b")


def test_an_expired_issuer_refuses_to_load() -> None:
    root = create_root(TD)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    inter = create_intermediate(root, now=past, lifetime=dt.timedelta(days=1))
    with pytest.raises(CaError, match="not valid now"):
        CertificateAuthority(inter.cert, inter.key, TrustBundle((root.cert,)))


def test_a_root_in_the_bundle_may_issue_directly() -> None:
    root = create_root(TD)
    ca = CertificateAuthority(root.cert, root.key, TrustBundle((root.cert,)))
    issued = ca.issue(build_csr(generate_key(), CHAT), CHAT)
    assert load_certificates(issued.chain_pem) == [issued.certificate]
