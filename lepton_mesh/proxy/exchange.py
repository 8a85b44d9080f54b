"""One proxied request/response: the link between a client connection and an upstream one.

An `Exchange` is created when a request head has been parsed and lives
until its response is fully written (or it fails). It owns the routing
decision, the upstream connection while bound, the request timeout, and the
record that becomes a metric sample and an access-log line.

Flow, all in callbacks (no task per request; a task only while opening a new
upstream connection):
  start -> route -> pick endpoint -> pooled connection | open one
  request body  -> written through (or held, bounded, while connecting)
  response head -> re-framed for the client -> body streamed chunk by chunk
  complete      -> connection back to its pool -> metrics, log -> client
                   connection moves to its next request

Invariants:
- Until the first response byte is written to the client, any failure is
  answered with a sidecar-originated error response naming its reason;
  after it, the client connection is cut (that is the only honest signal).
- An upstream connection is returned to its pool only when both the request
  and the response were complete and the upstream allows keep-alive.
- `done` is set exactly once, in `_finish`; every callback checks it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from lepton_mesh.proxy.errors import ProxyError, Reason, error_body
from lepton_mesh.proxy.flow import BUFFERED, PEER_BACKPRESSURE
from lepton_mesh.proxy.http1 import (
    IDEMPOTENT,
    Headers,
    RequestFacts,
    ResponseFraming,
    chunk_frame,
    error_response,
    last_chunk,
    prepare_response_head,
)
from lepton_mesh.proxy.tunnel import splice

if TYPE_CHECKING:
    from lepton_mesh.proxy.downstream import DownstreamProtocol
    from lepton_mesh.proxy.pool import EndpointPool
    from lepton_mesh.proxy.snapshot import Destination, Snapshot
    from lepton_mesh.proxy.upstream import UpstreamConnection

# Request body bytes held while the upstream connection is being opened;
# past this, reading from the client pauses until the connection is there.
HOLD_LIMIT = 64 * 1024


class Exchange:
    __slots__ = (
        "_connecting",
        "_reused",
        "_timer",
        "attempts",
        "conn",
        "dest",
        "done",
        "down",
        "down_keep_alive",
        "early_tunnel",
        "facts",
        "framing",
        "head",
        "head_request",
        "method",
        "path",
        "pending",
        "pending_bytes",
        "pool",
        "reason",
        "req_bytes",
        "req_done",
        "resp_bytes",
        "resp_started",
        "snap",
        "start",
        "status",
        "upstream_start",
        "version",
    )

    def __init__(
        self,
        down: DownstreamProtocol,
        snap: Snapshot,
        method: bytes,
        path: bytes,
        head: bytes,
        facts: RequestFacts,
        version: str,
        keep_alive: bool,
    ) -> None:
        self.down = down
        self.snap = snap
        self.method = method
        self.path = path
        self.head = head
        self.facts = facts
        self.version = version
        self.head_request = method == b"HEAD"
        self.down_keep_alive = keep_alive
        self.start = down.loop.time()
        self.done = False
        self.dest: Destination | None = None
        self.pool: EndpointPool | None = None
        self.conn: UpstreamConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reused = False
        self._timer: asyncio.TimerHandle | None = None
        self.attempts = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.req_bytes = 0
        self.req_done = False
        self.early_tunnel = b""
        self.status = 0
        self.reason = "-"
        self.framing: ResponseFraming | None = None
        self.resp_started = False
        self.resp_bytes = 0
        self.upstream_start = 0.0

    # -- start ---------------------------------------------------------------

    def begin(self) -> None:
        timeout = self.snap.cfg.timeouts.request
        if timeout > 0:
            self._timer = self.down.loop.call_later(timeout, self._on_timeout)
        try:
            self.dest = self.down.listener.route(self.snap, self.facts)
            self._acquire()
        except ProxyError as err:
            self.respond_error(err)

    def _acquire(self, fresh: bool = False) -> None:
        dest = self.dest
        assert dest is not None
        address = dest.pick()
        pool = self.down.listener.pools.get(address, dest.name)
        self.pool = pool
        conn = None if fresh else pool.take_idle()
        if conn is not None:
            self._reused = True
            self._attach(conn)
        else:
            self._reused = False
            self._connecting = self.down.loop.create_task(self._open(pool))

    async def _open(self, pool: EndpointPool) -> None:
        try:
            conn = await pool.open(self.snap.cfg.timeouts.connect)
        except ProxyError as err:
            self._connecting = None
            if not self.done:
                self.respond_error(err)
            return
        self._connecting = None
        if self.done:
            pool.release(conn)  # fresh and unused: keep it for the next request
        else:
            self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.attempts += 1
        self.upstream_start = self.down.loop.time()
        conn.bind(self, self.head_request, self.down.write_paused)
        self.pending.insert(0, self.head)
        if not self.down.feeding:
            self.flush_upstream()

    def flush_upstream(self) -> None:
        """Write what is held for the upstream in one call (head and body of one read go
        out in one syscall; the downstream protocol calls this after each read)."""
        conn = self.conn
        if conn is None or not self.pending:
            return
        conn.transport.writelines(self.pending)  # type: ignore[union-attr]
        self.pending = []
        if self.pending_bytes > HOLD_LIMIT:
            self.down.gate.resume(BUFFERED)
        self.pending_bytes = 0

    # -- request body (from the downstream protocol) --------------------------

    def request_body(self, data: bytes) -> None:
        self.req_bytes += len(data)
        limit = self.snap.cfg.limits.max_body_bytes
        if limit and self.req_bytes > limit:
            if not self.done:
                self.fail(
                    ProxyError(
                        413,
                        Reason.BODY_TOO_LARGE,
                        f"request body exceeds {limit} bytes",
                        close=True,
                    )
                )
            return
        if self.done:
            return
        frames = chunk_frame(data) if self.facts.chunked else (data,)
        conn = self.conn
        if conn is not None and not self.pending and not self.down.feeding:
            conn.transport.writelines(frames)  # type: ignore[union-attr]
            return
        self.pending.extend(frames)
        self.pending_bytes += len(data)
        if conn is None and self.pending_bytes > HOLD_LIMIT:
            self.down.gate.pause(BUFFERED)

    def request_complete(self, trailers: Headers | None) -> None:
        self.req_done = True
        if self.done or not self.facts.chunked:
            return
        self.pending.append(last_chunk(trailers))
        if not self.down.feeding:
            self.flush_upstream()

    def set_early_tunnel_bytes(self, data: bytes) -> None:
        """Bytes the client sent after an upgrade request's head, before the upstream agreed."""
        self.early_tunnel += data

    # -- response (from the upstream connection) -----------------------------

    def on_response_head(self, status: int, headers: Headers, keep_alive: bool) -> None:
        if self.done:
            return
        down = self.down
        if status < 200 and status != 101:
            if self.version == "1.1":  # interim responses mean nothing to HTTP/1.0 clients
                head, _ = prepare_response_head(
                    status, headers, client_version="1.1", head_request=False, keep_alive=True
                )
                down.send(head)
            return
        upgrade = status == 101
        if upgrade and not self.facts.upgrade:
            self.on_upstream_error(
                ProxyError(
                    502,
                    Reason.UPSTREAM_PROTOCOL_ERROR,
                    "101 response to a request that did not ask to upgrade",
                )
            )
            return
        keep = self.down_keep_alive and self.req_done and not down.listener.draining
        head, framing = prepare_response_head(
            status,
            headers,
            client_version=self.version,
            head_request=self.head_request,
            keep_alive=keep,
            upgrade=upgrade,
        )
        self.framing = framing
        self.down_keep_alive = keep and not framing.close_delimited
        self.status = status
        self.resp_started = True
        down.send(head)

    def on_response_body(self, data: bytes) -> None:
        if self.done:
            return
        self.resp_bytes += len(data)
        if self.framing is not None and self.framing.chunked:
            self.down.send_many(chunk_frame(data))
        else:
            self.down.send(data)

    def on_response_complete(self, trailers: Headers | None, reusable: bool) -> None:
        if self.done:
            return
        if self.framing is not None and self.framing.chunked:
            self.down.send(last_chunk(trailers))
        conn = self.conn
        self.conn = None
        if conn is not None:
            if reusable and self.req_done:
                self.pool.release(conn)  # type: ignore[union-attr]
            else:
                conn.close()
        if not self.req_done:
            self.down_keep_alive = False  # the rest of the request body has nowhere to go
        self._finish()

    def on_upstream_error(self, err: ProxyError) -> None:
        if self.done:
            return
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.abort()
        if not self.resp_started:
            if self._may_resend(conn, err):
                try:
                    self._acquire(fresh=True)
                except ProxyError as again:
                    self.respond_error(again)
                return
            self.respond_error(err)
            return
        # Mid-response: no status can be sent any more; cutting the client
        # connection is the only way it learns the body is incomplete.
        self.reason = err.reason
        self._finish(abort=True)

    def _may_resend(self, conn: UpstreamConnection | None, err: ProxyError) -> bool:
        """A reused keep-alive connection that the upstream had already closed.

        The request never reached the app if the connection died before any
        response byte; it is sent once more on a fresh connection when it is
        idempotent and has no body (nothing to replay).
        """
        return (
            conn is not None
            and self._reused
            and not conn.responded
            and err.reason == Reason.UPSTREAM_RESET
            and self.attempts == 1
            and self.req_done
            and self.req_bytes == 0
            and self.method in IDEMPOTENT
        )

    def on_upgraded(self, rest: bytes) -> None:
        """The upstream agreed (101): from now on both connections carry raw bytes."""
        conn = self.conn
        self.conn = None
        if self.done or conn is None:
            if conn is not None:
                conn.abort()
            return
        self.pool.detach(conn)  # type: ignore[union-attr]
        down = self.down
        listener = down.listener
        listener.tunnels += 1

        def closed(up: int, down_bytes: int) -> None:
            listener.tunnels -= 1
            if listener.draining and not listener.busy():
                listener.sidecar.check_drained()

        down_transport = down.transport
        down_eof = down.eof
        down.detach_for_tunnel()
        conn.gate.resume(PEER_BACKPRESSURE)
        self._finish(tunneled=True)
        splice(
            down_transport,
            conn.transport,
            a_to_b=self.early_tunnel,
            b_to_a=rest,
            a_eof=down_eof,
            on_closed=closed,
        )  # type: ignore[arg-type]

    # -- flow control between the two sides ------------------------------------

    def pause_downstream(self) -> None:
        self.down.gate.pause(PEER_BACKPRESSURE)

    def resume_downstream(self) -> None:
        self.down.gate.resume(PEER_BACKPRESSURE)

    # -- failures ------------------------------------------------------------

    def fail(self, err: ProxyError) -> None:
        """A failure found on our side of the exchange (limits, timeouts)."""
        if self.done:
            return
        if self.resp_started:
            self.reason = err.reason
            if self.conn is not None:
                self.conn.abort()
                self.conn = None
            self._finish(abort=True)
        else:
            self.respond_error(err)

    def respond_error(self, err: ProxyError) -> None:
        if self.done:
            return
        self.reason = err.reason
        self.status = err.status
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self.conn is not None:
            self.conn.abort()
            self.conn = None
        # The connection survives the error if the request is (or will be, with
        # no body to skip) complete: a 404 must not cost a keep-alive connection.
        facts = self.facts
        complete = self.req_done or (not facts.chunked and facts.content_length <= 0)
        keep = (
            not err.close and complete and self.down_keep_alive and not self.down.listener.draining
        )
        self.down_keep_alive = keep
        rid = self.facts.request_id
        body = error_body(err, rid.decode("latin-1"))
        self.resp_bytes = len(body)
        self.down.send(
            error_response(err, rid, body, keep_alive=keep, head_request=self.head_request)
        )
        self._finish()

    def _on_timeout(self) -> None:
        self._timer = None
        timeout = self.snap.cfg.timeouts.request
        self.fail(
            ProxyError(
                504,
                Reason.UPSTREAM_TIMEOUT,
                f"no complete response within {timeout:g}s",
                close=True,
            )
        )

    def downstream_lost(self) -> None:
        """The client went away before the exchange finished."""
        if self.done:
            return
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self.conn is not None:
            self.conn.abort()
            self.conn = None
        if not self.resp_started:
            self.status = 499  # as nginx: the client closed the request
        self.reason = Reason.DOWNSTREAM_RESET
        self._finish(abort=True, notify=False)

    # -- end -----------------------------------------------------------------

    def _finish(self, *, abort: bool = False, tunneled: bool = False, notify: bool = True) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.down.listener.record(self)
        if notify and not tunneled:
            self.down.exchange_done(self, abort=abort)

    def upstream_address(self) -> str:
        return str(self.pool.address) if self.pool is not None else "-"

    def log_record(self, now: float) -> dict[str, object]:
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "reporter": self.down.listener.reporter,
            "method": self.method.decode("latin-1"),
            "authority": self.facts.authority.decode("latin-1"),
            "path": self.path.decode("latin-1"),
            "protocol": "HTTP/" + self.version,
            "status": self.status,
            "reason": self.reason,
            "duration_ms": round((now - self.start) * 1000, 3),
            "upstream_ms": round((now - self.upstream_start) * 1000, 3)
            if self.upstream_start
            else None,
            "request_bytes": self.req_bytes,
            "response_bytes": self.resp_bytes,
            "upstream": self.upstream_address(),
            "request_id": self.facts.request_id.decode("latin-1"),
            "traceparent": self.facts.traceparent.decode("latin-1"),
            "attempts": self.attempts,
            "downstream": self.down.client_ip_str,
        }
