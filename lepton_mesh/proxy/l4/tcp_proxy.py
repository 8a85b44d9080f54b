"""The L4 proxy: a local listener per TCP service, piping raw bytes to an endpoint.

For databases and brokers the app connects to `ServiceConfig.listen`; each
accepted connection is tunnelled (lepton_mesh.proxy.l4.tunnel) to one of the
service's endpoints. There is no protocol to answer an error in, so a
connection that cannot be served is logged (one line, with the reason code)
and closed.

Invariants:
- Each connection reads the config snapshot once, when accepted, and keeps
  the endpoint it connected to; a config swap only affects later connections.
- Until the tunnel takes over, both transports sit in a `_Held` protocol that
  stops reading after the first chunk, so at most one read per side is held
  while the upstream connection is being opened (the app or the server may
  speak first: a database greeting, a pipelined command).
- A client's EOF before the splice is not a reason to give up: it may be
  waiting for the reply (`nc -N`); the EOF is forwarded once connected. Its
  reset is: connecting stops and the connection is forgotten.
- At most `limits.max_connections` client connections at once; one past it
  is reset at accept and logged (reason `overflow`).
- A connection cut by `close()` (a stop, a drain's deadline) is reset on
  both sides, never closed cleanly: a cut stream must not look complete.
- `metrics.tcp_opened` is counted once the upstream connection is made, and
  every opened connection is matched by exactly one `tcp_closed`.
- A connection with no byte read from either side for `timeouts.tcp_idle`
  (half-closed or not) is closed on both sides and logged (reason
  `idle_timeout`), as Envoy's tcp_proxy `idle_timeout`: a peer that vanished
  without a FIN or RST would otherwise hold a `max_connections` slot forever.
  Inbound tunnels too. See `tunnel.IdleTimeout` for what it costs.

L4 over mTLS. With an identity (`tls` configured), an endpoint that is a
peer sidecar (not labelled `lepton.io/tls: disabled`) is reached at its
inbound listener over mTLS with ALPN `lepton-tcp/1`, and its certificate must
name the service. The peer's inbound listener sees that ALPN and hands the
connection to `InboundTunnels`, which pipes it to its local `tls.tcp_app`.
Inside TLS the bytes travel in `lepton-tcp/1` frames (`FrameDecoder`): a
4-byte big-endian length and that many bytes; length 0 ends one direction.
The end frame is what carries a half-close across (TLS transports cannot
write EOF and keep reading), so `nc -N`-style clients work as over plain TCP.
A TLS connection that ends without the end frame was cut: the plaintext
side is reset, never closed cleanly, so a truncated stream is not taken for
a complete one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import typing
from collections.abc import Callable, Sequence

from lepton_mesh.policy.sidecar_config import Address, Endpoint, SidecarConfig
from lepton_mesh.proxy.errors import Reason
from lepton_mesh.proxy.flow import PEER_BACKPRESSURE, ReadGate
from lepton_mesh.proxy.l4.tunnel import IdleTimeout, close_idle, reset, splice
from lepton_mesh.proxy.security.mtls import MeshTlsError, open_mesh_connection, plaintext_endpoints

if typing.TYPE_CHECKING:
    from lepton_mesh.proxy.security.mtls import Credentials, MeshIdentity

log = logging.getLogger(__name__)


class TcpMetrics(typing.Protocol):
    def tcp_opened(self, reporter: str, source_workload: str, destination_service: str) -> None: ...

    def tcp_closed(
        self,
        reporter: str,
        source_workload: str,
        destination_service: str,
        sent: int,
        received: int,
    ) -> None: ...


def connect_order(endpoints: Sequence[Endpoint], turn: int) -> list[Endpoint]:
    """The endpoints to try, in order, for the `turn`-th connection.

    Weighted round robin over healthy endpoints with a positive weight: over
    any `sum(weights)` consecutive turns each endpoint comes first `weight`
    times. The rest follow in list order (wrapping), each once, as fallbacks.
    The one place that chooses; a real balancer replaces this function.
    """
    live = [e for e in endpoints if e.healthy and e.weight > 0]
    if not live:
        return []
    slot = turn % sum(e.weight for e in live)
    for i, e in enumerate(live):
        if slot < e.weight:
            return live[i:] + live[:i]
        slot -= e.weight
    raise AssertionError("unreachable: slot < sum of weights")


class TcpProxy:
    """One service's listener; see the module docstring."""

    def __init__(
        self,
        service: str,
        get_config: Callable[[], SidecarConfig],
        metrics: TcpMetrics,
        identity: MeshIdentity | None = None,
    ) -> None:
        self.service = service
        self._get_config = get_config
        self._metrics = metrics
        self._identity = identity  # None: every endpoint in plaintext
        self._plaintext: tuple[SidecarConfig | None, frozenset[Address]] = (None, frozenset())
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self._turn = 0  # round-robin position, shared by all connections
        self._idle: asyncio.Event | None = None  # set when _conns empties, while closing
        # Called each time the last open connection closes (a draining
        # sidecar re-checks whether it is done).
        self.on_idle: Callable[[], None] | None = None

    async def start(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Held(self._accepted), host, port)
        self._server = server
        return server

    def active(self) -> int:
        """Client connections accepted and not yet closed."""
        return len(self._conns)

    def buffered(self) -> int:
        """Bytes waiting in this proxy's write buffers, over all connections."""
        return sum(c.buffered() for c in self._conns)

    def stop_listening(self) -> None:
        """Stop accepting; open connections go on (drain)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening and reset every connection (draining is the caller's job)."""
        self.stop_listening()
        conns = list(self._conns)
        for c in conns:
            c.abort()
        tasks = [c.task for c in conns if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._conns:
            self._idle = asyncio.Event()
            await self._idle.wait()
        if self._server is not None:
            await self._server.wait_closed()

    # --- per connection ---

    def _accepted(self, held: _Held) -> None:
        limit = self._get_config().limits.max_connections
        if len(self._conns) >= limit:
            # As the HTTP listeners' 503 overflow; with no protocol to answer in,
            # a reset (the app's client sees a failure, never a clean end).
            _log_refused(self.service, held.transport, Reason.OVERFLOW, f"{limit} connections open")
            reset(held.transport)
            return
        conn = _Conn(self, held)
        self._conns.add(conn)
        conn.task = asyncio.get_running_loop().create_task(self._connect(conn))
        conn.task.add_done_callback(conn.connect_done)

    def _finished(self, conn: _Conn) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        if self._conns:
            return
        if self._idle is not None:
            self._idle.set()
        if self.on_idle is not None:
            self.on_idle()

    async def _connect(self, conn: _Conn) -> None:
        cfg = self._get_config()
        svc = cfg.services.get(self.service)
        if svc is None or svc.protocol != "tcp":
            conn.fail(Reason.NO_ROUTE, "service not in config")
            return
        self._turn += 1
        order = connect_order(svc.endpoints, self._turn - 1)
        if not order:
            conn.fail(Reason.NO_HEALTHY_ENDPOINT, f"{len(svc.endpoints)} endpoints, none healthy")
            return
        timeout = cfg.timeouts.connect if cfg.timeouts.connect > 0 else None
        loop = asyncio.get_running_loop()
        identity = self._identity
        plaintext = self._plaintext_for(cfg)
        errors: list[str] = []
        for ep in order:
            creds: Credentials | None = None
            try:
                async with asyncio.timeout(timeout):
                    if identity is None or ep.address in plaintext:
                        upstream, held = await loop.create_connection(
                            lambda: _Held(None), ep.address.host, ep.address.port
                        )
                    else:
                        upstream, held, creds = await open_mesh_connection(  # type: ignore[assignment]
                            identity, lambda: _Held(None), ep.address, self.service, tcp=True
                        )
            except MeshTlsError as e:
                errors.append(e.detail)
                continue
            except (OSError, TimeoutError) as e:
                errors.append(f"{ep.address}: {_describe(e)}")
                continue
            if conn.client.lost:
                upstream.close()  # the app gave up while we were connecting
                return
            idle = cfg.timeouts.tcp_idle
            if creds is None:
                conn.tunnel(cfg.service, upstream, held, idle)
            else:
                conn.tunnel_secure(cfg.service, upstream, held, idle, creds, ep.address)
            return
        conn.fail(Reason.UPSTREAM_CONNECT_FAILED, "; ".join(errors))

    def _plaintext_for(self, cfg: SidecarConfig) -> frozenset[Address]:
        """The endpoints called without TLS, worked out once per config."""
        if self._identity is None:
            return frozenset()
        seen, addresses = self._plaintext
        if seen is not cfg:
            addresses = plaintext_endpoints(cfg)
            self._plaintext = (cfg, addresses)
        return addresses


class _Conn:
    """One accepted client connection, from accept to close."""

    __slots__ = ("client", "proxy", "task", "upstream")

    def __init__(self, proxy: TcpProxy, client: _Held) -> None:
        self.proxy = proxy
        self.client = client
        self.task: asyncio.Task[None] | None = None
        self.upstream: asyncio.Transport | None = None
        client.on_lost = self._client_lost

    def buffered(self) -> int:
        n = self.client.transport.get_write_buffer_size()
        if self.upstream is not None:
            n += self.upstream.get_write_buffer_size()
        return n

    def tunnel(self, source: str, upstream: asyncio.Transport, held: _Held, idle: float) -> None:
        proxy = self.proxy
        dest = proxy.service
        self.upstream = upstream
        proxy._metrics.tcp_opened("source", source, dest)
        self.client.on_lost = None  # the tunnel reports the end from here on

        def closed(sent: int, received: int) -> None:
            proxy._metrics.tcp_closed("source", source, dest, sent, received)
            proxy._finished(self)

        c = self.client
        splice(
            c.transport,
            upstream,
            a_to_b=c.take(),
            b_to_a=held.take(),
            a_eof=c.eof,
            b_eof=held.eof,
            on_closed=closed,
            idle=idle,
            on_idle=lambda: self.idle_timeout(idle),
        )

    def tunnel_secure(
        self,
        source: str,
        upstream: asyncio.Transport,
        held: _Held,
        idle: float,
        creds: Credentials,
        address: Address,
    ) -> None:
        """The endpoint is a peer sidecar: frames inside mTLS (see the module docstring)."""
        proxy = self.proxy
        dest = proxy.service
        identity = proxy._identity
        self.upstream = upstream
        proxy._metrics.tcp_opened("source", source, dest)
        self.client.on_lost = None
        sslobj = upstream.get_extra_info("ssl_object")

        def keep_session() -> None:
            creds.tcp.store(address, sslobj)

        def closed(sent: int, received: int) -> None:
            proxy._metrics.tcp_closed("source", source, dest, sent, received)
            if identity is not None:
                identity.connection_closed()
            proxy._finished(self)

        c = self.client
        splice_framed(
            c.transport,
            upstream,
            plain_pre=c.take(),
            secure_pre=held.take(),
            plain_eof=c.eof,
            secure_eof=held.eof,
            on_closed=closed,
            on_secure_data=keep_session,
            idle=idle,
            on_idle=lambda: self.idle_timeout(idle),
        )

    def fail(self, reason: str, detail: str) -> None:
        _log_refused(self.proxy.service, self.client.transport, reason, detail)
        self.client.transport.close()

    def idle_timeout(self, idle: float) -> None:
        """The tunnel closes both sides; say why."""
        detail = f"no byte either way for {idle:g}s"
        _log_refused(self.proxy.service, self.client.transport, Reason.IDLE_TIMEOUT, detail)

    def connect_done(self, task: asyncio.Task[None]) -> None:
        """A bug while connecting must not leave the client hanging."""
        if task.cancelled() or task.exception() is None:
            return
        log.error(
            "tcp service=%s: connecting failed", self.proxy.service, exc_info=task.exception()
        )
        self.abort()

    def abort(self) -> None:
        """Cut both sides with a reset: a clean close would pass a stream cut
        short (a drain's deadline, a stop) for a complete one."""
        if self.task is not None:
            self.task.cancel()
        reset(self.client.transport)
        if self.upstream is not None:
            reset(self.upstream)

    def _client_lost(self) -> None:
        if self.task is not None:
            self.task.cancel()  # stop connecting for nobody
        self.proxy._finished(self)


class _Held(asyncio.Protocol):
    """Holds a transport until it is spliced: keeps at most one chunk, and EOF."""

    __slots__ = ("chunks", "eof", "lost", "on_lost", "on_made", "transport")

    transport: asyncio.Transport

    def __init__(self, on_made: Callable[[_Held], None] | None) -> None:
        self.on_made = on_made
        self.on_lost: Callable[[], None] | None = None
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost = False

    def take(self) -> bytes:
        chunks, self.chunks = self.chunks, []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = typing.cast(asyncio.Transport, transport)
        # Reading stays on until the first chunk (data_received pauses): a
        # reset or EOF that comes before any data is still seen, and uvloop
        # would ignore a pause here anyway (it starts reading after
        # connection_made returns).
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True  # stay open: the reply may still have to be written

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.on_lost is not None:
            self.on_lost()


def _log_refused(service: str, client: asyncio.BaseTransport, reason: str, detail: str) -> None:
    """The one log line of a connection that could not be served, or was closed
    by the proxy (`idle_timeout`)."""
    peer = client.get_extra_info("peername")
    where = f"{peer[0]}:{peer[1]}" if peer else "?"
    log.warning("tcp service=%s client=%s reason=%s detail=%s", service, where, reason, detail)


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "connect timeout"
    return f"{type(e).__name__}: {e}"


# --- inbound L4 over mTLS ------------------------------------------------------------


class InboundTunnels:
    """L4 tunnels from peer sidecars, each piped to the local `target` (`tls.tcp_app`).

    The inbound listener hands over a TLS connection that negotiated ALPN
    `lepton-tcp/1` from inside its `connection_made` (`accept`); from then on
    this class owns it. `on_open` / `on_close` pair up once per tunnel (the
    listener counts them for drain); metrics report `reporter="destination"`
    with the caller's verified workload.
    """

    def __init__(
        self,
        service: str,
        target: Address,
        metrics: TcpMetrics,
        identity: MeshIdentity,
        *,
        connect_timeout: Callable[[], float],
        idle_timeout: Callable[[], float],
        on_open: Callable[[], None],
        on_close: Callable[[], None],
    ) -> None:
        self.service = service
        self.target = target
        self._metrics = metrics
        self._identity = identity
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout  # timeouts.tcp_idle, read at each splice
        self._on_open = on_open
        self._on_close = on_close
        self._live: set[_Inbound] = set()

    def active(self) -> int:
        return len(self._live)

    def accept(self, transport: asyncio.Transport, workload: str) -> None:
        """Take over a secured transport (call from its protocol's connection_made)."""
        held = _Held(None)
        held.transport = transport
        transport.set_protocol(held)  # reads pause after the first chunk, until spliced
        t = _Inbound(self, held, workload)
        self._live.add(t)
        held.on_lost = t.client_lost
        self._on_open()
        t.task = asyncio.get_running_loop().create_task(self._connect(t))

    async def _connect(self, t: _Inbound) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._connect_timeout()
        try:
            async with asyncio.timeout(timeout if timeout > 0 else None):
                app, held = await loop.create_connection(
                    lambda: _Held(None), self.target.host, self.target.port
                )
        except (OSError, TimeoutError) as e:
            t.fail(f"{self.target}: {_describe(e)}")
            return
        if t.client.lost:
            app.close()
            return
        t.splice(app, held, self._idle_timeout())

    def _done(self, t: _Inbound) -> None:
        if t in self._live:
            self._live.discard(t)
            self._identity.connection_closed()
            self._on_close()

    def abort_all(self) -> None:
        for t in list(self._live):
            t.abort()


class _Inbound:
    """One inbound L4 tunnel, from handover to close."""

    __slots__ = ("app", "client", "owner", "task", "workload")

    def __init__(self, owner: InboundTunnels, client: _Held, workload: str) -> None:
        self.owner = owner
        self.client = client
        self.workload = workload
        self.task: asyncio.Task[None] | None = None
        self.app: asyncio.Transport | None = None

    def splice(self, app: asyncio.Transport, held: _Held, idle: float) -> None:
        owner = self.owner
        self.app = app
        owner._metrics.tcp_opened("destination", self.workload, owner.service)
        self.client.on_lost = None

        def closed(to_peer: int, to_app: int) -> None:
            owner._metrics.tcp_closed("destination", self.workload, owner.service, to_app, to_peer)
            owner._done(self)

        c = self.client
        splice_framed(
            app,
            c.transport,
            plain_pre=held.take(),
            secure_pre=c.take(),
            plain_eof=held.eof,
            secure_eof=c.eof,
            on_closed=closed,
            idle=idle,
            on_idle=lambda: self._log(Reason.IDLE_TIMEOUT, f"no byte either way for {idle:g}s"),
        )

    def fail(self, detail: str) -> None:
        self._log(Reason.UPSTREAM_CONNECT_FAILED, detail)
        reset(self.client.transport)  # the caller's app sees a reset, as with no listener
        self.owner._done(self)

    def client_lost(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.owner._done(self)

    def _log(self, reason: str, detail: str) -> None:
        peer = self.client.transport.get_extra_info("peername")
        log.warning(
            "tcp inbound service=%s client=%s workload=%s reason=%s detail=%s",
            self.owner.service,
            f"{peer[0]}:{peer[1]}" if peer else "?",
            self.workload,
            reason,
            detail,
        )

    def abort(self) -> None:
        """Cut both sides with a reset, as `_Conn.abort` does."""
        if self.task is not None:
            self.task.cancel()
        reset(self.client.transport)
        if self.app is not None:
            reset(self.app)
        self.owner._done(self)


# --- lepton-tcp/1: frames inside TLS ----------------------------------------------------

FRAME_HEAD = struct.Struct(">I")
END_FRAME = FRAME_HEAD.pack(0)


class FrameError(Exception):
    """The peer broke the framing (data after the end frame)."""


class FrameDecoder:
    """Sans-IO reader of `lepton-tcp/1` frames: a 4-byte big-endian length, then
    that many bytes; length 0 is the end of the stream in this direction.

    `feed(data)` returns the payload pieces `data` holds (the whole object or
    memoryviews of it: never copied) and sets `ended` at the end frame. A frame
    may span any number of feeds, and a feed may hold any number of frames.
    """

    __slots__ = ("_head", "_left", "ended")

    def __init__(self) -> None:
        self._head = b""  # a length prefix split across feeds
        self._left = 0  # payload bytes still to come in the current frame
        self.ended = False

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        if self.ended:
            if data:
                raise FrameError("data after the end frame")
            return []
        out: list[bytes | memoryview] = []
        n = len(data)
        i = 0
        view: memoryview | None = None
        while i < n:
            left = self._left
            if left:
                take = min(left, n - i)
                if take == n:
                    out.append(data)  # the common case: a whole read is payload
                else:
                    if view is None:
                        view = memoryview(data)
                    out.append(view[i : i + take])
                self._left = left - take
                i += take
                continue
            need = 4 - len(self._head)
            self._head += data[i : i + need]
            i += need
            if len(self._head) < 4:
                break
            (length,) = FRAME_HEAD.unpack(self._head)
            self._head = b""
            if length == 0:
                self.ended = True
                if i < n:
                    raise FrameError("data after the end frame")
                break
            self._left = length
        return out


def splice_framed(
    plain: asyncio.Transport,
    secure: asyncio.Transport,
    *,
    plain_pre: bytes = b"",
    secure_pre: bytes = b"",
    plain_eof: bool = False,
    secure_eof: bool = False,
    on_closed: Callable[[int, int], None] | None = None,
    on_secure_data: Callable[[], None] | None = None,
    idle: float = 0.0,
    on_idle: Callable[[], None] | None = None,
) -> None:
    """Pipe a plaintext transport and a TLS one carrying `lepton-tcp/1` frames.

    The handover rules are `tunnel.splice`'s (call with no await since the
    previous protocols' last read; `*_pre` are bytes they read, `*_eof` an EOF
    they saw). `on_closed(plain_to_secure, secure_to_plain)` runs once, when
    both are closed, with payload byte counts. `on_secure_data` runs once, at
    the first bytes from the TLS side (or at the end): the caller keeps the
    TLS session then, its ticket having arrived. `idle`, `on_idle`: as in
    `tunnel.splice`, the end frame going out first when it can.
    """
    p = _PlainEnd(plain)
    q = _SecureEnd(secure, on_secure_data)
    p.peer, q.peer = q, p
    state = _Pair(p, q, on_closed)
    p.pair = q.pair = state
    if idle > 0:

        def idle_timeout() -> None:
            if on_idle is not None:
                on_idle()
            state.close_idle()

        p.idle = q.idle = state.idle = IdleTimeout(asyncio.get_running_loop(), idle, idle_timeout)
    plain.set_protocol(p)
    secure.set_protocol(q)
    if plain_pre:
        p.data_received(plain_pre)
    if secure_pre:
        q.data_received(secure_pre)
    if plain_eof:
        p.eof_received()
    if secure_eof:
        q.eof_received()
    if plain.is_closing():
        state.lost(p, None)
    if secure.is_closing():
        state.lost(q, None)
    p.take_reading()
    q.take_reading()


class _Pair:
    """What both ends share: who is closed, and the one on_closed call."""

    __slots__ = ("idle", "on_closed", "plain", "secure")

    def __init__(
        self, plain: _PlainEnd, secure: _SecureEnd, on_closed: Callable[[int, int], None] | None
    ) -> None:
        self.plain = plain
        self.secure = secure
        self.on_closed = on_closed
        self.idle: IdleTimeout | None = None

    def both_ended(self) -> bool:
        return self.plain.eof and self.secure.decoder.ended

    def finish(self) -> None:
        """Both directions ended: close both (each flushes what it holds first)."""
        self.plain.transport.close()
        self.secure.transport.close()

    def close_idle(self) -> None:
        """`tunnel.close_idle` for both, the end frame first if it can go out:
        the peer sidecar then ends its app's side cleanly too."""
        secure = self.secure
        t = secure.transport
        if not t.is_closing() and not t.get_write_buffer_size():
            secure.send_end()
            t.close()
        else:
            close_idle(t)
        close_idle(self.plain.transport)

    def lost(self, end: _PlainEnd | _SecureEnd, exc: BaseException | None) -> None:
        if end.lost:
            return
        end.lost = True
        other: _PlainEnd | _SecureEnd = self.secure if end is self.plain else self.plain
        if not other.lost:
            secure = self.secure
            truncated = end is secure and (secure.broken or not secure.decoder.ended)
            if exc is not None or truncated:
                reset(other.transport)
            elif end is self.plain and not self.secure.sent_end:
                self.secure.send_end()
                other.transport.close()
            else:
                other.transport.close()
            return
        if self.idle is not None:
            self.idle.cancel()
        self.secure.data_seen()
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            asyncio.get_running_loop().call_soon(on_closed, self.plain.nbytes, self.secure.nbytes)


class _PlainEnd(asyncio.Protocol):
    """The plaintext transport: what it reads goes out as frames on the TLS one."""

    __slots__ = ("eof", "gate", "idle", "lost", "nbytes", "pair", "peer", "transport")

    peer: _SecureEnd
    pair: _Pair

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.gate = ReadGate()
        self.eof = False
        self.lost = False
        self.nbytes = 0
        self.idle: IdleTimeout | None = None

    def take_reading(self) -> None:
        _take_reading(self.transport, self.gate, self.lost or self.eof, self.peer.transport)

    def data_received(self, data: bytes) -> None:
        idle = self.idle
        if idle is not None:
            idle.last = idle.now()
        peer = self.peer
        if peer.lost or peer.sent_end:
            return
        self.nbytes += len(data)
        peer.transport.writelines((FRAME_HEAD.pack(len(data)), data))

    def eof_received(self) -> bool:
        if self.eof or self.lost:
            return True
        self.eof = True
        peer = self.peer
        if not peer.lost:
            peer.send_end()
            if self.pair.both_ended():
                self.pair.finish()
        return True  # stay open: the other direction may still flow into it

    def pause_writing(self) -> None:
        if not self.peer.decoder.ended:
            self.peer.gate.pause(PEER_BACKPRESSURE)

    def resume_writing(self) -> None:
        if not self.peer.decoder.ended:
            self.peer.gate.resume(PEER_BACKPRESSURE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.lost(self, exc)


class _SecureEnd(asyncio.Protocol):
    """The TLS transport: frames in, payload out to the plaintext one."""

    __slots__ = (
        "broken",
        "decoder",
        "first",
        "gate",
        "idle",
        "lost",
        "nbytes",
        "pair",
        "peer",
        "sent_end",
        "transport",
    )

    peer: _PlainEnd
    pair: _Pair

    def __init__(self, transport: asyncio.Transport, first: Callable[[], None] | None) -> None:
        self.transport = transport
        self.first = first
        self.gate = ReadGate()
        self.decoder = FrameDecoder()
        self.broken = False  # the peer broke the framing: the stream is not trusted
        self.lost = False
        self.sent_end = False
        self.nbytes = 0
        self.idle: IdleTimeout | None = None

    def take_reading(self) -> None:
        _take_reading(
            self.transport, self.gate, self.lost or self.decoder.ended, self.peer.transport
        )

    def send_end(self) -> None:
        if not self.sent_end:
            self.sent_end = True
            self.transport.write(END_FRAME)

    def data_seen(self) -> None:
        first, self.first = self.first, None
        if first is not None:
            first()

    def data_received(self, data: bytes) -> None:
        idle = self.idle
        if idle is not None:
            idle.last = idle.now()
        if self.first is not None:
            self.data_seen()
        try:
            pieces = self.decoder.feed(data)
        except FrameError:
            self.broken = True
            reset(self.transport)
            return
        peer = self.peer
        if not peer.lost:
            write = peer.transport.write
            for piece in pieces:
                self.nbytes += len(piece)
                write(piece)
        if self.decoder.ended and not peer.lost:
            if self.pair.both_ended():
                self.pair.finish()
            elif not peer.transport.is_closing():
                peer.transport.write_eof()  # the half-close, carried across

    def eof_received(self) -> bool:
        # TLS ended. After the end frame that is the peer closing; before it, the
        # stream was cut, and connection_lost (which follows) resets the app side.
        return False

    def pause_writing(self) -> None:
        if not self.peer.eof:
            self.peer.gate.pause(PEER_BACKPRESSURE)

    def resume_writing(self) -> None:
        if not self.peer.eof:
            self.peer.gate.resume(PEER_BACKPRESSURE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.lost(self, exc)


def _take_reading(
    t: asyncio.Transport, gate: ReadGate, done: bool, peer: asyncio.Transport
) -> None:
    """Own `t`'s reading from now on (tunnel.splice's handover rule)."""
    if done or t.is_closing():
        return
    with contextlib.suppress(NotImplementedError):
        low_high = peer.get_write_buffer_limits()
        if peer.get_write_buffer_size() > low_high[1]:
            gate.pause(PEER_BACKPRESSURE)
    gate.attach(t)
    if not gate.paused:
        t.resume_reading()
