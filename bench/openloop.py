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

With `--phases`, the bench names parts of the measured time: a line
`phase NAME` on stdin starts phase NAME (the client answers `PHASE NAME` on
stdout once it has, so the bench can act, e.g. kill an endpoint, knowing
that every request dispatched from then on counts in the new phase). A
request belongs to the phase it was dispatched in; the JSON then holds a
summary per phase under `phases`. The measured part starts in phase `all`.

Every request dispatched in the measured part is counted once: answered 2xx
(its latency is kept), answered with another status, or never answered (its
connection was lost, or it was still in flight at the end: `unfinished`).
`failed` is dispatched minus 2xx, whatever the cause.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import sys
import time
from typing import cast

import httptools
import uvloop

MEASURE_START = "MEASURE_START"
MEASURE_END = "MEASURE_END"
PHASE = "PHASE "
FIRST_PHASE = "all"
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
        self.client.complete(self, self._sent_at, self._parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class Tally:
    """What happened to the requests dispatched in one phase."""

    __slots__ = ("dispatched", "errors", "latencies")

    def __init__(self) -> None:
        self.dispatched = 0
        self.latencies: list[float] = []  # seconds, 2xx answers only
        self.errors: collections.Counter[str] = collections.Counter()

    def merge(self, other: Tally) -> None:
        self.dispatched += other.dispatched
        self.latencies.extend(other.latencies)
        self.errors.update(other.errors)


class OpenLoop:
    def __init__(self, rate: float, request: bytes) -> None:
        self.rate = rate
        self.request = request
        self.idle: collections.deque[_Conn] = collections.deque()
        self.waiting: collections.deque[float] = collections.deque()
        self.in_flight = 0
        # The measured part: phases in the order they started, with the
        # dispatch time each starts at (ascending), so a request is filed by
        # its dispatch time even when it completes in a later phase.
        self.recording_since: float | None = None
        self.phase_starts: list[float] = []
        self.phases: dict[str, Tally] = {}
        self._tallies: list[Tally] = []  # phases' values, by index

    def start_phase(self, name: str, at: float) -> None:
        if name in self.phases:
            raise ValueError(f"phase {name!r} already started")
        if self.recording_since is None:
            self.recording_since = at
        self.phase_starts.append(at)
        self.phases[name] = tally = Tally()
        self._tallies.append(tally)

    def stop_recording(self) -> None:
        self.recording_since = None

    def tally_at(self, at: float) -> Tally | None:
        """The tally of the phase a request dispatched at `at` belongs to, if measured."""
        if self.recording_since is None or at < self.phase_starts[0]:
            return None
        i = bisect.bisect_right(self.phase_starts, at) - 1
        return self._tallies[i]

    def dispatch(self, at: float) -> None:
        self.in_flight += 1
        tally = self.tally_at(at)
        if tally is not None:
            tally.dispatched += 1
        if self.idle:
            self.idle.popleft().send(at)
        else:
            self.waiting.append(at)

    def complete(self, conn: _Conn, dispatched_at: float, status: int) -> None:
        self.in_flight -= 1
        tally = self.tally_at(dispatched_at)
        if tally is not None:
            if 200 <= status < 300:
                tally.latencies.append(time.perf_counter() - dispatched_at)
            else:
                tally.errors[f"status_{status}"] += 1
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)

    def fail(self, what: str) -> None:
        tally = self.tally_at(time.perf_counter())
        if tally is not None:
            tally.errors[what] += 1

    def lost(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        self.fail("connection_lost")

    def total(self) -> Tally:
        out = Tally()
        for tally in self.phases.values():
            out.merge(tally)
        return out

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


def summarize(tally: Tally, seconds: float) -> dict[str, object]:
    """Exact percentiles of the 2xx answers; every other dispatched request is `failed`."""
    values = sorted(tally.latencies)
    ms = {
        f"p{q:g}".replace(".", ""): round(_percentile(values, q) * 1000, 3)
        for q in (50, 90, 99, 99.9)
    }
    errors = dict(tally.errors)
    failed = tally.dispatched - len(values)
    answered_badly = sum(v for k, v in errors.items() if k.startswith("status_"))
    if failed > answered_badly:
        errors["unfinished"] = failed - answered_badly
    return {
        "requests": len(values),
        "dispatched": tally.dispatched,
        "failed": failed,
        "rps": round(len(values) / seconds, 1) if seconds else 0.0,
        "p50_ms": ms["p50"],
        "p90_ms": ms["p90"],
        "p99_ms": ms["p99"],
        "p999_ms": ms["p999"],
        "max_ms": round(values[-1] * 1000, 3) if values else 0.0,
        "errors": {k: v for k, v in errors.items() if v},
    }


async def _follow_phases(client: OpenLoop) -> None:
    """Read `phase NAME` lines from stdin until it closes; answer each on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        word, _, name = line.decode().strip().partition(" ")
        measuring = client.recording_since is not None
        if word != "phase" or not name or name in client.phases or not measuring:
            print(f"IGNORED {line.decode().strip()!r}", flush=True)
            continue
        client.start_phase(name, time.perf_counter())
        print(PHASE + name, flush=True)


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
    started = time.perf_counter()
    client.start_phase(FIRST_PHASE, started)
    follower = loop.create_task(_follow_phases(client)) if args.phases else None
    await client.pace(args.duration)
    paced_until = time.perf_counter()
    await _drain(client, 5.0)
    if follower is not None:
        follower.cancel()
    client.stop_recording()
    print(MEASURE_END, flush=True)
    result = summarize(client.total(), paced_until - started)
    if args.phases:
        ends = [*client.phase_starts[1:], paced_until]
        result["phases"] = {
            name: summarize(tally, end - start) | {"seconds": round(end - start, 3)}
            for (name, tally), start, end in zip(
                client.phases.items(), client.phase_starts, ends, strict=True
            )
        }
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
    p.add_argument("--phases", action="store_true", help="read `phase NAME` lines on stdin")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = uvloop.run(main_async(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
