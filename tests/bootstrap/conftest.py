"""Fixtures for workload identity bootstrap and rotation: a real etcd, a CA made
by `certs init`, a token key, control replicas serving TLS with that CA, and
sidecar-side control clients.

The replicas use the fixed `/lepton/v1/` layout, so this folder runs its own
etcd (one per module) and wipes that prefix before each test.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from bootstrap_support import Pki, Replicas, TlsPeer

from lepton_mesh.control.auth import TokenIssuer, init_key
from lepton_mesh.control.daemon import ControlDaemon, ControlOptions
from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.store import Store
from lepton_mesh.identity.store import init_ca

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def control_etcd() -> Iterator[LocalEtcd]:
    server = LocalEtcd(fast=True).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def store(control_etcd: LocalEtcd) -> AsyncIterator[Store]:
    if not control_etcd.running:
        control_etcd.start()
    s = await Store.connect(control_etcd.endpoints, timeout=3.0)
    await s.delete("/lepton/v1/", prefix=True)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A CA directory (`certs init`) and a token key, as an operator makes them."""
    ca = init_ca(tmp_path / "certs")
    key_path = tmp_path / "token.key"
    key = init_key(key_path)
    return Pki(ca, key_path, TokenIssuer(key), tmp_path)


@pytest.fixture
async def replicas(control_etcd: LocalEtcd, store: Store, pki: Pki) -> AsyncIterator[Replicas]:
    """`await replicas(**option overrides)` starts a replica with the CA; all stopped after."""
    started: list[ControlDaemon] = []

    async def start(**overrides: Any) -> ControlDaemon:
        opts: dict[str, Any] = {
            "etcd": tuple(control_etcd.endpoints),
            "listen": ("127.0.0.1", 0),
            "admin": None,
            "replica_id": f"replica-{next(_ids)}",
            "etcd_timeout": 2.0,
            "ca_dir": str(pki.ca.directory),
            "token_key": str(pki.token_key),
            "ca_reload_interval": 0.05,
        }
        daemon = ControlDaemon(ControlOptions(**(opts | overrides)))
        await daemon.start()
        started.append(daemon)
        assert daemon.ctx is not None
        await asyncio.wait_for(daemon.ctx.cache.ready.wait(), 10)
        return daemon

    yield start
    for daemon in started:
        await daemon.stop()


@pytest.fixture(autouse=True)
async def close_peers() -> AsyncIterator[None]:
    yield
    peers, TlsPeer.opened = TlsPeer.opened, []
    for peer in peers:
        await peer.close()
