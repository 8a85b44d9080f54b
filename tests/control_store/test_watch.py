"""Store.watch_prefix against a real etcd: order, batching, resume, compaction."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.store import Compacted, Delete, Event, Put, Store, StoreUnavailable
from tests.support.etcd import EtcdTarget, eventually

BACKLOG = 3000


async def _write_each(store: Store, keys: list[str], value: bytes = b"") -> list[int]:
    """One put per key, each its own revision, 50 in flight at a time; their revisions.

    Keys are written in order (a chunk's puts may land in any order among themselves).
    """
    revisions: list[int] = []
    for i in range(0, len(keys), 50):
        chunk = keys[i : i + 50]
        revisions += await asyncio.gather(*(store.put(k, value or k.encode()) for k in chunk))
    return sorted(revisions)


async def _collect(
    store: Store,
    prefix: str,
    start: int,
    count: int,
    *,
    into: list[Event] | None = None,
    timeout: float | None = 30,
) -> list[Event]:
    """Watch until `count` events arrived (into `into`, so a caller sees progress)."""
    events: list[Event] = [] if into is None else into
    try:
        async with asyncio.timeout(timeout):
            async for batch in store.watch_prefix(prefix, start):
                events += batch
                if len(events) >= count:
                    return events
    except TimeoutError:
        raise AssertionError(_progress(events, count, start, timeout)) from None
    return events


def _progress(events: list[Event], count: int, start: int, within: float | None) -> str:
    last = events[-1].revision if events else None
    return f"{len(events)} of {count} events within {within} s (from revision {start}, last {last})"


async def test_batches_are_whole_revisions_in_order(etcd: EtcdTarget, etcd_store: Store) -> None:
    start = await etcd_store.revision() + 1
    # A 100-op transaction, single puts and a delete, interleaved.
    big = await etcd_store.txn([], [Put(etcd.key(f"big/{i:03d}"), b"x") for i in range(100)])
    single = await etcd_store.put(etcd.key("single"), b"y")
    mixed = await etcd_store.txn(
        [], [Delete(etcd.key("big/"), prefix=True), Put(etcd.key("after"), b"z")]
    )
    batches: list[list[Event]] = []
    async with asyncio.timeout(10):
        async for batch in etcd_store.watch_prefix(etcd.prefix, start):
            batches.append(batch)
            if len(batches) == 3:
                break
    assert [len(b) for b in batches] == [100, 1, 101]
    assert [{e.revision for e in b} for b in batches] == [
        {big.revision},
        {single},
        {mixed.revision},
    ]
    assert batches[1] == [Event("put", etcd.key("single"), b"y", single)]
    assert {e.kind for e in batches[2]} == {"put", "delete"}
    assert all(e.value is None for e in batches[2] if e.kind == "delete")


async def test_watch_from_compacted_revision_raises_promptly(
    etcd: EtcdTarget, etcd_store: Store
) -> None:
    first = await etcd_store.put(etcd.key("a"), b"1")
    last = await etcd_store.put(etcd.key("a"), b"2")
    await etcd_store.compact(last)
    await etcd_store.compact(last)  # again: a no-op, not an error
    started = time.monotonic()
    with pytest.raises(Compacted) as info:
        async with asyncio.timeout(10):
            async for _ in etcd_store.watch_prefix(etcd.prefix, first):
                pass
    assert info.value.compact_revision == last
    assert time.monotonic() - started < 2
    # From the compaction point itself the watch works.
    events = await _collect(etcd_store, etcd.prefix, last, 1)
    assert events == [Event("put", etcd.key("a"), b"2", last)]


async def test_backlog_replay_survives_restart_mid_replay(
    etcd_private: LocalEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    """3,000 events already written; etcd restarts while the watch replays them.

    Values of 1 KiB make the backlog (3 MiB) far larger than gRPC's receive
    window, so most of it is still in etcd when the stream breaks: the watch must
    resume mid-backlog (checked in the log) and still deliver every event once.
    """
    caplog.set_level(logging.INFO, logger="lepton_mesh.control.store")
    store = await Store.connect(etcd_private.endpoints, timeout=5.0)
    try:
        start = await store.revision() + 1
        keys = [f"/b/{i:05d}" for i in range(BACKLOG)]
        written = await _write_each(store, keys, value=b"v" * 1024)
        events: list[Event] = []
        restarted = False
        async with asyncio.timeout(40):
            async for batch in store.watch_prefix("/b/", start):
                events += batch
                if not restarted and len(events) >= 500:
                    # The generator is suspended here: etcd goes away under a
                    # half-replayed backlog.
                    await asyncio.to_thread(etcd_private.restart)
                    restarted = True
                if len(events) >= BACKLOG:
                    break
        assert [e.revision for e in events] == written
        assert sorted(e.key for e in events) == keys  # each exactly once
        resumes = [r.args[-1] for r in caplog.records if "resuming at" in r.getMessage()]
        assert resumes, "the watch never reconnected"
        assert written[0] < resumes[0] <= written[-1], "the restart did not hit the replay"
    finally:
        await store.close()


async def test_live_watch_survives_restarts_while_writing(etcd_private: LocalEtcd) -> None:
    """Events written before, between and after two restarts all arrive, in order."""
    writer = await Store.connect(etcd_private.endpoints, timeout=5.0)
    watcher = await Store.connect(etcd_private.endpoints, timeout=5.0)
    try:
        start = await writer.revision() + 1
        total = 1500
        events: list[Event] = []
        # No deadline while etcd restarts (a loaded CI machine may take its
        # time; the test's own timeout bounds that): the watch must deliver
        # everything within 30 s of the last write.
        collector = asyncio.create_task(
            _collect(watcher, "/live/", start, total, into=events, timeout=None)
        )
        written = await _write_each(writer, [f"/live/a{i:04d}" for i in range(500)])
        await asyncio.to_thread(etcd_private.restart)
        written += await _write_each(writer, [f"/live/b{i:04d}" for i in range(500)])
        # A crash of etcd, not of its durability: etcd 3.5.1 may lose the last
        # acknowledged writes to a SIGKILL (see LocalEtcd.kill).
        etcd_private.kill(commit_first=True)
        await asyncio.to_thread(etcd_private.start)
        written += await _write_each(writer, [f"/live/c{i:04d}" for i in range(500)])
        try:
            await asyncio.wait_for(collector, 30)
        except TimeoutError:
            raise AssertionError(_progress(events, total, start, 30)) from None
        assert [e.revision for e in events] == written
        assert len({e.key for e in events}) == total
    finally:
        await writer.close()
        await watcher.close()


async def test_watch_gives_up_after_retry_window(etcd_private: LocalEtcd) -> None:
    store = await Store.connect(etcd_private.endpoints, timeout=1.0)
    try:
        start = await store.put("/w/a", b"1")
        seen: list[Event] = []
        created = asyncio.Event()

        async def watch() -> None:
            async for batch in store.watch_prefix("/w/", start, on_created=created.set):
                seen.extend(batch)

        task = asyncio.create_task(watch())
        await eventually(lambda: created.is_set() and len(seen) == 1)
        etcd_private.kill()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(10):
                await task
        assert time.monotonic() - started < 5
        assert [e.revision for e in seen] == [start]
    finally:
        await store.close()
