"""The L4 proxy end to end: a real client, the proxy, real servers, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from tcp_support import (
    DEADLINE,
    ConfigBox,
    FakeMetrics,
    Servers,
    reset,
    tcp_config,
    until,
)

from lepton_mesh.policy.sidecar_config import Address, Endpoint, Limits, SidecarConfig
from lepton_mesh.proxy.l4.tcp_proxy import TcpProxy, connect_order


@dataclass
class Running:
    proxy: TcpProxy
    address: Address
    box: ConfigBox
    metrics: FakeMetrics


StartProxy = Callable[[SidecarConfig], Awaitable[Running]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """`await start_proxy(cfg)` -> Running; every proxy is closed at teardown."""
    started: list[TcpProxy] = []

    async def start(cfg: SidecarConfig) -> Running:
        box, metrics = ConfigBox(cfg), FakeMetrics()
        proxy = TcpProxy("db", box.get, metrics)
        server = await proxy.start("127.0.0.1", 0)
        started.append(proxy)
        port = server.sockets[0].getsockname()[1]
        return Running(proxy, Address("127.0.0.1", port), box, metrics)

    yield start
    for p in started:
        await asyncio.wait_for(p.close(), DEADLINE)


def opened() -> tuple[object, ...]:
    return ("opened", "source", "app", "db")


def closed(sent: int, received: int) -> tuple[object, ...]:
    return ("closed", "source", "app", "db", sent, received)


async def test_echo_through_the_proxy(servers: Servers, start_proxy: StartProxy) -> None:
    up = await servers.serve()
    run = await start_proxy(tcp_config(up.address))
    c = await servers.connect(run.address)
    c.writer.write(b"hello through the mesh")
    assert await c.reader.readexactly(22) == b"hello through the mesh"
    assert run.proxy.active() == 1
    c.writer.write_eof()
    assert await c.reader.read() == b""
    await until(lambda: run.proxy.active() == 0, "connection closed")
    assert run.metrics.calls == [opened(), closed(22, 22)]


async def test_server_may_speak_first(servers: Servers, start_proxy: StartProxy) -> None:
    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ready\r\n")  # like SMTP, MySQL: before the client says anything
        writer.write(await reader.read())
        writer.close()

    up = await servers.serve(greeter)
    run = await start_proxy(tcp_config(up.address))
    c = await servers.connect(run.address)
    assert await c.reader.readexactly(11) == b"220 ready\r\n"
    c.writer.write(b"QUIT")
    c.writer.write_eof()
    assert await c.reader.read() == b"QUIT"


async def test_half_close_client_still_gets_the_full_reply(
    servers: Servers, start_proxy: StartProxy
) -> None:
    reply = bytes(range(256)) * 8192  # 2 MiB, sent only after the client's EOF

    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF
        assert request == b"whole request"
        writer.write(reply)
        await writer.drain()
        writer.close()

    up = await servers.serve(reply_after_eof)
    run = await start_proxy(tcp_config(up.address))
    c = await servers.connect(run.address)
    c.writer.write(b"whole request")
    c.writer.write_eof()
    assert await c.reader.read() == reply
    await until(lambda: run.proxy.active() == 0, "connection closed")
    assert run.metrics.calls == [opened(), closed(13, len(reply))]


async def test_server_initiated_close(servers: Servers, start_proxy: StartProxy) -> None:
    async def bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.close()

    up = await servers.serve(bye)
    run = await start_proxy(tcp_config(up.address))
    c = await servers.connect(run.address)
    assert await c.reader.read() == b"bye"  # then EOF
    assert run.proxy.active() == 1  # half-closed: the client may still talk
    c.writer.close()
    await until(lambda: run.proxy.active() == 0, "connection closed")
    assert run.metrics.calls == [opened(), closed(0, 3)]


async def test_server_reset_reaches_the_client_as_a_reset(
    servers: Servers, start_proxy: StartProxy
) -> None:
    async def reset_on_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        reset(writer.transport)

    up = await servers.serve(reset_on_data)
    run = await start_proxy(tcp_config(up.address))
    c = await servers.connect(run.address)
    c.writer.write(b"!")
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(DEADLINE):
            await c.reader.read()
    await until(lambda: run.proxy.active() == 0, "connection closed")
    assert run.metrics.calls == [opened(), closed(1, 0)]


async def test_client_reset_reaches_the_server_as_a_reset(
    servers: Servers, start_proxy: StartProxy
) -> None:
    seen: list[BaseException] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        try:
            await reader.read()
        except ConnectionResetError as e:
            seen.append(e)

    up = await servers.serve(record)
    run = await start_proxy(tcp_config(up.address))
    c = await servers.connect(run.address)
    assert await c.reader.readexactly(2) == b"ok"
    c.reset()
    await until(lambda: seen, "the server saw a reset")
    await until(lambda: run.proxy.active() == 0, "connection closed")


async def test_refused_endpoint_falls_over_to_the_live_one(
    servers: Servers, start_proxy: StartProxy
) -> None:
    up = await servers.serve()
    run = await start_proxy(tcp_config(servers.dead_address(), up.address))
    c = await servers.connect(run.address)  # turn 0: the dead endpoint comes first
    c.writer.write(b"still served")
    assert await c.reader.readexactly(12) == b"still served"
    assert up.accepted == 1


async def test_timed_out_endpoint_falls_over_to_the_live_one(
    servers: Servers, start_proxy: StartProxy
) -> None:
    up = await servers.serve()
    cfg = tcp_config(servers.blackhole_address(), up.address, connect_timeout=0.2)
    run = await start_proxy(cfg)
    c = await servers.connect(run.address)
    c.writer.write(b"late but served")
    assert await c.reader.readexactly(15) == b"late but served"


async def test_all_endpoints_dead_closes_the_client_and_logs_why(
    servers: Servers,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = [servers.dead_address(), servers.dead_address()]
    run = await start_proxy(tcp_config(*dead))
    c = await servers.connect(run.address)
    with caplog.at_level(logging.WARNING, logger="lepton_mesh.proxy.l4.tcp_proxy"):
        assert await c.reader.read() == b""  # closed, nothing sent
        await until(lambda: run.proxy.active() == 0, "connection closed")
    [line] = caplog.messages
    assert "service=db" in line
    assert "reason=upstream_connect_failed" in line
    for addr in dead:
        assert str(addr) in line  # every endpoint tried once, each named with its error
    assert line.count("ConnectionRefusedError") == 2
    assert run.metrics.calls == []


async def test_no_healthy_endpoint(
    servers: Servers, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    up = await servers.serve()
    run = await start_proxy(tcp_config(Endpoint(up.address, healthy=False)))
    c = await servers.connect(run.address)
    with caplog.at_level(logging.WARNING, logger="lepton_mesh.proxy.l4.tcp_proxy"):
        assert await c.reader.read() == b""
    assert "reason=no_healthy_endpoint" in caplog.text
    assert up.accepted == 0


async def test_client_reset_while_connecting_stops_connecting(
    servers: Servers, start_proxy: StartProxy
) -> None:
    cfg = tcp_config(servers.blackhole_address(), connect_timeout=30)
    run = await start_proxy(cfg)
    c = await servers.connect(run.address)
    await until(lambda: run.proxy.active() == 1, "accepted")
    c.reset()
    await until(lambda: run.proxy.active() == 0, "connection forgotten")
    assert run.metrics.calls == []


async def test_bytes_are_counted_per_direction(servers: Servers, start_proxy: StartProxy) -> None:
    async def thrice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(1000)
        writer.write(data * 3)
        writer.close()

    up = await servers.serve(thrice)
    run = await start_proxy(tcp_config(up.address))
    for _ in range(2):
        c = await servers.connect(run.address)
        c.writer.write(b"q" * 1000)
        assert len(await c.reader.read()) == 3000
        c.writer.close()
        await until(lambda: run.proxy.active() == 0, "connection closed")
    assert run.metrics.calls == [opened(), closed(1000, 3000)] * 2


async def test_config_swap_new_connections_use_new_endpoints(
    servers: Servers, start_proxy: StartProxy
) -> None:
    old, new = await servers.serve(), await servers.serve()
    run = await start_proxy(tcp_config(old.address))
    c1 = await servers.connect(run.address)
    c1.writer.write(b"1")
    assert await c1.reader.readexactly(1) == b"1"

    run.box.cfg = tcp_config(new.address)  # the sidecar swaps the snapshot
    c2 = await servers.connect(run.address)
    c2.writer.write(b"2")
    assert await c2.reader.readexactly(1) == b"2"
    assert (old.accepted, new.accepted) == (1, 1)

    c1.writer.write(b"old connection still works")
    assert await c1.reader.readexactly(26) == b"old connection still works"
    assert (old.accepted, new.accepted) == (1, 1)


async def test_round_robin_honours_weights(servers: Servers, start_proxy: StartProxy) -> None:
    heavy, light = await servers.serve(), await servers.serve()
    cfg = tcp_config(Endpoint(heavy.address, weight=2), Endpoint(light.address, weight=1))
    run = await start_proxy(cfg)
    for i in range(6):
        c = await servers.connect(run.address)
        c.writer.write(b"%d" % i)
        assert await c.reader.readexactly(1) == b"%d" % i
    assert (heavy.accepted, light.accepted) == (4, 2)


async def test_close_stops_listening_and_closes_connections(
    servers: Servers, start_proxy: StartProxy
) -> None:
    up = await servers.serve()
    run = await start_proxy(tcp_config(up.address))
    c = await servers.connect(run.address)
    c.writer.write(b"x")
    assert await c.reader.readexactly(1) == b"x"
    await asyncio.wait_for(run.proxy.close(), DEADLINE)
    assert run.proxy.active() == 0
    with pytest.raises(ConnectionResetError):  # cut, not ended: see the next test
        await c.reader.read()
    with pytest.raises(ConnectionRefusedError):
        await servers.connect(run.address)
    assert run.metrics.calls == [opened(), closed(1, 1)]


async def test_a_transfer_cut_by_close_is_a_reset_on_both_sides(
    servers: Servers, start_proxy: StartProxy
) -> None:
    """A drain's deadline ends in close(): a download cut there must not look complete
    to the client (a clean EOF after the bytes so far), nor the upload to the server."""
    server_saw: list[BaseException | bytes] = []

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"x" * 65536
        try:
            while not reader.at_eof():
                writer.write(chunk)
                await writer.drain()  # blocks once the stalled client's buffers are full
        except ConnectionError as e:
            server_saw.append(e)
            return
        server_saw.append(b"clean EOF")

    up = await servers.serve(stream)
    run = await start_proxy(tcp_config(up.address))
    c = await servers.connect(run.address)
    await c.reader.readexactly(65536)  # the transfer is under way; the client now stalls
    await until(lambda: run.proxy.buffered() > 0, "the proxy holding bytes for the client")
    await asyncio.wait_for(run.proxy.close(), DEADLINE)

    async def read_to_the_end() -> None:
        while await c.reader.read(1 << 16):
            pass

    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(read_to_the_end(), DEADLINE)
    await until(lambda: server_saw, "the server's end of the transfer")
    assert isinstance(server_saw[0], ConnectionResetError), server_saw


A, B, C = (Endpoint(Address("10.0.0.1", p)) for p in (1, 2, 3))
HEAVY = Endpoint(Address("10.0.0.9", 9), weight=3)
SICK = Endpoint(Address("10.0.0.6", 6), healthy=False)
ZERO = Endpoint(Address("10.0.0.7", 7), weight=0)


@pytest.mark.parametrize(
    ("endpoints", "turn", "want"),
    [
        ((), 0, []),
        ((A,), 5, [A]),
        ((A, B, C), 0, [A, B, C]),
        ((A, B, C), 1, [B, C, A]),
        ((A, B, C), 2, [C, A, B]),
        ((A, B, C), 3, [A, B, C]),
        ((A, SICK, B), 1, [B, A]),  # unhealthy: never tried
        ((SICK,), 0, []),
        ((ZERO, A), 0, [A]),  # weight 0: drained, never tried
        ((HEAVY, A), 0, [HEAVY, A]),
        ((HEAVY, A), 2, [HEAVY, A]),
        ((HEAVY, A), 3, [A, HEAVY]),
        ((HEAVY, A), 4, [HEAVY, A]),
    ],
)
def test_connect_order(endpoints: tuple[Endpoint, ...], turn: int, want: list[Endpoint]) -> None:
    assert connect_order(endpoints, turn) == want


async def test_a_bug_while_connecting_closes_the_client(
    servers: Servers, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    up = await servers.serve()
    run = await start_proxy(tcp_config(up.address))

    def broken(*args: object) -> None:
        raise RuntimeError("metrics bug")

    run.metrics.tcp_opened = broken  # type: ignore[method-assign]
    c = await servers.connect(run.address)
    with caplog.at_level(logging.ERROR, logger="lepton_mesh.proxy.l4.tcp_proxy"):
        with pytest.raises(ConnectionResetError):  # not served: never a clean end
            await c.reader.read()
        await until(lambda: run.proxy.active() == 0, "connection forgotten")
    assert "connecting failed" in caplog.text


async def test_drain_stops_accepting_and_reports_idle(
    servers: Servers, start_proxy: StartProxy
) -> None:
    up = await servers.serve()
    run = await start_proxy(tcp_config(up.address))
    idle: list[int] = []
    run.proxy.on_idle = lambda: idle.append(run.proxy.active())
    c = await servers.connect(run.address)
    c.writer.write(b"a")
    assert await c.reader.readexactly(1) == b"a"

    run.proxy.stop_listening()
    with pytest.raises(ConnectionRefusedError):
        await servers.connect(run.address)
    c.writer.write(b"still open")
    assert await c.reader.readexactly(10) == b"still open"
    assert idle == []
    c.writer.write_eof()
    assert await c.reader.read() == b""
    await until(lambda: idle, "on_idle")
    assert idle == [0]


async def test_connections_past_the_limit_are_reset_and_logged(
    servers: Servers, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    # limits.max_connections holds for every listener, the tcp services' too.
    up = await servers.serve()
    cfg = dataclasses.replace(tcp_config(up.address), limits=Limits(max_connections=2))
    run = await start_proxy(cfg)
    served = [await servers.connect(run.address) for _ in range(2)]
    for c in served:
        c.writer.write(b"x")
        assert await c.reader.readexactly(1) == b"x"
    with caplog.at_level(logging.WARNING, logger="lepton_mesh.proxy.l4.tcp_proxy"):
        over = await servers.connect(run.address)
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(DEADLINE):
                await over.reader.read()
    assert "reason=overflow" in caplog.text
    assert (run.proxy.active(), up.accepted) == (2, 2)
    served[0].writer.write_eof()
    assert await served[0].reader.read() == b""
    await until(lambda: run.proxy.active() == 1, "a slot freed")
    again = await servers.connect(run.address)
    again.writer.write(b"y")
    assert await again.reader.readexactly(1) == b"y"
