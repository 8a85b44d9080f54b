"""Fixtures for the control daemon's tests: a real etcd, replicas, protocol peers.

The replicas use the fixed `/lepton/v1/` layout, so this folder runs its own
etcd (one per module) and wipes that prefix before each test, rather than
sharing the run-wide etcd whose tests are isolated by random prefixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from lepton_mesh import meshproto as mp
from lepton_mesh.control.daemon import ControlDaemon, ControlOptions
from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.store import Store
from tests.support.etcd import eventually

__all__ = ["Peer", "eventually"]

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def control_etcd() -> Iterator[LocalEtcd]:
    server = LocalEtcd(fast=True).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def store(control_etcd: LocalEtcd) -> AsyncIterator[Store]:
    if not control_etcd.running:  # a test stopped it and failed before starting it again
        control_etcd.start()
    s = await Store.connect(control_etcd.endpoints, timeout=3.0)
    await s.delete("/lepton/v1/", prefix=True)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(autouse=True)
async def close_peers() -> AsyncIterator[None]:
    yield
    peers, Peer.opened = Peer.opened, []
    for peer in peers:
        await peer.close()


Replicas = Callable[..., Awaitable[ControlDaemon]]


@pytest.fixture
async def replicas(control_etcd: LocalEtcd, store: Store) -> AsyncIterator[Replicas]:
    """`await replicas(**option overrides)` starts a replica; all are stopped after."""
    started: list[ControlDaemon] = []

    async def start(**overrides: Any) -> ControlDaemon:
        opts: dict[str, Any] = {
            "etcd": tuple(control_etcd.endpoints),
            "listen": ("127.0.0.1", 0),
            "admin": None,
            "replica_id": f"replica-{next(_ids)}",
            "etcd_timeout": 2.0,
        }
        daemon = ControlDaemon(ControlOptions(**(opts | overrides)))
        await daemon.start()
        assert daemon.ctx is not None
        await asyncio.wait_for(daemon.ctx.cache.ready.wait(), 10)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        await daemon.stop()


def hello(
    service: str,
    node_id: str | None = None,
    *,
    deps: tuple[str, ...] = (),
    port: int = 15006,
    labels: dict[str, str] | None = None,
    namespace: str = "default",
    protocol: int = mp.PROTOCOL_VERSION,
) -> mp.Hello:
    return mp.Hello(
        node_id=node_id or f"{service}-{next(_ids)}",
        service=service,
        namespace=namespace,
        instance=mp.Instance("127.0.0.1", {"http": port}, labels or {}),
        dependencies=deps,
        protocol=protocol,
    )


class Peer:
    """A sidecar as the control daemon sees it: a real socket speaking meshproto.

    Every peer a test opens is closed after it (`close_peers`)."""

    opened: list[Peer] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = mp.FrameDecoder()
        self.snapshot: mp.Snapshot | None = None  # the latest received
        self.snapshots: list[mp.Snapshot] = []

    @classmethod
    async def connect(cls, port: int, hello_msg: mp.Hello | None = None) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        peer = cls(reader, writer)
        cls.opened.append(peer)
        if hello_msg is not None:
            peer.send(hello_msg)
        return peer

    @classmethod
    async def join(cls, port: int, hello_msg: mp.Hello) -> Peer:
        """Connect, hello, and read the welcome and the first snapshot."""
        peer = await cls.connect(port, hello_msg)
        welcome = await peer.recv()
        assert isinstance(welcome, mp.Welcome), welcome
        await peer.next_snapshot()
        return peer

    def send(self, msg: mp.Message) -> None:
        self.writer.write(mp.encode(msg))

    async def recv(self, timeout: float = 5.0) -> mp.Message | None:
        """The next message; None when the control closed the stream."""
        async with asyncio.timeout(timeout):
            while True:
                msg = self.decoder.next_message()
                if msg is not None:
                    if isinstance(msg, mp.Snapshot):
                        self.snapshot = msg
                        self.snapshots.append(msg)
                    return msg
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.decoder.feed(data)

    async def next_snapshot(
        self, cond: Callable[[mp.Snapshot], bool] = lambda s: True, timeout: float = 5.0
    ) -> mp.Snapshot:
        """Read until a snapshot satisfying `cond` arrives (others are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv(timeout)
                assert msg is not None, "stream closed"
                if isinstance(msg, mp.Snapshot) and cond(msg):
                    return msg

    async def ping(self) -> None:
        """A ping answered by a pong: the stream is up and the control is serving it."""
        self.send(mp.Ping(1.5))
        while True:
            msg = await self.recv()
            assert msg is not None, "stream closed"
            if isinstance(msg, mp.Pong):
                assert msg.time == 1.5
                return

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def endpoints(snap: mp.Snapshot, service: str) -> list[dict[str, Any]]:
    svc = snap.services.get(service)
    return list(svc["endpoints"]) if svc is not None else []
