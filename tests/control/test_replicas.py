"""Several control replicas on one etcd: shared registry, dead replicas, election."""

from __future__ import annotations

import asyncio
import contextlib
import time

from lepton_mesh.control.election import LEADER_KEY, Election, Job, leader_jobs
from lepton_mesh.control.store import Compacted, Store
from lepton_mesh.control.watch_cache import WatchCache
from tests.control.conftest import Peer, Replicas, endpoints, eventually, hello


async def test_a_peer_sees_instances_registered_through_another_replica(
    replicas: Replicas,
) -> None:
    one, two = await replicas(), await replicas()
    chat = await Peer.join(one.listen_port, hello("chat", deps=("intent",)))
    started = time.monotonic()
    await Peer.join(two.listen_port, hello("intent", port=15106))
    snap = await chat.next_snapshot(lambda s: bool(endpoints(s, "intent")))
    print(
        f"register on replica 2 -> snapshot on replica 1: {(time.monotonic() - started) * 1000:.1f} ms"
    )
    assert [ep["address"] for ep in endpoints(snap, "intent")] == ["127.0.0.1:15106"]
    # Versions are etcd revisions: comparable across replicas.
    assert one.ctx is not None and two.ctx is not None
    await eventually(lambda: len(one.ctx.registry.sidecars()) == 2)  # type: ignore[union-attr]
    assert {s["control"] for s in one.ctx.registry.sidecars()} == {
        one.options.replica_id,
        two.options.replica_id,
    }


async def test_a_dead_replicas_instances_vanish_after_the_lease_ttl(
    replicas: Replicas, store: Store
) -> None:
    ttl = 2
    one, two = await replicas(lease_ttl=ttl), await replicas(lease_ttl=ttl)
    chat = await Peer.join(one.listen_port, hello("chat", deps=("intent",)))
    intent = await Peer.join(two.listen_port, hello("intent", "intent-1"))
    await chat.next_snapshot(lambda s: bool(endpoints(s, "intent")))

    killed = time.monotonic()
    await two.kill()  # nothing revoked: as if the process died
    assert await intent.recv() is None  # its sidecar lost the stream
    kv = await store.get("/lepton/v1/instances/default/intent/intent-1")
    assert kv is not None, "a dead replica's instance stays until its lease expires"
    await chat.next_snapshot(lambda s: not endpoints(s, "intent"), timeout=ttl + 5)
    gone_after = time.monotonic() - killed
    print(f"replica killed -> instance gone from the caller's snapshot: {gone_after:.2f} s")
    assert gone_after <= ttl + 2.0


async def test_one_leader_and_another_takes_over_when_it_stops(
    replicas: Replicas, store: Store
) -> None:
    one, two = await replicas(lease_ttl=2), await replicas(lease_ttl=2)
    assert one.ctx is not None and two.ctx is not None
    e1, e2 = one.ctx.election, two.ctx.election
    await eventually(lambda: e1.is_leader or e2.is_leader, what="a leader")
    assert not (e1.is_leader and e2.is_leader)
    leader, other = (one, two) if e1.is_leader else (two, one)
    assert leader.ctx is not None and other.ctx is not None
    kv = await store.get(LEADER_KEY)
    assert kv is not None and kv.lease != 0
    await eventually(lambda: other.ctx.election.leader() == leader.options.replica_id)  # type: ignore[union-attr]

    await leader.stop()  # resigns: the other takes over without waiting for the TTL
    await eventually(lambda: other.ctx.election.is_leader, timeout=2.0, what="take-over")  # type: ignore[union-attr]


async def test_a_killed_leader_is_replaced_after_its_lease_expires(replicas: Replicas) -> None:
    one = await replicas(lease_ttl=2)
    assert one.ctx is not None
    await eventually(lambda: one.ctx.election.is_leader)  # type: ignore[union-attr]
    two = await replicas(lease_ttl=2)
    assert two.ctx is not None
    await one.kill()
    await eventually(lambda: two.ctx.election.is_leader, timeout=6.0, what="take-over")  # type: ignore[union-attr]


async def test_leader_jobs_run_only_on_the_leader(store: Store) -> None:
    cache = WatchCache(store, "/lepton/v1/")
    cache_task = asyncio.create_task(cache.run())
    calls: dict[str, int] = {"a": 0, "b": 0}

    def counting(name: str) -> Job:
        async def run() -> None:
            calls[name] += 1

        return Job(f"count-{name}", 0.05, run)

    a = Election(store, cache, replica_id="a", lease_ttl=2, jobs=(counting("a"),))
    b = Election(store, cache, replica_id="b", lease_ttl=2, jobs=(counting("b"),))
    tasks = [asyncio.create_task(a.run())]
    await eventually(lambda: a.is_leader and calls["a"] >= 2)
    tasks.append(asyncio.create_task(b.run()))
    await eventually(lambda: b.leader() == "a")
    assert not b.is_leader and calls["b"] == 0
    await a.resign()
    await eventually(lambda: b.is_leader and calls["b"] >= 1, what="b takes over")
    ran = calls["a"]
    await eventually(lambda: calls["b"] >= 3)
    assert calls["a"] == ran  # a's jobs stopped when it resigned
    for task in [*tasks, cache_task]:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await b.resign()


class _History:
    def __init__(self) -> None:
        self.depths: list[int] = []

    async def compact_history(self, depth: int) -> int:
        self.depths.append(depth)
        return 0


async def test_leader_jobs_compact_history_and_etcd(store: Store) -> None:
    cache = WatchCache(store, "/lepton/v1/")
    history = _History()
    jobs = leader_jobs(store, cache, history, history_depth=7, mvcc_retention=0.2)
    assert [j.name for j in jobs] == ["history-compaction", "mvcc-compaction"]
    await jobs[0].run()
    assert history.depths == [7]
    assert [j.name for j in leader_jobs(store, cache, object(), history_depth=7)] == [
        "mvcc-compaction"
    ]
    # etcd compaction lags `retention` behind: only the 5th tick compacts, to the 1st's revision.
    first = await store.put("/lepton/v1/meta/probe", b"1")
    cache.revision = first
    for _ in range(4):
        await jobs[1].run()
        cache.revision = await store.put("/lepton/v1/meta/probe", b"2")
    await jobs[1].run()
    try:
        async for _ in store.watch_prefix("/lepton/v1/meta/", first - 1):
            raise AssertionError("revisions before the compaction point are still there")
    except Compacted:
        pass
