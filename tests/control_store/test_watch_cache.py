"""WatchCache against a real etcd: whole transactions only, outages, restarts, compaction."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lepton_mesh.control.etcd_local import LocalEtcd, LocalEtcdCluster
from lepton_mesh.control.store import Delete, Event, Put, Store
from lepton_mesh.control.watch_cache import WatchCache
from tests.support.etcd import EtcdTarget, eventually


@contextlib.asynccontextmanager
async def running(cache: WatchCache) -> AsyncIterator[WatchCache]:
    task = asyncio.create_task(cache.run())
    try:
        async with asyncio.timeout(10):
            await cache.ready.wait()
        yield cache
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Recorder:
    """A subscriber that checks the cache is whole at every notification.

    Every transaction of these tests writes the keys a, b and c with one value:
    a notification that sees them differ saw half a transaction.
    """

    def __init__(self, cache: WatchCache, prefix: str) -> None:
        self.cache = cache
        self.prefix = prefix
        self.calls: list[tuple[int, list[Event] | None]] = []
        self.torn: list[int] = []
        cache.subscribe(self)

    def __call__(self, revision: int, events: list[Event] | None) -> None:
        assert revision == self.cache.revision
        if self.calls:
            assert revision > self.calls[-1][0]
        self.calls.append((revision, events))
        values = {self.cache.items.get(self.prefix + k) for k in "abc"}
        if len(values) > 1:
            self.torn.append(revision)

    @property
    def resyncs(self) -> int:
        return sum(1 for _, events in self.calls if events is None)


def _triple(prefix: str, n: int) -> list[Put]:
    return [Put(prefix + k, b"%d" % n) for k in "abc"]


async def test_mirrors_prefix_and_notifies_whole_revisions(
    etcd: EtcdTarget, etcd_store: Store
) -> None:
    await etcd_store.txn([], _triple(etcd.prefix, 0))
    cache = WatchCache(etcd_store, etcd.prefix)
    recorder = Recorder(cache, etcd.prefix)
    async with running(cache):
        assert cache.healthy
        assert recorder.calls == [(cache.revision, None)]  # the first full read
        last = 0
        for n in range(1, 51):
            last = (await etcd_store.txn([], _triple(etcd.prefix, n))).revision
        gone = await etcd_store.txn([], [Delete(etcd.prefix + "a")])
        await cache.wait_for_revision(gone.revision, timeout=5)
        assert last < gone.revision
    assert cache.items == {etcd.prefix + "b": b"50", etcd.prefix + "c": b"50"}
    assert recorder.torn == [gone.revision]  # only the deliberate delete leaves them unequal
    assert [len(ev) for _, ev in recorder.calls[1:]] == [3] * 50 + [1]


async def test_serves_from_cache_while_etcd_is_down_and_catches_up(
    etcd_private: LocalEtcd,
) -> None:
    store = await Store.connect(etcd_private.endpoints, timeout=1.0)
    writer = await Store.connect(etcd_private.endpoints, timeout=5.0)
    try:
        await writer.txn([], _triple("/c/", 1))
        cache = WatchCache(store, "/c/")
        recorder = Recorder(cache, "/c/")
        async with running(cache):
            before = dict(cache.items)
            etcd_private.kill(commit_first=True)  # etcd 3.5.1 may lose the txn otherwise
            await eventually(lambda: not cache.healthy, timeout=5, what="unhealthy")
            assert cache.items == before  # still serving what it had
            await asyncio.to_thread(etcd_private.start)
            done = await writer.txn([], _triple("/c/", 2))
            await cache.wait_for_revision(done.revision, timeout=10)
            await eventually(lambda: cache.healthy, timeout=5, what="healthy again")
            assert cache.items == {f"/c/{k}": b"2" for k in "abc"}
            # Resumed from its revision: no full re-read was needed.
            assert recorder.resyncs == 1 and not recorder.torn
    finally:
        await store.close()
        await writer.close()


async def test_etcd_restored_from_an_older_backup_is_read_again_not_ignored(
    etcd_private: LocalEtcd, tmp_path: Path
) -> None:
    """After a restore, etcd's next writes reuse revisions the cache has applied."""
    store = await Store.connect(etcd_private.endpoints, timeout=1.0)
    writer = await Store.connect(etcd_private.endpoints, timeout=5.0)
    try:
        await writer.put("/r/a", b"1")
        backup = tmp_path / "backup.db"
        etcd_private.etcdctl("snapshot", "save", str(backup))
        cache = WatchCache(store, "/r/")
        async with running(cache):
            for key in "bcd":
                last = await writer.put(f"/r/{key}", b"1")
            await cache.wait_for_revision(last, timeout=10)
            seen = cache.revision
            await asyncio.to_thread(etcd_private.restore, backup)
            again = await writer.put("/r/e", b"2")
            assert again <= seen  # a revision the cache already applied
            want = {"/r/a": b"1", "/r/e": b"2"}
            await eventually(lambda: cache.items == want, timeout=10, what="etcd's state")
            assert cache.revision == again and cache.rewinds == 1
            # It goes on from there: the next write is not ignored either.
            later = await writer.put("/r/f", b"3")
            await cache.wait_for_revision(later, timeout=10)
            assert cache.items == want | {"/r/f": b"3"}
    finally:
        await store.close()
        await writer.close()


async def test_never_notifies_half_a_transaction_across_restarts(
    etcd_private: LocalEtcd,
) -> None:
    store = await Store.connect(etcd_private.endpoints, timeout=5.0)
    writer = await Store.connect(etcd_private.endpoints, timeout=5.0)
    try:
        cache = WatchCache(store, "/t/")
        recorder = Recorder(cache, "/t/")
        async with running(cache):
            last = 0
            for n in range(300):
                if n in (100, 200):
                    await asyncio.to_thread(etcd_private.restart)
                last = (await writer.txn([], _triple("/t/", n))).revision
            await cache.wait_for_revision(last, timeout=10)
        assert not recorder.torn
        assert cache.items == {f"/t/{k}": b"299" for k in "abc"}
        assert cache.revision == last
    finally:
        await store.close()
        await writer.close()


@pytest.mark.timeout(60)
async def test_resyncs_after_its_resume_point_was_compacted(
    etcd_cluster: LocalEtcdCluster,
) -> None:
    """The cache's member is down while the others write, delete and compact."""
    leader = etcd_cluster.leader()
    member = next(m for m in etcd_cluster.members if m is not leader)  # no election needed
    others = [ep for m in etcd_cluster.members if m is not member for ep in m.endpoints]
    store = await Store.connect(member.endpoints, timeout=1.0)
    writer = await Store.connect(others, timeout=5.0)
    try:
        await writer.txn([], [*_triple("/r/", 1), Put("/r/old", b"x")])
        cache = WatchCache(store, "/r/")
        recorder = Recorder(cache, "/r/")
        async with running(cache):
            member.kill()
            for n in range(2, 20):
                await writer.txn([], _triple("/r/", n))
            last = (await writer.txn([], [Delete("/r/old"), *_triple("/r/", 20)])).revision
            await writer.compact(last)
            await asyncio.to_thread(member.start)
            await cache.wait_for_revision(last, timeout=15)
            await eventually(lambda: cache.healthy, timeout=5)
        assert cache.items == {f"/r/{k}": b"20" for k in "abc"}
        assert recorder.resyncs == 2  # first read + the re-read after Compacted
        assert cache.resyncs == 2
        assert not recorder.torn
    finally:
        await store.close()
        await writer.close()


async def test_run_returns_when_its_store_is_closed(etcd: EtcdTarget) -> None:
    store = await Store.connect(etcd.endpoints)
    cache = WatchCache(store, etcd.prefix)
    task = asyncio.create_task(cache.run())
    async with asyncio.timeout(5):
        await cache.ready.wait()
    await store.close()
    async with asyncio.timeout(5):
        await task
