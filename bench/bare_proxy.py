"""A bare HTTP/1.1 reverse proxy on uvloop and httptools: the floor for a Python proxy.

`python -m bench.bare_proxy --port P --upstream U` forwards every request on
127.0.0.1:P to 127.0.0.1:U and does nothing else: no routing, ids, metrics,
log, timeouts, retries, pools or streaming (bodies are whole, framed by
Content-Length; hop-by-hop headers dropped). Each client connection gets its
own upstream connection, opened when the client connects.

It is not part of lepton-mesh. The bench runs it (`bare_proxy`) beside
nginx and the sidecar, pinned like them, so the table shows on the machine at
hand what the Python runtime, the event loop and the sockets cost by
themselves: the sidecar's distance to it is what its features cost, and its
distance to nginx is what no Python proxy can close.
"""

from __future__ import annotations

import argparse
import asyncio

import httptools
import uvloop

_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"}
)
_HOP |= {b"content-length"}  # re-framed below


class _Message:
    """What both parsers collect: headers kept, body parts, completion."""

    def __init__(self) -> None:
        self.headers: list[bytes] = []
        self.body: list[bytes] = []
        self.url = b""

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP:
            self.headers += (name, b": ", value, b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def framed(self, first_line: bytes) -> bytes:
        body = b"".join(self.body)
        head = b"".join(self.headers)
        return b"%s\r\n%scontent-length: %d\r\n\r\n%s" % (first_line, head, len(body), body)


class Upstream(_Message, asyncio.Protocol):
    def __init__(self, down: Downstream) -> None:
        super().__init__()
        self.down = down
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.down.send(self.framed(b"HTTP/1.1 %d OK" % self.parser.get_status_code()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.close()


class Downstream(_Message, asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.up: Upstream | None = None
        self.waiting: list[bytes] = []  # requests read before the upstream connection is up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(
                lambda: Upstream(self), "127.0.0.1", self.upstream_port
            )
        except OSError:
            self.close()
            return
        self.up = up
        for request in self.waiting:
            up.transport.write(request)  # type: ignore[union-attr]
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_message_complete(self) -> None:
        request = self.framed(self.parser.get_method() + b" " + self.url + b" HTTP/1.1")
        if self.up is None:
            self.waiting.append(request)
        else:
            self.up.transport.write(request)  # type: ignore[union-attr]

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Downstream(upstream_port), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
