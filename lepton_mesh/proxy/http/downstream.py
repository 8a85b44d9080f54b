"""The client side of an HTTP listener: one Protocol per accepted connection.

A thin wrapper around httptools' request parser, in the uvicorn style:
`data_received` feeds the parser, parser callbacks mutate per-request state,
nothing awaits. Each request head becomes an `Exchange`.

Pipelining: requests are answered strictly in order. While an exchange is in
flight, any further request the parser produces is queued (head, body and
completion) in `backlog` and reading is paused (reason PIPELINE), so the
queue holds at most what one read returned. When the exchange finishes, the
next queued request starts. Bytes the parser refuses are answered (400, 431)
only after every request parsed before them (RFC 9112 section 9.3.2): the
error waits in `_deferred_error` until the backlog is empty.

Upgrade requests: httptools ends the message at the head (it treats what
follows as the new protocol), so a Content-Length body is counted off here
(`Incoming.body_left`) and forwarded as the request's body; only the bytes
after it are held for the tunnel. If the upgrade does not happen (the
upstream declines, or the sidecar answers itself), those bytes are parsed
as HTTP again.

Timers: one `Deadline` per connection. Idle between requests (`idle`), then
`header_read` from the first byte of a request until its head is parsed
(slowloris -> 408), and while an exchange runs, that exchange's overall
timeout (the route's): a long response is governed by it, never by an idle
timer. While a request body is being received, no byte for `idle` seconds
is a stalled upload (408 body_timeout), whether or not the route has a
timeout; the deadline is then the earlier of the two (`_ex_until` keeps the
exchange's). One loop handle serves all of them, moved by float stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import traceback
from collections import deque
from math import inf
from typing import TYPE_CHECKING

import httptools

from lepton_mesh.proxy.errors import ProxyError, Reason, bad_request, error_body
from lepton_mesh.proxy.flow import BUFFERED, PEER_BACKPRESSURE, PIPELINE, ReadGate
from lepton_mesh.proxy.http.exchange import Exchange
from lepton_mesh.proxy.http.http1 import (
    Headers,
    error_response,
    inspect_request,
    new_request_id,
    split_target,
)
from lepton_mesh.proxy.security.mtls import XFCC
from lepton_mesh.proxy.timers import Deadline

if TYPE_CHECKING:
    from lepton_mesh.proxy.contracts import ListenerSide
    from lepton_mesh.proxy.security.mtls import InboundTls


class Incoming:
    """A request as parsed so far, before or while it has an exchange."""

    __slots__ = (
        "body",
        "body_left",
        "complete",
        "exchange",
        "head_size",
        "headers",
        "headers_done",
        "keep_alive",
        "method",
        "trailers",
        "tunnel",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.head_size = 0
        self.headers: Headers = []
        self.headers_done = False
        self.trailers: Headers | None = None
        self.body: list[bytes] = []  # only while queued behind another request
        self.complete = False
        self.exchange: Exchange | None = None
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False
        self.body_left = 0  # upgrade request: body bytes still to come (httptools skips them)
        self.tunnel = b""  # upgrade request still queued: bytes after it, for the new protocol


class DownstreamProtocol(asyncio.Protocol):
    __slots__ = (
        # wiring
        "listener",
        "loop",
        "parser",
        # per connection
        "_body_timed",
        "_body_waits",
        "_deferred_error",
        "_ex_until",
        "_head_bytes",
        "_stashed",
        "backlog",
        "client_ip",
        "client_ip_str",
        "closing",
        "current",
        "deadline",
        "eof",
        "feeding",
        "gate",
        "outbox",
        "transport",
        "tunneled",
        "write_paused",
        # mTLS inbound (None/False/b"" otherwise)
        "inbound_tls",
        "peer",
        "secure",
        "xfcc",
        # per request being parsed
        "req",
    )

    def __init__(
        self, listener: ListenerSide, tls: InboundTls | None = None, secure: bool = False
    ) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.gate = ReadGate()
        self.deadline = Deadline(self.loop, self._on_deadline)
        self.current: Exchange | None = None
        self.backlog: deque[Incoming] = deque()
        self.req: Incoming | None = None
        self.write_paused = False
        self.closing = False
        self.eof = False  # the client sent FIN
        self.tunneled = False
        # Write coalescing: while `outbox` is a list, sends are collected and
        # written in one call by `uncork` (the upstream side corks around each
        # read, so a response head and body from one read leave in one syscall).
        self.outbox: list[bytes] | None = None
        # True while our parser runs: exchanges hold upstream writes until the
        # read is fully parsed, then `flush_upstream` sends them at once.
        self.feeding = False
        self.client_ip = b""
        self.client_ip_str = ""
        self._head_bytes = 0
        self._stashed: ProxyError | None = None  # raised inside a parser callback
        # A refused request to answer once every request before it is answered,
        # with what its access-log line shows (method, authority, target).
        self._deferred_error: tuple[ProxyError, tuple[bytes, bytes, bytes]] | None = None
        self._ex_until = inf  # loop time of the running exchange's overall timeout
        self._body_timed = False  # the deadline times the gaps in a request body
        # An `Expect: 100-continue` body whose timing waits for the client to be
        # asked for it (a 100 relayed) or to send it anyway (its first byte).
        # Only ever consulted for the exchange that set it, so it is cleared
        # where it is used, not per request.
        self._body_waits = False
        # An inbound listener in STRICT or PERMISSIVE mode passes `tls`: the
        # caller is then who the handshake proved (`peer`, its workload; b""
        # for plaintext or no mesh identity), never what x-lepton-peer says,
        # and `xfcc` (By=<us>;URI=<caller>) is added to each request for the app.
        self.inbound_tls = tls
        self.secure = secure  # this connection is TLS
        self.peer = b""
        self.xfcc = b""

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.secure:
            found = self.inbound_tls.secured(transport)  # type: ignore[union-attr]
            if found is None:
                return  # an L4 tunnel (ALPN lepton-tcp/1): the TCP path owns it now
            self.peer, self.xfcc = found
        self.gate.attach(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip_str = peer[0] if peer else "unknown"
        self.client_ip = self.client_ip_str.encode("latin-1")
        listener = self.listener
        cfg = listener.snapshot.cfg
        if not listener.connection_opened(self):
            self._reject(
                ProxyError(
                    503,
                    Reason.OVERFLOW,
                    f"listener {listener.name} is at its connection limit",
                    close=True,
                ),
                None,
            )
            return
        self.deadline.arm(cfg.timeouts.header_read)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connection_closed(self)
        self.deadline.cancel()
        if self.secure:
            self.inbound_tls.identity.connection_closed()  # type: ignore[union-attr]
        self.backlog.clear()
        ex = self.current
        if ex is not None:
            self.current = None
            ex.downstream_lost()

    def eof_received(self) -> bool:
        # The client will send no more requests. A complete request in flight is
        # still answered (some clients half-close after sending it); a request
        # cut off mid-body can never complete, so it is abandoned.
        self.closing = True
        self.eof = True
        ex = self.current
        if ex is None:
            return False
        if not ex.req_done:
            self.current = None
            ex.downstream_lost()
            return False
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.gate.pause(PEER_BACKPRESSURE)

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.gate.resume(PEER_BACKPRESSURE)

    def data_received(self, data: bytes) -> None:
        req = self.req
        if req is None or not req.headers_done:
            self._head_bytes += len(data)
        elif req.upgrade:
            # After an upgrade request's head: its body, then bytes for the new protocol.
            self._after_upgrade(req, data)
            return
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.feeding = False
            self._flush_upstream()
            self._upgrade_requested(data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            self.feeding = False
            ex = self.current
            if ex is not None and ex.req_done:
                self._flush_upstream()  # the request before the bad bytes goes on
            self._parse_failed(exc)
            return
        self.feeding = False
        self._flush_upstream()
        req = self.req
        if req is None:
            return
        if not req.headers_done:
            limit = self.listener.snapshot.cfg.limits.max_header_bytes
            if self._head_bytes > limit:
                self._reject(
                    ProxyError(
                        431,
                        Reason.HEADERS_TOO_LARGE,
                        f"request head exceeds {limit} bytes",
                        close=True,
                    ),
                    req,
                )
        elif self._body_timed:
            self._arm_body()  # a body byte arrived: the stall timer starts again
        elif self._body_waits:
            ex = req.exchange
            if ex is not None and ex.req_bytes and ex is self.current:
                self._body_waits = False
                self._arm_body()  # sent without waiting for a 100: timed from now

    def _flush_upstream(self) -> None:
        ex = self.current
        if ex is not None and ex.pending:
            ex.flush_upstream()

    # -- writes to the client ------------------------------------------------

    def send(self, data: bytes) -> None:
        out = self.outbox
        if out is not None:
            out.append(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def send_many(self, frames: tuple[bytes, ...]) -> None:
        out = self.outbox
        if out is not None:
            out.extend(frames)
        else:
            self.transport.writelines(frames)  # type: ignore[union-attr]

    def cork(self) -> None:
        if self.outbox is None:
            self.outbox = []

    def uncork(self) -> None:
        out = self.outbox
        self.outbox = None
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    # -- httptools callbacks ----------------------------------------------

    def on_message_begin(self) -> None:
        self.req = Incoming()
        if self.current is None:
            self.deadline.arm(self.listener.snapshot.cfg.timeouts.header_read)

    def on_url(self, url: bytes) -> None:
        req = self.req
        req.url = url if not req.url else req.url + url  # type: ignore[union-attr]
        req.head_size += len(url) + 16  # method, version, spaces and CRLF, roughly

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 23 and name.lower() == XFCC:
            return  # only the inbound side sets it, from the verified certificate
        req = self.req
        assert req is not None
        if req.headers_done:
            if req.trailers is None:
                req.trailers = []
            req.trailers.append((name, value))
        else:
            req.headers.append((name, value))
            req.head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        req.headers_done = True
        self._head_bytes = 0
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade()
        limit = self.listener.snapshot.cfg.limits.max_header_bytes
        if req.head_size > limit:
            self._stash(
                ProxyError(
                    431, Reason.HEADERS_TOO_LARGE, f"request head exceeds {limit} bytes", close=True
                )
            )
        if req.upgrade:
            if req.method == b"CONNECT":
                self._stash(
                    ProxyError(
                        501,
                        Reason.UNSUPPORTED,
                        "CONNECT tunnels are not supported; send plain HTTP to the mesh",
                        close=True,
                    )
                )
            req.body_left = _upgrade_body_length(req.headers)
            if req.body_left < 0:
                self._stash(
                    ProxyError(
                        501,
                        Reason.UNSUPPORTED,
                        "an upgrade request with a chunked body is not supported",
                        close=True,
                    )
                )
        if self.current is None and not self.backlog:
            err = self._start(req)
            if err is not None:
                self._stash(err)  # inside a parser callback: stop parsing this connection
        else:
            self.backlog.append(req)
            self.gate.pause(PIPELINE)

    def on_body(self, body: bytes) -> None:
        req = self.req
        ex = req.exchange  # type: ignore[union-attr]
        if ex is not None:
            ex.request_body(body)
        else:
            req.body.append(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        if req.upgrade:
            # `req` stays: what follows is its body (`body_left`), then the new protocol.
            if not req.body_left:
                self._upgrade_body_done(req)
            return
        req.complete = True
        self.req = None
        if self._body_timed:
            self._end_body_timer()
        ex = req.exchange
        if ex is not None:
            ex.request_complete(req.trailers)

    # -- requests ------------------------------------------------------------

    def _start(self, req: Incoming) -> ProxyError | None:
        """Turn a parsed head into a running exchange; a refused head is returned, not raised."""
        self.deadline.disarm()
        self._ex_until = inf
        self._body_timed = False
        listener = self.listener
        snap = listener.snapshot
        try:
            facts = inspect_request(
                req.method,
                req.url,
                req.version,
                req.headers,
                client_ip=self.client_ip,
                upgrade=req.upgrade,
            )
        except ProxyError as err:
            return err
        limit = snap.cfg.limits.max_body_bytes
        if limit and facts.content_length > limit:
            # Refused before anything is forwarded (RFC 9110 section 15.5.14), and
            # before a `100 Continue` invites the body.
            return ProxyError(
                413,
                Reason.BODY_TOO_LARGE,
                f"request body of {facts.content_length} bytes exceeds {limit} bytes",
                close=True,
            )
        if self.inbound_tls is not None:
            facts.peer = self.peer
            if self.xfcc:
                facts.kept.append((XFCC, XFCC, self.xfcc))
        ex = Exchange(self, snap, facts, req.version, req.keep_alive and not self.closing)
        self.current = ex
        req.exchange = ex
        if req.body:  # queued behind a previous request: replay what was held
            for chunk in req.body:
                ex.request_body(chunk)
            req.body = []
        if req.complete:
            ex.request_complete(req.trailers)
        if req.tunnel:
            ex.set_early_tunnel_bytes(req.tunnel)
            req.tunnel = b""
        ex.begin()
        if not req.complete and (facts.chunked or facts.content_length > 0) and not ex.done:
            if facts.expect_continue and req.version == "1.1" and not req.body:
                # The client waits for a 100 before its body: until the upstream
                # sends one, a silence is the upstream's (the route's timeout
                # still runs), not a stalled upload.
                self._body_waits = True
            else:
                self._arm_body()
        return None

    def exchange_done(self, ex: Exchange, abort: bool) -> None:
        if ex is not self.current:
            return
        self.current = None
        self._ex_until = inf
        self._body_timed = False
        transport = self.transport
        assert transport is not None
        if abort:
            self.outbox = None
            transport.abort()
            return
        if not ex.down_keep_alive or self.closing:
            self.closing = True
            self.uncork()  # what the exchange wrote goes out before the FIN
            transport.close()
            return
        if ex.facts.upgrade and not self.feeding:
            # The upgrade did not happen (the upstream declined): the connection
            # goes on as HTTP, and what the client sent after the request is HTTP
            # too. (Answered by us inside the parser's callbacks, `feeding`:
            # `_upgrade_requested` does this once the parser returns.)
            # Nothing is queued (the parser stopped at the upgrade): the
            # connection is idle until `held` says otherwise, so the idle timer
            # runs first (bytes that start no request, a bare CRLF, arm nothing).
            self.req = None
            held, ex.early_tunnel = ex.early_tunnel, b""
            self.gate.resume(BUFFERED | PIPELINE)
            self.deadline.arm(self.listener.snapshot.cfg.timeouts.idle)
            if held:
                self.data_received(held)
            return
        if self.backlog:
            nxt = self.backlog.popleft()
            if not self.backlog and self._deferred_error is None:
                self.gate.resume(PIPELINE)
            err = self._start(nxt)
            if err is not None:
                self._reject(err, nxt)
            return
        deferred = self._deferred_error
        if deferred is not None:
            self._deferred_error = None
            self._reject(deferred[0], None, deferred[1])
            return
        self.gate.resume(PIPELINE)
        cfg = self.listener.snapshot.cfg
        reading_next = self.req is not None and self.req.exchange is None
        self.deadline.arm(cfg.timeouts.header_read if reading_next else cfg.timeouts.idle)

    def detach_for_tunnel(self) -> None:
        """The connection becomes a byte tunnel: this protocol lets go of it."""
        self.tunneled = True
        self.current = None
        self.listener.connection_closed(self)
        self.deadline.cancel()
        self.gate.resume(PEER_BACKPRESSURE | PIPELINE | BUFFERED)

    def start_drain(self) -> None:
        """Drain: idle connections close now; busy ones after their response."""
        self.closing = True
        if self.current is None and not self.backlog:
            self.transport.close()  # type: ignore[union-attr]

    # -- upgrade requests ------------------------------------------------------

    def _upgrade_requested(self, rest: bytes) -> None:
        """The parser stopped after an upgrade request's head; `rest` is what followed it."""
        req = self.req
        if self._stashed is not None:  # e.g. CONNECT, refused in on_headers_complete
            self._reject(self._stashed, req)
            return
        if req is None or self.transport is None or self.transport.is_closing():
            return
        ex = req.exchange
        if ex is not None and ex.done:
            # Answered by us already (no route, no endpoint): no switch happens,
            # and what follows is the next request.
            self.req = None
            if rest:
                self.data_received(rest)
            return
        if ex is None:
            self.gate.pause(PIPELINE)  # queued behind another request: wait for its turn
        if rest:
            self._after_upgrade(req, rest)

    def _after_upgrade(self, req: Incoming, data: bytes) -> None:
        """Bytes after an upgrade request's head: its body first, then, held until the
        upstream answers (reading paused), bytes for the new protocol."""
        left = req.body_left
        if left:
            body = data if len(data) <= left else data[:left]
            req.body_left = left - len(body)
            ex = req.exchange
            if ex is not None:
                ex.request_body(body)
            else:
                req.body.append(body)
            if req.body_left:
                if self._body_timed:
                    self._arm_body()
                elif self._body_waits and ex is not None:
                    self._body_waits = False
                    self._arm_body()
                return
            self._upgrade_body_done(req)
            data = data[left:]
            if not data:
                return
        ex = req.exchange
        if ex is not None:
            ex.set_early_tunnel_bytes(data)
            self.gate.pause(BUFFERED)
        else:
            req.tunnel += data

    def _upgrade_body_done(self, req: Incoming) -> None:
        req.complete = True
        ex = req.exchange
        if ex is None:
            return
        if self._body_timed:
            self._end_body_timer()
        ex.request_complete(None)
        if not ex.done:
            self.gate.pause(BUFFERED)  # the rest waits for the upstream's answer

    # -- errors --------------------------------------------------------------

    def _stash(self, err: ProxyError) -> None:
        """Record an error found inside a parser callback and stop the parser."""
        self._stashed = err
        raise err

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        err = self._stashed
        if err is None and isinstance(exc, httptools.HttpParserCallbackError):
            # Not the client's fault: a bug of ours raised inside a callback.
            # The client gets a 500 with a reason; the traceback goes to stderr.
            cause = exc.__context__ or exc
            traceback.print_exception(cause, file=sys.stderr)
            err = ProxyError(
                500, Reason.INTERNAL, f"internal error: {type(cause).__name__}", close=True
            )
        if err is None:
            detail = str(exc) or type(exc).__name__
            err = bad_request(f"malformed request: {detail}")
        self._reject(err, self.req)

    def _reject(
        self,
        err: ProxyError,
        req: Incoming | None,
        fields: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        """Answer a request the proxy refuses before it became an exchange, then close.

        `req` is the refused request as far as it was parsed (None: no request);
        `fields` its (method, authority, target) when taken earlier."""
        ex = self.current
        if ex is not None and not ex.req_done:
            # The error is in the body of the request in flight (a bad chunk,
            # a truncated stream): that exchange fails, and the connection with it.
            ex.fail(err)
            return
        if fields is None:
            fields = self._request_fields(req)
        if ex is not None:
            # Responses go out in order: answer after the ones in flight and queued.
            # A queued request whose body is bad is answered by this error alone.
            backlog = self.backlog
            if req is not None and backlog and backlog[-1] is req:
                backlog.pop()
            if self._deferred_error is None:
                self._deferred_error = (err, fields)
            self.gate.pause(PIPELINE)
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.deadline.cancel()
        rid = new_request_id()
        body = error_body(err, rid.decode("latin-1"))
        self.uncork()
        transport.write(error_response(err, rid, body, keep_alive=False))
        transport.close()
        self.closing = True
        method, authority, target = fields
        self.listener.record_reject(err, method, authority, target, self.client_ip_str, rid)

    def _request_fields(self, req: Incoming | None) -> tuple[bytes, bytes, bytes]:
        """(method, authority, target) of a refused request, as far as it was parsed."""
        if req is None:
            return b"", b"", b""
        url = req.url
        method = req.method
        if not method and url:
            method = self.parser.get_method()  # the request line was read: the method is known
        authority = b""
        if url[:1] != b"/":
            with contextlib.suppress(ProxyError):  # a bad target is logged as received
                authority, url = split_target(url)
        if not authority:
            for name, value in req.headers:
                if name.lower() == b"host":
                    authority = value.strip().lower()
                    break
        return method, authority, url

    # -- timers ----------------------------------------------------------------

    def arm_deadline(self, seconds: float) -> None:
        """While an exchange runs, the connection's deadline is its overall timeout."""
        deadline = self.deadline
        deadline.arm(seconds)
        self._ex_until = deadline.when  # type: ignore[assignment]
        if self._body_timed:
            self._arm_body()

    def continue_relayed(self, ex: Exchange) -> None:
        """A `100 Continue` reached the client: from now on its body is awaited."""
        if self._body_waits and ex is self.current and not ex.req_done:
            self._body_waits = False
            self._arm_body()

    def _arm_body(self) -> None:
        """A request body is being received: the deadline is the next `timeouts.idle`
        without a byte of it, unless the exchange's overall timeout comes first."""
        self._body_timed = True
        idle_until = self.loop.time() + self.listener.snapshot.cfg.timeouts.idle
        self.deadline.arm_at(min(idle_until, self._ex_until))

    def _end_body_timer(self) -> None:
        """The body is complete: the deadline is the exchange's overall timeout again."""
        self._body_timed = False
        until = self._ex_until
        if until == inf:
            self.deadline.disarm()
        else:
            self.deadline.arm_at(until)

    def _on_deadline(self) -> None:
        if self.transport is None:
            return
        ex = self.current
        if ex is not None:
            if self._body_timed and self.loop.time() < self._ex_until:
                if self.gate.paused:
                    self._arm_body()  # we stopped reading (backpressure): not the client's stall
                    return
                idle = self.listener.snapshot.cfg.timeouts.idle
                ex.fail(
                    ProxyError(
                        408,
                        Reason.BODY_TIMEOUT,
                        f"no request body byte received for {idle:g}s",
                        close=True,
                    )
                )
                return
            ex.on_timeout()
            return
        if self.req is not None or self.backlog:
            timeout = self.listener.snapshot.cfg.timeouts.header_read
            self._reject(
                ProxyError(
                    408,
                    Reason.HEADER_TIMEOUT,
                    f"request head not received within {timeout:g}s",
                    close=True,
                ),
                self.req,
            )
        else:
            self.transport.close()  # idle keep-alive connection


def _upgrade_body_length(headers: Headers) -> int:
    """The Content-Length of an upgrade request: 0 without one, -1 for a chunked body.

    httptools ends an upgrade request's message at its head, so its body is
    counted off by us; chunked framing would need a decoder of its own."""
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            return int(value)  # llhttp validated digits and uniqueness
        if lname == b"transfer-encoding":
            return -1
    return 0
