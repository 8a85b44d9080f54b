"""The identity pieces without a network: renewal arithmetic, the CSR limiter,
the sidecar's certificate life cycle driven message by message, the control
daemon's flags, and authentication decisions."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from bootstrap_support import Pki, hello
from cryptography import x509

from lepton_mesh import meshproto as mp
from lepton_mesh.control.daemon import ControlDaemon, ControlOptions, OptionError
from lepton_mesh.control.identity_service import CsrLimiter, IdentityService, StreamRefused
from lepton_mesh.identity.bundle import fingerprint
from lepton_mesh.identity.ca import CertificateAuthority
from lepton_mesh.identity.csr import build_csr, generate_key
from lepton_mesh.identity.spiffe import SpiffeId
from lepton_mesh.identity.store import init_ca, rotate_activate, rotate_prepare
from lepton_mesh.proxy.mesh.identity_client import MIN_RENEW_DELAY, IdentityClient, renew_delay

CHAT = SpiffeId("cluster.local", "default", "chat")


@pytest.mark.parametrize(
    ("left", "rng", "expected"),
    [
        (6.0, 0.0, 4.0),  # two thirds of what is left
        (6.0, 1.0, 3.8),  # less up to 5 % jitter
        (86400.0, 0.5, 86400 * 2 / 3 * 0.975),
        (0.3, 0.0, MIN_RENEW_DELAY),  # nearly expired on arrival: no CSR loop
        (-5.0, 0.0, MIN_RENEW_DELAY),  # already expired (clock skew)
    ],
)
def test_renew_delay(left: float, rng: float, expected: float) -> None:
    assert renew_delay(1000.0, 1000.0 + left, rng=lambda: rng) == pytest.approx(expected)


def test_csr_limiter_allows_a_burst_per_window() -> None:
    limiter = CsrLimiter(burst=2, window=10.0)
    assert [limiter.allow(t) for t in (0.0, 1.0, 2.0, 9.9, 10.0, 11.0, 11.5)] == [
        True, True, False, False, True, True, False,
    ]  # fmt: skip


# --- the sidecar's life cycle, message by message ------------------------------------


class Wire:
    """The control stream as the identity client sees it: `send`, and a CA answering."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.sent: list[mp.Message] = []
        self.up = True

    def send(self, msg: mp.Message) -> bool:
        if self.up:
            self.sent.append(msg)
        return self.up

    def csrs(self) -> list[mp.Csr]:
        return [m for m in self.sent if isinstance(m, mp.Csr)]

    def answer(self, csr: mp.Csr | None = None, *, lifetime: float = 3600.0) -> mp.Certificate:
        csr = csr or self.csrs()[-1]
        issued = self.ca.issue(csr.csr_pem.encode(), CHAT, lifetime=dt.timedelta(seconds=lifetime))
        return mp.Certificate(
            issued.chain_pem.decode(),
            self.ca.bundle.to_pem().decode(),
            issued.not_after.timestamp(),
        )

    def trust(self) -> mp.Trust:
        return mp.Trust(self.ca.bundle.to_pem().decode(), fingerprint(self.ca.certificate))


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return init_ca(tmp_path / "certs").load_authority()


def client(installs: list[Any], refuse: bool = False) -> IdentityClient:
    def install(chain: bytes, key: bytes, bundle: bytes) -> None:
        if refuse:
            raise ValueError("the data plane refused it")
        installs.append((chain, key, bundle))

    return IdentityClient(CHAT, install, rng=lambda: 0.0, retry_delay=0.05)


async def test_one_csr_in_flight_resent_after_a_reconnect(ca: CertificateAuthority) -> None:
    installs: list[Any] = []
    ic, wire = client(installs), Wire(ca)
    ic.connected(wire.send)
    ic.on_trust(wire.trust())  # no certificate yet: the CSR already sent is enough
    assert len(wire.csrs()) == 1
    ic.disconnected()
    ic.connected(wire.send)  # the answer was lost with the stream: ask again, same key
    first, again = (x509.load_pem_x509_csr(c.csr_pem.encode()) for c in wire.csrs())
    assert first.public_key() == again.public_key()
    ic.on_certificate(wire.answer())
    assert ic.has_certificate and len(installs) == 1
    assert ic.renew_at is not None
    ic.close()


async def test_a_certificate_for_another_key_is_not_installed(ca: CertificateAuthority) -> None:
    installs: list[Any] = []
    ic, wire = client(installs), Wire(ca)
    ic.connected(wire.send)
    other = mp.Csr(build_csr(generate_key(), CHAT).decode())
    ic.on_certificate(wire.answer(other))
    assert installs == [] and not ic.has_certificate
    assert "not for the key of our CSR" in (ic.last_error or "")
    ic.close()


async def test_a_refused_install_keeps_nothing_and_asks_again(ca: CertificateAuthority) -> None:
    from tests.support.etcd import eventually

    ic, wire = client([], refuse=True), Wire(ca)
    ic.connected(wire.send)
    ic.on_certificate(wire.answer())
    assert not ic.has_certificate and "refused" in (ic.last_error or "")
    await eventually(lambda: len(wire.csrs()) == 2, 2, "a new CSR after retry_delay")
    ic.close()


async def test_the_same_trust_again_changes_nothing(ca: CertificateAuthority) -> None:
    ic, wire = client([]), Wire(ca)
    ic.connected(wire.send)
    ic.on_certificate(wire.answer())
    ic.on_trust(wire.trust())
    assert len(wire.csrs()) == 1
    ic.close()


async def test_trust_changes_re_issue_at_once_one_csr_at_a_time(tmp_path: Path) -> None:
    files = init_ca(tmp_path / "certs")
    installs: list[Any] = []
    ic, wire = client(installs), Wire(files.load_authority())
    ic.connected(wire.send)
    ic.on_certificate(wire.answer())

    rotate_prepare(files.directory)  # a second root in the bundle
    wire.ca = files.load_authority()
    ic.on_trust(wire.trust())
    ic.on_trust(wire.trust())  # told twice: still one CSR in flight
    assert len(wire.csrs()) == 2
    pending = wire.csrs()[-1]

    rotate_activate(files.directory)  # the issuer changes before the answer arrives
    answered_by_old = wire.answer(pending)
    wire.ca = files.load_authority()
    ic.on_trust(wire.trust())
    ic.on_certificate(answered_by_old)
    assert len(wire.csrs()) == 3  # installed, found stale at once, asked again
    ic.on_certificate(wire.answer())
    assert ic.issuer == fingerprint(wire.ca.certificate)
    assert len(installs) == 3
    assert installs[-1][2] == files.bundle.read_bytes()  # both roots
    ic.close()


# --- the control daemon's side ---------------------------------------------------------


def test_authentication_decisions(pki: Pki) -> None:
    from lepton_mesh.control.auth import TokenVerifier

    service = IdentityService(pki.ca.directory, verifier=TokenVerifier.from_key_file(pki.token_key))
    service.load()
    assert service.authenticate(hello("chat", pki.token("chat")), None) == CHAT
    peercert = {"subjectAltName": (("URI", CHAT.uri),)}
    assert service.authenticate(hello("chat", None), peercert) == CHAT  # the certificate is proof
    with pytest.raises(StreamRefused) as refused:
        service.authenticate(hello("intent", pki.token("intent")), peercert)
    assert refused.value.reason == "identity_mismatch"  # a certificate beats a token


async def test_a_ca_directory_that_does_not_load_is_an_option_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    daemon = ControlDaemon(ControlOptions(etcd=("127.0.0.1:1",), ca_dir=str(tmp_path / "empty")))
    with pytest.raises(OptionError, match=r"--ca-dir .*ca-cert.pem: cannot read"):
        await daemon.start()


def test_control_flags_for_the_ca() -> None:
    import argparse

    from lepton_mesh.control.daemon import add_control_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_control_arguments(parser)
    args = parser.parse_args(["--etcd", "e:2379", "--ca-dir", "certs", "--cert-lifetime", "12h"])
    opts = options_from_args(args)
    assert (opts.ca_dir, opts.cert_lifetime) == ("certs", 12 * 3600.0)
    with pytest.raises(OptionError, match="--cert-lifetime"):
        options_from_args(parser.parse_args(["--etcd", "e", "--cert-lifetime", "soon"]))
