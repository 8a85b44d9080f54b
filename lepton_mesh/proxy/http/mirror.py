"""Traffic mirroring: a copy of a request sent to another backend, its answer discarded.

A mirror never slows or fails the primary request: it starts only once the
primary request is complete (its body is the replay copy the exchange holds,
so only requests up to 64 KiB are mirrored), runs on its own pooled
connection, has its own timeout, and reports only to its own metric
(`lepton_mirror_requests_total{outcome}`). Its Host carries a `-shadow`
suffix, as Istio's, so the mirrored service can tell copies from real calls.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lepton_mesh.proxy.errors import ProxyError
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
    head = render_request_head(
        facts,
        set_headers=rt.req_set,
        add_headers=rt.req_add,
        remove=rt.req_remove,
        host=_shadow_host(facts.host),
        extra=listener.peer_header,
    )
    timeout = rt.timeout if rt.timeout > 0 else snap.cfg.timeouts.request
    MirrorCall(listener, cluster, [head, *body], timeout or 10.0, snap.cfg.timeouts.connect).start()


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
        ep = self.cluster.balancer.pick()
        if ep is None:
            self._end("dropped")
            return
        pool = self._pool = self._listener.pools.get(ep.address, self.cluster.service)
        conn = pool.take_idle()
        if conn is not None:
            self._send(conn)
        else:
            self._task = self._listener.loop.create_task(self._open(pool))

    async def _open(self, pool: EndpointPool) -> None:
        try:
            conn = await pool.open(self._connect_timeout)
        except ProxyError:
            self._task = None
            self._end("failed")
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

    def _fail(self, outcome: str) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        self._end(outcome)

    def _end(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        self._timer.cancel()
        self._listener.observe_mirror(self.cluster.service, outcome)
