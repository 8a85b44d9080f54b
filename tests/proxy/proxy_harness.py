"""Fixtures for the sidecar's end-to-end HTTP/1.1 tests.

Everything runs on one uvloop event loop per test: the sidecar under test,
the upstream servers it forwards to, and the clients. Upstreams are raw
asyncio servers whose every byte the test controls; they count accepted
connections and received bytes *as the loop reads them* (not when a handler
gets around to parsing), so "nothing reached the upstream" is a real check.

The HTTP reader here is deliberately strict (CRLF only, one framing per
message): it is the oracle for what the proxy writes, so a sloppy reader
would hide framing bugs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import orjson
import pytest

from lepton_mesh.policy.sidecar_config import (
    AccessLogConfig,
    Address,
    Endpoint,
    Limits,
    Listeners,
    PoolConfig,
    ServiceConfig,
    SidecarConfig,
    Timeouts,
)
from tests.support.ports import free_port

# A generous bound for "this should happen promptly"; tests that measure
# latency assert their own, much tighter bounds.
DEADLINE = 5.0
LOCAL = "127.0.0.1"


# --------------------------------------------------------------------------
# Waiting on conditions, never on the clock.


async def wait_for(
    predicate: Callable[[], bool], timeout: float = DEADLINE, what: str = ""
) -> None:
    """Poll `predicate` on the loop until true; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------
# A strict HTTP/1.1 message reader, used on both sides of the proxy.


class ProtocolViolation(AssertionError):
    """The bytes the proxy wrote are not valid HTTP/1.1."""


@dataclass
class Message:
    """A request (start = method, target, version) or a response (version, status, phrase)."""

    start: tuple[str, str, str]
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    chunked: bool = False
    informational: list[Message] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.start[0]

    @property
    def target(self) -> str:
        return self.start[1]

    @property
    def version(self) -> str:
        return self.start[0] if self.start[0].startswith("HTTP/") else self.start[2]

    @property
    def status(self) -> int:
        return int(self.start[1])

    def all(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        if len(values) > 1:
            raise AssertionError(f"header {name} appears {len(values)} times: {values}")
        return values[0] if values else None

    def has(self, name: str) -> bool:
        return bool(self.all(name))

    def connection_tokens(self) -> set[str]:
        return {
            t.strip().lower() for v in self.all("connection") for t in v.split(",") if t.strip()
        }

    def json(self) -> Any:
        return orjson.loads(self.body)


async def read_head(reader: asyncio.StreamReader, limit: int = 256 * 1024) -> bytes | None:
    """The head up to and including CRLFCRLF, or None on a clean EOF before any byte."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolViolation(f"EOF inside a message head: {e.partial[:200]!r}") from None
    if len(head) > limit:
        raise ProtocolViolation("head too large")
    return head


def parse_fields(lines: Iterable[bytes]) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            raise ProtocolViolation(f"bare CR/LF/NUL in field line {line!r}")
        if line[:1] in (b" ", b"\t"):
            raise ProtocolViolation(f"obs-fold in field line {line!r}")
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ProtocolViolation(f"malformed field line {line!r}")
        out.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return out


def parse_head(head: bytes) -> tuple[tuple[str, str, str], list[tuple[str, str]]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].decode("latin-1").split(" ", 2)
    if len(parts) < 3 and not (len(parts) == 2 and parts[0].startswith("HTTP/")):
        raise ProtocolViolation(f"malformed start line {lines[0]!r}")
    if len(parts) == 2:
        parts.append("")
    return (parts[0], parts[1], parts[2]), parse_fields(lines[1:])


async def read_chunked(
    reader: asyncio.StreamReader, sink: Callable[[bytes], None] | None = None
) -> tuple[bytes, list[tuple[str, str]]]:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line[:-2].split(b";", 1)[0]
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolViolation(f"bad chunk size line {line!r}") from None
        if size == 0:
            break
        data = await reader.readexactly(size)
        if sink is not None:
            sink(data)
        else:
            body += data
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolViolation("chunk data not followed by CRLF")
    trailer_lines = []
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        trailer_lines.append(line[:-2])
    return bytes(body), parse_fields(trailer_lines)


def framing(msg: Message) -> tuple[str, int]:
    """("chunked" | "length" | "none" | "close", length) for a message's body, strictly."""
    te = msg.all("transfer-encoding")
    cl = msg.all("content-length")
    if te and cl:
        raise ProtocolViolation(f"both Transfer-Encoding and Content-Length: {msg.headers}")
    if te:
        if [v.strip().lower() for v in te] != ["chunked"]:
            raise ProtocolViolation(f"unexpected Transfer-Encoding {te}")
        return "chunked", -1
    if cl:
        if len(cl) != 1 or not cl[0].isdigit():
            raise ProtocolViolation(f"bad Content-Length {cl}")
        return "length", int(cl[0])
    return "none", 0


async def read_request(reader: asyncio.StreamReader, *, body: bool = True) -> Message | None:
    """One request, or None on EOF between requests. `body=False` leaves the body unread."""
    head = await read_head(reader)
    if head is None:
        return None
    start, headers = parse_head(head)
    if start[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolViolation(f"bad request line {start}")
    msg = Message(start, headers)
    if body:
        await read_body(reader, msg, request=True)
    return msg


async def read_body(
    reader: asyncio.StreamReader,
    msg: Message,
    *,
    request: bool,
    sink: Callable[[bytes], None] | None = None,
) -> None:
    kind, length = framing(msg)
    if kind == "chunked":
        msg.chunked = True
        msg.body, msg.trailers = await read_chunked(reader, sink)
    elif kind == "length":
        if sink is None:
            msg.body = await reader.readexactly(length)
        else:
            left = length
            while left:
                data = await reader.read(min(left, 1 << 20))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                sink(data)
    elif not request:  # response without framing: delimited by close
        msg.body = await reader.read()


async def read_response(
    reader: asyncio.StreamReader,
    *,
    method: str = "GET",
    sink: Callable[[bytes], None] | None = None,
) -> Message:
    """One final response (1xx responses collected in `.informational`)."""
    informational = []
    while True:
        head = await read_head(reader)
        if head is None:
            raise ProtocolViolation("connection closed before a response")
        start, headers = parse_head(head)
        if not start[0].startswith("HTTP/1."):
            raise ProtocolViolation(f"bad status line {start}")
        msg = Message(start, headers)
        if 100 <= msg.status < 200 and msg.status != 101:
            informational.append(msg)
            continue
        break
    msg.informational = informational
    if method == "HEAD" or msg.status in (204, 304) or msg.status == 101:
        if msg.status in (204, 304) and msg.has("transfer-encoding"):
            raise ProtocolViolation(f"{msg.status} with Transfer-Encoding")
        return msg
    await read_body(reader, msg, request=False, sink=sink)
    return msg


# --------------------------------------------------------------------------
# Raw clients.


class RawClient:
    """One client TCP connection; the test writes bytes and reads parsed responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, addr: Address) -> RawClient:
        reader, writer = await asyncio.open_connection(addr.host, addr.port, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, method: str = "GET", timeout: float = DEADLINE) -> Message:
        return await asyncio.wait_for(read_response(self.reader, method=method), timeout)

    async def request(self, data: bytes, method: str = "GET") -> Message:
        await self.send(data)
        return await self.response(method)

    async def read_to_eof(self, timeout: float = DEADLINE) -> bytes:
        """Everything until the peer closes. Fails if it does not close in time."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            return b""

    async def closed_by_peer(self, timeout: float = DEADLINE) -> bool:
        """True when the peer closed (EOF or reset) with no further bytes."""
        return await self.read_to_eof(timeout) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def get(
    target: str = "/",
    host: str = "svc",
    headers: Iterable[tuple[str, str]] = (),
    version: str = "1.1",
) -> bytes:
    return request_bytes("GET", target, host=host, headers=headers, version=version)


def request_bytes(
    method: str,
    target: str,
    *,
    host: str | None = "svc",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked_body(chunks: Iterable[bytes], trailers: Iterable[tuple[str, str]] = ()) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c)
    out += b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers) + b"\r\n"
    return out


def assert_lepton_error(
    resp: Message, status: int | Iterable[int], reason: str | Iterable[str]
) -> dict[str, Any]:
    """A sidecar-originated error: the status, `x-lepton-reason`, and a JSON body
    with error/reason/request_id, never a traceback."""
    statuses = {status} if isinstance(status, int) else set(status)
    reasons = {reason} if isinstance(reason, str) else set(reason)
    assert resp.status in statuses, (
        f"status {resp.status} not in {statuses}: {resp.headers} {resp.body[:300]!r}"
    )
    assert resp.get("x-lepton-reason") in reasons, (
        f"x-lepton-reason {resp.get('x-lepton-reason')!r} not in {reasons}"
    )
    assert b"Traceback" not in resp.body
    body = resp.json()
    assert set(body) >= {"error", "reason", "request_id"}, body
    assert body["reason"] == resp.get("x-lepton-reason")
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["request_id"], str) and body["request_id"]
    return body


# --------------------------------------------------------------------------
# Upstream test servers.


class Conn:
    """One connection accepted by an `Upstream`: the handler's view of it."""

    def __init__(
        self, upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        self.requests: list[Message] = []

    async def read_request(self, body: bool = True) -> Message | None:
        req = await read_request(self.reader, body=body)
        if req is not None:
            self.requests.append(req)
            self.upstream.requests.append(req)
            self.upstream.request_arrived.set()
        return req

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        self.writer.transport.abort()


Handler = Callable[[Conn], Awaitable[None]]
App = Callable[[Message, Conn], Awaitable[bool | None]]


class _CountingReader(asyncio.StreamReader):
    """Counts bytes as the transport delivers them, before any parsing."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(limit=1 << 20)
        self._upstream = upstream

    def feed_data(self, data: bytes) -> None:
        self._upstream.bytes_received += len(data)
        super().feed_data(data)


class Upstream:
    """A raw asyncio HTTP server: `handler(conn)` owns each accepted connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.bytes_received = 0
        self.requests: list[Message] = []
        self.request_arrived = asyncio.Event()
        self.conns: list[Conn] = []
        self.closed_conns = 0
        # Invalid HTTP the proxy wrote to us; the fixture fails the test on any.
        self.violations: list[ProtocolViolation] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> Address:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(host, port)

    async def start(self) -> Upstream:
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.StreamReaderProtocol:
            return asyncio.StreamReaderProtocol(_CountingReader(self), self._accepted)

        self._server = await loop.create_server(factory, LOCAL, 0)
        return self

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = Conn(self, reader, writer)
        self.conns.append(conn)
        task = asyncio.get_running_loop().create_task(self._run(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: Conn) -> None:
        try:
            await self.handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ProtocolViolation as e:
            self.violations.append(e)
        finally:
            conn.writer.close()
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()
            self.closed_conns += 1

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)


def http(app: App) -> Handler:
    """A keep-alive request loop: `app(req, conn)` writes the response; returning
    False closes the connection afterwards."""

    async def handler(conn: Conn) -> None:
        while True:
            req = await conn.read_request()
            if req is None:
                return
            if await app(req, conn) is False:
                return

    return handler


def replies(choose: Callable[[Message], bytes]) -> Handler:
    """A keep-alive upstream that answers each request with the raw bytes
    `choose(req)` gives (framing, surplus and all, as the test wrote them)."""

    async def app(req: Message, conn: Conn) -> None:
        await conn.send(choose(req))

    return http(app)


def response_bytes(
    status: int = 200,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    *,
    length: bool = True,
    phrase: str = "OK",
) -> bytes:
    lines = [f"HTTP/1.1 {status} {phrase}"] + [f"{k}: {v}" for k, v in headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def echo_payload(req: Message) -> bytes:
    """What the echo app answers: the request as the upstream saw it."""
    return orjson.dumps(
        {
            "method": req.method,
            "target": req.target,
            "version": req.start[2],
            "headers": req.headers,
            "body": req.body.decode("latin-1"),
            "chunked": req.chunked,
            "trailers": req.trailers,
        }
    )


def seen_header(seen: Mapping[str, Any], name: str) -> list[str]:
    """The values of header `name` in an echo payload, as the upstream received them."""
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


async def echo_app(req: Message, conn: Conn) -> None:
    body = echo_payload(req)
    await conn.send(response_bytes(200, body, [("Content-Type", "application/json")]))


# --------------------------------------------------------------------------
# Sidecars.

EPHEMERAL = Listeners(
    outbound=Address(LOCAL, 0), inbound=Address(LOCAL, 0), admin=Address(LOCAL, 0)
)


def service(name: str, *addresses: Address, **kw: Any) -> ServiceConfig:
    return ServiceConfig(name=name, endpoints=tuple(Endpoint(a) for a in addresses), **kw)


def make_config(
    *,
    app: Address | None = None,
    services: Mapping[str, ServiceConfig | Address | Iterable[Address]] | None = None,
    timeouts: Mapping[str, float] | None = None,
    limits: Mapping[str, int] | None = None,
    pool: Mapping[str, float] | None = None,
    name: str = "test",
    listeners: Listeners = EPHEMERAL,
) -> SidecarConfig:
    svcs: dict[str, ServiceConfig] = {}
    for key, value in (services or {}).items():
        if isinstance(value, ServiceConfig):
            svcs[key] = value
        elif isinstance(value, Address):
            svcs[key] = service(key, value)
        else:
            svcs[key] = service(key, *value)
    return SidecarConfig(
        service=name,
        app=app or Address(LOCAL, free_port()),
        listeners=listeners,
        services=MappingProxyType(svcs),
        timeouts=replace(Timeouts(), **(timeouts or {})),
        limits=replace(Limits(), **(limits or {})),
        pool=replace(PoolConfig(), **(pool or {})),
        access_log=AccessLogConfig(enabled=True),
    )


def outbound(sc: Any) -> Address:
    return sc.addresses["outbound"]


def inbound(sc: Any) -> Address:
    return sc.addresses["inbound"]


@contextlib.asynccontextmanager
async def client(addr: Address) -> AsyncIterator[RawClient]:
    c = await RawClient.connect(addr)
    try:
        yield c
    finally:
        await c.close()


def clean_proxy_env(monkeypatch: pytest.MonkeyPatch, proxy_url: str | None) -> None:
    """Point HTTP_PROXY at the sidecar (or nowhere) and drop anything that would bypass it."""
    for k in (
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ):
        monkeypatch.delenv(k, raising=False)
    if proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.setenv("http_proxy", proxy_url)


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
