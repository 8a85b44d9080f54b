"""Trust bundles: the root certificates a workload accepts, one or several.

A bundle holds more than one root only during a root rotation (see
docs/security.md): old and new roots side by side, so leaves from either
verify while workloads are re-issued.

Invariants: a bundle is never empty; every member is a self-signed CA
certificate; no root appears twice (compared by SHA-256 fingerprint); order is
kept (old roots first), so the PEM written back is stable.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from lepton_mesh.identity.errors import BundleError
from lepton_mesh.identity.spiffe import SpiffeId, spiffe_id_of_certificate, uri_sans

# root -> intermediate -> leaf. A deeper chain is not one this CA made.
MAX_CHAIN_DEPTH = 2


def load_certificates(pem: bytes, *, what: str = "PEM data") -> list[x509.Certificate]:
    """Every certificate in a PEM blob, in order; BundleError if there is none."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise BundleError(f"{what}: no readable certificate ({exc})") from None
    return certs


def certificates_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """An ordered, non-empty set of root CA certificates."""

    roots: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.roots:
            raise BundleError("a trust bundle needs at least one root certificate")
        seen: set[str] = set()
        for cert in self.roots:
            if not is_ca(cert) or not _is_self_signed(cert):
                raise BundleError(
                    f"{cert.subject.rfc4514_string() or 'a certificate'} "
                    "is not a self-signed CA certificate; a bundle holds roots only"
                )
            fp = fingerprint(cert)
            if fp in seen:
                raise BundleError(f"root {fp[:16]}... appears twice in the bundle")
            seen.add(fp)

    @classmethod
    def from_pem(cls, pem: bytes, *, what: str = "trust bundle") -> TrustBundle:
        return cls(tuple(load_certificates(pem, what=what)))

    def to_pem(self) -> bytes:
        return certificates_pem(self.roots)

    def fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint(c) for c in self.roots)

    def contains(self, cert: x509.Certificate) -> bool:
        return fingerprint(cert) in self.fingerprints()

    def with_root(self, cert: x509.Certificate) -> TrustBundle:
        """This bundle plus `cert` at the end (unchanged if already present)."""
        return self if self.contains(cert) else TrustBundle((*self.roots, cert))

    def without_root(self, cert: x509.Certificate) -> TrustBundle:
        """This bundle minus `cert`; BundleError if that would leave it empty."""
        fp = fingerprint(cert)
        return TrustBundle(tuple(c for c in self.roots if fingerprint(c) != fp))

    def verify(
        self, chain: Sequence[x509.Certificate], *, now: dt.datetime | None = None
    ) -> SpiffeId:
        """Verify a workload chain (leaf first, then intermediates) against these
        roots as a TLS peer would, and return the leaf's identity.

        Uses cryptography's RFC 5280 path validation (client-certificate
        profile: the leaf must allow clientAuth, as every mesh leaf does).
        Raises BundleError if the chain does not verify, InvalidSpiffeId if the
        verified leaf carries no mesh identity.
        """
        if not chain:
            raise BundleError("an empty chain has no leaf to verify")
        builder = (
            verification.PolicyBuilder()
            .store(verification.Store(list(self.roots)))
            .max_chain_depth(MAX_CHAIN_DEPTH)
            .time(now or dt.datetime.now(dt.UTC))
        )
        try:
            builder.build_client_verifier().verify(chain[0], list(chain[1:]))
        except verification.VerificationError as exc:
            raise BundleError(f"the chain does not verify against the bundle: {exc}") from None
        return spiffe_id_of_certificate(chain[0])


def describe(cert: x509.Certificate, now: dt.datetime | None = None) -> list[tuple[str, str]]:
    """(label, value) rows about a certificate for people (`certs show`).
    Public fields only: there is no key material in a certificate."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ca = f"yes, path length {bc.path_length}" if bc.ca else "no"
    except x509.ExtensionNotFound:
        ca = "no"
    begin, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if begin > now:
        state = "NOT YET VALID"
    elif end < now:
        state = "EXPIRED"
    else:
        state = f"{str(end - now).split('.')[0]} left"
    key = cert.public_key()
    kind = f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else "not ECDSA"
    return [
        ("identity", ", ".join(uri_sans(cert)) or "-"),
        ("subject", cert.subject.rfc4514_string() or "-"),
        ("issuer", cert.issuer.rfc4514_string() or "-"),
        ("serial", f"{cert.serial_number:x}"),
        ("valid", f"{begin:%Y-%m-%d %H:%M:%SZ} to {end:%Y-%m-%d %H:%M:%SZ} ({state})"),
        ("CA", ca),
        ("key", kind),
        ("sha256", fingerprint(cert)),
    ]
