"""Real etcd for tests: fixtures any tests/ folder can use.

Use them from a folder's conftest.py (pytest finds fixtures by name in the
conftest's namespace, so import every fixture you use *and* those it needs;
the star import does that):

    from tests.support.etcd import *  # noqa: F403  (etcd, etcd_server, etcd_private, etcd_cluster, etcd_store)

`tests` is importable because pytest runs as `python -m pytest` from the repo
root (the Makefile, CI and the docs all do), which puts the root on sys.path.

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

All members run with `fast=True` (short raft timers, no fsync: see
lepton_mesh/control/etcd_local.py for why that is safe here).
`eventually(cond, timeout)` waits for a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import atexit
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

from lepton_mesh.control.etcd_local import LocalEtcd, LocalEtcdCluster, cluster
from lepton_mesh.control.store import Store

__all__ = [
    "EtcdTarget",
    "etcd",
    "etcd_cluster",
    "etcd_private",
    "etcd_server",
    "etcd_store",
    "eventually",
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
    server = LocalEtcd(fast=True).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd_cluster() -> Iterator[LocalEtcdCluster]:
    group = cluster(3, fast=True)
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
