"""Leader election among control replicas, and the singleton jobs the leader runs.

The leader is whoever created `/lepton/v1/election/leader`: a create-if-absent
transaction, the key bound to the replica's own lease. When the leader dies
its lease expires and the key goes with it; the other replicas see the delete
in their WatchCache and campaign again. A leader that loses its lease (it
could not refresh it in time, e.g. cut off from etcd) stops being leader at
once, before etcd may have given the key to someone else: at most one
replica believes it leads, except for the moment between etcd expiring the
lease and this replica's local expiry timer, which fires no later (Lease
assumes the worst from the send time of its last good refresh).

Singleton jobs run only while leading, each on its own period:
- policy history compaction (`PolicyStore.compact_history(depth)`);
- etcd MVCC compaction: keep `mvcc_retention` seconds of revisions, as
  etcd's periodic auto-compaction does, so the database does not grow
  forever while watchers that fall behind by less than that still resume
  (one that falls further re-reads: the WatchCache handles `Compacted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from lepton_mesh.control.store import Compare, Event, Lease, Put, Store, StoreError

if TYPE_CHECKING:
    from lepton_mesh.control.watch_cache import WatchCache

__all__ = ["LEADER_KEY", "Election", "Job", "leader_jobs"]

log = logging.getLogger(__name__)

LEADER_KEY = "/lepton/v1/election/leader"


@dataclass(frozen=True, slots=True)
class Job:
    """A singleton job: `run()` every `interval` seconds while leading (first run at once)."""

    name: str
    interval: float
    run: Callable[[], Awaitable[Any]]


class Election:
    def __init__(
        self,
        store: Store,
        cache: WatchCache,
        *,
        replica_id: str,
        lease_ttl: int = 10,
        jobs: tuple[Job, ...] = (),
    ) -> None:
        self._store = store
        self._cache = cache
        self.replica_id = replica_id
        self._lease_ttl = lease_ttl
        self._jobs = jobs
        self._lease: Lease | None = None
        self._wake = asyncio.Event()
        self._job_tasks: list[asyncio.Task[None]] = []
        self.is_leader = False
        self._resigned = False  # never campaign again (shutdown)
        self.terms = 0  # times this replica became leader
        cache.subscribe(self._on_cache_change)

    def leader(self) -> str | None:
        """The leading replica's id, as the cache sees it."""
        raw = self._cache.items.get(LEADER_KEY)
        if raw is None:
            return None
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            return str(orjson.loads(raw).get("replica"))
        return None

    async def run(self) -> None:
        """Campaign, lead, re-campaign, until cancelled (then stop jobs; see `resign`)."""
        try:
            while not self._resigned:
                self._wake.clear()
                try:
                    await self._step()
                except StoreError as e:
                    log.info("election: %s; retrying", e)
                # Woken by a change of the leader key or a lost lease; the timeout
                # re-checks in case a notification was missed during a resync.
                # (asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel.)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._lease_ttl):
                        await self._wake.wait()
        finally:
            self._stop_jobs()

    async def _step(self) -> None:
        lease = self._lease
        if lease is None or not lease.alive:
            self._lease = lease = await self._store.grant_lease(self._lease_ttl)
            lease.on_lost(self._lost)
            lease.keep_alive()
        if self.is_leader or self._resigned:
            return
        value = orjson.dumps({"replica": self.replica_id, "since": time.time()})
        result = await self._store.txn(
            [Compare.absent(LEADER_KEY)], [Put(LEADER_KEY, value, lease.id)]
        )
        if self._resigned:  # resigned while the campaign was in flight
            with contextlib.suppress(StoreError):
                await lease.revoke()
        elif result.succeeded:
            self._become_leader()
        else:
            # A key bound to our own lease is ours: a txn whose answer was lost.
            kv = await self._store.get(LEADER_KEY)
            if kv is not None and kv.lease == lease.id:
                self._become_leader()

    def _become_leader(self) -> None:
        log.info("replica %s is the leader", self.replica_id)
        self.is_leader = True
        self.terms += 1
        loop = asyncio.get_running_loop()
        self._job_tasks = [loop.create_task(self._run_job(job)) for job in self._jobs]

    def _lost(self) -> None:
        if self.is_leader:
            log.warning("replica %s lost its lease: no longer the leader", self.replica_id)
        self.is_leader = False
        self._stop_jobs()
        self._wake.set()

    def _stop_jobs(self) -> None:
        for task in self._job_tasks:
            task.cancel()
        self._job_tasks = []

    def _on_cache_change(self, revision: int, events: list[Event] | None) -> None:
        if events is None or any(e.key == LEADER_KEY for e in events):
            holder = self.leader()
            if self.is_leader and holder is not None and holder != self.replica_id:
                self._lost()  # someone else holds the key: our lease must have gone
            if holder is None:
                self._wake.set()

    async def _run_job(self, job: Job) -> None:
        while True:
            try:
                await job.run()
            except StoreError as e:
                log.info("leader job %s: %s", job.name, e)
            except Exception:
                log.exception("leader job %s failed", job.name)
            await asyncio.sleep(job.interval)  # the job's period (a timer)

    async def resign(self) -> None:
        """Stop leading and campaigning; another replica takes over now (shutdown)."""
        self._resigned = True
        self._wake.set()
        self._stop_jobs()
        self.is_leader = False
        lease, self._lease = self._lease, None
        if lease is not None:
            with contextlib.suppress(StoreError):
                await lease.revoke()


def leader_jobs(
    store: Store,
    cache: WatchCache,
    policies: Any,
    *,
    history_depth: int,
    history_interval: float = 60.0,
    mvcc_retention: float = 300.0,
) -> tuple[Job, ...]:
    """The leader's jobs: history compaction (if the policy store has it) and etcd's."""
    jobs: list[Job] = []
    compact_history = getattr(policies, "compact_history", None)
    if compact_history is not None:

        async def history() -> None:
            removed = await compact_history(history_depth)
            if removed:
                log.info("history compaction removed %d records", removed)

        jobs.append(Job("history-compaction", history_interval, history))

    seen: list[int] = []  # cache revisions at each tick, oldest first
    done = [0]  # the revision last compacted to

    async def mvcc() -> None:
        # A tick every retention/4: compact to the revision seen 4 ticks ago.
        seen.append(cache.revision)
        if len(seen) > 4:
            target = seen.pop(0)
            if target > done[0]:
                await store.compact(target)
                done[0] = target
                log.info("etcd compacted to revision %d", target)

    jobs.append(Job("mvcc-compaction", mvcc_retention / 4, mvcc))
    return tuple(jobs)
