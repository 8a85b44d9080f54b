"""Helpers for the tunnel and L4 proxy tests: real sockets on 127.0.0.1.

`Servers` owns every server and connection a test opens and closes them all
at teardown, so no transport outlives its test (warnings are errors, and an
unclosed transport warns). Conditions are awaited with `until`, which polls
a predicate against a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import MappingProxyType

from lepton_mesh.policy.sidecar_config import (
    Address,
    Endpoint,
    ServiceConfig,
    SidecarConfig,
    Timeouts,
)

DEADLINE = 10.0
HOST = "127.0.0.1"


async def until(pred: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    """Wait until `pred()` is true; fail with `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.001)


def reset(transport: asyncio.BaseTransport) -> None:
    """Abort with SO_LINGER 0, so the peer gets a TCP RST."""
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


class Owner(asyncio.Protocol):
    """Stands in for the protocol that owns a transport before a splice
    (the HTTP proxy's, say): records what it reads, keeps the connection on EOF."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.eof = False
        self.lost = False

    @property
    def t(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@dataclass
class Remote:
    """The far end of a connection, as a stream client."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def reset(self) -> None:
        reset(self.writer.transport)


@dataclass
class Endpoint_:
    """A test server the proxy connects to: counts accepted connections."""

    address: Address
    server: asyncio.AbstractServer
    accepted: int = 0


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close."""
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


@dataclass
class Servers:
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    transports: list[asyncio.BaseTransport] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    sockets: list[socket.socket] = field(default_factory=list)
    _owners: asyncio.Queue[Owner] | None = None
    _owner_addr: tuple[str, int] | None = None

    async def serve(self, handler: Handler = echo) -> Endpoint_:
        """A stream server running `handler` per connection."""
        ep: Endpoint_

        def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ep.accepted += 1
            self.writers.append(writer)
            task = asyncio.get_running_loop().create_task(_quiet(handler(reader, writer)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        server = await asyncio.start_server(on_accept, HOST, 0)
        self.servers.append(server)
        port = server.sockets[0].getsockname()[1]
        ep = Endpoint_(Address(HOST, port), server)
        return ep

    def dead_address(self) -> Address:
        """An address that refuses connections: bound, never listening."""
        s = socket.socket()
        s.bind((HOST, 0))
        self.sockets.append(s)
        return Address(HOST, s.getsockname()[1])

    def blackhole_address(self) -> Address:
        """An address where connect() hangs: a listener with backlog 0 whose
        accept queue is already full, so the kernel drops further SYNs
        (Linux, with the default tcp_abort_on_overflow=0)."""
        s = socket.socket()
        s.bind((HOST, 0))
        s.listen(0)
        self.sockets.append(s)
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(s.getsockname())
            self.sockets.append(c)
        return Address(HOST, s.getsockname()[1])

    async def connect(self, addr: Address) -> Remote:
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        self.writers.append(writer)
        return Remote(reader, writer)

    async def pair(self) -> tuple[Owner, Remote]:
        """A connection whose near end is owned by an `Owner` (a transport to
        splice) and whose far end is a stream client."""
        if self._owners is None:
            owners: asyncio.Queue[Owner] = asyncio.Queue()
            self._owners = owners

            def factory() -> Owner:
                o = Owner()
                owners.put_nowait(o)
                return o

            server = await asyncio.get_running_loop().create_server(factory, HOST, 0)
            self.servers.append(server)
            self._owner_addr = server.sockets[0].getsockname()[:2]
        assert self._owner_addr is not None
        remote = await self.connect(Address(*self._owner_addr))
        owner = await asyncio.wait_for(self._owners.get(), DEADLINE)
        await until(lambda: owner.transport is not None, "connection_made")
        self.transports.append(owner.t)
        return owner, remote

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for w in self.writers:
            w.transport.abort()
        for t in self.transports:
            t.abort()  # type: ignore[attr-defined]
        for s in self.sockets:
            s.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()


async def _quiet(aw: Awaitable[None]) -> None:
    """Run a server handler; a peer's reset or abort is part of these tests."""
    with contextlib.suppress(ConnectionError):
        await aw


class FakeMetrics:
    """Records calls exactly as ProxyMetrics would receive them."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def tcp_opened(self, reporter: str, source_workload: str, destination_service: str) -> None:
        self.calls.append(("opened", reporter, source_workload, destination_service))

    def tcp_closed(
        self,
        reporter: str,
        source_workload: str,
        destination_service: str,
        sent: int,
        received: int,
    ) -> None:
        self.calls.append(
            ("closed", reporter, source_workload, destination_service, sent, received)
        )


class ConfigBox:
    """Holds the current config; the proxy reads it through `get`."""

    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg

    def get(self) -> SidecarConfig:
        return self.cfg


def tcp_config(
    *endpoints: Address | Endpoint, service: str = "db", connect_timeout: float = 1.0
) -> SidecarConfig:
    """A config for source workload `app` with one tcp service."""
    eps = tuple(e if isinstance(e, Endpoint) else Endpoint(e) for e in endpoints)
    svc = ServiceConfig(service, protocol="tcp", endpoints=eps, listen=Address(HOST, 0))
    return SidecarConfig(
        service="app",
        app=Address(HOST, 1),
        services=MappingProxyType({service: svc}),
        timeouts=Timeouts(connect=connect_timeout),
    )
