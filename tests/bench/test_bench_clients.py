"""The bench's own load clients against a small real server on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import pytest

from bench import holdconns, openloop
from bench.procs import free_port

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


class _Server(asyncio.Protocol):
    """Answers every complete request head with RESPONSE; counts connections and Host headers."""

    hosts: list[bytes]
    connections = 0

    def connection_made(self, transport):
        type(self).connections += 1
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            host = [line for line in head.split(b"\r\n") if line.lower().startswith(b"host:")]
            type(self).hosts.append(host[0][5:].strip())
            self.transport.write(RESPONSE)


@pytest.fixture
async def server():
    _Server.hosts, _Server.connections = [], 0
    srv = await asyncio.get_running_loop().create_server(_Server, "127.0.0.1", 0)
    yield srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 99, 0.0),
        ([5.0], 50, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 75, 3.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([float(i) for i in range(1, 1001)], 99.9, 999.0),
    ],
)
def test_nearest_rank_percentile(values, q, expected):
    assert openloop._percentile(values, q) == expected


class _FakeConn:
    def __init__(self):
        self.sent: list[float] = []

    def send(self, at):
        self.sent.append(at)


def test_a_request_waits_for_a_free_connection_and_keeps_its_dispatch_time():
    client = openloop.OpenLoop(rate=1000, request=b"")
    conn = _FakeConn()
    client.idle.append(conn)
    client.start_phase(openloop.FIRST_PHASE, 0.0)
    client.dispatch(1.0)
    client.dispatch(2.0)  # no idle connection: queued with its dispatch time
    assert (conn.sent, list(client.waiting), client.in_flight) == ([1.0], [2.0], 2)
    client.complete(conn, 1.0, 200)
    assert (conn.sent, list(client.waiting), client.in_flight) == ([1.0, 2.0], [], 1)
    client.complete(conn, 2.0, 503)
    total = client.total()
    assert (len(total.latencies), dict(total.errors), list(client.idle)) == (
        1,
        {"status_503": 1},
        [conn],
    )


def test_requests_count_in_the_phase_they_were_dispatched_in():
    client = openloop.OpenLoop(rate=1000, request=b"")
    conn = _FakeConn()
    client.dispatch(0.5)  # warm-up: before the measured part, not counted
    client.complete(conn, 0.5, 200)
    client.start_phase("all", 1.0)
    client.dispatch(1.5)
    client.start_phase("fault", 2.0)
    client.dispatch(2.5)
    client.dispatch(2.6)  # never answered: lost with its connection
    client.complete(conn, 1.5, 200)  # completes during "fault", counts in "all"
    client.complete(conn, 2.5, 502)
    client.stop_recording()
    client.complete(conn, 2.6, 200)  # after the end: not counted as an answer
    phases = {
        name: (t.dispatched, len(t.latencies), dict(t.errors)) for name, t in client.phases.items()
    }
    assert phases == {"all": (1, 1, {}), "fault": (2, 0, {"status_502": 1})}


@pytest.mark.parametrize(
    ("dispatched", "latencies", "errors", "expected"),
    [
        (3, [0.001, 0.002, 0.003], {}, (3, 0, {})),
        (4, [0.001], {"status_503": 2}, (1, 3, {"status_503": 2, "unfinished": 1})),
        (2, [], {"connection_lost": 1}, (0, 2, {"connection_lost": 1, "unfinished": 2})),
    ],
)
def test_summary_counts_every_dispatched_request(dispatched, latencies, errors, expected):
    tally = openloop.Tally()
    tally.dispatched, tally.latencies = dispatched, list(latencies)
    tally.errors.update(errors)
    s = openloop.summarize(tally, 1.0)
    assert (s["requests"], s["failed"], s["errors"]) == expected


async def test_open_loop_paces_and_counts_every_answer(server):
    args = argparse.Namespace(
        host="127.0.0.1",
        port=server,
        host_header="upstream",
        rate=500.0,
        connections=3,
        duration=0.2,
        warmup=0.0,
        phases=False,
    )
    result = await openloop.main_async(args)
    assert result["requests"] == 100
    assert result["errors"] == {}
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert set(_Server.hosts) == {b"upstream"}
    assert _Server.connections == 3


async def test_held_connections_each_got_an_answer(server):
    held = [
        await holdconns._open_one("127.0.0.1", server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(5)
    ]
    try:
        assert [outcome for _, outcome in held] == ["ok"] * 5
        assert all(not proto.transport.is_closing() for proto, _ in held)
    finally:
        for proto, _ in held:
            proto.transport.close()


async def _connect_when_listening(port: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)  # the child is still starting: poll until it listens


async def test_bare_proxy_forwards_keep_alive_requests_over_one_upstream_connection(server):
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.bare_proxy",
        f"--port={port}",
        f"--upstream={server}",
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        reader, writer = await _connect_when_listening(port)
        for i in range(3):
            writer.write(
                b"GET /r%d HTTP/1.1\r\nHost: svc-%d\r\nConnection: keep-alive\r\n\r\n" % (i, i)
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"content-length: 3\r\n" in head.lower()
            assert await reader.readexactly(3) == b"ok\n"
        assert _Server.hosts == [b"svc-0", b"svc-1", b"svc-2"]
        assert _Server.connections == 1
        writer.close()
        await writer.wait_closed()
    finally:
        proc.terminate()
        await proc.wait()
