"""A control peer built from meshproto on a real socket, and helpers for the client's tests.

`ControlPeer` is the other end of the stream as docs/control-plane.md
defines it: it answers Hello with Welcome (and, if told, a snapshot), Ping
with Pong, and records every message it receives, per connection. The test
sends it snapshots, errors or raw bytes, and can make it silent or stop it.
It is a protocol peer, not a stand-in for the control daemon's logic.

Nothing here sleeps to wait for state: `wait_for` polls a condition with a
deadline (tests/proxy's helper).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_PROXY_TESTS = Path(__file__).resolve().parent.parent / "proxy"
if str(_PROXY_TESTS) not in sys.path:
    sys.path.insert(0, str(_PROXY_TESTS))  # for `import proxy_harness`

from proxy_harness import (  # noqa: E402
    DEADLINE,
    LOCAL,
    Conn,
    Message,
    RawClient,
    get,
    response_bytes,
    wait_for,
)

from lepton_mesh import meshproto as mp  # noqa: E402
from lepton_mesh.policy.sidecar_config import Address, SidecarConfig  # noqa: E402
from lepton_mesh.policy.sidecar_loader import sidecar_config_from_mapping  # noqa: E402
from lepton_mesh.proxy.mesh.control_client import ControlTiming  # noqa: E402

__all__ = ["DEADLINE", "FAST", "ControlPeer", "PeerConn", "wait_for"]

# Clocks shrunk so that every timer-driven path runs within a test's budget.
FAST = ControlTiming(
    backoff_base=0.02,
    backoff_max=0.2,
    connect_timeout=1.0,
    ping_interval=0.1,
    silence_timeout=0.6,
    lkg_wait=0.3,
)


class PeerConn(asyncio.Protocol):
    """One sidecar connection as the control peer sees it."""

    def __init__(self, peer: ControlPeer) -> None:
        self.peer = peer
        self.decoder = mp.FrameDecoder()
        self.received: list[mp.Message] = []
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.opened_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.opened_at = asyncio.get_running_loop().time()
        self.peer.conns.append(self)
        if self.peer.hang_up:
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        while (msg := self.decoder.next_message()) is not None:
            self.received.append(msg)
            self.peer._on_message(self, msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def send(self, msg: mp.Message) -> None:
        self.write(mp.encode(msg))

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.received if isinstance(m, kind)]


class ControlPeer:
    """A control replica's side of the stream, on 127.0.0.1."""

    def __init__(
        self,
        control_id: str = "control-a",
        *,
        welcome: bool = True,
        pong: bool = True,
        snapshot: mp.Snapshot | None = None,
        hang_up: bool = False,
    ) -> None:
        self.control_id = control_id
        self.welcome = welcome  # answer Hello with Welcome
        self.pong = pong  # answer Ping with Pong
        self.snapshot = snapshot  # sent right after Welcome
        self.hang_up = hang_up  # close every connection as soon as it is accepted
        self.conns: list[PeerConn] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> ControlPeer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: PeerConn(self), LOCAL, 0)
        return self

    @property
    def address(self) -> Address:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(host, port)

    def _on_message(self, conn: PeerConn, msg: mp.Message) -> None:
        if isinstance(msg, mp.Hello) and self.welcome:
            conn.send(mp.Welcome(self.control_id))
            if self.snapshot is not None:
                conn.send(self.snapshot)
        elif isinstance(msg, mp.Ping) and self.pong:
            conn.send(mp.Pong(msg.time))

    @property
    def conn(self) -> PeerConn:
        """The newest connection."""
        assert self.conns, "no sidecar connected"
        return self.conns[-1]

    def of(self, kind: type) -> list[Any]:
        return [m for c in self.conns for m in c.received if isinstance(m, kind)]

    async def wait_connected(self, n: int = 1) -> PeerConn:
        await wait_for(lambda: len(self.conns) >= n, what=f"{n} connection(s) to {self.control_id}")
        await wait_for(lambda: bool(self.conns[n - 1].of(mp.Hello)), what="hello")
        return self.conns[n - 1]

    async def wait_message(self, kind: type, n: int = 1, **fields: Any) -> Any:
        """The n-th message of `kind` (over all connections) whose fields match."""

        def found() -> list[Any]:
            return [m for m in self.of(kind) if all(getattr(m, k) == v for k, v in fields.items())]

        await wait_for(lambda: len(found()) >= n, what=f"{kind.__name__} {fields} #{n}")
        return found()[n - 1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


# --- the sidecar side -----------------------------------------------------------


def named(name: str, status: int = 200) -> Any:
    """An HTTP app that answers every request with its name: which upstream served it."""

    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(response_bytes(status, name.encode()))

    return handler


def endpoints(*addresses: Address, **labels: str) -> list[dict[str, Any]]:
    return [
        {"address": str(a), "weight": 1, "labels": dict(labels), "healthy": True} for a in addresses
    ]


def snapshot(
    version: int,
    services: Mapping[str, Iterable[Address] | Mapping[str, Any]],
    policies: Iterable[Mapping[str, Any]] = (),
) -> mp.Snapshot:
    out: dict[str, Any] = {}
    for name, svc in services.items():
        out[name] = (
            dict(svc)
            if isinstance(svc, Mapping)
            else {"protocol": "http", "endpoints": endpoints(*svc)}
        )
    return mp.Snapshot(version, out, tuple(policies))


def route(destination: str, to: str) -> dict[str, Any]:
    return {
        "apiVersion": "lepton-mesh/v1",
        "kind": "Route",
        "metadata": {"name": destination, "namespace": "default"},
        "spec": {"destination": destination, "rules": [{"backends": [{"service": to}]}]},
    }


def control_config(
    addresses: Iterable[Address],
    *,
    app: Address,
    state_dir: str | None = None,
    **extra: Any,
) -> SidecarConfig:
    """A sidecar of `chat` fed by control, every listener on a free port; `extra` adds YAML keys."""
    control: dict[str, Any] = {"addresses": [str(a) for a in addresses]}
    if state_dir is not None:
        control["state_dir"] = state_dir
    data = {
        "service": "chat",
        "app": str(app),
        "listeners": {"outbound": f"{LOCAL}:0", "inbound": f"{LOCAL}:0", "admin": f"{LOCAL}:0"},
        "dependencies": ["intent"],
        "control": control,
        **extra,
    }
    return sidecar_config_from_mapping(data, "chat.yaml")


async def call(sc: Any, service: str, path: str = "/") -> Message:
    """One request through the sidecar's outbound listener to `service`."""
    c = await RawClient.connect(sc.addresses["outbound"])
    try:
        return await c.request(get(path, host=service))
    finally:
        await c.close()


async def admin_get(sc: Any, path: str) -> Message:
    c = await RawClient.connect(sc.addresses["admin"])
    try:
        return await c.request(get(path, host="admin"))
    finally:
        await c.close()
