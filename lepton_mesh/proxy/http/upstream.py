"""One HTTP/1.1 connection from the sidecar to an upstream endpoint.

A thin Protocol around httptools' response parser: callbacks never await,
they hand events to the exchange currently bound to the connection. While a
connection sits idle in its pool nothing is bound; any byte or EOF then means
the peer closed or broke the connection, so it is dropped from the pool and
never handed out again.

What the upstream may send (as nginx and Envoy hold it):
- Exactly the response it was asked for. A byte after its end, in the same
  read or later, means its framing cannot be trusted: the connection is
  closed, never reused, so surplus bytes can never answer another request.
  A response ends (and its connection goes back to the pool) only once the
  parser has returned, never from inside a parser callback: a pipelined
  request must not be bound to this connection while the read is parsed.
  llhttp skips bare CR/LF between messages (as RFC 9112 section 2.2 lets a
  recipient do); those alone are not counted.
- A response head of at most `MAX_RESPONSE_HEAD` bytes, and
  `Transfer-Encoding: chunked` as its only transfer coding: we re-frame
  bodies, and must not drop a coding we would forward (RFC 9112 section 6.3).
  Otherwise: 502 upstream_protocol_error, and the connection is closed.

An mTLS connection (`secured`) also keeps its TLS session for the next
connection to the endpoint once its first response is complete (a TLS 1.3
ticket arrives after the handshake, before the response), and tells the
identity when it closes (the memory trim timer, mtls.MallocTrimmer).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

import httptools

from lepton_mesh.proxy.errors import ProxyError, Reason, UpstreamError
from lepton_mesh.proxy.flow import PEER_BACKPRESSURE, ReadGate
from lepton_mesh.proxy.http.http1 import Headers

if TYPE_CHECKING:
    from lepton_mesh.proxy.resilience.circuit import CircuitBreaker
    from lepton_mesh.proxy.security.mtls import MeshIdentity
    from lepton_mesh.proxy.security.tls import SessionCache

# The largest response head we take (Envoy's default is 60 KiB, nginx's
# proxy buffer 4-8 KiB); counted per read while the head is incomplete.
MAX_RESPONSE_HEAD = 64 * 1024


class ConnectionOwner(Protocol):
    """The pool a connection belongs to: told when the connection can no longer be used."""

    address: object  # the endpoint: the key its TLS session is kept under

    def forget(self, conn: UpstreamConnection) -> None: ...


class _Corkable(Protocol):
    def cork(self) -> None: ...
    def uncork(self) -> None: ...


class ResponseSink(Protocol):
    """What an upstream connection reports to (the exchange)."""

    down: _Corkable  # the client side: corked around each read so writes coalesce

    def on_response_head(self, status: int, headers: Headers, keep_alive: bool) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_complete(self, trailers: Headers | None, reusable: bool) -> None: ...
    def on_upstream_error(self, err: ProxyError) -> None: ...
    def on_upgraded(self, rest: bytes) -> None: ...
    def pause_downstream(self) -> None: ...
    def resume_downstream(self) -> None: ...


class _HeadResponseDone(Exception):
    """Raised inside the parser to stop it after a HEAD response's head."""


class _Surplus(Exception):
    """Raised inside the parser when a byte follows the complete response."""


class _Refused(Exception):
    """Raised inside the parser for a response we do not forward; args[0] says why."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_close_delimited",
        "_complete",
        "_framed",
        "_head_bytes",
        "_headers",
        "_headers_done",
        "_keep_alive",
        "_session_cache",
        "_status",
        "_trailers",
        "breaker",
        "closed",
        "exchange",
        "gate",
        "head_request",
        "idle_since",
        "parser",
        "pool",
        "responded",
        "tls",
        "transport",
        "trust_generation",
        "write_paused",
    )

    def __init__(self, pool: ConnectionOwner) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.gate = ReadGate()
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: ResponseSink | None = None
        self.closed = False
        self.breaker: CircuitBreaker | None = None  # counted there while open
        self.write_paused = False
        self.idle_since = 0.0
        # mTLS (set by `secured`): None on a plaintext connection.
        self.tls: MeshIdentity | None = None
        self.trust_generation = 0
        self._session_cache: SessionCache | None = None  # until the session is kept
        # per response
        self.head_request = False  # set by the exchange: a HEAD response has no body
        # Any response byte arrived for the bound exchange. An int, always truthy
        # once set: each read stores True (1), and each interim (1xx) head
        # completed in that read adds 1, so a HEAD response's head can be found
        # after them (`_ends_with_head`) at no cost to reads without one.
        self.responded = False
        self._status = 0
        self._headers: Headers = []
        self._headers_done = False
        self._trailers: Headers | None = None
        self._keep_alive = True
        self._close_delimited = False
        self._framed = False
        self._complete = False  # the final response ended in the read being parsed
        self._head_bytes = 0  # bytes read while the head was incomplete

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gate.attach(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex = self.exchange
        self.pool.forget(self)
        if self.tls is not None:
            self.tls.connection_closed()
        if ex is not None:
            self.exchange = None
            ex.on_upstream_error(
                UpstreamError(
                    502,
                    Reason.UPSTREAM_RESET,
                    "upstream closed the connection before the response ended",
                    "reset",
                )
            )

    def eof_received(self) -> bool:
        ex = self.exchange
        if ex is not None and self._headers_done and self._close_delimited:
            # The body of a response without length ends at EOF (RFC 9112 section 6.3).
            self._finish(reusable=False)
        return False  # close our side too

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.pause_downstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.resume_downstream()

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes on an idle connection: the peer is confused or closing.
            self.close()
            return
        self.responded = True
        if not self._headers_done:
            self._head_bytes += len(data)
        down = ex.down
        down.cork()
        try:
            self._feed(data)
        finally:
            down.uncork()

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            ex = self.exchange
            if ex is not None and self._status == 101:
                self.exchange = None
                # The 101 head waits in the client's cork (ours, see data_received);
                # the tunnel writes past it, so it goes out first (RFC 9110 section 15.2.2).
                ex.down.uncork()
                ex.on_upgraded(data[exc.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadResponseDone):
                # A HEAD response ends with its head; llhttp cannot be told so,
                # so this connection gets a fresh parser for the next response.
                self.parser = httptools.HttpResponseParser(self)
                interim = self.responded - 1  # 1xx heads completed in this read
                self._finish(reusable=self._keep_alive and _ends_with_head(data, interim))
            elif self._complete:
                self._finish(reusable=False)  # _Surplus: bytes after the response
            else:
                self._protocol_error(cause.args[0] if isinstance(cause, _Refused) else str(exc))
            return
        except httptools.HttpParserError as exc:
            if self._complete:
                self._finish(reusable=False)  # what followed the response is not even HTTP
            else:
                self._protocol_error(str(exc))
            return
        if self._complete:
            self._finish(reusable=self._keep_alive and not self._close_delimited)
        elif self._head_bytes > MAX_RESPONSE_HEAD and not self._headers_done:
            self._protocol_error(f"response head exceeds {MAX_RESPONSE_HEAD} bytes")

    # -- httptools callbacks ----------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Surplus
        self._headers = []
        self._headers_done = False
        self._framed = False
        self._trailers = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))
            if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
                if len(name) == 17 and (self._framed or not _only_chunked(value)):
                    # nginx: "upstream sent unknown Transfer-Encoding" (a 502 too).
                    raise _Refused(
                        f"Transfer-Encoding {value.decode('latin-1')!r}: only chunked is forwarded"
                    )
                self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = True
        if self._head_bytes > MAX_RESPONSE_HEAD and _head_size(self._headers) > MAX_RESPONSE_HEAD:
            # The head and body of one read were counted; the head alone is over.
            raise _Refused(f"response head exceeds {MAX_RESPONSE_HEAD} bytes")
        status = self.parser.get_status_code()
        self._status = status
        keep_alive = self.parser.should_keep_alive()
        self._keep_alive = keep_alive
        ex = self.exchange
        if ex is None:
            return
        has_body = not (self.head_request or status in (204, 304) or 100 <= status < 200)
        self._close_delimited = has_body and not self._framed
        ex.on_response_head(status, self._headers, keep_alive)
        if self.head_request and status >= 200 and self.exchange is not None:
            raise _HeadResponseDone

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.on_response_body(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            # An interim response; the final one follows on this connection.
            self.responded += 1
            return
        self._complete = True  # finished by _feed once the parser returns

    # -- used by the exchange and the pool ---------------------------------

    def secured(self, identity: MeshIdentity, cache: SessionCache, trust_generation: int) -> None:
        """An mTLS connection whose peer was verified; its session goes to `cache`."""
        self.tls = identity
        self.trust_generation = trust_generation
        self._session_cache = cache

    def bind(
        self, exchange: ResponseSink, head_request: bool, downstream_write_paused: bool
    ) -> None:
        self.exchange = exchange
        self.head_request = head_request
        self.responded = False
        self._status = 0
        self._complete = False
        self._headers_done = False
        self._head_bytes = 0
        if downstream_write_paused:
            self.gate.pause(PEER_BACKPRESSURE)

    def unbind(self) -> None:
        self.exchange = None
        self.gate.resume(PEER_BACKPRESSURE)

    def close(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.forget(self)

    def abort(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self.pool.forget(self)

    def _finish(self, reusable: bool) -> None:
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        if self._session_cache is not None:
            self._keep_session()
        ex.on_response_complete(self._trailers, reusable)

    def _keep_session(self) -> None:
        """Once, after the first response: the endpoint's next connection resumes this session."""
        cache, self._session_cache = self._session_cache, None
        t = self.transport
        if cache is not None and t is not None:
            cache.store(self.pool.address, t.get_extra_info("ssl_object"))

    def _protocol_error(self, detail: str) -> None:
        ex = self.exchange
        self.abort()
        if ex is not None:
            ex.on_upstream_error(
                UpstreamError(
                    502,
                    Reason.UPSTREAM_PROTOCOL_ERROR,
                    f"invalid response from upstream: {detail}",
                    "reset",
                )
            )


def _only_chunked(value: bytes) -> bool:
    return value == b"chunked" or value.strip().lower() == b"chunked"


def _head_size(headers: Headers) -> int:
    """About the size of a head on the wire (the status line not counted)."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


def _ends_with_head(data: bytes, interim: int) -> bool:
    """`data`, the read in which a HEAD response's head ended after `interim`
    1xx heads that also ended in it, holds nothing after that head.

    The head ends at the (interim + 1)-th CRLFCRLF: each head ends at its
    first, so the one found is never past the real end, and a CRLFCRLF in
    bytes after the head can only make it fall short (the connection is then
    closed). A read that starts with CR or LF may be finishing a CRLFCRLF
    begun in the previous read, so it is not trusted (closed too: rare, and
    always safe); so are CR/LF that llhttp skipped between heads.
    """
    if data[:1] in (b"\r", b"\n"):
        return False
    end = data.find(b"\r\n\r\n")
    while interim and end >= 0:
        interim -= 1
        end = data.find(b"\r\n\r\n", end + 4)
    return end == len(data) - 4
