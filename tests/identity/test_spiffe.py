"""SPIFFE IDs: the accepted shape, everything refused, and reading IDs out of
certificates in each form they arrive in."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from identity_support import make_ca, self_signed_without_san

from lepton_mesh.identity.csr import build_csr, generate_key
from lepton_mesh.identity.errors import InvalidSpiffeId
from lepton_mesh.identity.spiffe import (
    SpiffeId,
    spiffe_id_of_certificate,
    spiffe_id_of_der,
    spiffe_id_of_peercert,
    trust_domain_id,
    uri_sans,
)


@pytest.mark.parametrize(
    ("uri", "parts"),
    [
        ("spiffe://cluster.local/ns/default/svc/chat", ("cluster.local", "default", "chat")),
        ("spiffe://example.org/ns/prod-1/svc/a", ("example.org", "prod-1", "a")),
        ("spiffe://td_x-1/ns/0/svc/intent-v2", ("td_x-1", "0", "intent-v2")),
        (f"spiffe://td/ns/{'n' * 63}/svc/s", ("td", "n" * 63, "s")),
    ],
)
def test_parse_valid(uri: str, parts: tuple[str, str, str]) -> None:
    sid = SpiffeId.parse(uri)
    assert (sid.trust_domain, sid.namespace, sid.service) == parts
    assert str(sid) == sid.uri == uri
    assert SpiffeId(*parts) == sid


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "spiffe://",
        "spiffe://cluster.local",
        "spiffe://cluster.local/",
        "spiffe://cluster.local/ns/default",
        "spiffe://cluster.local/ns/default/svc/",
        "spiffe://cluster.local/ns//svc/chat",
        "spiffe://cluster.local/ns/default/svc/chat/",
        "spiffe://cluster.local/ns/default/svc/chat/extra",
        "spiffe://cluster.local/ns/default/svc/chat?x=1",
        "spiffe://cluster.local/ns/default/svc/chat#f",
        "spiffe://cluster.local:8443/ns/default/svc/chat",
        "spiffe://user@cluster.local/ns/default/svc/chat",
        "spiffe://Cluster.local/ns/default/svc/chat",
        "SPIFFE://cluster.local/ns/default/svc/chat",
        "spiffe://cluster.local/ns/Default/svc/chat",
        "spiffe://cluster.local/ns/default/svc/ch%61t",
        "spiffe://cluster.local/ns/default/svc/-chat",
        "spiffe://cluster.local/ns/default/svc/chat-",
        "spiffe://cluster.local/ns/default/svc/ch.at",
        f"spiffe://cluster.local/ns/default/svc/{'s' * 64}",
        "spiffe://.cluster.local/ns/default/svc/chat",
        "spiffe:///ns/default/svc/chat",
        "https://cluster.local/ns/default/svc/chat",
        "spiffe://cluster.local/svc/chat/ns/default",
    ],
)
def test_parse_invalid(uri: str) -> None:
    with pytest.raises(InvalidSpiffeId) as err:
        SpiffeId.parse(uri)
    assert err.value.reason == "invalid_spiffe_id"


@pytest.mark.parametrize(
    "parts",
    [
        ("", "ns", "svc"),
        ("td", "", "svc"),
        ("td", "ns", ""),
        ("TD", "ns", "svc"),
        ("td", "a/b", "c"),
    ],
)
def test_construct_invalid(parts: tuple[str, str, str]) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId(*parts)


def test_trust_domain_id() -> None:
    assert trust_domain_id("cluster.local") == "spiffe://cluster.local"
    with pytest.raises(InvalidSpiffeId):
        trust_domain_id("bad/domain")


def test_identity_from_certificate_der_and_peercert_dict() -> None:
    ca = make_ca()
    sid = SpiffeId("cluster.local", "default", "chat")
    issued = ca.issue(build_csr(generate_key(), sid), sid)
    cert = issued.certificate
    assert uri_sans(cert) == [sid.uri]
    assert spiffe_id_of_certificate(cert) == sid
    assert spiffe_id_of_der(cert.public_bytes(serialization.Encoding.DER)) == sid
    # The shape ssl's getpeercert() returns.
    peercert = {"subject": (), "subjectAltName": (("URI", sid.uri),)}
    assert spiffe_id_of_peercert(peercert) == sid


@pytest.mark.parametrize(
    "peercert",
    [
        None,
        {},  # what ssl returns for an unverified certificate
        {"subjectAltName": ()},
        {"subjectAltName": (("DNS", "chat.default.svc"),)},
        {"subjectAltName": (("URI", "spiffe://td/ns/a/svc/b"), ("URI", "spiffe://td/ns/a/svc/c"))},
        {"subjectAltName": (("URI", "https://chat"),)},
    ],
)
def test_no_identity_in_peercert(peercert: dict | None) -> None:
    with pytest.raises(InvalidSpiffeId):
        spiffe_id_of_peercert(peercert)


def test_no_identity_in_garbage_der_or_ca_cert() -> None:
    with pytest.raises(InvalidSpiffeId):
        spiffe_id_of_der(b"\x30\x03garbage")
    ca = make_ca()
    # A CA certificate names only its trust domain: no workload identity.
    with pytest.raises(InvalidSpiffeId):
        spiffe_id_of_certificate(ca.certificate)
    assert uri_sans(ca.certificate) == ["spiffe://cluster.local"]


def test_uri_sans_of_a_certificate_without_san() -> None:
    assert uri_sans(self_signed_without_san()) == []
    with pytest.raises(InvalidSpiffeId):
        spiffe_id_of_certificate(self_signed_without_san())
