"""A 3-member etcd cluster whose leader is killed: writes come back, no event is lost."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from lepton_mesh.control.etcd_local import LocalEtcdCluster
from lepton_mesh.control.store import Compare, Event, Put, Store, StoreError, UnknownOutcome
from lepton_mesh.control.watch_cache import WatchCache
from tests.support.etcd import eventually

WRITES_BEFORE = 200
WRITES_AFTER = 200


@pytest.mark.timeout(60)
async def test_leader_killed_writes_resume_and_watch_loses_nothing(
    etcd_cluster: LocalEtcdCluster,
) -> None:
    store = await Store.connect(etcd_cluster.endpoints, timeout=5.0)
    watcher = await Store.connect(etcd_cluster.endpoints, timeout=5.0)
    try:
        start = await store.revision() + 1
        seen: list[Event] = []

        async def watch() -> None:
            async for batch in watcher.watch_prefix("/k/", start):
                seen.extend(batch)

        watch_task = asyncio.create_task(watch())
        cache = WatchCache(watcher, "/k/")
        cache_task = asyncio.create_task(cache.run())

        written: dict[str, int] = {}
        for i in range(WRITES_BEFORE):
            written[f"/k/{i:04d}"] = await store.put(f"/k/{i:04d}", b"%d" % i)

        killed_at = time.monotonic()
        await asyncio.to_thread(etcd_cluster.kill_leader)
        # The first write after the kill: put retries within its budget, so it
        # returns once a new leader serves (or raises after 5 s: the test fails).
        first = f"/k/{WRITES_BEFORE:04d}"
        written[first] = await store.put(first, b"after")
        outage = time.monotonic() - killed_at
        for i in range(WRITES_BEFORE + 1, WRITES_BEFORE + WRITES_AFTER):
            written[f"/k/{i:04d}"] = await store.put(f"/k/{i:04d}", b"%d" % i)
        last = max(written.values())

        await eventually(lambda: bool(seen) and seen[-1].revision >= last, timeout=10)
        await cache.wait_for_revision(last, timeout=10)
        revisions = [e.revision for e in seen]
        assert revisions == sorted(set(revisions)), "events out of order or repeated"
        assert set(written.values()) <= set(revisions), "a write's event was lost"
        assert set(cache.items) == set(written)
        assert cache.resyncs == 1  # resumed, never needed a full re-read
        assert outage < 5.0, f"writes back only after {outage:.1f} s"
        print(f"leader killed: first write answered after {outage:.2f} s")
        watch_task.cancel()
        cache_task.cancel()
        for task in (watch_task, cache_task):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await store.close()
        await watcher.close()


@pytest.mark.timeout(60)
async def test_txn_during_leader_kill_is_applied_once_or_reported_unknown(
    etcd_cluster: LocalEtcdCluster,
) -> None:
    """A CAS counter while the leader dies: every increment that returned success
    is in the final value; one that raised UnknownOutcome may or may not be; a
    failed compare or an unsent request added nothing."""
    store = await Store.connect(etcd_cluster.endpoints, timeout=2.0)
    try:
        key = "/cas/n"
        await store.put(key, b"0")
        confirmed = unknown = 0
        kill: asyncio.Future[object] | None = None
        for i in range(200):
            if i == 20:
                kill = asyncio.ensure_future(asyncio.to_thread(etcd_cluster.kill_leader))
            if kill is not None and kill.done() and i >= 60:
                break
            current = await _read(store, key)
            if current is None:
                continue
            value, mod = current
            try:
                result = await store.txn([Compare.mod(key, mod)], [Put(key, b"%d" % (value + 1))])
            except UnknownOutcome:
                unknown += 1
                continue
            except StoreError:
                continue  # never sent (no member reachable): nothing happened
            confirmed += result.succeeded
        assert kill is not None
        await kill
        final = await _read(store, key)
        assert final is not None
        assert confirmed <= final[0] <= confirmed + unknown
        print(f"CAS during leader kill: {confirmed} confirmed, {unknown} unknown, final {final[0]}")
    finally:
        await store.close()


async def _read(store: Store, key: str) -> tuple[int, int] | None:
    try:
        kv = await store.get(key)
    except StoreError:
        return None
    assert kv is not None
    return int(kv.value), kv.mod_revision


async def test_watch_from_now_resumes_from_where_it_started(
    etcd_cluster: LocalEtcdCluster,
) -> None:
    """start_revision 0 ('from now') is pinned at creation: a write made while the
    watcher's member was down is still delivered after it comes back."""
    leader = etcd_cluster.leader()
    member = next(m for m in etcd_cluster.members if m is not leader)
    others = [ep for m in etcd_cluster.members if m is not member for ep in m.endpoints]
    watcher = await Store.connect(member.endpoints, timeout=5.0)
    writer = await Store.connect(others, timeout=5.0)
    try:
        created = asyncio.Event()
        watch = watcher.watch_prefix("/now/", 0, on_created=created.set)
        first = asyncio.ensure_future(anext(watch))
        async with asyncio.timeout(5):
            await created.wait()
        member.kill()
        missed = await writer.put("/now/a", b"while down")
        await asyncio.to_thread(member.start)
        async with asyncio.timeout(10):
            batch = await first
        assert batch == [Event("put", "/now/a", b"while down", missed)]
        await watch.aclose()
    finally:
        await watcher.close()
        await writer.close()
