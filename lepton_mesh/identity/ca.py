"""The mesh CA: a long-lived root kept offline, an intermediate the control
daemon signs with, and workload certificates issued from CSRs.

    root (10 y, pathlen 1)  --signs-->  intermediate (1 y, pathlen 0)  --signs-->  leaf (24 h)

`create_root` / `create_intermediate` make the CA pair (`certs init`, and a
new pair for `certs rotate-root`); `CertificateAuthority` is what the control
daemon loads from its mounted secret files and calls `issue()` on.

Invariants:
- Every key is ECDSA P-256, every signature ECDSA-SHA256.
- CA certificates carry the trust domain's own SPIFFE ID (`spiffe://td`) as
  their only URI SAN; that is where a loaded CA learns its trust domain.
- A leaf is built from scratch: only the CSR's public key and the identity the
  caller authorized go into it, never the CSR's subject or extensions. It is
  never a CA, may only sign (digitalSignature) for TLS client and server auth,
  and never outlives the intermediate that signed it.
- The issuing key lives in one private attribute; it is never logged, never
  in a repr, never in an error message, never written by this module.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lepton_mesh.identity.bundle import TrustBundle, certificates_pem, fingerprint, is_ca
from lepton_mesh.identity.csr import CURVE, generate_key
from lepton_mesh.identity.errors import CaError, CsrReason, CsrRejected, InvalidSpiffeId
from lepton_mesh.identity.spiffe import (
    SCHEME,
    SpiffeId,
    as_spiffe_id,
    trust_domain_id,
    uri_sans,
    validate_trust_domain,
)

ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=365)
WORKLOAD_LIFETIME = dt.timedelta(hours=24)
# Certificates start this much before "now", so a peer whose clock is a little
# behind does not see a fresh certificate as not yet valid.
CLOCK_SKEW = dt.timedelta(minutes=5)
# Longest workload lifetime `issue` accepts: short-lived is the point.
MAX_WORKLOAD_LIFETIME = dt.timedelta(days=30)

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class CaKeyPair:
    """A CA certificate and its private key. The key is kept out of repr."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted: the caller writes it to a 0600 file and nowhere else."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _ca_builder(
    subject: x509.Name, issuer: x509.Name, trust_domain: str, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_id(trust_domain))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _ca_name(trust_domain: str, role: str, now: dt.datetime) -> x509.Name:
    # The date keeps names distinct across rotations, so an operator reading
    # `certs show` can tell the old root from the new one.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"lepton-mesh {role} CA {now:%Y-%m-%d %H:%M:%S}"
            ),
        ]
    )


def create_root(
    trust_domain: str, *, now: dt.datetime | None = None, lifetime: dt.timedelta = ROOT_LIFETIME
) -> CaKeyPair:
    """A self-signed root CA for `trust_domain` (pathlen 1: it signs intermediates only)."""
    validate_trust_domain(trust_domain)
    now = now or _now()
    key = generate_key()
    name = _ca_name(trust_domain, "root", now)
    cert = (
        _ca_builder(name, name, trust_domain, key)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CaKeyPair(cert, key)


def create_intermediate(
    root: CaKeyPair,
    *,
    now: dt.datetime | None = None,
    lifetime: dt.timedelta = INTERMEDIATE_LIFETIME,
) -> CaKeyPair:
    """The control daemon's issuing CA, signed by `root` (pathlen 0: it signs leaves only).
    It never outlives its root."""
    trust_domain = _trust_domain_of_ca(root.cert)
    now = now or _now()
    key = generate_key()
    cert = (
        _ca_builder(
            _ca_name(trust_domain, "intermediate", now), root.cert.subject, trust_domain, key
        )
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + lifetime, root.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    return CaKeyPair(cert, key)


def _trust_domain_of_ca(cert: x509.Certificate) -> str:
    uris = uri_sans(cert)
    if len(uris) != 1 or not uris[0].startswith(SCHEME) or "/" in uris[0][len(SCHEME) :]:
        raise CaError("the CA certificate does not name its trust domain (URI SAN spiffe://<td>)")
    try:
        return validate_trust_domain(uris[0][len(SCHEME) :])
    except InvalidSpiffeId as exc:
        raise CaError(f"the CA certificate's trust domain is invalid: {exc}") from None


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """What `issue` returns. `chain_pem` is leaf then intermediate, ready for
    `proxy.security.tls` contexts; the rest is for logs, metrics and status."""

    identity: SpiffeId
    chain_pem: bytes
    certificate: x509.Certificate
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime


class CertificateAuthority:
    """Issues workload certificates with the intermediate CA's key.

    Built by `load()` from files (the control daemon's mounted secret) or
    directly from objects (tests). `issue()` is synchronous and CPU-only
    (~1 ms); it touches no file and keeps no state, so one instance may be used
    from any thread.
    """

    __slots__ = ("_cert", "_chain_tail", "_key", "bundle", "trust_domain", "workload_lifetime")

    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        bundle: TrustBundle,
        *,
        workload_lifetime: dt.timedelta = WORKLOAD_LIFETIME,
        now: dt.datetime | None = None,
    ) -> None:
        _check_lifetime(workload_lifetime)
        if not is_ca(cert):
            raise CaError("the issuing certificate is not a CA certificate")
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, CURVE):
            raise CaError("the issuing key is not an ECDSA P-256 key")
        if key.public_key() != cert.public_key():
            raise CaError("the issuing key does not belong to the issuing certificate")
        now = now or _now()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CaError(
                f"the issuing certificate is not valid now (valid "
                f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
            )
        _check_chains_to(cert, bundle)
        self.trust_domain = _trust_domain_of_ca(cert)
        self.bundle = bundle
        self.workload_lifetime = workload_lifetime
        self._cert = cert
        self._key = key
        # A root in the bundle may issue directly (tests); then the chain is the leaf alone.
        self._chain_tail = b"" if bundle.contains(cert) else certificates_pem([cert])

    @classmethod
    def load(
        cls,
        cert_path: str | Path,
        key_path: str | Path,
        bundle_path: str | Path,
        *,
        workload_lifetime: dt.timedelta = WORKLOAD_LIFETIME,
    ) -> CertificateAuthority:
        """Load the issuing CA from PEM files; CaError names the file that is wrong."""
        cert_pem = _read(cert_path)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise CaError(f"{cert_path}: not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(_read(key_path), password=None)
        except (ValueError, TypeError):
            # Never include the exception text: it could quote the file.
            raise CaError(f"{key_path}: not an unencrypted PEM private key") from None
        bundle = TrustBundle.from_pem(_read(bundle_path), what=str(bundle_path))
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(f"{key_path}: not an ECDSA P-256 key")
        return cls(cert, key, bundle, workload_lifetime=workload_lifetime)

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def not_after(self) -> dt.datetime:
        return self._cert.not_valid_after_utc

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority(trust_domain={self.trust_domain!r}, "
            f"cert={fingerprint(self._cert)[:16]}, not_after={self.not_after:%Y-%m-%d})"
        )

    def issue(
        self,
        csr_pem: bytes,
        authorized: SpiffeId | str,
        *,
        lifetime: dt.timedelta | None = None,
        now: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Sign a workload certificate for `authorized`, the identity the caller
        proved (its join token's scope) — never the identity the CSR asks for.

        The CSR must be signed by its key (proof of possession), hold an ECDSA
        P-256 key, and ask for exactly one name: a URI SAN equal to
        `authorized`. Anything else raises CsrRejected with a `CsrReason`.
        `now` exists so tests can issue backdated or future certificates.
        """
        identity = as_spiffe_id(authorized)
        if identity.trust_domain != self.trust_domain:
            raise CsrRejected(
                f"{identity} is outside this CA's trust domain {self.trust_domain!r}",
                reason=CsrReason.IDENTITY_MISMATCH,
            )
        public_key = _check_csr(_parse_csr(csr_pem), identity)
        life = self.workload_lifetime if lifetime is None else _check_lifetime(lifetime)
        now = now or _now()
        not_before = now - CLOCK_SKEW
        not_after = min(now + life, self.not_after)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            # Critical because the subject is empty (RFC 5280, 4.2.1.6).
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            identity=identity,
            chain_pem=certificates_pem([cert]) + self._chain_tail,
            certificate=cert,
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CaError(f"{path}: cannot read: {exc.strerror}") from None


def _check_lifetime(lifetime: dt.timedelta) -> dt.timedelta:
    if not dt.timedelta(0) < lifetime <= MAX_WORKLOAD_LIFETIME:
        raise CaError(
            f"workload certificate lifetime {lifetime} must be positive and at most "
            f"{MAX_WORKLOAD_LIFETIME.days} days"
        )
    return lifetime


def _check_chains_to(cert: x509.Certificate, bundle: TrustBundle) -> None:
    """The issuing certificate is a root of the bundle or directly signed by one
    (leaves it signs must verify wherever the bundle is trusted)."""
    if bundle.contains(cert):
        return
    for root in bundle.roots:
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise CaError("the issuing certificate is not signed by any root in the trust bundle")


def _parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError):
        raise CsrRejected(
            "the CSR is not a PEM certificate request", reason=CsrReason.MALFORMED
        ) from None
    if not csr.is_signature_valid:
        raise CsrRejected(
            "the CSR's signature does not verify with its own key (no proof of possession)",
            reason=CsrReason.BAD_SIGNATURE,
        )
    return csr


def _check_csr(
    csr: x509.CertificateSigningRequest, identity: SpiffeId
) -> ec.EllipticCurvePublicKey:
    """The CSR's key, if the CSR asks for exactly `identity` with an acceptable key."""
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, CURVE):
        raise CsrRejected("the CSR's key is not ECDSA P-256", reason=CsrReason.UNSUPPORTED_KEY)
    try:
        names = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        raise CsrRejected(
            "the CSR asks for no identity (no subjectAltName)", reason=CsrReason.MISSING_IDENTITY
        ) from None
    except (ValueError, x509.DuplicateExtension):
        raise CsrRejected(
            "the CSR's extensions cannot be parsed", reason=CsrReason.MALFORMED
        ) from None
    uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    if not uris:
        raise CsrRejected("the CSR asks for no URI SAN", reason=CsrReason.MISSING_IDENTITY)
    if len(names) != 1:
        raise CsrRejected(
            f"the CSR asks for {len(names)} names; a workload certificate has exactly one URI SAN",
            reason=CsrReason.UNEXPECTED_NAMES,
        )
    if uris[0] != identity.uri:
        raise CsrRejected(
            f"the CSR asks for {uris[0]!r} but the caller is authorized for {identity.uri!r}",
            reason=CsrReason.IDENTITY_MISMATCH,
        )
    return key
