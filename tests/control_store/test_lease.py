"""Leases against a real etcd: expiry, keep-alive, loss while etcd is down, revoke."""

from __future__ import annotations

import asyncio
import time

from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.store import Store
from tests.support.etcd import EtcdTarget, eventually


async def test_lease_expires_and_on_lost_fires(etcd: EtcdTarget, etcd_store: Store) -> None:
    lease = await etcd_store.grant_lease(1)
    await etcd_store.put(etcd.key("inst"), b"x", lease=lease.id)
    lost = asyncio.Event()
    lease.on_lost(lost.set)
    started = time.monotonic()
    async with asyncio.timeout(5):
        await lost.wait()
    assert not lease.alive
    assert 0.5 < time.monotonic() - started < 2.5
    # etcd dropped the key with the lease (its expiry check runs every 500 ms).
    await eventually(lambda: _absent(etcd_store, etcd.key("inst")), timeout=5)
    called: list[bool] = []
    lease.on_lost(lambda: called.append(True))  # registered after the loss: runs at once
    assert called == [True]


async def _absent(store: Store, key: str) -> bool:
    return await store.get(key) is None


async def test_keep_alive_keeps_the_lease_past_its_ttl(etcd: EtcdTarget, etcd_store: Store) -> None:
    lease = await etcd_store.grant_lease(1)
    lease.keep_alive()
    lost: list[bool] = []
    lease.on_lost(lambda: lost.append(True))
    await etcd_store.put(etcd.key("inst"), b"x", lease=lease.id)
    started = time.monotonic()
    # Three TTLs: the key must stay the whole time.
    while time.monotonic() - started < 3.0:
        assert await etcd_store.get(etcd.key("inst")) is not None
        await asyncio.sleep(0.2)  # sampling over a fixed period is the point of this test
    assert lease.alive and not lost
    assert await etcd_store.lease_ttl(lease.id) >= 0  # whole seconds left (TTL 1: often 0)
    await lease.revoke()
    assert not lease.alive and not lost  # revoke is not a loss
    assert await etcd_store.get(etcd.key("inst")) is None
    assert await etcd_store.lease_ttl(lease.id) == -1


async def test_many_leases_share_one_keepalive_stream(etcd: EtcdTarget, etcd_store: Store) -> None:
    leases = await asyncio.gather(*(etcd_store.grant_lease(1) for _ in range(200)))
    for lease in leases:
        lease.keep_alive()
    await asyncio.sleep(2.0)  # time passing is the test: two TTLs, each lease refreshed
    assert all(lease.alive for lease in leases)
    ttls = await asyncio.gather(*(etcd_store.lease_ttl(lease.id) for lease in leases))
    assert min(ttls) >= 0
    await asyncio.gather(*(lease.revoke() for lease in leases))


async def test_lease_survives_a_short_restart_and_is_lost_in_a_long_outage(
    etcd_private: LocalEtcd,
) -> None:
    store = await Store.connect(etcd_private.endpoints, timeout=1.0)
    try:
        lease = await store.grant_lease(3)
        lease.keep_alive()
        lost = asyncio.Event()
        lease.on_lost(lost.set)
        await store.put("/l/inst", b"x", lease=lease.id)
        # A restart shorter than the TTL: etcd keeps the lease, keep-alive resumes.
        await asyncio.to_thread(etcd_private.restart)
        await eventually(lambda: lease.expires_in > 2.5, timeout=5, what="a refresh after restart")
        assert lease.alive and await store.get("/l/inst") is not None
        # An outage longer than the TTL: the lease must be given up on time, even
        # though etcd cannot say so.
        etcd_private.kill()
        killed = time.monotonic()
        async with asyncio.timeout(6):
            await lost.wait()
        assert time.monotonic() - killed < 3.5
        assert not lease.alive
    finally:
        await store.close()
