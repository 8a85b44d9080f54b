"""Helpers for the observability tests: fakes, a pipe reader, an HTTP response reader."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Run the loop until `pred()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)  # yield to the loop; the condition decides, not the delay


# -- access log ---------------------------------------------------------------------


class FakeTimer:
    def __init__(self, loop: FakeLoop, delay: float, cb: Callable[[], None]) -> None:
        self.loop, self.delay, self.cb = loop, delay, cb
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Just call_later, with timers fired by the test."""

    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []

    def call_later(self, delay: float, cb: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(self, delay, cb)
        self.timers.append(t)
        return t

    def live(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled]

    def fire(self) -> None:
        (t,) = self.live()
        t.cancelled = True
        t.cb()


class ListStream:
    """A binary stream that keeps what it is given; `max_write` makes it a short writer."""

    def __init__(self, max_write: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.flushes = 0
        self.max_write = max_write
        self.gate = threading.Event()
        self.gate.set()

    def write(self, data: bytes | memoryview) -> int:
        self.gate.wait(10)
        n = len(data) if self.max_write is None else min(len(data), self.max_write)
        self.chunks.append(bytes(data[:n]))
        return n

    def flush(self) -> None:
        self.flushes += 1

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class PipeReader:
    """Collects what arrives on a pipe's read end, from the running loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 1 << 16):
                self.buf += chunk

    def lines(self) -> list[bytes]:
        return bytes(self.buf).splitlines()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


# -- admin -------------------------------------------------------------------------


@dataclass
class Admin:
    server: asyncio.Server
    hooks: FakeHooks
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


StartAdmin = Callable[..., Awaitable[Admin]]


@dataclass
class FakeHooks:
    ready: tuple[bool, str] = (True, "")
    config: dict = field(default_factory=lambda: {"service": "ratings", "port": 9080})
    clusters: dict = field(default_factory=lambda: {"clusters": []})
    metrics: tuple[bytes, str] = (b"# metrics\n", "text/plain; version=0.0.4; charset=utf-8")
    fail: str | None = None  # the name of a hook that raises
    drains: int = 0
    quits: int = 0

    def _check(self, name: str) -> None:
        if self.fail == name:
            raise RuntimeError(f"{name} broke")

    def readiness(self) -> tuple[bool, str]:
        self._check("readiness")
        return self.ready

    def config_json(self) -> dict:
        self._check("config_json")
        return self.config

    def clusters_json(self) -> dict:
        self._check("clusters_json")
        return self.clusters

    def metrics_text(self) -> tuple[bytes, str]:
        self._check("metrics_text")
        return self.metrics

    def start_drain(self) -> None:
        self._check("start_drain")
        self.drains += 1

    def quit(self) -> None:
        self._check("quit")
        self.quits += 1


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


async def read_response(
    reader: asyncio.StreamReader, head: bool = False, timeout: float = 5.0
) -> Response:
    """One response off the stream. The admin server always sends Content-Length,
    so a response ends after that many body bytes (none for HEAD), which also
    splits pipelined responses apart."""
    async with asyncio.timeout(timeout):
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value.strip()
        body = b""
        if not head and int(status) >= 200:
            body = await reader.readexactly(int(headers["content-length"]))
    return Response(int(status), headers, body, headers.get("connection") != "close")
