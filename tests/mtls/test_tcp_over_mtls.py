"""L4 over mTLS: the app's TCP client -> A's tcp listener -> mTLS (ALPN
lepton-tcp/1, framed) -> B's inbound listener -> B's tcp_app.

Half-close must cross both sidecars (a client that sends, shuts down its
write side and then reads the answer), in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mtls_support import (
    DEADLINE,
    LOCAL,
    App,
    Pki,
    metric,
    sidecar_config,
    wait_for,
    write_tls,
)

from lepton_mesh.policy.sidecar_config import Address


class TcpApp:
    """Reads until EOF, answers `got:<bytes>`, then closes (as a batch job's server would).
    With `greet`, it speaks first. `reset` aborts instead of answering."""

    def __init__(self, *, greet: bytes = b"", reset: bool = False) -> None:
        self.greet = greet
        self.reset = reset
        self.server: asyncio.Server | None = None
        self.received: list[bytes] = []

    async def start(self) -> TcpApp:
        self.server = await asyncio.start_server(self._serve, LOCAL, 0)
        return self

    @property
    def address(self) -> Address:
        assert self.server is not None
        return Address(LOCAL, self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.greet:
                writer.write(self.greet)
            data = await reader.read()  # to EOF: the client's half-close got here
            self.received.append(data)
            if self.reset:  # RST, not FIN: SO_LINGER 0, then close
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            writer.write(b"got:" + data)
            await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def tcp_app() -> AsyncIterator[TcpApp]:
    srv = await TcpApp().start()
    yield srv
    await srv.stop()


async def l4_mesh(tmp_path: Path, pki: Pki, sidecars, app: App, tcp_target: Address | None):
    b = await sidecars(
        sidecar_config(
            "db",
            app.address,
            tls_cfg=write_tls(tmp_path / "b", pki.issue("db"), pki.bundle_pem, tcp_app=tcp_target),
        )
    )
    a = await sidecars(
        sidecar_config(
            "web",
            app.address,
            tls_cfg=write_tls(tmp_path / "a", pki.issue("web"), pki.bundle_pem),
            tcp={"db": [b.addresses["inbound"]]},
        )
    )
    return a, b


async def exchange(address: Address, payload: bytes, *, greeting: int = 0) -> tuple[bytes, bytes]:
    """Connect, read `greeting` bytes, send, half-close, read to EOF."""
    async with asyncio.timeout(DEADLINE):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        try:
            hello = await reader.readexactly(greeting) if greeting else b""
            writer.write(payload)
            writer.write_eof()
            return hello, await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def test_half_close_crosses_two_sidecars(
    tmp_path: Path, pki: Pki, sidecars, app: App, tcp_app: TcpApp
) -> None:
    a, b = await l4_mesh(tmp_path, pki, sidecars, app, tcp_app.address)
    payload = b"x" * 300_000 + b"end"  # many frames, larger than any one read
    _, answer = await exchange(a.addresses["tcp:db"], payload)
    assert answer == b"got:" + payload
    assert tcp_app.received == [payload]
    await wait_for(
        lambda: metric(b, "lepton_tcp_connections_closed_total", reporter="destination") == 1
    )
    assert (
        metric(
            b,
            "lepton_tcp_connections_opened_total",
            reporter="destination",
            source_workload="web",
            destination_service="db",
        )
        == 1
    )
    assert metric(b, "lepton_tcp_received_bytes_total", reporter="destination") == len(payload)
    assert metric(b, "lepton_tcp_sent_bytes_total", reporter="destination") == len(payload) + 4
    await wait_for(lambda: metric(a, "lepton_tcp_connections_closed_total", reporter="source") == 1)
    assert metric(a, "lepton_tls_handshakes_total", side="outbound", resumed="false") == 1


async def test_server_speaks_first_and_sessions_resume(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    greeter = await TcpApp(greet=b"HELLO\n").start()
    try:
        a, _ = await l4_mesh(tmp_path, pki, sidecars, app, greeter.address)
        for _ in range(3):
            hello, answer = await exchange(a.addresses["tcp:db"], b"ping", greeting=6)
            assert (hello, answer) == (b"HELLO\n", b"got:ping")
        assert metric(a, "lepton_tls_handshakes_total", side="outbound", resumed="true") == 2
    finally:
        await greeter.stop()


async def test_app_reset_reaches_the_client_as_a_reset(
    tmp_path: Path, pki: Pki, sidecars, app: App
) -> None:
    resetter = await TcpApp(reset=True).start()
    try:
        a, _ = await l4_mesh(tmp_path, pki, sidecars, app, resetter.address)
        with pytest.raises(ConnectionResetError):
            await exchange(a.addresses["tcp:db"], b"data")
        assert resetter.received == [b"data"]
    finally:
        await resetter.stop()


async def test_peer_without_tcp_app_refuses_tunnels(
    tmp_path: Path, pki: Pki, sidecars, app: App, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = await l4_mesh(tmp_path, pki, sidecars, app, None)
    _, answer = await exchange(a.addresses["tcp:db"], b"data")
    assert answer == b""  # the client's connection is closed: no peer would take it
    assert metric(a, "lepton_tls_handshake_failures_total", reason="other") == 1
    assert any("does not accept L4 tunnels" in r.getMessage() for r in caplog.records)


async def test_tcp_app_down_resets_the_client(tmp_path: Path, pki: Pki, sidecars, app: App) -> None:
    dead = await TcpApp().start()
    target = dead.address
    await dead.stop()  # nothing listens there now
    a, b = await l4_mesh(tmp_path, pki, sidecars, app, target)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(DEADLINE):
            reader, writer = await asyncio.open_connection(
                a.addresses["tcp:db"].host, a.addresses["tcp:db"].port
            )
            try:
                writer.write(b"data")
                got = await reader.read()
                if got == b"":
                    raise ConnectionResetError("closed")  # also acceptable: nothing came back
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    await wait_for(lambda: b.inbound.busy() == 0)
