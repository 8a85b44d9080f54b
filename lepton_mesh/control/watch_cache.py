"""A consistent in-memory mirror of one etcd prefix.

Full read, then a watch from that read's revision + 1. The watch resumes by
itself across reconnects (Store.watch_prefix); when it cannot (its resume point
was compacted) the cache re-reads everything and watches from the new read's
revision. While etcd is unreachable the cache keeps what it has (`healthy` is
False) and resumes from `revision + 1` when etcd is back, so a change made
meanwhile is never missed. When etcd comes back *behind* `revision` (restored
from a backup, or it lost acknowledged writes), new writes would reuse
revisions the cache has seen and be ignored: it re-reads everything and takes
etcd's revision, even though that is lower.

Invariants:
- `items` is always the whole prefix as of `revision`: a revision's events (one
  transaction) are applied together before anyone is told, and a full read is
  swapped in with one assignment. Subscribers never see a partial transaction.
- `revision` only grows (a re-read can only return a later revision), except
  after etcd itself went back (`Rewound`): then it is etcd's, at once.
- Subscribers are called synchronously after each applied revision, with that
  revision and its events, or with `None` after a full resync (recompute from
  `items`). A subscriber that raises is logged and does not stop the cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from lepton_mesh.control.store import (
    Compacted,
    Event,
    Rewound,
    Store,
    StoreError,
    StoreUnavailable,
)

__all__ = ["WatchCache"]

_log = logging.getLogger(__name__)

Subscriber = Callable[[int, list[Event] | None], None]

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0


class WatchCache:
    """A consistent in-memory mirror of one etcd prefix: full read, then watch;
    on compaction or a lost watch that cannot resume: full re-read. Subscribers are
    told after whole revisions only, never mid-transaction."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.items: dict[str, bytes] = {}
        self.revision = 0
        self.ready = asyncio.Event()
        self.healthy = False
        self.resyncs = 0  # full reads done (1 after the first); for tests and metrics
        self.rewinds = 0  # times etcd came back behind our revision
        self._subscribers: list[Subscriber] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def subscribe(self, callback: Subscriber) -> None:
        """`callback(revision, events)` after each revision; events None = full resync."""
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def get(self, key: str) -> bytes | None:
        return self.items.get(key)

    def with_prefix(self, prefix: str) -> dict[str, bytes]:
        """The items whose key starts with `prefix` (a sub-prefix of the cache's)."""
        return {k: v for k, v in self.items.items() if k.startswith(prefix)}

    async def wait_for_revision(self, revision: int, timeout: float | None = None) -> None:
        """Wait until the cache has applied `revision` (e.g. a write's own revision)."""
        if self.revision >= revision:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (revision, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await fut
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def run(self) -> None:
        """Mirror the prefix until cancelled or the store is closed. Never raises
        StoreError: retries with backoff."""
        backoff = _BACKOFF_MIN
        need_read = True
        rewound = False
        while not self.store.closed:
            try:
                if need_read:
                    await self._full_read(rewound=rewound)
                    need_read = rewound = False
                async for batch in self.store.watch_prefix(
                    self.prefix, self.revision + 1, on_created=self._on_watch_created
                ):
                    self._apply(batch)
                    backoff = _BACKOFF_MIN
            except Compacted as exc:
                # Our resume point is gone: only a full read can tell what changed.
                _log.info("cache %s: %s; full re-read", self.prefix, exc)
                need_read = True
                continue
            except Rewound as exc:
                # We may hold writes etcd no longer has, and its next writes reuse
                # revisions we have applied: start over from its state.
                _log.warning("cache %s: %s; full re-read", self.prefix, exc)
                self.rewinds += 1
                need_read = rewound = True
                continue
            except StoreUnavailable as exc:
                self._set_healthy(False)
                _log.warning(
                    "cache %s: etcd unavailable (%s); serving from cache", self.prefix, exc
                )
            except StoreError as exc:
                self._set_healthy(False)
                _log.error("cache %s: %s; retrying", self.prefix, exc)
            await asyncio.sleep(backoff)  # retry backoff (a timer, not a wait for state)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    # ---- internals -----------------------------------------------------------

    async def _full_read(self, *, rewound: bool = False) -> None:
        kvs, revision = await self.store.get_prefix(self.prefix)
        self.items = {kv.key: kv.value for kv in kvs}  # one swap: never half-read
        self.revision = revision if rewound else max(revision, self.revision)
        self.resyncs += 1
        self._set_healthy(True)
        self.ready.set()
        self._notify(self.revision, None)

    def _on_watch_created(self) -> None:
        self._set_healthy(True)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            _log.info("cache %s: healthy=%s at revision %d", self.prefix, healthy, self.revision)

    def _apply(self, events: list[Event]) -> None:
        revision = events[-1].revision
        if revision <= self.revision:
            return  # already in the items (a resume can overlap a full read)
        items = self.items
        for ev in events:
            if ev.kind == "put":
                assert ev.value is not None
                items[ev.key] = ev.value
            else:
                items.pop(ev.key, None)
        self.revision = revision
        self._notify(revision, events)

    def _notify(self, revision: int, events: list[Event] | None) -> None:
        for callback in list(self._subscribers):
            try:
                callback(revision, events)
            except Exception:
                _log.exception("cache %s: subscriber %r failed", self.prefix, callback)
        self._wake()

    def _wake(self) -> None:
        if not self._waiters:
            return
        still: list[tuple[int, asyncio.Future[None]]] = []
        for revision, fut in self._waiters:
            if revision <= self.revision:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((revision, fut))
        self._waiters = still
