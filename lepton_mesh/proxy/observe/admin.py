"""The sidecar's admin endpoints on a tiny HTTP/1.1 server.

Built on asyncio.Protocol + httptools, not a web framework: the sidecar stays
lean and the admin port shares the data plane's parser. The server talks to
the sidecar only through `AdminHooks`; every hook is synchronous and cheap.

Routes: GET /, /metrics, /ready, /live, /config, /clusters; POST /drain,
/quit (from loopback only: they stop the sidecar, and the admin port is often
bound beyond loopback for probes and scraping). HEAD is accepted wherever GET is.

Protocol rules (the things a client can count on):
- Keep-alive, HTTP/1.0 and 1.1; every response has Content-Length. An
  HTTP/1.1 request needs exactly one Host header (RFC 9112 section 3.2), else 400.
- Errors are the proxy's own (`http1.error_response`): an `x-lepton-reason`
  and an `x-request-id` header, and `{"error": <detail>, "reason": <code>,
  "request_id": <id>}`. 404 and 405 (with Allow) keep the connection; 400
  (unparseable), 413 (body over `max_body_bytes`), 431 (request line +
  headers over `max_header_bytes`) close it, since the rest of the byte
  stream can no longer be trusted.
- Pipelined requests are answered in order, as soon as each is complete.
  While the transport's write buffer is over its high-water mark, reading is
  paused and the requests already read wait in a queue of at most
  `max_pipeline`; past that the connection is answered 503 and closed. So a
  connection holds at most one read, the queued requests (not their answers:
  those are built when sent) and the transport's write buffer.
- The header block is bounded by counting the bytes fed while the head is
  incomplete (as h11 does), so a never-ending header line is refused too; a
  pipelined head that starts inside an earlier read is counted from its next
  read, so the bound is `max_header_bytes` plus one read.
- A connection idle for `idle_timeout` seconds is closed (a call_later
  handle re-armed on activity, no task per connection).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import typing
from collections import deque
from collections.abc import Callable
from http import HTTPStatus

import httptools
import orjson

from lepton_mesh.proxy.errors import ProxyError, Reason, bad_request, error_body
from lepton_mesh.proxy.flow import PEER_BACKPRESSURE, ReadGate
from lepton_mesh.proxy.http.http1 import error_response, new_request_id

_log = logging.getLogger(__name__)

# Reason codes of the admin server's own answers (the shared ones come from Reason).
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
HOOK_FAILED = "admin_hook_failed"
FORBIDDEN = "forbidden"

JSON = "application/json"


class AdminHooks(typing.Protocol):
    """What the admin server needs from the sidecar. All calls run on the loop."""

    def readiness(self) -> tuple[bool, str]: ...  # (ready, reason when not)
    def config_json(self) -> dict: ...
    def clusters_json(self) -> dict: ...
    def metrics_text(self) -> tuple[bytes, str]: ...
    def start_drain(self) -> None: ...
    def quit(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class AdminLimits:
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    max_pipeline: int = 16
    idle_timeout: float = 60.0


async def start_admin_server(
    hooks: AdminHooks, host: str, port: int, *, limits: AdminLimits | None = None
) -> asyncio.Server:
    """Listen on host:port (0 picks a free port; read it from server.sockets)."""
    loop = asyncio.get_running_loop()
    lim = limits or AdminLimits()
    return await loop.create_server(lambda: AdminProtocol(hooks, lim, loop), host, port)


# -- routes -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = JSON
    # Runs once the response is written (POST /quit: exit only after answering).
    after: Callable[[], None] | None = None
    # An error the server originates: rendered as the proxy renders its own
    # (`body` is then built when written, with a fresh request id).
    error: ProxyError | None = None


def _json(status: int, obj: object) -> _Response:
    return _Response(status, orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS))


def _error(status: int, reason: str, detail: str) -> _Response:
    return _failure(ProxyError(status, reason, detail))


def _failure(err: ProxyError) -> _Response:
    return _Response(err.status, b"", error=err)


def _index(hooks: AdminHooks) -> _Response:
    return _json(
        200,
        {
            "endpoints": {
                path: {"methods": sorted(route.methods), "help": route.help}
                for path, route in ROUTES.items()
            }
        },
    )


def _metrics(hooks: AdminHooks) -> _Response:
    body, content_type = hooks.metrics_text()
    return _Response(200, body, content_type)


def _ready(hooks: AdminHooks) -> _Response:
    ready, reason = hooks.readiness()
    if ready:
        return _json(200, {"ready": True})
    return _json(503, {"ready": False, "reason": reason})


def _live(hooks: AdminHooks) -> _Response:
    return _json(200, {"live": True})


def _config(hooks: AdminHooks) -> _Response:
    return _json(200, hooks.config_json())


def _clusters(hooks: AdminHooks) -> _Response:
    return _json(200, hooks.clusters_json())


def _drain(hooks: AdminHooks) -> _Response:
    hooks.start_drain()
    return _json(202, {"draining": True})


def _quit(hooks: AdminHooks) -> _Response:
    resp = _json(202, {"quitting": True})
    return _Response(resp.status, resp.body, resp.content_type, after=hooks.quit)


@dataclasses.dataclass(frozen=True, slots=True)
class _Route:
    methods: typing.Mapping[str, Callable[[AdminHooks], _Response]]
    help: str


ROUTES: dict[str, _Route] = {
    "/": _Route({"GET": _index}, "this list"),
    "/metrics": _Route({"GET": _metrics}, "Prometheus metrics"),
    "/ready": _Route({"GET": _ready}, "200 when ready to take traffic, else 503 with a reason"),
    "/live": _Route({"GET": _live}, "200 while the process runs"),
    "/config": _Route({"GET": _config}, "the running config snapshot"),
    "/clusters": _Route({"GET": _clusters}, "upstream services, endpoints and their state"),
    "/drain": _Route({"POST": _drain}, "stop taking new work; finish in-flight requests"),
    "/quit": _Route({"POST": _quit}, "drain, then exit 0"),
}


# Writes that stop the sidecar. The admin port is often bound beyond loopback
# (probes and Prometheus in a pod), so only a local caller may use them.
_LOCAL_ONLY = frozenset({"/drain", "/quit"})


def dispatch(hooks: AdminHooks, method: str, path: str, *, local: bool = True) -> _Response:
    """The response for one request, HEAD answered as GET (the body is dropped later).
    `local`: the caller connected from a loopback address."""
    route = ROUTES.get(path)
    if route is None:
        return _error(404, NOT_FOUND, f"no admin endpoint {path}")
    handler = route.methods.get("GET" if method == "HEAD" else method)
    if handler is None:
        return _error(405, METHOD_NOT_ALLOWED, f"{method} not allowed on {path}")
    if path in _LOCAL_ONLY and not local:
        return _error(403, FORBIDDEN, f"{method} {path} is accepted from loopback only")
    try:
        return handler(hooks)
    except Exception as exc:
        _log.exception("admin hook for %s %s failed", method, path)
        return _error(500, HOOK_FAILED, f"{type(exc).__name__}: {exc}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == ""  # a Unix socket or a transport without a peer: local


def _allow(path: str) -> str:
    methods = set(ROUTES[path].methods)
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


# -- the protocol ---------------------------------------------------------------

_STATUS_LINES = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus if s.value >= 200
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclasses.dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    keep_alive: bool
    http10: bool


class AdminProtocol(asyncio.Protocol):
    __slots__ = (
        "_body_bytes",
        "_content_length",
        "_expect_continue",
        "_fed_in_head",
        "_gate",
        "_head_bytes",
        "_hosts",
        "_head_open",
        "_hooks",
        "_idle",
        "_limits",
        "_local",
        "_loop",
        "_parser",
        "_pending",
        "_stopped",
        "_transport",
        "_url",
        "_write_paused",
    )

    def __init__(
        self, hooks: AdminHooks, limits: AdminLimits, loop: asyncio.AbstractEventLoop
    ) -> None:
        # Global state.
        self._hooks = hooks
        self._limits = limits
        self._loop = loop
        # Per-connection state.
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._gate = ReadGate()
        self._idle: asyncio.TimerHandle | None = None
        self._write_paused = False
        # Requests (or the one fatal error) not answered yet, in arrival order.
        self._pending: deque[_Request | ProxyError] = deque()
        # Set once the connection is doomed: no more parsing.
        self._stopped = False
        # Header-size accounting: bytes fed while a head is incomplete, and the
        # exact size of the current request line + headers.
        self._head_open = True
        self._fed_in_head = 0
        self._head_bytes = 0
        # Per-request state.
        self._url = b""
        self._local = True
        self._content_length = 0
        self._expect_continue = False
        self._body_bytes = 0
        self._hosts = 0

    # -- transport callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._local = _is_loopback(peer[0] if peer else "")
        self._gate.attach(transport)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._pending.clear()
        self._stopped = True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._gate.pause(PEER_BACKPRESSURE)

    def resume_writing(self) -> None:
        self._write_paused = False
        # Answer what waited first: reading resumes only if that did not fill
        # the write buffer again, so `_pending` is non-empty only while paused.
        self._serve_pending()
        if not self._write_paused:
            self._gate.resume(PEER_BACKPRESSURE)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        self._arm_idle()
        if self._head_open:
            self._fed_in_head += len(data)
        try:
            self._parser.feed_data(data)
            if self._head_open and self._fed_in_head > self._limits.max_header_bytes:
                raise _headers_too_large()
        except ProxyError as err:
            self._stop(err)
        except httptools.HttpParserCallbackError as exc:
            err = exc.__context__
            if not isinstance(err, ProxyError):
                _log.error("admin request handling failed", exc_info=err)
                err = ProxyError(500, HOOK_FAILED, "internal error", close=True)
            self._stop(err)
        except httptools.HttpParserUpgrade:
            # The request is answered as a plain one; what follows it is another
            # protocol, which we do not speak, so the connection ends there.
            self._stopped = True
            last = self._pending[-1] if self._pending else None
            if isinstance(last, _Request):
                self._pending[-1] = dataclasses.replace(last, keep_alive=False)
        except httptools.HttpParserError as exc:
            self._stop(bad_request(str(exc) or type(exc).__name__))
        self._serve_pending()

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._head_bytes = 0
        self._content_length = 0
        self._expect_continue = False
        self._body_bytes = 0
        self._hosts = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        lname = name.lower()
        if lname == b"content-length":
            try:
                self._content_length = int(value)
            except ValueError:
                raise bad_request("invalid content-length") from None
        elif lname == b"expect":
            self._expect_continue = value.lower() == b"100-continue"
        elif lname == b"host":
            self._hosts += 1

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._fed_in_head = 0
        if self._hosts > 1:
            raise bad_request("more than one Host header")
        if not self._hosts and self._parser.get_http_version() != "1.0":
            raise bad_request("missing Host header")
        if self._content_length > self._limits.max_body_bytes:
            raise _body_too_large(self._limits.max_body_bytes)
        # Only when nothing is queued: a 100 must not overtake an earlier answer.
        if self._expect_continue and not self._pending and self._transport is not None:
            self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _body_too_large(self._limits.max_body_bytes)

    def on_message_complete(self) -> None:
        self._head_open = True
        if len(self._pending) >= self._limits.max_pipeline:
            raise ProxyError(503, Reason.OVERFLOW, "too many pipelined requests", close=True)
        parser = self._parser
        self._pending.append(
            _Request(
                method=parser.get_method().decode("ascii", "replace"),
                path=self._url.partition(b"?")[0].decode("utf-8", "replace"),
                keep_alive=parser.should_keep_alive(),
                http10=parser.get_http_version() == "1.0",
            )
        )

    # -- answering ----------------------------------------------------------------

    def _serve_pending(self) -> None:
        """Answer queued requests in order while the transport takes writes."""
        pending = self._pending
        while pending and not self._write_paused:
            item = pending.popleft()
            if isinstance(item, ProxyError):
                self._write(_failure(item), keep_alive=False)
                self._close()
                return
            resp = dispatch(self._hooks, item.method, item.path, local=self._local)
            self._write(
                resp,
                keep_alive=item.keep_alive,
                head=item.method == "HEAD",
                http10=item.http10,
                allow=_allow(item.path) if resp.status == 405 else None,
            )
            if resp.after is not None:
                try:
                    resp.after()
                except Exception:
                    _log.exception("admin hook after %s %s failed", item.method, item.path)
            if not item.keep_alive:
                self._close()
                return

    def _write(
        self,
        resp: _Response,
        *,
        keep_alive: bool,
        head: bool = False,
        http10: bool = False,
        allow: str | None = None,
    ) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        err = resp.error
        if err is not None:
            rid = new_request_id()
            body = error_body(err, rid.decode("latin-1"))
            extra = f"allow: {allow}\r\n".encode() if allow is not None else b""
            transport.write(
                error_response(
                    err, rid, body, keep_alive=keep_alive, head_request=head, extra=extra
                )
            )
            return
        parts = [
            _STATUS_LINES[resp.status],
            f"content-type: {resp.content_type}\r\ncontent-length: {len(resp.body)}\r\n".encode(),
        ]
        if allow is not None:
            parts.append(f"allow: {allow}\r\n".encode())
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        elif http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if not head:
            parts.append(resp.body)
        transport.write(b"".join(parts))

    def _stop(self, err: ProxyError) -> None:
        """Parsing is over for this connection: answer `err` after what is queued."""
        self._stopped = True
        self._pending.append(err)

    def _close(self) -> None:
        self._stopped = True
        self._pending.clear()
        if self._transport is not None:
            self._transport.close()  # flushes what is buffered first

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self._limits.max_header_bytes:
            raise _headers_too_large()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(self._limits.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        self._idle = None
        if self._transport is not None:
            self._transport.close()


def _headers_too_large() -> ProxyError:
    return ProxyError(431, Reason.HEADERS_TOO_LARGE, "request headers too large", close=True)


def _body_too_large(limit: int) -> ProxyError:
    return ProxyError(413, Reason.BODY_TOO_LARGE, f"request body over {limit} bytes", close=True)
