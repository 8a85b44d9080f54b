"""The sidecar-facing stream server: hello, registration, snapshots, acks.

One `_Stream` (an asyncio Protocol) per sidecar connection, all fed by one
`PushServer` that mirrors the WatchCache into a `MeshIndex`. The stream
protocol is docs/control-plane.md's; `lepton_mesh.meshproto` is its codec.

A stream's life:
    hello --validate--> register (etcd, lease) --> welcome + first snapshot
    --> (snapshot when its content changes)* ... close --> revoke the lease
Anything but a valid hello first is an `error` frame and a close, as is a
protocol error at any time. A registration that etcd refuses (down, timed
out) is an `error` with reason `store_unavailable`: the sidecar retries with
backoff, and keeps serving its last config meanwhile.

Snapshots are cheap for many sidecars: sidecars with the same scope
(service, namespace, dependencies) share a `_Group`, whose snapshot is built
and encoded once per revision that can change it (`MeshIndex.apply` says
which services a revision touched; a group is rebuilt only if it reads one
of them), and pushed only if its content digest changed. A stream whose
transport is paused (the sidecar reads slowly) is not written to; when it
resumes it gets the group's latest frame, never a backlog: a snapshot is
complete, so skipping one loses nothing.

Pushes are coalesced: a group is built and pushed at most once per
`min_push_interval` (0.1 s). A change after a quiet spell goes out at once;
changes that follow within the interval mark their groups dirty, and one
build at the end of the interval sends their sum (100 applies in a second
are ~10 pushes per sidecar, not 100). A sidecar joining a dirty group has
it built first, so its first snapshot still includes its own registration.

Never a partial state: the index changes only in `on_cache_change`, which
the WatchCache calls after whole revisions, and a snapshot's version is the
revision its index was at.

A stream that sends nothing for `idle_timeout` (15 s; sidecars ping every
5 s) is dropped: a half-open connection must not keep its lease alive.

With an `IdentityService` (`--ca-dir`), the listener speaks TLS with the
daemon's own certificate, and a hello must prove its identity (a verified
client certificate, else a join token) before it is registered; see
control/identity_service.py. After Welcome the stream is sent `trust` (the
bundle and the issuer), again whenever the CA files change, and each `csr`
is answered with a `certificate` for the stream's proven identity only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lepton_mesh import meshproto as mp
from lepton_mesh.control.identity_service import (
    CsrLimiter,
    StreamRefused,
    certificate_status,
    peer_certificate,
)
from lepton_mesh.control.registry import NodeIdTaken
from lepton_mesh.control.snapshots import (
    ALL,
    MeshIndex,
    Scope,
    content_digest,
    instance_problem,
)
from lepton_mesh.control.store import Event, StoreError, StoreUnavailable
from lepton_mesh.identity.errors import CsrRejected

if TYPE_CHECKING:
    from lepton_mesh.control.identity_service import IdentityService, TrustState
    from lepton_mesh.control.registry import Registration, Registry
    from lepton_mesh.control.watch_cache import WatchCache
    from lepton_mesh.identity.spiffe import SpiffeId

__all__ = ["PushServer"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NODE_ID = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,252}")
# Frames that may arrive between hello and welcome (only pings, normally).
_MAX_EARLY = 16
# A registration waits this long for the cache's first read before giving up.
_READY_WAIT = 5.0
# A TLS client that has not finished its handshake by then is dropped.
_HANDSHAKE_TIMEOUT = 10.0
# Bytes a stream may hold unsent before it is reset: above one snapshot (a
# frame is at most 16 MiB), so that only a peer that stopped reading hits it.
_MAX_BUFFERED = mp.MAX_FRAME + 1024 * 1024
# A closed stream whose peer has not taken what was left to send (an error
# frame, a TLS close_notify) by then is reset.
_CLOSE_GRACE = 2.0


@dataclass(slots=True, eq=False)
class _Group:
    """Sidecars with one scope, and the snapshot they all get."""

    scope: Scope
    members: set[_Stream] = field(default_factory=set)
    digest: bytes = b""
    frame: bytes = b""
    version: int = 0
    reads: frozenset[str] = frozenset()  # services the snapshot was built from


class PushServer:
    """Serves sidecar streams on one listening socket.

    The daemon subscribes `on_cache_change` to the WatchCache before it runs.
    """

    def __init__(
        self,
        cache: WatchCache,
        registry: Registry,
        *,
        control_id: str,
        idle_timeout: float = 15.0,
        min_push_interval: float = 0.1,
        identity: IdentityService | None = None,
    ) -> None:
        self.cache = cache
        self.registry = registry
        self.control_id = control_id
        self.idle_timeout = idle_timeout
        self.min_push_interval = min_push_interval
        self.identity = identity  # None: plaintext streams, no authentication, no CA
        if identity is not None:
            identity.subscribe(self._on_trust_change)
        self._index = MeshIndex()
        self._indexed = False  # the index holds a full read
        self.revision = 0  # the revision the index (and every group's snapshot) is at
        self._groups: dict[Scope, _Group] = {}
        # Coalescing: groups a change may concern, built at the next flush.
        self._dirty: set[_Group] = set()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._last_flush = float("-inf")  # loop time
        self._streams: set[_Stream] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._closing = False
        self._all_gone: asyncio.Event | None = None  # set when closing and the last stream is lost
        # counters, for /metrics (control/metrics.py) and tests
        self.pushes = 0  # snapshots written to streams
        self.builds = 0  # group snapshots built
        self.nacks = 0  # snapshots sidecars rejected

    # --- the listening side ---

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (for port 0)."""
        loop = asyncio.get_running_loop()
        if self.identity is None:
            self._server = await loop.create_server(lambda: _Stream(self), host, port)
        else:
            self._server = await loop.create_server(
                lambda: _Stream(self),
                host,
                port,
                ssl=self.identity.ssl_context(),
                ssl_handshake_timeout=_HANDSHAKE_TIMEOUT,
            )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting, close every stream and revoke their leases."""
        self._closing = True
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._server is not None:
            self._server.close()
        for stream in list(self._streams):
            stream.close()
        # Peers take the close at once, but a frozen one never does: reset what
        # is still open after the grace period, rather than leave it to the loop.
        if self._streams:
            self._all_gone = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_GRACE):
                    await self._all_gone.wait()
        for stream in list(self._streams):
            stream.abort()
        # Not `while self._tasks: await gather(...)`: a finished task leaves the
        # set only when its done callback runs, and since Python 3.12 gather of
        # finished tasks returns without yielding to the loop, so that loop spun
        # forever. Wait for the unfinished ones, including any spawned meanwhile.
        while pending := [t for t in self._tasks if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def connections(self) -> int:
        return len(self._streams)

    def ack_rows(self) -> list[tuple[str, str, str, int, int]]:
        """(node_id, service, namespace, wanted version, applied version) per
        welcomed stream; wanted is its group's snapshot version (for metrics)."""
        rows = []
        for stream in list(self._streams):
            group, reg = stream._group, stream._reg
            if group is None or reg is None:
                continue  # not welcomed yet: nothing was sent to it
            status = reg.status
            rows.append(
                (
                    reg.node_id,
                    str(status.get("service", "")),
                    str(status.get("namespace", "")),
                    group.version,
                    int(status.get("applied_version") or 0),
                )
            )
        return rows

    def groups(self) -> int:
        return len(self._groups)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("stream task failed", exc_info=task.exception())

    # --- the cache side ---

    def on_cache_change(self, revision: int, events: list[Event] | None) -> None:
        """A whole revision (or a full resync, `events` None) reached the cache."""
        if events is None or not self._indexed:
            touched = self._index.reset(self.cache.items)
            self._indexed = True
        else:
            touched = self._index.apply(
                (e.key, e.value if e.kind == "put" else None) for e in events
            )
        self.revision = max(self.revision, revision)
        if touched:
            self._mark_affected(touched, everything=events is None)
            self._schedule_flush()

    def _ensure_indexed(self) -> None:
        # The cache may have done its first read before we subscribed.
        if not self._indexed and self.cache.ready.is_set():
            self._index.reset(self.cache.items)
            self._indexed = True
            self.revision = max(self.revision, self.cache.revision)

    def _on_trust_change(self, trust: TrustState) -> None:
        """The CA files changed: every welcomed stream learns the new bundle and
        issuer now (its sidecar asks for a new certificate at once)."""
        frame = mp.encode(trust.message())
        for stream in list(self._streams):
            stream.send_trust(frame)

    def _mark_affected(self, touched: Iterable[tuple[str, str]], *, everything: bool) -> None:
        by_ns: dict[str, set[str]] = {}
        for ns, svc in touched:
            by_ns.setdefault(ns, set()).add(svc)
        for group in self._groups.values():
            svcs = by_ns.get(group.scope.namespace)
            if everything or (
                svcs is not None and (group.scope.everything or not group.reads.isdisjoint(svcs))
            ):
                self._dirty.add(group)

    def _schedule_flush(self) -> None:
        """Build the dirty groups now if the last flush is `min_push_interval` old,
        else once it is (one timer for every change in between)."""
        if not self._dirty or self._flush_timer is not None or self._closing:
            return
        loop = asyncio.get_running_loop()
        wait = self._last_flush + self.min_push_interval - loop.time()
        if wait <= 0:
            self._flush()
        else:
            self._flush_timer = loop.call_later(wait, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        self._last_flush = asyncio.get_running_loop().time()
        dirty, self._dirty = self._dirty, set()
        for group in dirty:
            if self._groups.get(group.scope) is group:
                self._build(group)

    def _build(self, group: _Group) -> None:
        content, group.reads = self._index.snapshot(group.scope)
        self.builds += 1
        digest = content_digest(content)
        if digest == group.digest:
            return
        group.digest = digest
        group.version = self.revision
        group.frame = mp.encode(
            mp.Snapshot(self.revision, content["services"], tuple(content["policies"]))
        )
        for stream in group.members:
            stream.push()

    def join(self, stream: _Stream, scope: Scope) -> _Group:
        self._ensure_indexed()
        group = self._groups.get(scope)
        if group is None:
            group = self._groups[scope] = _Group(scope)
            self._build(group)
        elif group in self._dirty:  # its frame predates changes (this registration, maybe)
            self._dirty.discard(group)
            self._build(group)
        group.members.add(stream)
        return group

    def leave(self, stream: _Stream, group: _Group) -> None:
        group.members.discard(stream)
        if not group.members and self._groups.get(group.scope) is group:
            del self._groups[group.scope]
            self._dirty.discard(group)

    async def wait_ready(self) -> None:
        """The cache has its first full read (else StoreUnavailable)."""
        if self.cache.ready.is_set():
            return
        try:
            async with asyncio.timeout(_READY_WAIT):
                await self.cache.ready.wait()
        except TimeoutError:
            raise StoreUnavailable("the control daemon has not read etcd yet") from None


class _Stream(asyncio.Protocol):
    """One sidecar connection. Callbacks never await; etcd work runs in tasks."""

    __slots__ = (
        # global
        "_server",
        "_loop",
        # connection
        "_transport",
        "_decoder",
        "_closed",
        "_write_paused",
        "_last_rx",
        "_idle_timer",
        # stream state
        "_state",
        "_early",
        "_hello",
        "_reg",
        "_group",
        "_sent_digest",
        # identity (with an IdentityService)
        "_identity",
        "_peer_cert",
        "_csrs",
    )

    def __init__(self, server: PushServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._decoder = mp.FrameDecoder()
        self._closed = False
        self._write_paused = False
        self._last_rx = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._state = "hello"  # hello -> registering -> active
        self._early: list[mp.Message] = []
        self._hello: mp.Hello | None = None
        self._reg: Registration | None = None
        self._group: _Group | None = None
        self._sent_digest = b""
        self._identity: SpiffeId | None = None  # proven by the hello
        self._peer_cert: Any = None  # the verified client certificate (x509), if any
        self._csrs: CsrLimiter | None = None  # made on the first CSR

    # --- asyncio callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not asserted to be an asyncio.Transport: uvloop's TLS transport is not one.
        self._transport = transport  # type: ignore[assignment]
        if self._server._closing:
            transport.close()
            return
        self._server._streams.add(self)
        self._idle_timer = self._loop.call_later(self._server.idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self._last_rx = self._loop.time()
        self._decoder.feed(data)
        self._process()

    def _process(self) -> None:
        """Handle the frames received, until the peer stops reading what we send:
        then the rest wait in the decoder, and reading is paused (backpressure:
        a peer that sends pings and never reads the pongs must not make us
        buffer them without bound)."""
        try:
            while (
                not self._closed
                and not self._write_paused
                and (msg := self._decoder.next_message()) is not None
            ):
                self._handle(msg)
        except mp.ProtocolError as e:
            self._fail(e.reason, e.detail)

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        server = self._server
        server._streams.discard(self)
        if not server._streams and server._all_gone is not None:
            server._all_gone.set()
        self._release()

    def _release(self) -> None:
        """The stream is over (closed by either side, or declared dead): leave the
        group, and deregister at once (revoke the lease). Not in connection_lost
        only: closing a TLS transport waits for the peer's close_notify (up to
        the TLS shutdown timeout, ~30 s) before that is called, and a frozen
        sidecar must not stay registered for that long."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._group is not None:
            self._server.leave(self, self._group)
            self._group = None
        if self._reg is not None:
            reg, self._reg = self._reg, None
            self._server.spawn(self._server.registry.deregister(reg))

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.push()
        self._process()
        if self._transport is not None and not self._closed and not self._write_paused:
            self._transport.resume_reading()

    # --- messages ---

    def _handle(self, msg: mp.Message) -> None:
        if isinstance(msg, mp.Unknown):
            return  # a later minor version's message: ignored
        if self._state == "hello":
            self._on_hello(msg)
        elif self._state == "registering":
            if isinstance(msg, mp.Ping):
                self._send(mp.Pong(msg.time))
            elif len(self._early) < _MAX_EARLY:
                self._early.append(msg)
            else:
                self._fail(mp.Reason.UNEXPECTED_MESSAGE, "too many frames before welcome")
        else:
            self._on_message(msg)

    def _on_hello(self, msg: mp.Message) -> None:
        if not isinstance(msg, mp.Hello):
            self._fail(mp.Reason.UNEXPECTED_MESSAGE, f"expected hello, got {mp.msg_type(msg)}")
            return
        if msg.protocol != mp.PROTOCOL_VERSION:
            self._fail(
                mp.Reason.UNSUPPORTED_VERSION,
                f"protocol {msg.protocol} is not supported (this control speaks {mp.PROTOCOL_VERSION})",
            )
            return
        problem = _hello_problem(msg)
        if problem:
            self._fail(mp.Reason.BAD_HELLO, problem)
            return
        if self._server.identity is not None and not self._authenticate(msg):
            return
        self._hello = msg
        self._state = "registering"
        self._server.spawn(self._register(msg))

    def _authenticate(self, hello: mp.Hello) -> bool:
        """Prove the hello's identity (client certificate or join token); else refuse."""
        identity = self._server.identity
        assert identity is not None
        peercert, self._peer_cert = peer_certificate(self._transport)
        try:
            self._identity = identity.authenticate(hello, peercert)
        except StreamRefused as e:
            log.warning("refused the stream of %s: %s", hello.node_id, e)
            self._fail(e.reason, e.detail)
            return False
        return True

    def _status_identity(self) -> dict[str, Any] | None:
        """What the sidecar status key says about this stream's identity."""
        if self._identity is None:
            return None
        cert = self._peer_cert
        return {
            "identity": self._identity.uri,
            "certificate": certificate_status(cert) if cert is not None else None,
        }

    async def _register(self, hello: mp.Hello) -> None:
        server = self._server
        try:
            await server.wait_ready()
            reg = await server.registry.register(
                node_id=hello.node_id,
                service=hello.service,
                namespace=hello.namespace,
                instance={
                    "address": hello.instance.address,
                    "ports": dict(hello.instance.ports),
                    "labels": dict(hello.instance.labels),
                    "weight": hello.instance.weight,
                },
                applied_version=hello.applied_version,
                identity=self._status_identity(),
            )
        except NodeIdTaken as e:
            log.warning("refused the hello of %s: %s", hello.node_id, e.detail)
            self._fail(mp.Reason.NODE_ID_TAKEN, e.detail)
            return
        except StoreError as e:
            log.info("registration of %s failed: %s", hello.node_id, e)
            self._fail(e.reason, f"registration failed: {e.detail}")
            return
        # Read-your-writes: the first snapshot is built from a cache that has seen
        # this registration, hence everything committed before it.
        with contextlib.suppress(TimeoutError):
            await server.cache.wait_for_revision(reg.revisions[reg.instance_key], _READY_WAIT)
        if self._closed:  # the sidecar went away while we registered it
            await server.registry.deregister(reg)
            return
        self._reg = reg
        reg.on_superseded = self._superseded
        self._state = "active"
        self._send(mp.Welcome(server.control_id))
        if server.identity is not None:
            self._send(server.identity.trust.message())
        self._group = server.join(
            self, Scope.of(hello.service, hello.namespace, hello.dependencies)
        )
        self.push()
        early, self._early = self._early, []
        for msg in early:
            if self._closed:
                break
            self._on_message(msg)

    def _on_message(self, msg: mp.Message) -> None:
        registry, reg = self._server.registry, self._reg
        assert reg is not None
        if isinstance(msg, mp.Ping):
            self._send(mp.Pong(msg.time))
            registry.record_seen(reg)
        elif isinstance(msg, mp.Ack):
            registry.record_ack(reg, msg.version)
        elif isinstance(msg, mp.Nack):
            log.warning("%s rejected snapshot %d: %s", reg.node_id, msg.version, msg.error)
            self._server.nacks += 1
            registry.record_nack(reg, msg.version, msg.error)
        elif isinstance(msg, mp.Health):
            registry.set_health(reg, msg.healthy)
            registry.record_seen(reg)
        elif isinstance(msg, mp.Draining):
            registry.set_draining(reg)
            registry.record_seen(reg)
        elif isinstance(msg, mp.Csr):
            self._on_csr(msg, reg)
        else:
            self._fail(
                mp.Reason.UNEXPECTED_MESSAGE, f"unexpected {mp.msg_type(msg)} on an open stream"
            )

    def _on_csr(self, msg: mp.Csr, reg: Registration) -> None:
        """Sign for the stream's proven identity (~0.3 ms, on the loop), or refuse and close."""
        identity = self._server.identity
        if identity is None or self._identity is None:
            self._fail(mp.Reason.CA_UNAVAILABLE, "this control daemon has no CA (--ca-dir)")
            return
        if self._csrs is None:
            self._csrs = CsrLimiter()
        if not self._csrs.allow(time.monotonic()):
            self._fail(mp.Reason.TOO_MANY_CSRS, "too many CSRs on this stream; slow down")
            return
        try:
            issued = identity.issue(msg.csr_pem, self._identity)
        except CsrRejected as e:
            log.warning("refused a CSR from %s (%s): %s", reg.node_id, e.reason, e.detail)
            self._fail(e.reason, e.detail)
            return
        trust = identity.trust
        self._send(
            mp.Certificate(
                chain_pem=issued.chain_pem.decode("ascii"),
                bundle_pem=trust.bundle_pem,
                not_after=issued.not_after.timestamp(),
            )
        )
        log.info(
            "issued %s (serial %x, until %s) to %s",
            issued.identity,
            issued.serial,
            f"{issued.not_after:%Y-%m-%d %H:%M:%SZ}",
            reg.node_id,
        )
        self._server.registry.record_certificate(reg, certificate_status(issued.certificate, trust))

    # --- output ---

    def send_trust(self, frame: bytes) -> None:
        """A new bundle or issuer, to a welcomed stream (others get it with Welcome)."""
        if self._state == "active" and not self._closed and self._transport is not None:
            self._transport.write(frame)

    def push(self) -> None:
        """Send the group's snapshot if this sidecar does not have it yet."""
        group = self._group
        if group is None or self._closed or self._write_paused or group.digest == self._sent_digest:
            return
        self._sent_digest = group.digest
        assert self._transport is not None
        self._transport.write(group.frame)
        self._server.pushes += 1

    def _send(self, msg: mp.Message) -> None:
        if self._closed or self._transport is None:
            return
        if self._transport.get_write_buffer_size() > _MAX_BUFFERED:
            # Reading is paused while writing is, so this takes a peer that
            # does not read while we keep having things to tell it.
            log.warning("resetting a stream that does not read what is sent to it")
            self.abort()
            return
        self._transport.write(mp.encode(msg))

    def _fail(self, reason: str, detail: str) -> None:
        """An `error` frame, then close: fatal for the stream."""
        if self._closed:
            return
        with contextlib.suppress(mp.ProtocolError):
            self._send(mp.Error(reason, detail))
        self.close()

    def _superseded(self) -> None:
        self._reg = None  # the registry already let its keys go
        self._fail(mp.Reason.SUPERSEDED, "this sidecar registered again on another stream")

    def close(self) -> None:
        if self._closed or self._transport is None:
            return
        self._closed = True
        self._release()  # deregistered now, not when the peer has taken the close
        self._transport.close()  # flushes what was written, then connection_lost
        # A peer that does not read (frozen) never takes the rest, nor a TLS
        # close_notify: reset the connection after a grace period.
        self._loop.call_later(_CLOSE_GRACE, self.abort)

    def abort(self) -> None:
        """Reset the connection now, unless it is already gone."""
        if self in self._server._streams and self._transport is not None:
            self._closed = True
            self._release()
            self._transport.abort()

    def _check_idle(self) -> None:
        idle = self._loop.time() - self._last_rx
        if idle >= self._server.idle_timeout:
            log.info("dropping a stream silent for %.0f s", idle)
            why = " (it does not read what is sent to it)" if self._write_paused else ""
            self._fail("idle_timeout", f"nothing received for {idle:.0f} s{why}")
            return
        self._idle_timer = self._loop.call_later(self._server.idle_timeout - idle, self._check_idle)


def _hello_problem(hello: mp.Hello) -> str:
    """What is wrong with a hello's identity, or "" (the codec checked the types)."""
    if not _NODE_ID.fullmatch(hello.node_id):
        return f"node_id {hello.node_id!r}: use letters, digits, '-', '_' and '.'"
    for what, name in (("service", hello.service), ("namespace", hello.namespace)):
        if len(name) > 63 or not _NAME.fullmatch(name):
            return f"{what} {name!r} is not a DNS label (lowercase letters, digits and '-')"
    for dep in hello.dependencies:
        if dep != ALL and (len(dep) > 63 or not _NAME.fullmatch(dep)):
            return f"dependency {dep!r} is neither a service name nor '*'"
    if not hello.instance.ports:
        return "instance.ports is empty: callers could not reach this instance"
    inst = hello.instance
    return instance_problem(inst.address, inst.ports, inst.labels, inst.weight)
