"""200 MiB each way through the L4 proxy with receivers that stop reading.

The assertion is structural, not a timing one. Each receiver stops reading
twice (at the start and half way); each time the test waits until the
*sender* is paused by its own transport (`pause_writing`), which can only
happen if the proxy stopped reading from it, since otherwise the proxy would
absorb everything. Throughout the transfer the bytes held in the proxy's
write buffers are sampled at every read and every pause, and must never
exceed, per direction, the transport's high-water mark plus one read.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Callable

import pytest
from tcp_support import DEADLINE, FakeMetrics, Servers, tcp_config, until

from lepton_mesh.policy.sidecar_config import Address
from lepton_mesh.proxy.l4.tcp_proxy import TcpProxy

BLOCK = random.Random(7).randbytes(1 << 20)
TOTAL = 200 << 20
HOLD_AT = (0, TOTAL // 2)  # received byte counts where a receiver stops reading

HIGH_WATER = 64 * 1024  # uvloop's and asyncio's default
MAX_READ = 256 * 1024  # the most one read delivers (uvloop 256000, asyncio 256 KiB)
BOUND = 2 * (HIGH_WATER + MAX_READ)  # both directions


class Pump(asyncio.Protocol):
    """Sends TOTAL bytes as fast as its transport allows, then EOF; receives
    everything, stopping at each HOLD_AT until `release()`."""

    def __init__(self, sample: Callable[[], None]) -> None:
        self.sample = sample
        self.sent = 0
        self.received = 0
        self.crc = 0
        self.eof = False
        self.write_paused = False
        self.holding = False
        self.holds = list(HOLD_AT)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.pump()

    def pump(self) -> None:
        while not self.write_paused and self.sent < TOTAL:
            self.t.write(BLOCK)  # TOTAL is a multiple of the block
            self.sent += len(BLOCK)
        if self.sent == TOTAL and not self.t.is_closing():
            self.t.write_eof()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.sample()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.pump()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.crc = zlib.crc32(data, self.crc)
        self.sample()
        if self.holds and self.received >= self.holds[0]:
            self.holds.pop(0)
            self.holding = True
            self.t.pause_reading()

    def release(self) -> None:
        self.holding = False
        self.t.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True


def pushed_back(sender: Pump) -> bool:
    """The sender is paused by its transport; fails at once if instead it
    could write everything while its receiver was not reading."""
    assert sender.sent < TOTAL, "a sender wrote all its bytes to a stalled receiver"
    return sender.write_paused


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_200_mib_each_way_with_stalled_receivers_stays_bounded(servers: Servers) -> None:
    expected_crc = 0
    for _ in range(TOTAL // len(BLOCK)):
        expected_crc = zlib.crc32(BLOCK, expected_crc)
    loop = asyncio.get_running_loop()
    samples: list[int] = []

    def sample() -> None:
        samples.append(proxy.buffered())

    servers_side: list[Pump] = []

    def server_pump() -> Pump:
        p = Pump(sample)
        servers_side.append(p)
        return p

    upstream = await loop.create_server(server_pump, "127.0.0.1", 0)
    servers.servers.append(upstream)
    up_addr = Address("127.0.0.1", upstream.sockets[0].getsockname()[1])
    metrics = FakeMetrics()
    cfg = tcp_config(up_addr)
    proxy = TcpProxy("db", lambda: cfg, metrics)
    listener = await proxy.start("127.0.0.1", 0)
    try:
        t, client = await loop.create_connection(
            lambda: Pump(sample), "127.0.0.1", listener.sockets[0].getsockname()[1]
        )
        servers.transports.append(t)
        await until(lambda: servers_side, "upstream accepted")
        server = servers_side[0]
        servers.transports.append(server.t)
        for hold in HOLD_AT:
            await until(
                lambda: client.holding and server.holding,
                f"both receivers reached {hold} bytes",
                timeout=30,
            )
            await until(
                lambda: pushed_back(client) and pushed_back(server),
                "backpressure reached both senders",
                timeout=30,
            )
            assert proxy.buffered() <= BOUND
            client.release()
            server.release()

        await until(lambda: client.eof and server.eof, "all bytes and EOF", timeout=60)
        assert (client.received, server.received) == (TOTAL, TOTAL)
        assert (client.crc, server.crc) == (expected_crc, expected_crc)
        assert max(samples) <= BOUND, f"proxy buffered {max(samples)} bytes > {BOUND}"
        assert len(samples) > 1000  # sampled all along, not just at the stalls
        await until(lambda: metrics.calls[-1][0] == "closed", "both directions closed")
        assert metrics.calls == [
            ("opened", "source", "app", "db"),
            ("closed", "source", "app", "db", TOTAL, TOTAL),
        ]
    finally:
        await asyncio.wait_for(proxy.close(), DEADLINE)
