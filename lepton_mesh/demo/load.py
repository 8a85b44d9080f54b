"""The demo's load generator: chat messages at a steady rate, and what came back.

Load is paced: request i is due at `start + i / rate`, taken by whichever of
`concurrency` workers is free. When the mesh keeps up, the rate is exact and
the machine (shared by everything else) stays calm; when it cannot, workers
send back to back and the client measures the backlog as latency.

Each request carries a session id (`x-session-id`, one of `SESSIONS`), as a
chat front end would; chat passes it on to dialog, whose DestinationPolicy
hashes on it. The `dialog_version` of every 200 answer is tallied: which
dialog version wrote the reply, as the customer saw it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Sequence
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
    versions: Counter[str] = field(default_factory=Counter)  # dialog_version of 200 answers
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


SESSIONS = 64
VERSION_FIELD = "dialog_version"


async def generate(
    url: str,
    *,
    duration: float,
    rate: float,
    concurrency: int,
    messages: Sequence[str] = MESSAGES,
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
            await _send(session, url, body, f"s-{i % SESSIONS}", stats)

    async with ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    stats.elapsed_s = loop.time() - start
    return stats


async def _send(
    session: ClientSession, url: str, body: bytes, session_id: str, stats: ClientStats
) -> None:
    headers = {"Host": "chat", "Content-Type": "application/json", "x-session-id": session_id}
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            raw = await resp.read()
            status = resp.status
    except (ClientError, TimeoutError) as e:
        stats.errors[type(e).__name__] += 1
        return
    stats.latencies_ms.append((time.perf_counter() - t0) * 1000)
    stats.codes[status] += 1
    if status == 200:
        stats.versions[_version_of(raw)] += 1


def _version_of(raw: bytes) -> str:
    try:
        value = orjson.loads(raw).get(VERSION_FIELD)
    except (orjson.JSONDecodeError, AttributeError):
        return "?"
    return value if isinstance(value, str) else "?"
