"""Real etcd for tests: fixtures any tests/ folder can use.

Use them from a folder's conftest.py (pytest finds fixtures by name in the
conftest's namespace, so import every fixture you use *and* those it needs;
the star import does that):

    from tests.support.etcd import *  # noqa: F403  (etcd, etcd_server, etcd_private, etcd_cluster, etcd_store)

`tests` is importable because pytest runs as `python -m pytest` from the repo
root (the Makefile, CI and the docs all do), which puts the root on sys.path.
For a bare `pytest` too, insert the root first (tests/control_store/conftest.py
shows how), or set `pythonpath = ["."]` in pytest's config.

Fixtures:
- `etcd_server` (session): one etcd for the whole run, started on first use and
  killed at exit. Never restart or kill it: use `etcd_private` for that.
- `etcd` (function): an `EtcdTarget` on that shared server with a fresh key
  prefix per test (`target.prefix`, e.g. "/t/3f9a1c2b7d/"), so tests never see
  each other's keys. Its `endpoints` go to `Store.connect`.
- `etcd_private` (function): a `LocalEtcd` of the test's own, to stop, restart
  or kill (~0.5 s to start).
- `etcd_cluster` (function): a 3-member `LocalEtcdCluster` (~1.5 s to start);
  `.leader()`, `.kill_leader()`, `.members[i].kill()/.start()`.
- `etcd_store` (async, function): a `Store` connected to `etcd`, closed after.
- `etcd_tls` (function): a `LocalEtcd` of the test's own serving TLS with client
  certificates (`.tls` has the CA, and a client cert/key for `Store.connect`).

`make_tls(directory)` writes a throwaway CA, server and client certificates.

All members run with `fast=True` (short raft timers). The shared etcd and
`etcd_tls` also skip fsync; `etcd_private` and `etcd_cluster`, whose tests kill
members and then expect what was acknowledged before, keep it (without fsync a
killed etcd 3.5 can lose its last acknowledged writes: see
lepton_mesh/control/etcd_local.py).
`eventually(cond, timeout)` waits for a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import ipaddress
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lepton_mesh.control.etcd_local import EtcdTLS, LocalEtcd, LocalEtcdCluster, cluster
from lepton_mesh.control.store import Store

__all__ = [
    "EtcdTarget",
    "etcd",
    "etcd_cluster",
    "etcd_private",
    "etcd_server",
    "etcd_store",
    "etcd_tls",
    "eventually",
    "make_tls",
    "shared_etcd",
]

_shared: LocalEtcd | None = None


def shared_etcd() -> LocalEtcd:
    """The one etcd shared by the run (every folder's `etcd_server` is this one)."""
    global _shared
    if _shared is None or not _shared.running:
        if _shared is not None:
            _shared.close()
        _shared = LocalEtcd(fast=True).start()
        atexit.register(_shared.close)
    return _shared


@dataclass(frozen=True, slots=True)
class EtcdTarget:
    """Where a test may write: `endpoints` of a running etcd, keys under `prefix`."""

    endpoints: list[str]
    prefix: str
    server: LocalEtcd

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)


@pytest.fixture(scope="session")
def etcd_server() -> LocalEtcd:
    return shared_etcd()


@pytest.fixture
def etcd(etcd_server: LocalEtcd) -> EtcdTarget:
    return EtcdTarget(list(etcd_server.endpoints), f"/t/{uuid.uuid4().hex[:10]}/", etcd_server)


@pytest.fixture
def etcd_private() -> Iterator[LocalEtcd]:
    server = LocalEtcd(fast=True, fsync=True).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd_cluster() -> Iterator[LocalEtcdCluster]:
    group = cluster(3, fast=True, fsync=True)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture
async def etcd_store(etcd: EtcdTarget) -> AsyncIterator[Store]:
    store = await Store.connect(etcd.endpoints, timeout=5.0)
    try:
        yield store
    finally:
        await store.close()


async def eventually(
    cond: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Wait until `cond()` is true (it may be async), polling every 10 ms, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.01)  # polling interval of a condition with a deadline


@pytest.fixture
def etcd_tls(tmp_path: Path) -> Iterator[LocalEtcd]:
    server = LocalEtcd(tmp_path / "data", fast=True, tls=make_tls(tmp_path / "pki")).start()
    try:
        yield server
    finally:
        server.close()


def make_tls(directory: Path, *, client_cn: str = "lepton-control") -> EtcdTLS:
    """A CA, a server cert for 127.0.0.1/localhost and a client cert, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lepton test etcd CA")])
    # What OpenSSL's X509_STRICT asks for (Python 3.13's default contexts set it):
    # key usage and a subject key id on the CA, an authority key id on leaves.
    ca = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]):  # type: ignore[no-untyped-def]
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            _builder(name, ca_name, key)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(ca_key_id, critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(
        "127.0.0.1",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    client, client_key = leaf(client_cn, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    paths = {}
    for name, cert, key in (
        ("ca", ca, None),
        ("server", server, server_key),
        ("client", client, client_key),
    ):
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            paths[name + "_key"] = directory / f"{name}-key.pem"
            paths[name + "_key"].write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
    return EtcdTLS(
        ca_file=paths["ca"],
        cert_file=paths["server"],
        key_file=paths["server_key"],
        client_cert_file=paths["client"],
        client_key_file=paths["client_key"],
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
