"""The bench's own load clients against a small real server on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from bench import holdconns, openloop

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
    client.recording = True
    client.dispatch(1.0)
    client.dispatch(2.0)  # no idle connection: queued with its dispatch time
    assert (conn.sent, list(client.waiting), client.in_flight) == ([1.0], [2.0], 2)
    client.complete(conn, 0.001, 200)
    assert (conn.sent, list(client.waiting), client.in_flight) == ([1.0, 2.0], [], 1)
    client.complete(conn, 0.002, 503)
    assert (client.latencies, dict(client.errors), list(client.idle)) == (
        [0.001],
        {"status_503": 1},
        [conn],
    )


async def test_open_loop_paces_and_counts_every_answer(server):
    args = argparse.Namespace(
        host="127.0.0.1",
        port=server,
        host_header="upstream",
        rate=500.0,
        connections=3,
        duration=0.2,
        warmup=0.0,
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
