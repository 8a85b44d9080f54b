"""The L4 proxy: a local listener per TCP service, piping raw bytes to an endpoint.

For databases and brokers the app connects to `ServiceConfig.listen`; each
accepted connection is tunnelled (lepton_mesh.proxy.tunnel) to one of the
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
- `metrics.tcp_opened` is counted once the upstream connection is made, and
  every opened connection is matched by exactly one `tcp_closed`.
"""

from __future__ import annotations

import asyncio
import logging
import typing
from collections.abc import Callable, Sequence

from lepton_mesh.policy.sidecar_config import Endpoint, SidecarConfig
from lepton_mesh.proxy.errors import Reason
from lepton_mesh.proxy.tunnel import splice

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
        self, service: str, get_config: Callable[[], SidecarConfig], metrics: TcpMetrics
    ) -> None:
        self.service = service
        self._get_config = get_config
        self._metrics = metrics
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
        """Stop listening and abort every connection (draining is the caller's job)."""
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
        errors: list[str] = []
        for ep in order:
            try:
                async with asyncio.timeout(timeout):
                    upstream, held = await loop.create_connection(
                        lambda: _Held(None), ep.address.host, ep.address.port
                    )
            except (OSError, TimeoutError) as e:
                errors.append(f"{ep.address}: {_describe(e)}")
                continue
            if conn.client.lost:
                upstream.close()  # the app gave up while we were connecting
                return
            conn.tunnel(cfg.service, upstream, held)
            return
        conn.fail(Reason.UPSTREAM_CONNECT_FAILED, "; ".join(errors))


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

    def tunnel(self, source: str, upstream: asyncio.Transport, held: _Held) -> None:
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
        )

    def fail(self, reason: str, detail: str) -> None:
        peer = self.client.transport.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if peer else "?"
        log.warning(
            "tcp service=%s client=%s reason=%s detail=%s",
            self.proxy.service,
            client,
            reason,
            detail,
        )
        self.client.transport.close()

    def connect_done(self, task: asyncio.Task[None]) -> None:
        """A bug while connecting must not leave the client hanging."""
        if task.cancelled() or task.exception() is None:
            return
        log.error(
            "tcp service=%s: connecting failed", self.proxy.service, exc_info=task.exception()
        )
        self.abort()

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.client.transport.abort()
        if self.upstream is not None:
            self.upstream.abort()

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


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "connect timeout"
    return f"{type(e).__name__}: {e}"
