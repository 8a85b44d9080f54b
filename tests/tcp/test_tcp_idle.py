"""`timeouts.tcp_idle` end to end: real sidecars, real sockets, real mTLS.

An L4 connection with no byte read from either side for `tcp_idle` is closed
on both sides (cleanly: the peers read EOF) and logged with reason
`idle_timeout`; traffic in one direction keeps it open; `0` never closes.
Without it a peer that vanished without a FIN or RST held its connection,
and a `limits.max_connections` slot, forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tcp_support import DEADLINE, HOST, Remote, Servers, until

from lepton_mesh.policy.sidecar_config import Address, SidecarConfig
from lepton_mesh.policy.sidecar_loader import ConfigError, sidecar_config_from_mapping
from lepton_mesh.proxy.sidecar import Sidecar
from tests.mtls.mtls_support import Pki, sidecar_config, write_tls
from tests.support.sidecars import sidecar_starter

IDLE = 0.3
LOGGER = "lepton_mesh.proxy.l4.tcp_proxy"

pytestmark = pytest.mark.timeout(30)

StartSidecar = Callable[[SidecarConfig], Awaitable[Sidecar]]


@pytest.fixture
async def sidecars() -> AsyncIterator[StartSidecar]:
    """`await sidecars(cfg)` starts a Sidecar on this loop; all stop at teardown."""
    async with sidecar_starter(DEADLINE) as start:
        yield start


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def with_idle(cfg: SidecarConfig, tcp_idle: float) -> SidecarConfig:
    return dataclasses.replace(cfg, timeouts=dataclasses.replace(cfg.timeouts, tcp_idle=tcp_idle))


def plain_sidecar(upstream: Address, tcp_idle: float) -> SidecarConfig:
    """Service `web` with one tcp service `db` at `upstream`, no mTLS."""
    return with_idle(sidecar_config("web", Address(HOST, 1), tcp={"db": [upstream]}), tcp_idle)


class Upstream:
    """The database: counts what it reads (over all connections), then at EOF
    answers `got:<n>` and closes. With `half_close` it first says `hi` and
    shuts its sending side, as a server done talking would."""

    def __init__(self, *, half_close: bool = False) -> None:
        self.half_close = half_close
        self.received = 0
        self.ended = 0  # connections whose reading ended (EOF or reset)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.half_close:
            writer.write(b"hi")
            writer.write_eof()
        try:
            while data := await reader.read(1 << 16):
                self.received += len(data)
        finally:
            self.ended += 1
        if not self.half_close:
            writer.write(b"got:%d" % self.received)
        writer.close()


async def connected(servers: Servers, address: Address, up: Upstream) -> Remote:
    """A client connection through the sidecar, the upstream connection made."""
    c = await servers.connect(address)
    c.writer.write(b"x")
    await until(lambda: up.received == 1, "the first byte upstream")
    return c


async def read_eof(c: Remote) -> bytes:
    async with asyncio.timeout(DEADLINE):
        return await c.reader.read()


def idle_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "reason=idle_timeout" in r.getMessage()]


async def test_an_idle_connection_is_closed_on_both_sides_and_logged(
    servers: Servers, sidecars: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    up = Upstream()
    ep = await servers.serve(up)
    sc = await sidecars(plain_sidecar(ep.address, IDLE))
    c = await connected(servers, sc.addresses["tcp:db"], up)

    assert await read_eof(c) == b""  # a clean close (FIN), not a reset
    await until(lambda: up.ended == 1, "the upstream side closed too")
    await until(lambda: sc._tcp["db"].active() == 0, "the connection's slot freed")
    [line] = idle_lines(caplog)
    assert line.startswith("tcp service=db client=127.0.0.1:")
    assert line.endswith(f"reason=idle_timeout detail=no byte either way for {IDLE:g}s")
    closed = sc.metrics.render()[0].decode()
    assert 'lepton_tcp_connections_closed_total{reporter="source",' in closed


async def test_a_half_closed_connection_still_times_out(
    servers: Servers, sidecars: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    up = Upstream(half_close=True)
    ep = await servers.serve(up)
    sc = await sidecars(plain_sidecar(ep.address, IDLE))
    c = await connected(servers, sc.addresses["tcp:db"], up)
    assert await read_eof(c) == b"hi"  # upstream -> client is done; client -> upstream open

    await until(lambda: up.ended == 1, "the upstream side closed by the sidecar")
    await until(lambda: sc._tcp["db"].active() == 0, "the connection's slot freed")
    assert len(idle_lines(caplog)) == 1


async def test_traffic_one_way_keeps_a_connection_open_until_it_stops(
    servers: Servers, sidecars: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    idle = 0.5  # margin for the 0.1 s ticks on a loaded machine
    up = Upstream()
    ep = await servers.serve(up)
    sc = await sidecars(plain_sidecar(ep.address, idle))
    c = await connected(servers, sc.addresses["tcp:db"], up)
    for sent in range(2, 12):  # a byte every 0.1 s for 1 s, client to upstream only
        await asyncio.sleep(0.1)
        c.writer.write(b".")
        await until(lambda: up.received == sent, f"byte {sent} upstream")  # noqa: B023
    assert (idle_lines(caplog), up.ended, c.reader.at_eof()) == ([], 0, False)

    assert await read_eof(c) == b""  # silence from here on: now it times out
    await until(lambda: up.ended == 1, "the upstream side closed too")
    assert len(idle_lines(caplog)) == 1


async def test_tcp_idle_zero_never_closes(
    servers: Servers, sidecars: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """Each connection keeps the tcp_idle of the config it was accepted under:
    one accepted with 0, then one with IDLE. When the second times out the
    first has been idle longer, and its timer (if it had one) was due first."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    up = Upstream()
    ep = await servers.serve(up)
    sc = await sidecars(plain_sidecar(ep.address, 0))
    never = await connected(servers, sc.addresses["tcp:db"], up)
    sc.swap_config(with_idle(sc.cfg, IDLE))
    c = await servers.connect(sc.addresses["tcp:db"])
    c.writer.write(b"y")
    await until(lambda: up.received == 2, "the second connection upstream")

    assert await read_eof(c) == b""
    await until(lambda: up.ended == 1, "the second connection's upstream side closed")
    assert len(idle_lines(caplog)) == 1
    assert not never.reader.at_eof() and sc._tcp["db"].active() == 1
    never.writer.write_eof()  # still a working connection
    assert await read_eof(never) == b"got:2"  # the upstream's count, shared by both


@pytest.mark.parametrize("where", ["inbound", "outbound"])
async def test_an_idle_tunnel_over_mtls_is_closed_by_either_sidecar(
    where: str,
    tmp_path: Path,
    pki: Pki,
    servers: Servers,
    sidecars: StartSidecar,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """client -> A's tcp listener =mTLS=> B's inbound (an inbound L4 tunnel) -> upstream.
    Only one sidecar has a tcp_idle; it closes both its sides, and the end
    frame it sends first lets the other sidecar close its sides cleanly too."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    up = Upstream()
    ep = await servers.serve(up)
    app = Address(HOST, 1)
    b_tls = write_tls(tmp_path / "b", pki.issue("db"), pki.bundle_pem, tcp_app=ep.address)
    b = await sidecars(
        with_idle(sidecar_config("db", app, tls_cfg=b_tls), IDLE if where == "inbound" else 0)
    )
    a_tls = write_tls(tmp_path / "a", pki.issue("web"), pki.bundle_pem)
    a_cfg = sidecar_config("web", app, tls_cfg=a_tls, tcp={"db": [b.addresses["inbound"]]})
    a = await sidecars(with_idle(a_cfg, IDLE if where == "outbound" else 0))
    c = await connected(servers, a.addresses["tcp:db"], up)

    assert await read_eof(c) == b""
    await until(lambda: up.ended == 1, "the upstream side closed too")
    await until(lambda: a._tcp["db"].active() == 0, "A's connection slot freed")
    await until(lambda: b.inbound.l4.active() == 0, "B's tunnel gone")
    [line] = idle_lines(caplog)
    prefix = "tcp inbound service=db" if where == "inbound" else "tcp service=db"
    assert line.startswith(prefix)


def load(timeouts: dict[str, Any]) -> SidecarConfig:
    return sidecar_config_from_mapping({"service": "web", "app": "a:1", "timeouts": timeouts}, "t")


def test_tcp_idle_config_default_zero_and_units() -> None:
    assert load({}).timeouts.tcp_idle == 3600.0
    assert load({"tcp_idle": 0}).timeouts.tcp_idle == 0.0
    assert load({"tcp_idle": "2h"}).timeouts.tcp_idle == 7200.0
    assert load({"idle": "5m"}).timeouts.tcp_idle == 3600.0  # apart from the HTTP idle


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, "t: timeouts.tcp_idle: must be 0 or more, found -1"),
        (
            "5 min",
            "t: timeouts.tcp_idle: expected a duration like '250ms', '1s', '5m', '1m30s'"
            " or a number of seconds, found string '5 min'",
        ),
        (True, "t: timeouts.tcp_idle: expected a duration like '250ms', '1s', '5m', '1m30s'"
         " or a number of seconds, found boolean true"),
    ],
)  # fmt: skip
def test_tcp_idle_config_errors(value: object, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({"tcp_idle": value})
    assert str(info.value) == error
