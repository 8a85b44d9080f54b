"""The service registry: connected sidecars' instances and status, in etcd.

Each sidecar connected to this replica owns two keys (docs/control-plane.md):
`/lepton/v1/instances/<ns>/<svc>/<id>` and `/lepton/v1/sidecars/<node_id>`,
both bound to one etcd lease of its own that this replica keeps alive while
the sidecar's stream is up. Closing the stream revokes the lease, so a
sidecar killed with -9 (its kernel closes the TCP connection) disappears at
once; if this replica dies, the lease expires within its TTL and so do the
keys. A lease per sidecar (not one per replica) is what makes that hold even
when a revoke cannot reach etcd: its keep-alive stops either way.

Ownership: a sidecar that reconnects elsewhere (or here) while its old
stream still looks alive takes its keys over with a new lease. Every later
write of a registration is therefore a transaction conditioned on the
keys' mod revisions being the ones it last wrote; if not, it re-reads them:
a key bound to its own lease was its own write (a timed-out write that did
apply), an absent key is re-created (the lease was lost while etcd was
away), and a key bound to another lease means the sidecar lives elsewhere
now: the registration is superseded and its stream is closed, rather than
clobbering the new owner's keys and revoking them with its own lease.

Writes after the first go through one flusher task: health and draining
changes at once, acks and nacks within `flush_delay`, `last_seen` at most
every `seen_interval` (a mesh of sidecars pinging every 5 s must not turn
into a write per ping). Several registrations are written per transaction.
While etcd is away, changes stay pending and are retried with backoff.

The query side (`services`, `instances`, `sidecars`) reads the WatchCache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from lepton_mesh.control.snapshots import INSTANCES_PREFIX, MeshIndex
from lepton_mesh.control.store import (
    Compare,
    Lease,
    Put,
    Store,
    StoreError,
    StoreUnavailable,
    TxnResult,
)

if TYPE_CHECKING:
    from lepton_mesh.control.watch_cache import WatchCache

__all__ = ["SIDECARS_PREFIX", "NodeIdTaken", "Registration", "Registry"]

log = logging.getLogger(__name__)

SIDECARS_PREFIX = "/lepton/v1/sidecars/"
# etcd refuses transactions of more than 128 operations by default; a
# registration needs up to 2 compares and 2 puts.
_BATCH = 32
# A first registration reads who holds its node_id, then writes on condition
# that nobody wrote it since; this many tries when others keep writing it.
_CLAIM_TRIES = 3
# What a node_id's holder is: a registration of another of these is not the
# same sidecar reconnecting, and must not take the node_id over.
_HOLDER_FIELDS = ("service", "namespace", "identity")


class NodeIdTaken(Exception):
    """The node_id is registered by another service, namespace or identity.

    Not a store error: the hello is refused (the sidecar retries, and gets
    in once the holder's registration is gone)."""

    reason = "node_id_taken"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _holder(status: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(status.get(f) for f in _HOLDER_FIELDS)


def _other_holder(held: Any, status: Mapping[str, Any]) -> str | None:
    """Who else holds a node_id, as a message; None when `held` is ours (or unreadable)."""
    if not isinstance(held, Mapping) or _holder(held) == _holder(status):
        return None
    namespace, service, identity = held.get("namespace"), held.get("service"), held.get("identity")
    who = f"{namespace}/{service}" + (f" ({identity})" if identity else "")
    return f"node_id {status['node_id']!r} is registered by {who}: choose another node_id"


def _stored_holder(value: bytes, status: Mapping[str, Any]) -> str | None:
    """`_other_holder` of a status key's value in etcd (None if it is not JSON)."""
    try:
        held = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return _other_holder(held, status)


class Registration:
    """One connected sidecar's keys and what is pending to be written for it.

    Mutated only by the Registry (on the loop): the push server calls the
    Registry's methods and never writes these fields.
    """

    __slots__ = (
        # identity
        "instance_key",
        "node_id",
        "status_key",
        # values as they should be in etcd
        "instance",
        "status",
        # etcd bookkeeping
        "lease",
        "lease_lost",
        "revisions",
        # pending writes
        "instance_dirty",
        "status_dirty",
        "due",
        "seen_written",
        # lifecycle
        "closed",
        "on_superseded",
    )

    def __init__(self, node_id: str, instance: dict[str, Any], status: dict[str, Any]) -> None:
        self.node_id = node_id
        self.instance_key = (
            f"{INSTANCES_PREFIX}{instance['namespace']}/{instance['service']}/{instance['id']}"
        )
        self.status_key = f"{SIDECARS_PREFIX}{node_id}"
        self.instance = instance
        self.status = status
        self.lease: Lease | None = None
        self.lease_lost = False
        # key -> mod revision of our last write (0: we believe it absent)
        self.revisions: dict[str, int] = {self.instance_key: 0, self.status_key: 0}
        self.instance_dirty = False
        self.status_dirty = False
        self.due = 0.0  # monotonic time after which pending writes are made
        self.seen_written = 0.0  # monotonic time of the last status write
        self.closed = False
        self.on_superseded: Callable[[], None] | None = None

    @property
    def pending(self) -> bool:
        return self.instance_dirty or self.status_dirty or self.lease_lost

    def puts(self) -> list[Put]:
        assert self.lease is not None
        out = []
        if self.instance_dirty:
            out.append(Put(self.instance_key, orjson.dumps(self.instance), self.lease.id))
        if self.status_dirty:
            out.append(Put(self.status_key, orjson.dumps(self.status), self.lease.id))
        return out


class Registry:
    """Registers connected sidecars in etcd and answers the admin side's queries."""

    def __init__(
        self,
        store: Store,
        cache: WatchCache,
        *,
        replica_id: str,
        lease_ttl: int = 10,
        flush_delay: float = 0.2,
        seen_interval: float = 5.0,
    ) -> None:
        self._store = store
        self._cache = cache
        self.replica_id = replica_id
        self.lease_ttl = lease_ttl
        self._flush_delay = flush_delay
        self._seen_interval = seen_interval
        self._local: dict[str, Registration] = {}  # node_id -> its registration here
        self._wake = asyncio.Event()

    # --- the push server's side ---

    async def register(
        self,
        *,
        node_id: str,
        service: str,
        namespace: str,
        instance: Mapping[str, Any],
        applied_version: int = 0,
        identity: Mapping[str, Any] | None = None,
    ) -> Registration:
        """Write the sidecar's instance and status under a new lease kept alive from now on.

        `identity` (with a CA): `{"identity": spiffe uri, "certificate": {...} | None}`,
        merged into the status as is.

        Takes the keys over from any earlier registration of `node_id`. Raises
        `StoreError` (the sidecar will retry) and leaves nothing behind.
        """
        now = time.time()
        inst = {
            "id": str(instance.get("id") or node_id),
            "service": service,
            "namespace": namespace,
            "address": instance.get("address"),
            "ports": dict(instance.get("ports") or {}),
            "labels": dict(instance.get("labels") or {}),
            "weight": instance.get("weight", 1),
            "healthy": True,
            "draining": False,
            "node_id": node_id,
            "registered_at": now,
        }
        status = {
            "node_id": node_id,
            "service": service,
            "namespace": namespace,
            "control": self.replica_id,
            "applied_version": applied_version,
            "last_nack": None,
            "last_seen": now,
            "connected_at": now,
            **(identity or {}),
        }
        reg = Registration(node_id, inst, status)
        old = self._local.get(node_id)
        if old is not None and (taken := _other_holder(old.status, status)):
            raise NodeIdTaken(taken)
        lease = await self._store.grant_lease(self.lease_ttl)
        try:
            reg.lease = lease
            result = await self._claim(reg)
        except BaseException:
            await _revoke_quietly(lease)
            raise
        reg.revisions = dict.fromkeys(reg.revisions, result.revision)
        reg.instance_dirty = reg.status_dirty = False
        reg.seen_written = time.monotonic()
        lease.on_lost(lambda: self._lease_lost(reg))
        lease.keep_alive()
        old = self._local.get(node_id)
        self._local[node_id] = reg
        if old is not None:  # a reconnect raced the old stream's close: the old one is stale
            self._supersede(old)
        return reg

    async def _claim(self, reg: Registration) -> TxnResult:
        """Write a new registration's keys unless another holder has its node_id
        (on any replica: the status key in etcd says who). Raises `NodeIdTaken`."""
        for _ in range(_CLAIM_TRIES):
            kv = await self._store.get(reg.status_key)
            if kv is not None and (taken := _stored_holder(kv.value, reg.status)):
                raise NodeIdTaken(taken)
            reg.instance_dirty = reg.status_dirty = True
            compare = Compare.mod(reg.status_key, kv.mod_revision if kv is not None else 0)
            result = await self._store.txn([compare], reg.puts())
            if result.succeeded:
                return result
        raise StoreUnavailable(f"{reg.status_key} keeps changing: retry")

    async def deregister(self, reg: Registration) -> None:
        """The stream closed: revoke the lease now (its keys go with it)."""
        if reg.closed:
            return
        reg.closed = True
        if self._local.get(reg.node_id) is reg:
            del self._local[reg.node_id]
        if reg.lease is not None:
            await _revoke_quietly(reg.lease)

    def set_health(self, reg: Registration, healthy: bool) -> None:
        if reg.instance["healthy"] != healthy:
            reg.instance["healthy"] = healthy
            self._mark(reg, instance=True, delay=0.0)

    def set_draining(self, reg: Registration) -> None:
        if not reg.instance["draining"]:
            reg.instance["draining"] = True
            self._mark(reg, instance=True, delay=0.0)

    def record_ack(self, reg: Registration, version: int) -> None:
        reg.status["applied_version"] = version
        nack = reg.status.get("last_nack")
        if isinstance(nack, dict) and version >= int(nack.get("version") or 0):
            # A later snapshot applied: the rejection is over (else a sidecar that
            # NACKed once would count in sidecars_with_nack until it reconnects).
            reg.status["last_nack"] = None
        reg.status["last_seen"] = time.time()
        self._mark(reg, delay=self._flush_delay)

    def record_nack(self, reg: Registration, version: int, error: str) -> None:
        reg.status["last_nack"] = {"version": version, "error": error}
        reg.status["last_seen"] = time.time()
        self._mark(reg, delay=self._flush_delay)

    def record_certificate(self, reg: Registration, certificate: Mapping[str, Any]) -> None:
        """A certificate was issued to the sidecar: its serial, expiry, issuer, roots."""
        reg.status["certificate"] = dict(certificate)
        reg.status["last_seen"] = time.time()
        self._mark(reg, delay=self._flush_delay)

    def record_seen(self, reg: Registration) -> None:
        """Any frame from the sidecar: written with the next status write, or within
        `seen_interval` of the last one."""
        reg.status["last_seen"] = time.time()
        if not reg.status_dirty:
            wait = reg.seen_written + self._seen_interval - time.monotonic()
            self._mark(reg, delay=max(wait, 0.0))

    def local(self) -> list[Registration]:
        return list(self._local.values())

    def _mark(self, reg: Registration, *, instance: bool = False, delay: float) -> None:
        if reg.closed:
            return
        due = time.monotonic() + delay
        was_pending = reg.instance_dirty or reg.status_dirty
        if instance:
            reg.instance_dirty = True
        else:
            reg.status_dirty = True
        reg.due = min(reg.due, due) if was_pending else due
        self._wake.set()

    def _lease_lost(self, reg: Registration) -> None:
        if reg.closed:
            return
        log.warning("lease of %s lost: re-registering", reg.node_id)
        reg.lease_lost = True
        reg.due = 0.0
        self._wake.set()

    def _supersede(self, reg: Registration) -> None:
        log.info("%s registered again elsewhere: closing its old stream here", reg.node_id)
        reg.closed = True
        if self._local.get(reg.node_id) is reg:
            del self._local[reg.node_id]
        if reg.lease is not None:
            # Our lease no longer holds the keys (or soon will not): revoking it is harmless.
            lease = reg.lease
            asyncio.get_running_loop().create_task(_revoke_quietly(lease))
        if reg.on_superseded is not None:
            reg.on_superseded()

    # --- the flusher ---

    async def run(self) -> None:
        """Write pending changes until cancelled; back off while etcd is away."""
        backoff = 0.0
        while True:
            if backoff:
                await asyncio.sleep(backoff)
            due = self._due()
            if not due:
                self._wake.clear()
                await self._wait_for_work()
                continue
            try:
                await self._flush(due)
            except StoreError as e:
                log.warning("registry writes pending (%s): retrying", e)
                backoff = min(max(backoff * 2, 0.5), 5.0)
            else:
                backoff = 0.0

    def _due(self) -> list[Registration]:
        now = time.monotonic()
        return [r for r in self._local.values() if r.pending and (r.due <= now or r.lease_lost)]

    async def _wait_for_work(self) -> None:
        pending = [r.due for r in self._local.values() if r.pending]
        timeout = max(min(pending) - time.monotonic(), 0.0) if pending else None
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _flush(self, regs: list[Registration]) -> None:
        retired: list[Lease] = []
        for reg in [r for r in regs if r.lease_lost]:
            old = await self._renew_lease(reg)
            if old is not None:
                retired.append(old)
        regs = [r for r in regs if not r.closed and not r.lease_lost]
        for i in range(0, len(regs), _BATCH):
            batch = regs[i : i + _BATCH]
            if len(batch) > 1 and await self._write(batch):
                continue
            for reg in batch:  # one failed compare fails a whole batch: find whose
                if not reg.closed and not await self._write([reg]):
                    await self._recover(reg)
        # Only now, with the keys moved onto their new leases, may the old ones
        # go. etcd keeps leases across its own restarts, so an old lease can
        # still hold live keys: revoking it first deleted live instances for a
        # revision or two after every long etcd outage. (If the writes above
        # raised, the old leases simply expire on their TTL.)
        for old in retired:
            await _revoke_quietly(old)

    async def _renew_lease(self, reg: Registration) -> Lease | None:
        """Put `reg` on a new lease; returns the old one for the caller to revoke
        once the keys have moved (None when there was none or `reg` closed)."""
        lease = await self._store.grant_lease(self.lease_ttl)
        if reg.closed:
            await _revoke_quietly(lease)
            return None
        old, reg.lease = reg.lease, lease
        reg.lease_lost = False
        reg.instance_dirty = reg.status_dirty = True
        lease.on_lost(lambda: self._lease_lost(reg))
        lease.keep_alive()
        return old

    async def _write(self, regs: list[Registration]) -> bool:
        """One transaction for `regs`, conditioned on each key being as we last wrote it."""
        compares: list[Compare] = []
        puts: list[Put] = []
        written: list[tuple[Registration, list[str]]] = []
        for reg in regs:
            reg_puts = reg.puts()
            compares += [Compare.mod(p.key, reg.revisions[p.key]) for p in reg_puts]
            puts += reg_puts
            written.append((reg, [p.key for p in reg_puts]))
            reg.instance_dirty = reg.status_dirty = (
                False  # changes made during the await stay dirty
            )
        try:
            result = await self._store.txn(compares, puts)
        except BaseException:
            for reg, keys in written:
                reg.instance_dirty |= reg.instance_key in keys
                reg.status_dirty |= reg.status_key in keys
            raise
        now = time.monotonic()
        for reg, keys in written:
            if result.succeeded:
                reg.revisions.update(dict.fromkeys(keys, result.revision))
                if reg.status_key in keys:
                    reg.seen_written = now
            else:
                reg.instance_dirty |= reg.instance_key in keys
                reg.status_dirty |= reg.status_key in keys
        return result.succeeded

    async def _recover(self, reg: Registration) -> None:
        """A conditioned write failed: learn whose keys these are now."""
        assert reg.lease is not None
        for key in (reg.instance_key, reg.status_key):
            kv = await self._store.get(key)
            if kv is None:
                reg.revisions[key] = 0  # lost with an expired lease: re-create it
            elif kv.lease == reg.lease.id:
                reg.revisions[key] = kv.mod_revision  # our own write, its answer lost
            elif key == reg.status_key and _stored_holder(kv.value, reg.status) is not None:
                # Another service took this node_id (a replica without the
                # node_id check wrote it): not this sidecar registering again,
                # so this one keeps it. Its next write takes the key back.
                log.warning("%s: its status key was written by another holder; keeping it", key)
                reg.revisions[key] = kv.mod_revision
            else:
                self._supersede(reg)
                return
        reg.instance_dirty = reg.status_dirty = True
        reg.due = 0.0
        self._wake.set()

    def abandon(self) -> None:
        """The replica is going away: forget every registration without revoking.
        Their sidecars are alive and re-register on another replica, which takes
        the keys over; a lease nobody takes over expires within its TTL."""
        for reg in self._local.values():
            reg.closed = True
        self._local.clear()

    async def close(self) -> None:
        """Revoke every local registration's lease (shutdown)."""
        regs = list(self._local.values())
        await asyncio.gather(*(self.deregister(r) for r in regs))

    # --- queries (the admin API's side), from the cache ---

    def _index(self) -> MeshIndex:
        return MeshIndex.from_items(
            log_skipped=False,  # the push server's index logs them, once per write
            items={
                k: v
                for k, v in self._cache.items.items()
                if k.startswith(("/lepton/v1/instances/", "/lepton/v1/policies/ExternalService/"))
            },
        )

    def services(self) -> list[dict[str, Any]]:
        """Every service with registered instances or external endpoints, per namespace."""
        index = self._index()
        out = []
        for ns in index.namespaces():
            for name in sorted(index.service_names(ns)):
                eps = index.service_endpoints(ns, name)
                out.append(
                    {
                        "name": name,
                        "namespace": ns,
                        "instances": len(eps),
                        "healthy": sum(1 for ep in eps if ep["healthy"]),
                    }
                )
        return out

    def instances(self, service: str | None = None) -> list[dict[str, Any]]:
        """Registered instances (of `service`, in any namespace), as stored."""
        rows = self._index().instances()
        return [r for r in rows if service is None or r.get("service") == service]

    def sidecars(self) -> list[dict[str, Any]]:
        """The status of every connected sidecar, on any replica, by node id."""
        out = []
        for key in sorted(k for k in self._cache.items if k.startswith(SIDECARS_PREFIX)):
            try:
                value = orjson.loads(self._cache.items[key])
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                out.append(value)
        return out


async def _revoke_quietly(lease: Lease) -> None:
    """Revoke, or let it expire: either way its keys go within the TTL."""
    try:
        await lease.revoke()
    except StoreError as e:
        log.info("lease revoke failed (%s): it expires within its TTL", e)
