"""The demo's load generator and the few requests that show the sidecar's own errors.

Load is paced: request i is due at `start + i / rate`, taken by whichever of
`concurrency` workers is free. When the mesh keeps up, the rate is exact and
the machine (shared by everything else) stays calm; when it cannot, workers
send back to back and the client measures the backlog as latency.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector

MESSAGES: tuple[str, ...] = (
    "Where is my order? It was supposed to arrive yesterday.",
    "I want a refund for the headphones I returned.",
    "Please cancel my subscription.",
    "Why is there a second charge on my invoice?",
    "Can I talk to a human agent?",
    "Hello there",
    "Track my shipping please",
    "My payment failed but the bill still shows it",
    "I'd like my money back",
    "What's the weather like?",
)


@dataclass(slots=True)
class ClientStats:
    """What the client saw. Latency is first byte sent to last byte read."""

    latencies_ms: list[float] = field(default_factory=list)
    codes: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.codes.values()) + sum(self.errors.values())

    @property
    def ok(self) -> int:
        return self.codes.get(200, 0)

    def quantile_ms(self, q: float) -> float:
        """Nearest-rank quantile of the exact latencies (NaN when there are none)."""
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


Progress = Callable[[float, ClientStats], None]


async def generate(
    url: str,
    *,
    duration: float,
    rate: float,
    concurrency: int,
    messages: Sequence[str] = MESSAGES,
    progress: Progress | None = None,
    progress_every: float = 5.0,
) -> ClientStats:
    """POST chat messages to `url` for `duration` seconds at up to `rate` per second."""
    stats = ClientStats()
    slots = itertools.count()
    connector = TCPConnector(limit=concurrency)
    timeout = ClientTimeout(total=10)
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + duration

    async def worker(session: ClientSession) -> None:
        while True:
            i = next(slots)
            due = start + i / rate
            if due >= end:
                return
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            body = orjson.dumps({"message": messages[i % len(messages)]})
            await _send(session, url, body, stats)

    async def report() -> None:
        while True:
            await asyncio.sleep(progress_every)
            if progress is not None:
                progress(loop.time() - start, stats)

    async with ClientSession(connector=connector, timeout=timeout) as session:
        reporter = asyncio.ensure_future(report())
        try:
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
    stats.elapsed_s = loop.time() - start
    return stats


async def _send(session: ClientSession, url: str, body: bytes, stats: ClientStats) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(
            url, data=body, headers={"Host": "chat", "Content-Type": "application/json"}
        ) as resp:
            await resp.read()
            status = resp.status
    except (ClientError, TimeoutError) as e:
        stats.errors[type(e).__name__] += 1
        return
    stats.latencies_ms.append((time.perf_counter() - t0) * 1000)
    stats.codes[status] += 1


@dataclass(frozen=True, slots=True)
class Showcase:
    """One request made to show what the sidecar answers by itself."""

    title: str
    method: str
    url: str
    host: str
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class ShowcaseResult:
    request: Showcase
    status: int
    reason: str  # the x-lepton-reason header, "-" when absent
    body: str


async def send_showcase(requests: Sequence[Showcase]) -> list[ShowcaseResult]:
    results = []
    async with ClientSession(timeout=ClientTimeout(total=10)) as session:
        for p in requests:
            headers = {"Host": p.host, "Content-Type": "application/json"}
            try:
                async with session.request(p.method, p.url, data=p.body, headers=headers) as r:
                    body = (await r.read()).decode(errors="replace")
                    results.append(
                        ShowcaseResult(p, r.status, r.headers.get("x-lepton-reason", "-"), body)
                    )
            except (ClientError, TimeoutError) as e:
                results.append(ShowcaseResult(p, 0, type(e).__name__, str(e)))
    return results


@dataclass(frozen=True, slots=True)
class StreamResult:
    status: int
    tokens: tuple[str, ...]
    done: bool  # the final `event: done` arrived
    elapsed_ms: float


async def read_stream(url: str) -> StreamResult:
    """Read a server-sent event stream to its end, collecting the tokens."""
    tokens: list[str] = []
    done = False
    status = 0
    t0 = time.perf_counter()
    try:
        async with (
            ClientSession(timeout=ClientTimeout(total=10)) as session,
            session.get(url, headers={"Host": "chat", "Accept": "text/event-stream"}) as resp,
        ):
            status = resp.status
            event = "message"
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event == "done":
                        done = True
                    else:
                        tokens.append(orjson.loads(line[5:])["token"])
                elif not line:
                    event = "message"
    except (ClientError, TimeoutError, orjson.JSONDecodeError, KeyError):
        done = False  # reported as an incomplete stream, with what arrived
    return StreamResult(status, tuple(tokens), done, (time.perf_counter() - t0) * 1000)
