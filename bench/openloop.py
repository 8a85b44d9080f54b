"""An open-loop HTTP/1.1 client: requests at a fixed rate over a few keep-alive connections.

wrk2 is not packaged, and closed-loop wrk measures latency at saturation, not at
a given load. This client dispatches request i at `t0 + i / rate` whatever the
server does (open loop). A request dispatched while every connection is busy
waits in a queue for the next free one, and its latency counts from its
dispatch, so a slow server shows up in the latency instead of silently slowing
the sender (no coordinated omission). Timer lateness of the client itself
(libuv timers tick in milliseconds) is not counted: a late tick dispatches
everything due at once, and each request's clock starts at its dispatch.

Run as `python -m bench.openloop --port P --host-header upstream --rate 1000`;
prints MEASURE_START and MEASURE_END around the measured part, then one JSON
line with exact percentiles (all latencies are kept and sorted).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from typing import cast

import httptools
import uvloop

MEASURE_START = "MEASURE_START"
MEASURE_END = "MEASURE_END"
_REQUEST = "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lepton-bench\r\n\r\n"


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    __slots__ = ("_done", "_parser", "_request", "_sent_at", "_status", "client", "transport")

    def __init__(self, client: OpenLoop, request: bytes) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self._request = request
        self._parser = httptools.HttpResponseParser(self)
        self._sent_at = 0.0
        self._status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, dispatched_at: float) -> None:
        assert self.transport is not None
        self._sent_at = dispatched_at
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.client.fail("parse")
            self.transport.close()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.client.complete(
            self, time.perf_counter() - self._sent_at, self._parser.get_status_code()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class OpenLoop:
    def __init__(self, rate: float, request: bytes) -> None:
        self.rate = rate
        self.request = request
        self.idle: collections.deque[_Conn] = collections.deque()
        self.waiting: collections.deque[float] = collections.deque()
        self.latencies: list[float] = []
        self.recording = False
        self.errors: collections.Counter[str] = collections.Counter()
        self.in_flight = 0

    def dispatch(self, at: float) -> None:
        self.in_flight += 1
        if self.idle:
            self.idle.popleft().send(at)
        else:
            self.waiting.append(at)

    def complete(self, conn: _Conn, latency: float, status: int) -> None:
        self.in_flight -= 1
        if self.recording:
            if 200 <= status < 300:
                self.latencies.append(latency)
            else:
                self.errors[f"status_{status}"] += 1
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)

    def fail(self, what: str) -> None:
        self.errors[what] += 1

    def lost(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        self.errors["connection_lost"] += 1

    async def pace(self, seconds: float) -> int:
        """Dispatch at `rate` for `seconds`; returns how many were dispatched."""
        start, sent, interval = time.perf_counter(), 0, 1.0 / self.rate
        total = int(seconds * self.rate)
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - start) / interval) + 1)
            while sent < due:
                self.dispatch(now)
                sent += 1
            next_at = start + sent * interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        return sent


async def _drain(client: OpenLoop, deadline_s: float) -> None:
    end = time.perf_counter() + deadline_s
    while client.in_flight and time.perf_counter() < end:
        await asyncio.sleep(0.01)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (like wrk's): the smallest value with >= q% at or below it."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def summarize(latencies: list[float], seconds: float, errors: dict[str, int]) -> dict[str, object]:
    values = sorted(latencies)
    ms = {
        f"p{q:g}".replace(".", ""): round(_percentile(values, q) * 1000, 3)
        for q in (50, 90, 99, 99.9)
    }
    return {
        "requests": len(values),
        "rps": round(len(values) / seconds, 1) if seconds else 0.0,
        "p50_ms": ms["p50"],
        "p90_ms": ms["p90"],
        "p99_ms": ms["p99"],
        "p999_ms": ms["p999"],
        "max_ms": round(values[-1] * 1000, 3) if values else 0.0,
        "errors": dict(errors),
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    request = _REQUEST.format(host=args.host_header).encode()
    client = OpenLoop(args.rate, request)
    for _ in range(args.connections):
        _, conn = await loop.create_connection(lambda: _Conn(client, request), args.host, args.port)
        client.idle.append(conn)
    if args.warmup > 0:
        await client.pace(args.warmup)
        await _drain(client, 5.0)
    # The markers let the bench read the proxy's CPU around the measured part only.
    print(MEASURE_START, flush=True)
    client.recording = True
    started = time.perf_counter()
    await client.pace(args.duration)
    paced = time.perf_counter() - started
    await _drain(client, 5.0)
    client.recording = False
    print(MEASURE_END, flush=True)
    if client.in_flight:
        client.errors["unfinished"] += client.in_flight
    result = summarize(client.latencies, paced, client.errors)
    for conn in list(client.idle):
        conn.transport.close()  # type: ignore[union-attr]
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-header", default="localhost")
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = uvloop.run(main_async(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
