"""Trust bundles: what they may hold, adding and removing roots, verifying chains."""

from __future__ import annotations

import datetime as dt

import pytest
from identity_support import make_pki, self_signed_without_san

from lepton_mesh.identity.bundle import TrustBundle, describe, load_certificates
from lepton_mesh.identity.csr import build_csr, generate_key
from lepton_mesh.identity.errors import BundleError, InvalidSpiffeId
from lepton_mesh.identity.spiffe import SpiffeId

CHAT = SpiffeId("cluster.local", "default", "chat")


def _chain(pki, sid: SpiffeId = CHAT, **kwargs) -> list:
    return load_certificates(pki.ca.issue(build_csr(generate_key(), sid), sid, **kwargs).chain_pem)


def test_bundle_holds_roots_only() -> None:
    pki = make_pki()
    with pytest.raises(BundleError):
        TrustBundle(())
    with pytest.raises(BundleError, match="roots only"):
        TrustBundle((pki.intermediate.cert,))  # a CA, but not self-signed
    with pytest.raises(BundleError, match="roots only"):
        TrustBundle((_chain(pki)[0],))  # a leaf
    with pytest.raises(BundleError, match="roots only"):
        TrustBundle((self_signed_without_san(),))  # self-signed, but not a CA
    with pytest.raises(BundleError, match="twice"):
        TrustBundle((pki.root.cert, pki.root.cert))


def test_pem_round_trip_and_errors() -> None:
    a, b = make_pki(), make_pki()
    both = a.bundle.with_root(b.root.cert)
    assert TrustBundle.from_pem(both.to_pem()) == both
    assert both.fingerprints()[0] == a.bundle.fingerprints()[0]
    with pytest.raises(BundleError):
        TrustBundle.from_pem(b"not pem")
    with pytest.raises(BundleError):
        TrustBundle.from_pem(b"")


def test_add_and_remove_roots() -> None:
    a, b = make_pki(), make_pki()
    both = a.bundle.with_root(b.root.cert)
    assert both.roots == (a.root.cert, b.root.cert)
    assert both.with_root(b.root.cert) is both  # idempotent
    assert both.without_root(a.root.cert).roots == (b.root.cert,)
    assert both.without_root(a.root.cert).without_root(a.root.cert).roots == (b.root.cert,)
    with pytest.raises(BundleError):
        a.bundle.without_root(a.root.cert)  # never empty


def test_two_roots_verify_leaves_from_both() -> None:
    old, new = make_pki(), make_pki()
    both = old.bundle.with_root(new.root.cert)
    assert both.verify(_chain(old)) == CHAT
    assert both.verify(_chain(new)) == CHAT
    with pytest.raises(BundleError):
        new.bundle.verify(_chain(old))


@pytest.mark.parametrize(
    "when",
    [
        {"now": dt.datetime.now(dt.UTC) - dt.timedelta(days=2), "lifetime": dt.timedelta(hours=1)},
        {"now": dt.datetime.now(dt.UTC) + dt.timedelta(days=1)},
    ],
    ids=["expired", "not-yet-valid"],
)
def test_verify_checks_validity(when: dict) -> None:
    pki = make_pki()
    with pytest.raises(BundleError):
        pki.bundle.verify(_chain(pki, **when))


def test_verify_needs_the_intermediate_and_a_leaf() -> None:
    pki = make_pki()
    with pytest.raises(BundleError):
        pki.bundle.verify(_chain(pki)[:1])  # leaf without its intermediate
    with pytest.raises(BundleError):
        pki.bundle.verify([])


def test_verify_of_a_chain_without_identity() -> None:
    # A verifying chain whose leaf has no mesh identity is not a workload.
    pki = make_pki()
    with pytest.raises((BundleError, InvalidSpiffeId)):
        pki.bundle.verify([pki.intermediate.cert])


def test_describe_rows() -> None:
    pki = make_pki()
    leaf = _chain(pki)[0]
    rows = dict(describe(leaf))
    assert rows["identity"] == CHAT.uri
    assert rows["CA"] == "no"
    assert rows["key"] == "ECDSA secp256r1"
    assert rows["valid"].endswith("left)")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    assert dict(describe(leaf, later))["valid"].endswith("(EXPIRED)")
