"""The one module that talks to etcd (v3 API over gRPC).

Everything else in the control daemon uses `Store`, `Lease` and the frozen
value types below; none of them sees gRPC or protobuf. docs/etcd.md says why
the client is etcd3aio and which of its parts we use (its channel setup and
generated stubs) and which we replace (retries, watch resume, lease keep-alive).

Invariants this module keeps:
- A watch resumes from the last *event* revision + 1, never from a response
  header's revision (a header can be ahead of events not yet delivered: resuming
  from it loses them). A watch from a compacted revision raises `Compacted`; it
  never waits forever: every wait on etcd is bounded by `timeout`.
- The events of one etcd revision (one transaction) are yielded together, never
  split: etcd never splits a revision across watch responses unless the watcher
  asks for fragments (we don't), and we cut responses at revision boundaries.
- A transaction is sent once. If the outcome is unknown (the connection broke or
  the deadline passed after it may have been applied) it raises `UnknownOutcome`;
  it is retried only when the request provably never left (no connection).
  Reads are retried until `timeout`; so are `put` and `delete`, whose repeat
  leaves the same state (an extra revision at most).
- Errors leave as `StoreError` subclasses with `.status` and `.reason`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import grpc
import grpc.aio

# etcd3aio's generated stubs and messages (the package pins one etcd API version).
from etcd3aio import _protobuf as pb
from etcd3aio.kv import prefix_range_end

__all__ = [
    "KV",
    "Compacted",
    "Compare",
    "Delete",
    "Event",
    "Lease",
    "Put",
    "Rewound",
    "Store",
    "StoreAuthFailed",
    "StoreError",
    "StoreUnavailable",
    "TxnResult",
    "UnknownOutcome",
]

_log = logging.getLogger(__name__)

# ---- errors -----------------------------------------------------------------


class StoreError(Exception):
    """Base of every error this module raises. `status`/`reason` as the proxy's errors."""

    status = 500
    reason = "store_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class StoreUnavailable(StoreError):
    """etcd did not answer within the timeout (down, no quorum, unreachable)."""

    status = 503
    reason = "store_unavailable"


class Compacted(StoreError):
    """A watch or read asked for a revision etcd has compacted away.

    `compact_revision` is etcd's compaction point when etcd said it (watches),
    0 when it did not (reads). The cure is a full re-read.
    """

    status = 410
    reason = "store_compacted"

    def __init__(self, detail: str, compact_revision: int = 0) -> None:
        super().__init__(detail)
        self.compact_revision = compact_revision


class Rewound(StoreError):
    """etcd's revision is behind one it already showed us: it was restored from a
    backup, or lost acknowledged writes. Later writes reuse revisions we have seen,
    so a mirror must read everything again (and let its revision go down).

    `revision` is etcd's current revision.
    """

    status = 503
    reason = "store_rewound"

    def __init__(self, detail: str, revision: int) -> None:
        super().__init__(detail)
        self.revision = revision


class StoreAuthFailed(StoreError):
    """etcd refused our credentials (wrong user/password, or no permission)."""

    status = 503
    reason = "store_auth_failed"


class UnknownOutcome(StoreError):
    """A write timed out or lost its connection after it may have been applied.

    The caller must re-read to know (e.g. look for its own marker in the state).
    """

    status = 503
    reason = "store_unknown_outcome"


# ---- values -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    value: bytes | None  # None for a delete
    revision: int  # the event's own mod_revision


CompareTarget = Literal["value", "mod_revision", "create_revision", "version"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    key: str
    target: CompareTarget
    op: CompareOp
    operand: bytes | int

    @classmethod
    def absent(cls, key: str) -> Compare:
        """The key does not exist (etcd's idiom: create_revision == 0)."""
        return cls(key, "create_revision", "==", 0)

    @classmethod
    def mod(cls, key: str, revision: int) -> Compare:
        """The key was last written at `revision` (0: absent)."""
        return cls(key, "mod_revision", "==", revision)

    @classmethod
    def value_is(cls, key: str, value: bytes) -> Compare:
        return cls(key, "value", "==", value)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int


# ---- gRPC error classification -----------------------------------------------

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# gRPC's own core, not etcd, says this (as INTERNAL) when it could not carry a
# message on a connection that broke under it (seen while etcd restarts: "Failed
# execute_batch ... SendMessageOperation"): a transport failure like UNAVAILABLE.
_CORE_TRANSPORT_MARKER = "internal error from core"
# gRPC says these when no connection was ready to carry the call: it never left.
# (The wording differs between gRPC versions and load-balancing states.)
_NOT_SENT_MARKERS = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "connection refused",
)
# etcd's own word that a revision is gone (KV.Range at a compacted revision).
_COMPACTED_MARKER = "required revision has been compacted"
_TOKEN_MARKERS = ("invalid auth token", "user name is empty")

_CMP_RESULT = {"==": 0, ">": 1, "<": 2, "!=": 3}  # etcd Compare.CompareResult
_CMP_TARGET = {"version": 0, "create_revision": 1, "mod_revision": 2, "value": 3}

# Channel options on top of etcd3aio's defaults: reconnect quickly after an
# outage (gRPC's default backoff grows to 120 s, far past an etcd restart), and
# accept large range reads (get_prefix pages at _PAGE keys anyway).
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),  # retries are ours: a transparent txn retry is unsafe
]
_PAGE = 1000
# Watches ask etcd to cancel them when the member loses its leader, so a watch
# on a partitioned member moves to another instead of going silent.
_HAS_LEADER = ("hasleader", "true")


def _details(exc: grpc.aio.AioRpcError) -> str:
    return exc.details() or ""


def _is_token_error(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.UNAUTHENTICATED or any(
        m in _details(exc) for m in _TOKEN_MARKERS
    )


Verdict = Literal["token", "denied", "compacted", "error", "unknown", "retry"]


def transport_failure(code: grpc.StatusCode, details: str) -> bool:
    """The call failed on the way (no member, a broken connection, no answer in
    time), not because etcd refused it: worth another try."""
    if code in _RETRYABLE:
        return True
    return code == grpc.StatusCode.INTERNAL and _CORE_TRANSPORT_MARKER in details.lower()


def classify(code: grpc.StatusCode, details: str, *, idempotent: bool) -> Verdict:
    """What a failed unary call means (pure; the table in test_errors.py drives it).

    token: our token is missing or expired (re-authenticate once, then "denied");
    denied: credentials or permissions refused; compacted: the revision is gone;
    error: etcd refused the request itself; unknown: a non-repeatable write may
    have been applied; retry: nothing was applied or a repeat is harmless.
    """
    if code == grpc.StatusCode.UNAUTHENTICATED or any(m in details for m in _TOKEN_MARKERS):
        return "token"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "denied"
    if _COMPACTED_MARKER in details:
        return "compacted"
    if not transport_failure(code, details):
        return "error"
    never_left = code == grpc.StatusCode.UNAVAILABLE and any(
        m in details.lower() for m in _NOT_SENT_MARKERS
    )
    if not (idempotent or never_left):
        return "unknown"
    return "retry"


def _kv(msg: Any) -> KV:
    return KV(
        key=msg.key.decode(),
        value=bytes(msg.value),
        mod_revision=msg.mod_revision,
        create_revision=msg.create_revision,
        version=msg.version,
        lease=msg.lease,
    )


def _event(msg: Any) -> Event:
    kv = msg.kv
    if msg.type == 0:  # mvccpb.Event.PUT
        return Event("put", kv.key.decode(), bytes(kv.value), kv.mod_revision)
    return Event("delete", kv.key.decode(), None, kv.mod_revision)


def _compare_pb(c: Compare) -> Any:
    msg = pb.Compare(key=c.key.encode(), result=_CMP_RESULT[c.op], target=_CMP_TARGET[c.target])
    if c.target == "value":
        if not isinstance(c.operand, bytes):
            raise TypeError(f"Compare on value needs bytes, got {type(c.operand).__name__}")
        msg.value = c.operand
    else:
        if not isinstance(c.operand, int):
            raise TypeError(f"Compare on {c.target} needs an int")
        setattr(msg, c.target, c.operand)  # the proto fields are named like the targets
    return msg


def _op_pb(op: Put | Delete) -> Any:
    if isinstance(op, Put):
        return pb.RequestOp(
            request_put=pb.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease)
        )
    end = prefix_range_end(op.key.encode()) if op.prefix else b""
    return pb.RequestOp(
        request_delete_range=pb.DeleteRangeRequest(key=op.key.encode(), range_end=end)
    )


def _split_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """'host:port', 'http://host:port' or 'https://host:port' -> (host, port, tls)."""
    raw = endpoint.strip()
    url = urlsplit(raw if "://" in raw else f"//{raw}")
    if not url.hostname:
        raise ValueError(f"bad etcd endpoint {endpoint!r}")
    return url.hostname, url.port or 2379, url.scheme == "https"


def _resolve(host: str, port: int) -> list[str]:
    """IP literals for the ipv4:/ipv6: target (gRPC takes one name per channel only)."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    if host == "localhost":
        return ["127.0.0.1"]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def _target(endpoints: Sequence[str]) -> tuple[str, bool, str | None]:
    """One gRPC target over all members (round robin), whether TLS was asked for,
    and the TLS server name (the first hostname, when members are named)."""
    v4: list[str] = []
    v6: list[str] = []
    tls = False
    server_name: str | None = None
    for ep in endpoints:
        host, port, is_tls = _split_endpoint(ep)
        tls = tls or is_tls
        try:
            ipaddress.ip_address(host)
        except ValueError:
            server_name = server_name or host
        for ip in _resolve(host, port):
            (v6 if ":" in ip else v4).append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    if v4:
        return "ipv4:" + ",".join(v4), tls, server_name
    return "ipv6:" + ",".join(v6), tls, server_name


# ---- the store ----------------------------------------------------------------


class Store:
    """etcd behind a small typed API. Make one with `await Store.connect(...)`."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout: float,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._channel = channel
        self._kv = pb.KVStub(channel)
        self._watch = pb.WatchStub(channel)
        self._lease = pb.LeaseStub(channel)
        self._auth = pb.AuthStub(channel)
        self.timeout = timeout
        self._username = username
        self._password = password
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self._keepalive = _KeepAliveMux(self)
        self._leases: set[Lease] = set()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        endpoints: Sequence[str],
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        tls_server_name: str | None = None,
    ) -> Store:
        """Open a channel to all `endpoints` (round robin; a dead member is skipped).

        Endpoints are 'host:port' or 'http(s)://host:port'; https or a CA file turns
        TLS on. With a username, authenticates now (raises StoreUnavailable if etcd
        is down); otherwise no request is made until the first call.
        """
        if not endpoints:
            raise ValueError("no etcd endpoints")
        target, tls, server_name = _target(endpoints)
        options = list(_CHANNEL_OPTIONS)
        if tls or ca_file or cert_file:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_file),
                private_key=_read(key_file),
                certificate_chain=_read(cert_file),
            )
            name = tls_server_name or server_name
            if name:
                options.append(("grpc.ssl_target_name_override", name))
            channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        store = cls(channel, timeout=timeout, username=username, password=password)
        if username is not None:
            try:
                await store._authenticate(None)
            except BaseException:
                await channel.close()
                raise
        return store

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for lease in list(self._leases):
            lease._stop()
        await self._keepalive.close()
        await self._channel.close()

    # ---- calls -----------------------------------------------------------

    def _metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...] | None:
        md = ((("token", self._token),) if self._token else ()) + extra
        return md or None

    async def _authenticate(self, stale: str | None) -> None:
        """Get a token; if another caller already replaced `stale`, keep theirs."""
        async with self._auth_lock:
            if self._token is not None and self._token != stale:
                return
            req = pb.AuthenticateRequest(name=self._username or "", password=self._password or "")
            try:
                resp = await self._auth.Authenticate(req, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                if transport_failure(exc.code(), _details(exc)):
                    raise StoreUnavailable(f"etcd authenticate: {_details(exc)}") from exc
                raise StoreAuthFailed(f"etcd authenticate failed: {_details(exc)}") from exc
            self._token = resp.token

    async def _call(
        self,
        method: Callable[..., Awaitable[Any]],
        request: Any,
        *,
        what: str,
        idempotent: bool,
        timeout: float | None = None,
    ) -> Any:
        """One unary call, retried only where a repeat is harmless, bounded by `timeout`."""
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        backoff = 0.05
        reauthed = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreUnavailable(f"etcd {what}: no answer within {budget:.1f} s")
            if self._closed:
                raise StoreError(f"etcd {what}: the store is closed")
            token = self._token
            # A repeatable call gets several tries within the budget: a request
            # caught by a leader change waits out etcd's own timeout otherwise.
            attempt = min(remaining, max(budget / 4, 0.5)) if idempotent else remaining
            try:
                return await method(request, metadata=self._metadata(), timeout=attempt)
            except grpc.aio.AioRpcError as exc:
                verdict = classify(exc.code(), _details(exc), idempotent=idempotent)
                text = f"etcd {what}: {exc.code().name}: {_details(exc)}"
                if verdict == "token" and self._username is not None and not reauthed:
                    reauthed = True
                    await self._authenticate(token)
                    continue
                if verdict in ("token", "denied"):
                    raise StoreAuthFailed(text) from exc
                if verdict == "compacted":
                    raise Compacted(text) from exc
                if verdict == "error":
                    raise StoreError(text) from exc
                if verdict == "unknown":
                    raise UnknownOutcome(f"{text}; it may have been applied") from exc
                if time.monotonic() + backoff >= deadline:
                    raise StoreUnavailable(
                        f"etcd {what}: {exc.code().name}: {_details(exc)}"
                    ) from exc
            await asyncio.sleep(backoff)  # retry backoff (a timer, not a wait for state)
            backoff = min(backoff * 2, 0.5)

    # ---- KV ---------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        resp = await self._call(
            self._kv.Range, pb.RangeRequest(key=key.encode()), what="get", idempotent=True
        )
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under `prefix` as of one revision (linearizable), and that revision.

        Pages through large prefixes at the first page's revision, so the result is
        one consistent snapshot however many pages it takes.
        """
        for _ in range(3):
            try:
                return await self._read_pages(prefix)
            except Compacted:
                continue  # compacted between two pages: read again at a newer revision
        return await self._read_pages(prefix)

    async def _read_pages(self, prefix: str) -> tuple[list[KV], int]:
        start = prefix.encode()
        end = prefix_range_end(start)
        revision = 0
        out: list[KV] = []
        while True:
            req = pb.RangeRequest(key=start, range_end=end, revision=revision, limit=_PAGE)
            resp = await self._call(self._kv.Range, req, what="get_prefix", idempotent=True)
            if revision == 0:
                revision = resp.header.revision
            out.extend(_kv(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return out, revision
            start = resp.kvs[-1].key + b"\x00"

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write `key`; returns the revision of the write."""
        req = pb.PutRequest(key=key.encode(), value=value, lease=lease)
        resp = await self._call(self._kv.Put, req, what="put", idempotent=True)
        return resp.header.revision

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete `key` (or every key under it); returns how many were deleted."""
        end = prefix_range_end(key.encode()) if prefix else b""
        req = pb.DeleteRangeRequest(key=key.encode(), range_end=end)
        resp = await self._call(self._kv.DeleteRange, req, what="delete", idempotent=True)
        return resp.deleted

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> TxnResult:
        """One etcd transaction: all of `success` if every compare holds, else `failure`.

        Sent once: raises UnknownOutcome if it may or may not have been applied.
        """
        req = pb.TxnRequest(
            compare=[_compare_pb(c) for c in compares],
            success=[_op_pb(op) for op in success],
            failure=[_op_pb(op) for op in failure],
        )
        resp = await self._call(self._kv.Txn, req, what="txn", idempotent=False)
        return TxnResult(succeeded=resp.succeeded, revision=resp.header.revision)

    async def revision(self) -> int:
        """The store's current revision (a linearizable read of nothing)."""
        req = pb.RangeRequest(key=b"\x00", count_only=True)
        resp = await self._call(self._kv.Range, req, what="revision", idempotent=True)
        return resp.header.revision

    async def compact(self, revision: int) -> None:
        """Drop history before `revision`. Compacting an already compacted revision is a no-op."""
        req = pb.CompactionRequest(revision=revision, physical=False)
        with contextlib.suppress(Compacted):
            await self._call(self._kv.Compact, req, what="compact", idempotent=True)

    async def ping(self) -> bool:
        """True if etcd answered a linearizable read (so it has a leader) within timeout."""
        try:
            await self.revision()
        except StoreError:
            return False
        return True

    # ---- leases -------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> Lease:
        """A new lease of `ttl` seconds (granted now; not refreshed until keep_alive())."""
        started = time.monotonic()
        resp = await self._call(
            self._lease.LeaseGrant,
            pb.LeaseGrantRequest(TTL=ttl),
            what="grant_lease",
            idempotent=True,
        )
        if resp.error:
            raise StoreError(f"etcd grant_lease: {resp.error}")
        lease = Lease(self, resp.ID, resp.TTL, expires_at=started + resp.TTL)
        self._leases.add(lease)
        return lease

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining seconds of a lease as etcd sees it; -1 if it does not exist."""
        req = pb.LeaseTimeToLiveRequest(ID=lease_id)
        resp = await self._call(self._lease.LeaseTimeToLive, req, what="lease_ttl", idempotent=True)
        return resp.TTL

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease by id (e.g. one a dead replica held); its keys go now.

        A lease this store holds is better revoked with `Lease.revoke()`.
        """
        await self._revoke(lease_id)

    async def _revoke(self, lease_id: int) -> None:
        try:
            await self._call(
                self._lease.LeaseRevoke,
                pb.LeaseRevokeRequest(ID=lease_id),
                what="revoke",
                idempotent=True,
            )
        except StoreError as exc:
            if "lease not found" not in exc.detail:
                raise

    # ---- watches --------------------------------------------------------------

    async def watch_prefix(
        self,
        prefix: str,
        start_revision: int,
        *,
        on_created: Callable[[], None] | None = None,
        retry_for: float | None = None,
    ) -> AsyncIterator[list[Event]]:
        """Every change under `prefix` from `start_revision` on, one revision per batch.

        Survives reconnects (a restarted or killed member) by resuming from the last
        event's revision + 1. Raises Compacted if the start (or resume) revision was
        compacted, Rewound if etcd is behind the revision before it (restored
        from a backup; a start more than one past etcd's current revision says
        that too), and StoreUnavailable once no member accepted the watch for
        `retry_for` seconds (default: the store timeout); call again from the last
        revision + 1 to resume. `on_created` is called each time etcd confirms the
        watch (at start and after every reconnect): the caller is caught up to then.
        """
        key = prefix.encode()
        end = prefix_range_end(key)
        cursor = _Cursor(start_revision)
        window = self.timeout if retry_for is None else retry_for
        down_since: float | None = None
        backoff = 0.05
        reauthed = False
        while not self._closed:
            token = self._token
            closed = asyncio.Event()
            stream = self._open_watch(key, end, cursor.next_rev, closed)
            try:
                async for batch in self._watch_stream(stream, cursor, on_created):
                    down_since = None
                    backoff = 0.05
                    reauthed = False
                    cursor.next_rev = batch[-1].revision + 1
                    yield batch
                # The server ended the stream cleanly (shutdown): reconnect.
            except grpc.aio.AioRpcError as exc:
                if _is_token_error(exc) or exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    if self._username is None or reauthed:
                        raise StoreAuthFailed(f"etcd watch: {_details(exc)}") from exc
                    reauthed = True
                    await self._authenticate(token)
                    continue
                code = exc.code()
                if code != grpc.StatusCode.CANCELLED and not transport_failure(code, _details(exc)):
                    raise StoreError(f"etcd watch: {code.name}: {_details(exc)}") from exc
                _log.info("watch %s: %s, resuming at %d", prefix, code.name, cursor.next_rev)
            except _WatchLost as exc:
                _log.info("watch %s: %s, resuming at %d", prefix, exc, cursor.next_rev)
            except asyncio.CancelledError:
                # gRPC raises CancelledError for a call cancelled under it (the channel
                # closed); only a cancellation of our own task must propagate.
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or not self._closed:
                    raise
                return
            finally:
                closed.set()  # ends our request generator, so nothing is left running
                stream.cancel()
            now = time.monotonic()
            down_since = now if down_since is None else down_since
            if now - down_since >= window:
                raise StoreUnavailable(f"etcd watch {prefix}: no member for {window:.1f} s")
            await asyncio.sleep(backoff)  # reconnect backoff (a timer)
            backoff = min(backoff * 2, 0.5)

    def _open_watch(
        self, key: bytes, end: bytes, start_revision: int, closed: asyncio.Event
    ) -> Any:
        create = pb.WatchCreateRequest(key=key, range_end=end, start_revision=start_revision)

        async def requests() -> AsyncIterator[Any]:
            yield pb.WatchRequest(create_request=create)
            await closed.wait()  # keep our half of the stream open until we are done

        return self._watch.Watch(requests(), metadata=self._metadata(_HAS_LEADER))

    async def _watch_stream(
        self, stream: Any, cursor: _Cursor, on_created: Callable[[], None] | None
    ) -> AsyncIterator[list[Event]]:
        """The batches of one watch stream; bounded wait for etcd's 'created' answer."""
        responses = stream.__aiter__()
        try:
            async with asyncio.timeout(self.timeout):
                first = await anext(responses)
        except TimeoutError:
            raise _WatchLost("no 'created' answer within timeout") from None
        except StopAsyncIteration:
            return
        async for batch in self._batches(first, responses, cursor, on_created):
            yield batch

    async def _check_not_rewound(self, seen: int) -> None:
        """Raise Rewound if etcd is really behind `seen`, a revision it showed us.

        A watch's header comes from the member it runs on, which may lag the
        leader for a moment; only a linearizable read says where etcd is."""
        now = await self.revision()
        if now < seen:
            raise Rewound(
                f"etcd is at revision {now}, behind revision {seen} it already showed: "
                "restored from a backup, or it lost acknowledged writes",
                now,
            )

    async def _batches(
        self,
        first: Any,
        responses: Any,
        cursor: _Cursor,
        on_created: Callable[[], None] | None,
    ) -> AsyncIterator[list[Event]]:
        resp = first
        while True:
            if resp.compact_revision:
                raise Compacted(
                    f"watch start revision compacted (etcd compacted up to {resp.compact_revision})",
                    resp.compact_revision,
                )
            if resp.canceled:
                reason = resp.cancel_reason or "no reason"
                if "permission denied" in reason:
                    raise StoreAuthFailed(f"etcd watch: {reason}")
                raise _WatchLost(f"etcd canceled the watch: {reason}")
            if resp.created:
                if cursor.next_rev <= 0:
                    # "From now": pin it, so a reconnect resumes here, not at a later now.
                    cursor.next_rev = resp.header.revision + 1
                elif resp.header.revision < cursor.next_rev - 1:
                    await self._check_not_rewound(cursor.next_rev - 1)
                if on_created is not None:
                    on_created()
            for batch in _by_revision(resp.events):
                yield batch
            try:
                resp = await anext(responses)
            except StopAsyncIteration:
                return


class _Cursor:
    """Where a watch resumes: the last delivered event's revision + 1."""

    __slots__ = ("next_rev",)

    def __init__(self, next_rev: int) -> None:
        self.next_rev = next_rev


class _WatchLost(Exception):
    """The watch stream stopped delivering; resume from the last event revision + 1."""


def _by_revision(events: Sequence[Any]) -> list[list[Event]]:
    """Cut one response's events at revision boundaries (a revision is never split)."""
    out: list[list[Event]] = []
    current: list[Event] = []
    for msg in events:
        ev = _event(msg)
        if current and current[-1].revision != ev.revision:
            out.append(current)
            current = []
        current.append(ev)
    if current:
        out.append(current)
    return out


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


# ---- leases ---------------------------------------------------------------------


class Lease:
    """An etcd lease. Keys written with `lease=lease.id` go when it expires.

    `alive` turns False (and `on_lost` callbacks run, once) when the lease is known
    or must be assumed expired: a keep-alive answer says TTL 0, or no refresh
    succeeded before the locally computed expiry (send time of the last good
    refresh + its TTL: etcd's clock started no earlier, so by then etcd dropped it).
    Without keep_alive() that expiry is the grant's. `revoke()` is not a loss.
    """

    def __init__(self, store: Store, lease_id: int, ttl: int, *, expires_at: float) -> None:
        self._store = store
        self.id = lease_id
        self.ttl = ttl
        self.alive = True
        self._expires_at = expires_at
        self._callbacks: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._arm_expiry()

    def keep_alive(self) -> None:
        """Refresh every ttl/3 from now on, until revoke() or the store closes."""
        if self._task is None and self.alive:
            self._task = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name=f"lease-keepalive-{self.id:x}"
            )

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when the lease is lost (right away if it already is)."""
        if not self.alive:
            callback()
            return
        self._callbacks.append(callback)

    async def revoke(self) -> None:
        """Drop the lease and its keys now. No on_lost callback (it was not lost)."""
        self._stop()
        self.alive = False
        await self._store._revoke(self.id)

    @property
    def expires_in(self) -> float:
        """Seconds until the lease must be assumed expired (local clock)."""
        return self._expires_at - time.monotonic()

    async def _refresh_loop(self) -> None:
        interval = max(self.ttl / 3.0, 0.2)
        while self.alive:
            sent = time.monotonic()
            try:
                ttl = await self._store._keepalive.refresh(
                    self.id, timeout=min(interval, self.expires_in)
                )
            except (StoreError, TimeoutError) as exc:
                _log.info("lease %x: refresh failed (%s)", self.id, exc)
                if self.expires_in <= 0:
                    self._lose()
                    return
                await asyncio.sleep(min(0.2, max(self.expires_in, 0)))  # quick retry (timer)
                continue
            if ttl <= 0:
                self._lose()
                return
            self._expires_at = sent + ttl
            self._arm_expiry()
            await asyncio.sleep(interval)  # the refresh period (a timer)

    def _arm_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to arm
            loop = asyncio.get_running_loop()
            self._expiry_timer = loop.call_at(loop.time() + max(self.expires_in, 0), self._lose)

    def _lose(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self._stop()
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:
                _log.exception("lease %x: on_lost callback failed", self.id)

    def _stop(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._store._leases.discard(self)

    def __repr__(self) -> str:
        return f"Lease(id={self.id:x}, ttl={self.ttl}, alive={self.alive})"


class _KeepAliveMux:
    """One LeaseKeepAlive stream shared by every lease of a store.

    A refresh sends the lease's id and waits for the answer with that id. When the
    stream breaks, every pending refresh fails (StoreUnavailable) and the next
    refresh opens a new stream. 1,000 leases cost one stream, not 1,000.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: asyncio.Queue[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, list[asyncio.Future[int]]] = {}

    async def refresh(self, lease_id: int, *, timeout: float) -> int:
        """The lease's new TTL (<= 0: it has expired)."""
        self._ensure_stream()
        assert self._queue is not None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(lease_id, []).append(fut)
        self._queue.put_nowait(pb.LeaseKeepAliveRequest(ID=lease_id))
        try:
            async with asyncio.timeout(max(timeout, 0.05)):
                return await fut
        finally:
            waiters = self._pending.get(lease_id)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._pending[lease_id]

    def _ensure_stream(self) -> None:
        if self._reader is not None and not self._reader.done():
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def requests() -> AsyncIterator[Any]:
            while (request := await queue.get()) is not None:  # None: stream done
                yield request

        call = self._store._lease.LeaseKeepAlive(requests(), metadata=self._store._metadata())
        self._queue = queue
        self._reader = asyncio.get_running_loop().create_task(
            self._read(call), name="lease-keepalive"
        )

    async def _read(self, call: Any) -> None:
        error: StoreError = StoreUnavailable("lease keep-alive stream ended")
        try:
            async for resp in call:
                for fut in self._pending.pop(resp.ID, []):
                    if not fut.done():
                        fut.set_result(resp.TTL)
        except grpc.aio.AioRpcError as exc:
            error = StoreUnavailable(f"lease keep-alive: {exc.code().name}: {_details(exc)}")
            if self._store._username is not None and _is_token_error(exc):
                with contextlib.suppress(StoreError):
                    await self._store._authenticate(self._store._token)
        finally:
            if self._queue is not None:
                self._queue.put_nowait(None)
            call.cancel()
            self._queue = None
            for futs in self._pending.values():
                for fut in futs:
                    if not fut.done():
                        fut.set_exception(error)
            self._pending.clear()

    async def close(self) -> None:
        task, self._reader = self._reader, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
