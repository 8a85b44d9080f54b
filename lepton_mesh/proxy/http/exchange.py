"""One proxied request/response: the link between a client connection and upstream tries.

An `Exchange` is created when a request head has been parsed and lives
until its response is fully written (or it fails). It walks the outbound
layers in order (linkerd2-proxy's shape):

  logical   the service the request names and the route rule it matches
            (routing.ServiceTarget), with the rule's faults and mirror
  concrete  the backend (service or subset) the rule's weights pick
            (clusters.Cluster), guarded by the service's circuit breaker
  endpoint  the address the balancer picks for this try, and a pooled
            connection to it

Inbound, for a service with security policies, `snap.guard`
(inbound_policy.py) first decides whether the request may reach the app.

Then it streams: request body written through (held, bounded, while a
connection opens), response head re-framed for the client, body chunk by
chunk. All in callbacks: a task exists only while a connection is opened.

Retries: a try that fails before any response byte reaches the client
(connect failure, reset, per-try timeout, or a retriable status) may be
repeated on another endpoint when the rule's retry policy allows it for the
method, attempts remain, the body is replayable (held up to 64 KiB, as
Linkerd), the breaker's retry limit and the service's retry budget agree.
Then the failed try's connection is dropped and, after a jittered backoff,
a new try sends the head and the held body again.

Invariants:
- Until the first response byte is written to the client, any failure is
  answered with a sidecar-originated error response naming its reason;
  after it, the client connection is cut (the only honest signal left).
- An upstream connection returns to its pool only when both the request
  and the response were complete and the upstream allows keep-alive.
- Every breaker slot taken is released exactly once: in `_finish`, when
  its try ends, or (a pending slot) when its connect task ends, cancelled
  or not; `done` is set exactly once, in `_finish`.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from random import random
from typing import TYPE_CHECKING

from lepton_mesh.policy.decisions import (
    Outcome,
    backoff_delay,
    choose_backend,
    fault_decision,
    mirror_decision,
    retry_allowed,
)
from lepton_mesh.proxy.errors import ProxyError, Reason, UpstreamError, error_body
from lepton_mesh.proxy.flow import BUFFERED, PEER_BACKPRESSURE
from lepton_mesh.proxy.http.http1 import (
    IDEMPOTENT,
    Headers,
    RequestFacts,
    ResponseFraming,
    chunk_frame,
    error_response,
    last_chunk,
    prepare_response_head,
    render_request_head,
)
from lepton_mesh.proxy.http.mirror import start_mirror
from lepton_mesh.proxy.l4.tunnel import splice
from lepton_mesh.proxy.outbound.routing import (
    OUTBOUND_RESPONSE_HEADERS,
    FactsView,
    hash_key,
    header_value,
)

if TYPE_CHECKING:
    from lepton_mesh.proxy.contracts import ClientSide
    from lepton_mesh.proxy.http.upstream import UpstreamConnection
    from lepton_mesh.proxy.outbound.clusters import Cluster
    from lepton_mesh.proxy.outbound.endpoints import EndpointState
    from lepton_mesh.proxy.outbound.pool import EndpointPool
    from lepton_mesh.proxy.outbound.routing import RuleRuntime, ServiceTarget
    from lepton_mesh.proxy.security.inbound_policy import SecurityOutcome
    from lepton_mesh.proxy.snapshot import Snapshot

# Request body bytes held while the upstream connection is being opened;
# past this, reading from the client pauses until the connection is there.
HOLD_LIMIT = 64 * 1024
# Request body bytes kept for replay on a retry (Linkerd's default); a
# larger body is streamed and its request is not retried.
REPLAY_LIMIT = 64 * 1024

# Outcomes as the outlier detector counts them.
_GATEWAY = frozenset({502, 503, 504})


class Exchange:
    __slots__ = (
        # wiring
        "down",
        "snap",
        # the request
        "facts",
        "head",
        "head_request",
        "pending",
        "pending_bytes",
        "replay",
        "replay_bytes",
        "req_bytes",
        "req_done",
        "version",
        "early_tunnel",
        "sec",
        # routing (logical, concrete)
        "target",
        "rt",
        "cluster",
        "hash_key",
        # the current try (endpoint)
        "attempts",
        "conn",
        "ep",
        "ep_started",
        "pool",
        "_connecting",
        "_reused",
        "_try_timer",
        "_wait_timer",
        # breaker slots held
        "_holds_request",
        "_holds_retry",
        # the response
        "status",
        "reason",
        "framing",
        "resp_started",
        "resp_bytes",
        "down_keep_alive",
        "_budget_exhausted",
        # timing
        "start",
        "start_wall",
        "upstream_start",
        "done",
    )

    def __init__(
        self,
        down: ClientSide,
        snap: Snapshot,
        facts: RequestFacts,
        version: str,
        keep_alive: bool,
    ) -> None:
        self.down = down
        self.snap = snap
        self.facts = facts
        self.version = version
        self.head = b""
        self.head_request = facts.method == b"HEAD"
        self.down_keep_alive = keep_alive
        self.start = time.perf_counter()
        self.start_wall = time.time()
        self.done = False
        self.target: ServiceTarget | None = None
        self.rt: RuleRuntime | None = None
        self.cluster: Cluster | None = None
        self.hash_key: bytes | None = None
        self.pool: EndpointPool | None = None
        self.conn: UpstreamConnection | None = None
        self.ep: EndpointState | None = None
        self.ep_started: float | None = None  # when the current try began; None = no try running
        self._connecting: asyncio.Task[None] | None = None
        self._reused = False
        self._try_timer: asyncio.TimerHandle | None = None
        self._wait_timer: asyncio.TimerHandle | None = None
        self._holds_request = False
        self._holds_retry = False
        self._budget_exhausted = False
        self.attempts = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.replay: list[bytes] | None = []
        self.replay_bytes = 0
        self.req_bytes = 0
        self.req_done = False
        self.early_tunnel = b""
        self.status = 0
        self.reason = "-"
        self.framing: ResponseFraming | None = None
        self.resp_started = False
        self.resp_bytes = 0
        self.upstream_start = 0.0
        # What the inbound security policy found (inbound_policy.py); None elsewhere.
        self.sec: SecurityOutcome | None = None

    # -- logical: service and rule ---------------------------------------------

    def begin(self) -> None:
        try:
            self._route()
        except ProxyError as err:
            self.respond_error(err)
        except Exception as exc:  # a bug of ours: never leak it into the caller's callbacks
            traceback.print_exception(exc, file=sys.stderr)
            self.respond_error(
                ProxyError(
                    500, Reason.INTERNAL, f"internal error: {type(exc).__name__}", close=True
                )
            )

    def _route(self) -> None:
        snap = self.snap
        target = self.target = self.down.listener.route(snap, self.facts)
        guard = snap.guard
        if guard is not None and target is snap.local:
            # Inbound with security policies: the guard calls `admitted` (now,
            # or once the JWKS it waits for is in) or answers the request itself.
            guard.admit(self)
            return
        self._forward(self.down.listener.peer_header, None)

    def admitted(self, extra: bytes, remove: frozenset[bytes]) -> None:
        """The inbound policy let the request through: `extra` are the claim
        header lines to add, `remove` the received headers to drop."""
        try:
            self._forward(extra, remove)
        except ProxyError as err:
            self.respond_error(err)

    def _forward(self, extra: bytes, remove: frozenset[bytes] | None) -> None:
        down = self.down
        facts = self.facts
        rt = self.rt = self.target.select(facts)  # type: ignore[union-attr]
        if rt.timeout > 0:
            # The client connection's own deadline times the exchange: moving it
            # costs a float store, where a loop timer per request costs a
            # create and a cancel. It calls `on_timeout` when it passes.
            down.arm_deadline(rt.timeout)
        self.head = render_request_head(
            facts,
            set_headers=rt.req_set,
            add_headers=rt.req_add,
            remove=_request_remove(rt.req_remove, remove),
            extra=extra,
        )
        if rt.fault is not None:
            delay, abort = fault_decision(rt.fault, random(), random(), FactsView(facts).header)
            if delay > 0:
                self._wait_timer = down.loop.call_later(delay, self._after_delay, abort)
                return
            if abort:
                raise _fault(abort, rt.name)
        self._choose_backend()

    def _after_delay(self, abort: int) -> None:
        self._wait_timer = None
        if self.done:
            return
        try:
            if abort:
                raise _fault(abort, self.rt.name)  # type: ignore[union-attr]
            self._choose_backend()
        except ProxyError as err:
            self.respond_error(err)

    # -- concrete: backend, breaker --------------------------------------------

    def _choose_backend(self) -> None:
        rt = self.rt
        assert rt is not None
        # Mirrored only when the request goes on to a backend: as Envoy's fault
        # filter runs before its router, an aborted request is not copied.
        if rt.mirror is not None and mirror_decision(rt.mirror, random()):
            self._mirror_when_complete()
        backends = rt.backends
        backend = backends[0] if len(backends) == 1 else choose_backend(backends, random())
        cluster = self.cluster = self.down.listener.cluster_for(self.snap, backend)
        state = cluster.state
        if not state.breaker.try_acquire_request():
            raise ProxyError(
                503, Reason.OVERFLOW, f"circuit breaker: max_requests to {cluster.label} reached"
            )
        self._holds_request = True
        state.budget.record_request()
        if cluster.hash_on is not None:
            self.hash_key = hash_key(cluster.hash_on, self.facts, self.down.client_ip)
        self._try()

    # -- endpoint: one try -------------------------------------------------------

    def _try(self) -> None:
        cluster = self.cluster
        assert cluster is not None
        avoid = self.ep
        ep = cluster.balancer.pick(self.hash_key, avoid)
        if ep is None:
            n = len(cluster.endpoints)
            detail = (
                f"none of the {n} endpoints of {cluster.label} is available (unhealthy or"
                " ejected) and its panic_threshold is 0"
                if n
                else f"{cluster.label} has no endpoint"
            )
            raise ProxyError(503, Reason.NO_HEALTHY_ENDPOINT, detail)
        self.ep = ep
        self.attempts += 1
        self.ep_started = ep.begin()
        pool = self.pool = self.down.listener.pools.get(ep.address, cluster.service)
        per_try = self.rt.retry.per_try_timeout  # type: ignore[union-attr]
        if per_try > 0:
            self._try_timer = self.down.loop.call_later(per_try, self._on_try_timeout)
        conn = pool.take_idle()
        if conn is not None:
            self._reused = True
            self._attach(conn)
            return
        self._connect(pool)

    def _connect(self, pool: EndpointPool) -> None:
        """Open a new connection for the current try (a task holding a pending slot)."""
        self._reused = False
        cluster = self.cluster
        assert cluster is not None
        breaker = cluster.state.breaker
        if not breaker.try_acquire_pending():
            raise ProxyError(
                503, Reason.OVERFLOW, f"circuit breaker: max_pending to {cluster.label} reached"
            )
        # The pending slot is the connect task's: released when the task ends,
        # however it ends (a done callback runs even for a task cancelled
        # before its first step, which no `finally` in `_open` would see).
        task = self._connecting = self.down.loop.create_task(self._open(pool))
        task.add_done_callback(lambda _task: breaker.release_pending())

    async def _open(self, pool: EndpointPool) -> None:
        breaker = self.cluster.state.breaker  # type: ignore[union-attr]
        try:
            conn = await pool.open(self.snap.cfg.timeouts.connect, breaker)
        except ProxyError as err:
            self._connecting = None
            if not self.done:
                self.on_upstream_error(err)
            return
        self._connecting = None
        if self.done:
            pool.release(conn)  # fresh and unused: keep it for the next request
        else:
            self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.upstream_start = time.perf_counter()
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
        replay = self.replay
        if replay is not None:
            self.replay_bytes += len(data)
            if self.replay_bytes > REPLAY_LIMIT and (
                self.ep_started is not None or not self.attempts
            ):
                self.replay = None  # too large to hold: this request will not be retried
            else:
                # Past the limit only while a retry waits for its backoff: that
                # retry was granted and will replay everything (dropping the copy
                # now would send it without the body's start). No try takes the
                # bytes meanwhile, so the HOLD_LIMIT gate below bounds them.
                replay.extend(frames)
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
        tail = last_chunk(trailers)
        if self.replay is not None:
            self.replay.append(tail)
        self.pending.append(tail)
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
                if status == 100:
                    down.continue_relayed(self)
            return
        if (
            status >= 500 or status in self.rt.retry.retriable_status_codes  # type: ignore[union-attr]
        ) and self._retry(Outcome("status", status), "gateway" if status in _GATEWAY else "5xx"):
            return
        upgrade = status == 101
        if upgrade and not self.facts.upgrade:
            self.on_upstream_error(
                UpstreamError(
                    502,
                    Reason.UPSTREAM_PROTOCOL_ERROR,
                    "101 to a request that did not ask to upgrade",
                    "reset",
                )
            )
            return
        self._cancel_try_timer()
        keep = self.down_keep_alive and self.req_done and not down.listener.draining
        rt = self.rt
        # Tries are the calling side's business: only the outbound listener says
        # how many it made (and its own count replaces any from further hops).
        outbound = down.listener.reporter == "source"
        extra = b"x-lepton-attempts: %d\r\n" % self.attempts if outbound else b""
        if rt is not None and rt.resp_extra:
            extra += rt.resp_extra
        if self._budget_exhausted:
            self.reason = Reason.RETRY_BUDGET_EXHAUSTED
            extra += b"x-lepton-reason: retry_budget_exhausted\r\n"
        head, framing = prepare_response_head(
            status,
            headers,
            client_version=self.version,
            head_request=self.head_request,
            keep_alive=keep,
            upgrade=upgrade,
            extra=extra,
            remove=_response_remove(rt, outbound),
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
        status = self.status
        self._end_try(
            status < 500,
            "success" if status < 500 else ("gateway" if status in _GATEWAY else "5xx"),
        )
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
                self._resend()
                return
            upstream = isinstance(err, UpstreamError)
            if upstream and self._retry(Outcome(err.kind), "gateway"):  # type: ignore[attr-defined]
                return
            # Only the endpoint's own failures count against it: a full pool or
            # the breaker's max_connections is our limit, and ejecting a healthy
            # endpoint for it (as a gateway error) would shrink capacity further.
            self._end_try(False, "gateway" if upstream else None)
            if self._budget_exhausted:
                err = ProxyError(
                    err.status,
                    Reason.RETRY_BUDGET_EXHAUSTED,
                    f"{err.detail}; retry budget exhausted",
                )
            self.respond_error(err)
            return
        # Mid-response: no status can be sent any more; cutting the client
        # connection is the only way it learns the body is incomplete.
        self._end_try(False, "gateway")
        self.reason = err.reason
        self._finish(abort=True)

    def _may_resend(self, conn: UpstreamConnection | None, err: ProxyError) -> bool:
        """A reused keep-alive connection that the upstream had already closed.

        The request never reached the app if the connection died before any
        response byte; it is sent once more on a fresh connection when it is
        idempotent and has no body, whatever the retry policy says (`_resend`).
        Only a reused connection qualifies and the resend's is new, so a try
        resends at most once: a second failure is the try's own.
        """
        return (
            conn is not None
            and self._reused
            and not conn.responded
            and err.reason == Reason.UPSTREAM_RESET
            and self.req_done
            and self.req_bytes == 0
            and self.facts.method in IDEMPOTENT
        )

    def _resend(self) -> None:
        """The same try again on a fresh connection to the same endpoint (as Envoy's
        reuse of a stale pooled connection): not a try, so no attempt is counted,
        no retry slot or budget token is taken, and the endpoint, which did nothing
        wrong, keeps its try running (latency, in-flight count, per-try timer)."""
        self._hold_replay()  # no body, but a chunked request's last chunk is in it
        try:
            self._connect(self.pool)  # type: ignore[arg-type]
        except ProxyError as err:
            self.respond_error(err)

    # -- retries -----------------------------------------------------------------

    def _retry(self, outcome: Outcome, outlier_outcome: str) -> bool:
        """Schedule another try if everything allows it; False = answer with this one."""
        rt = self.rt
        if rt is None or self.cluster is None:
            return False
        policy = rt.retry
        if self.attempts >= policy.attempts or self.replay is None:
            return False
        if not retry_allowed(policy, self.facts.method.decode("latin-1"), outcome):
            return False
        state = self.cluster.state
        if self._holds_retry:
            state.breaker.release_retry()
            self._holds_retry = False
        if not state.breaker.try_acquire_retry():
            return False
        if not state.budget.try_retry():
            state.breaker.release_retry()
            self._budget_exhausted = True
            return False
        self._holds_retry = True
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.abort()  # the failed try's response is not wanted
        self._end_try(False, outlier_outcome)
        delay = backoff_delay(self.attempts, policy.backoff, random())
        self._wait_timer = self.down.loop.call_later(delay, self._again)
        return True

    def _again(self) -> None:
        """Start the next try: the held body is replayed after the head."""
        self._wait_timer = None
        if self.done:
            return
        self._hold_replay()
        try:
            self._try()
        except ProxyError as err:
            self.respond_error(err)

    def _hold_replay(self) -> None:
        """Hold the replay copy for the next connection (the head goes before it).

        What is held is then the whole replay: if holding it paused the client
        (BUFFERED), the flush after connecting must resume it."""
        self.pending = list(self.replay or ())
        self.pending_bytes = self.replay_bytes

    def _end_try(self, ok: bool, outlier_outcome: str | None) -> None:
        self._cancel_try_timer()
        ep = self.ep
        started = self.ep_started
        if ep is None or started is None:
            return
        ep.end(started, ok)
        self.ep_started = None
        if outlier_outcome is not None and self.cluster is not None:
            self.cluster.state.outlier.report(ep, outlier_outcome)  # type: ignore[arg-type]

    def _cancel_try_timer(self) -> None:
        if self._try_timer is not None:
            self._try_timer.cancel()
            self._try_timer = None

    def _on_try_timeout(self) -> None:
        self._try_timer = None
        if self.done or self.resp_started:
            return
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        per_try = self.rt.retry.per_try_timeout  # type: ignore[union-attr]
        self.on_upstream_error(
            UpstreamError(
                504,
                Reason.UPSTREAM_TIMEOUT,
                f"no response within the per-try timeout {per_try:g}s",
                "timeout",
            )
        )

    # -- mirroring ---------------------------------------------------------------

    def _mirror_when_complete(self) -> None:
        """Mirror once the request is whole (its body held for replay); never waits on it."""
        if self.req_done:
            self._mirror()
        else:
            self.down.loop.call_soon(self._mirror_later)

    def _mirror_later(self) -> None:
        if self.req_done or self.done:
            self._mirror()
        elif self.replay is not None:
            self.down.loop.call_later(0.01, self._mirror_later)

    def _mirror(self) -> None:
        rt = self.rt
        if rt is None or rt.mirror is None or self.replay is None or not self.req_done:
            return
        try:
            start_mirror(self.down.listener, self.snap, self.facts, rt, self.replay)
        except Exception as exc:  # a mirror never fails the primary request
            traceback.print_exception(exc, file=sys.stderr)
            self.down.listener.observe_mirror(rt.mirror.backend.service, "failed")

    # -- upgrade ------------------------------------------------------------------

    def on_upgraded(self, rest: bytes) -> None:
        """The upstream agreed (101): from now on both connections carry raw bytes."""
        conn = self.conn
        self.conn = None
        if self.done or conn is None:
            if conn is not None:
                conn.abort()
            return
        self.pool.detach(conn)  # type: ignore[union-attr]
        self._end_try(True, "success")
        down = self.down
        listener = down.listener
        down_transport = down.transport
        ends = (down_transport, conn.transport)
        listener.tunnel_opened(ends)  # type: ignore[arg-type]

        def closed(up: int, down_bytes: int) -> None:
            listener.tunnel_closed(ends)

        down_eof = down.eof
        down.detach_for_tunnel()
        conn.gate.resume(PEER_BACKPRESSURE)
        self._finish(tunneled=True)
        splice(
            down_transport,  # type: ignore[arg-type]
            conn.transport,  # type: ignore[arg-type]
            a_to_b=self.early_tunnel,
            b_to_a=rest,
            a_eof=down_eof,
            on_closed=closed,
        )

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
            self._end_try(False, None)
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
        self._end_try(False, None)
        # The connection survives the error if the request is (or will be, with
        # no body to skip) complete: a 404 must not cost a keep-alive connection.
        complete = self.req_done or not self.facts.has_body
        keep = (
            not err.close and complete and self.down_keep_alive and not self.down.listener.draining
        )
        self.down_keep_alive = keep
        rid = self.facts.request_id
        body = error_body(err, rid.decode("latin-1"))
        self.resp_bytes = len(body)
        outbound = self.down.listener.reporter == "source"
        extra = b"x-lepton-attempts: %d\r\n" % self.attempts if self.attempts and outbound else b""
        self.down.send(
            error_response(
                err,
                rid,
                body,
                keep_alive=keep,
                head_request=self.head_request,
                extra=extra + err.headers if err.headers else extra,
            )
        )
        self._finish()

    def on_timeout(self) -> None:
        """The overall timeout passed (called by the client connection's deadline)."""
        timeout = self.rt.timeout if self.rt is not None else 0
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
        self._end_try(False, None)
        if not self.resp_started:
            self.status = 499  # as nginx: the client closed the request
        self.reason = Reason.DOWNSTREAM_RESET
        self._finish(abort=True, notify=False)

    # -- end -----------------------------------------------------------------

    def _finish(self, *, abort: bool = False, tunneled: bool = False, notify: bool = True) -> None:
        self.done = True
        for timer in (self._try_timer, self._wait_timer):
            if timer is not None:
                timer.cancel()
        self._try_timer = self._wait_timer = None
        cluster = self.cluster
        if cluster is not None:
            breaker = cluster.state.breaker
            if self._holds_request:
                self._holds_request = False
                breaker.release_request()
            if self._holds_retry:
                self._holds_retry = False
                breaker.release_retry()
            # A pending slot is released when its connect task ends (see
            # _connect), never here: the slot is the task's.
        self.down.listener.record(self)
        if notify and not tunneled:
            self.down.exchange_done(self, abort=abort)

    def destination(self) -> str:
        """The service label of this exchange (the backend's service, else the one named)."""
        if self.cluster is not None:
            return self.cluster.service
        return self.target.name if self.target is not None else "unknown"

    def log_entry(self, now: float) -> LogEntry:
        """What this exchange's access-log line needs, taken as it ends.

        The line itself is built later (`render_log_line`, when the access
        log's batch leaves). The entry must not keep the client connection
        alive until then: a closed TLS connection's transport holds its
        buffers (~256 KiB), and holding a few hundred of them under
        connection churn added ~30 MB to the peak. Nor the request's headers:
        only the five values the line shows (`log_entry_bytes` sizes them).
        """
        down = self.down
        facts = self.facts
        return (
            facts.method,
            facts.authority,
            facts.target,
            facts.request_id,
            facts.traceparent,
            self.sec,
            down.listener.reporter,
            down.client_ip_str,
            self.version,
            self.status,
            self.reason,
            self.start_wall,
            now - self.start,
            now - self.upstream_start if self.upstream_start else None,
            self.req_bytes,
            self.resp_bytes,
            self.pool,
            self.cluster,
            self.rt,
            self.attempts,
        )

    def peer_workload(self) -> str | None:
        """The calling workload as its sidecar named it (inbound side)."""
        return header_value(self.facts, b"x-lepton-peer")


# Exchange.log_entry's fields, in order (see render_log_line).
LogEntry = tuple[
    bytes,
    bytes,
    bytes,
    bytes,
    bytes,
    "SecurityOutcome | None",
    str,
    str,
    str,
    int,
    str,
    float,
    float,
    "float | None",
    int,
    int,
    "EndpointPool | None",
    "Cluster | None",
    "RuleRuntime | None",
    int,
]


def log_entry_bytes(entry: LogEntry) -> int:
    """Roughly what an entry holds beyond its fixed part: the client's bytes."""
    return len(entry[1]) + len(entry[2]) + len(entry[3])


def render_log_line(entry: LogEntry) -> dict[str, object]:
    """One access-log line from `Exchange.log_entry` (docs/operations.md lists the fields)."""
    (
        method,
        authority,
        target,
        request_id,
        traceparent,
        sec,
        reporter,
        client,
        version,
        status,
        reason,
        wall,
        took,
        upstream_took,
        req_bytes,
        resp_bytes,
        pool,
        cluster,
        rt,
        attempts,
    ) = entry
    record: dict[str, object] = {
        "time": iso_time(wall),
        "reporter": reporter,
        "method": method.decode("latin-1"),
        "authority": authority.decode("latin-1"),
        "path": target.decode("latin-1"),
        "protocol": "HTTP/" + version,
        "status": status,
        "reason": reason,
        # Milliseconds to the microsecond (truncated: a third of round()'s cost).
        "duration_ms": int(took * 1e6) / 1000,
        "upstream_ms": int(upstream_took * 1e6) / 1000 if upstream_took is not None else None,
        "request_bytes": req_bytes,
        "response_bytes": resp_bytes,
        "upstream": pool.address_text if pool is not None else "-",
        "backend": cluster.label if cluster is not None else None,
        "rule": rt.name if rt is not None else None,
        "request_id": request_id.decode("latin-1"),
        "traceparent": traceparent.decode("latin-1"),
        "attempts": attempts,
        "downstream": client,
    }
    if sec is not None:
        record.update(sec.log_fields())
    return record


def _request_remove(rule: frozenset[bytes], ours: frozenset[bytes] | None) -> frozenset[bytes]:
    """Received headers not forwarded: the rule's and the inbound policy's (a new
    set only when both name some: this runs per request)."""
    if not ours:
        return rule
    return rule | ours if rule else ours


def _response_remove(rt: RuleRuntime | None, outbound: bool) -> frozenset[bytes]:
    """Upstream response headers not forwarded: the rule's, and on the outbound side ours."""
    if rt is None:
        return OUTBOUND_RESPONSE_HEADERS if outbound else frozenset()
    return rt.resp_remove_outbound if outbound else rt.resp_remove


def _fault(status: int, rule: str) -> ProxyError:
    return ProxyError(status, Reason.FAULT_INJECTED, f"fault injected by route rule {rule!r}")


_iso_cache: tuple[int, str] = (-1, "")
_iso_last: tuple[int, str] = (-1, "")


def iso_time(wall: float) -> str:
    """ISO-8601 UTC with milliseconds. The seconds part is formatted once per
    second, and the whole text once per millisecond: a batch of access-log lines
    (rendered together) mostly shares its milliseconds."""
    global _iso_cache, _iso_last
    ms = int(wall * 1000)
    last = _iso_last
    if last[0] == ms:
        return last[1]
    sec = ms // 1000
    if _iso_cache[0] != sec:
        _iso_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    text = f"{_iso_cache[1]}.{ms % 1000:03d}Z"
    _iso_last = (ms, text)
    return text
