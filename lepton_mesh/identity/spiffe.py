"""SPIFFE IDs of mesh workloads: `spiffe://<trust-domain>/ns/<namespace>/svc/<service>`.

Build, parse and validate them, and read them out of certificates in the three
shapes they come in: a `cryptography` certificate, DER bytes
(`SSLObject.getpeercert(binary_form=True)`) and the dict `ssl` decodes
(`SSLObject.getpeercert()`).

Invariants:
- A mesh identity has exactly this path shape; anything else (a query, a
  fragment, a port, percent-encoding, extra segments, upper case) is refused,
  so two different strings never name the same workload.
- Namespace and service are DNS labels, the same rule the policy loader
  applies to names (policy.fields), so every configured service has an identity.
- A workload certificate carries exactly one URI SAN (the SPIFFE X509-SVID
  rule); a certificate with zero or several has no identity.
- `cryptography` (~16 MB of RSS) is imported only by the two functions that
  read a parsed or DER certificate: IDs, and reading them out of the dict
  `ssl` decodes, cost a sidecar without mTLS nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lepton_mesh.identity.errors import InvalidSpiffeId

if TYPE_CHECKING:
    from cryptography import x509

SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"

# SPIFFE spec: a trust domain is lowercase letters, digits, '.', '-' and '_'.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]{1,255}")
# The policy loader's name rule (policy.fields._NAME_RE), repeated here
# because this package imports only the standard library and cryptography.
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_ID_RE = re.compile(r"spiffe://([^/]*)/ns/([^/]*)/svc/([^/]*)")


def validate_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain) or trust_domain.strip(".") != trust_domain:
        raise InvalidSpiffeId(
            f"invalid trust domain {trust_domain!r}: use lowercase letters, digits, "
            "'.', '-' and '_', at most 255 characters, not starting or ending with '.'"
        )
    return trust_domain


def _validate_name(kind: str, name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise InvalidSpiffeId(
            f"invalid {kind} {name!r}: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )


def trust_domain_id(trust_domain: str) -> str:
    """The trust domain's own SPIFFE ID (`spiffe://td`), carried by the CA certificates."""
    return SCHEME + validate_trust_domain(trust_domain)


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated workload identity. `str(sid)` and `sid.uri` give the URI."""

    trust_domain: str
    namespace: str
    service: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _validate_name("namespace", self.namespace)
        _validate_name("service", self.service)

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/svc/{self.service}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """`spiffe://td/ns/NS/svc/SVC` -> SpiffeId; InvalidSpiffeId for anything else."""
        m = _ID_RE.fullmatch(uri) if isinstance(uri, str) else None
        if m is None:
            raise InvalidSpiffeId(
                f"{uri!r} is not a mesh SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/svc/<service>)"
            )
        return cls(*m.groups())


def as_spiffe_id(value: SpiffeId | str) -> SpiffeId:
    return value if isinstance(value, SpiffeId) else SpiffeId.parse(value)


def _single(uris: list[str], what: str) -> SpiffeId:
    if len(uris) != 1:
        raise InvalidSpiffeId(f"{what} has {len(uris)} URI SANs; a workload certificate has one")
    return SpiffeId.parse(uris[0])


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI in the certificate's subjectAltName (empty if it has none)."""
    from cryptography import x509  # the caller holds a certificate: already loaded

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_id_of_certificate(cert: x509.Certificate) -> SpiffeId:
    """The workload identity of a parsed certificate; InvalidSpiffeId if it has none."""
    return _single(uri_sans(cert), "the certificate")


def spiffe_id_of_der(der: bytes) -> SpiffeId:
    """The identity in a DER certificate (`getpeercert(binary_form=True)`)."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise InvalidSpiffeId(f"the peer certificate cannot be parsed: {exc}") from None
    return spiffe_id_of_certificate(cert)


def spiffe_id_of_peercert(peercert: Mapping[str, Any] | None) -> SpiffeId:
    """The identity in the dict `getpeercert()` returns (verified certificates only:
    `ssl` returns an empty dict for a certificate it did not verify)."""
    if not peercert:
        raise InvalidSpiffeId("no verified peer certificate")
    uris = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]
    return _single(uris, "the peer certificate")
