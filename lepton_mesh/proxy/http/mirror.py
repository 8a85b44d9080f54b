"""Traffic mirroring: a copy of a request sent to another backend, its answer discarded.

A mirror never slows or fails the primary request: it starts only once the
primary request is complete (its body is the replay copy the exchange holds,
so only requests up to 64 KiB are mirrored), runs on its own pooled
connection, has its own timeout, and reports only to its own metric
(`lepton_mirror_requests_total{outcome}`). Its Host carries a `-shadow`
suffix, as Istio's, so the mirrored service can tell copies from real calls.

A copy goes through its backend's circuit breaker, as Envoy's shadow
requests: it holds a `max_requests` slot until it ends, a `max_pending` slot
while its connection opens, and opens connections only within
`max_connections` and the pool's size. Every slot is taken with a try,
never waited for: when one is full the copy is dropped and counted as
`overflow`, so copies can never fill a pool the primary traffic needs.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lepton_mesh.proxy.errors import ProxyError, Reason
from lepton_mesh.proxy.http.http1 import Headers, render_request_head

if TYPE_CHECKING:
    from lepton_mesh.proxy.contracts import ListenerSide
    from lepton_mesh.proxy.http.http1 import RequestFacts
    from lepton_mesh.proxy.http.upstream import UpstreamConnection
    from lepton_mesh.proxy.outbound.clusters import Cluster
    from lepton_mesh.proxy.outbound.pool import EndpointPool
    from lepton_mesh.proxy.outbound.routing import RuleRuntime
    from lepton_mesh.proxy.snapshot import Snapshot


class _NoClient:
    """Stands where an exchange has its client connection: nothing to cork."""

    __slots__ = ()

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass


_NO_CLIENT = _NoClient()


def start_mirror(
    listener: ListenerSide, snap: Snapshot, facts: RequestFacts, rt: RuleRuntime, body: list[bytes]
) -> None:
    """Copy a complete request (head as `rt` rewrites it, `body` its held frames)
    to `rt.mirror`'s backend; failures are counted, never raised."""
    backend = rt.mirror.backend  # type: ignore[union-attr]
    try:
        cluster = snap.cluster(backend.service, backend.subset)
    except ProxyError:
        listener.observe_mirror(backend.service, "dropped")
        return
    breaker = cluster.state.breaker
    if not breaker.try_acquire_request():
        listener.observe_mirror(backend.service, "overflow")
        return
    try:
        head = render_request_head(
            facts,
            set_headers=rt.req_set,
            add_headers=rt.req_add,
            remove=rt.req_remove,
            host=_shadow_host(facts.host),
            extra=listener.peer_header,
        )
        timeout = rt.timeout if rt.timeout > 0 else snap.cfg.timeouts.request
        call = MirrorCall(
            listener, cluster, [head, *body], timeout or 10.0, snap.cfg.timeouts.connect
        )
    except BaseException:
        breaker.release_request()
        raise
    call.start()  # from here the call owns the slot: `_end` gives it back


def _shadow_host(host: bytes) -> bytes:
    name, sep, port = host.rpartition(b":")
    if sep and port.isdigit() and not name.endswith(b"]"):
        return name + b"-shadow:" + port
    return host + b"-shadow"


class MirrorCall:
    __slots__ = (
        "_conn",
        "_connect_timeout",
        "_listener",
        "_pool",
        "_task",
        "_timer",
        "cluster",
        "done",
        "frames",
        "status",
    )

    down = _NO_CLIENT

    def __init__(
        self,
        listener: ListenerSide,
        cluster: Cluster,
        frames: list[bytes],
        timeout: float,
        connect_timeout: float,
    ) -> None:
        self._listener = listener
        self._connect_timeout = connect_timeout
        self.cluster = cluster
        self.frames = frames
        self.status = 0
        self.done = False
        self._conn: UpstreamConnection | None = None
        self._pool: EndpointPool | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer = listener.loop.call_later(timeout, self._fail, "timeout")

    def start(self) -> None:
        """Send the copy; the caller has taken its `max_requests` slot."""
        try:
            ep = self.cluster.balancer.pick()
            if ep is None:
                self._end("dropped")
                return
            pool = self._pool = self._listener.pools.get(ep.address, self.cluster.service)
            conn = pool.take_idle()
            if conn is not None:
                self._send(conn)
                return
            breaker = self.cluster.state.breaker
            if not breaker.try_acquire_pending():
                self._end("overflow")
                return
            task = self._task = self._listener.loop.create_task(self._open(pool))
            # The pending slot is the task's, given back however it ends.
            task.add_done_callback(lambda _task: breaker.release_pending())
        except BaseException:
            self._fail("failed", observe=False)  # the caller counts it
            raise

    async def _open(self, pool: EndpointPool) -> None:
        try:
            conn = await pool.open(self._connect_timeout, self.cluster.state.breaker)
        except ProxyError as err:
            self._task = None
            self._end("overflow" if err.reason == Reason.OVERFLOW else "failed")
            return
        self._task = None
        if self.done:
            pool.release(conn)
        else:
            self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        conn.bind(self, False, False)  # type: ignore[arg-type]
        conn.transport.writelines(self.frames)  # type: ignore[union-attr]
        self.frames = []

    # -- ResponseSink: read and discard -------------------------------------------

    def on_response_head(self, status: int, headers: Headers, keep_alive: bool) -> None:
        if status >= 200:
            self.status = status

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_complete(self, trailers: Headers | None, reusable: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pool is not None:
            if reusable:
                self._pool.release(conn)
            else:
                conn.close()
        self._end("ok" if self.status < 500 else "failed")

    def on_upstream_error(self, err: ProxyError) -> None:
        self._fail("failed")

    def on_upgraded(self, rest: bytes) -> None:
        self._fail("failed")

    def pause_downstream(self) -> None:
        pass

    def resume_downstream(self) -> None:
        pass

    # -- end ----------------------------------------------------------------------

    def _fail(self, outcome: str, *, observe: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        self._end(outcome, observe=observe)

    def _end(self, outcome: str, *, observe: bool = True) -> None:
        """Exactly once per call: the `max_requests` slot goes back here."""
        if self.done:
            return
        self.done = True
        self._timer.cancel()
        self.cluster.state.breaker.release_request()
        if observe:
            self._listener.observe_mirror(self.cluster.service, outcome)
