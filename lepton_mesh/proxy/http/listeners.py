"""HTTP listeners: what differs between outbound and inbound, and their bookkeeping.

Outbound (app -> mesh): the destination is the service the request names by
its authority; metrics report `reporter="source"`. Inbound (mesh -> app): the
destination is always the local app; `reporter="destination"`. Everything
else (parsing, exchanges, pools) is shared.

Inbound with mTLS in STRICT or PERMISSIVE mode, connections come through a
`mtls.TlsAcceptor` instead of `create_server`, so each failed handshake is
counted, and each connection knows its caller's verified identity. A
connection that negotiated ALPN `lepton-tcp/1` is an L4 tunnel and goes to
`tcp_proxy.InboundTunnels` (when `tls.tcp_app` is set).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from lepton_mesh.proxy.errors import ProxyError
from lepton_mesh.proxy.http.downstream import DownstreamProtocol
from lepton_mesh.proxy.http.exchange import iso_time, log_entry_bytes, render_log_line
from lepton_mesh.proxy.l4.tcp_proxy import InboundTunnels
from lepton_mesh.proxy.l4.tunnel import TunnelEnds, reset
from lepton_mesh.proxy.security.mtls import InboundTls, TlsAcceptor

if TYPE_CHECKING:
    from lepton_mesh.policy.traffic import Backend
    from lepton_mesh.proxy.http.exchange import Exchange
    from lepton_mesh.proxy.http.http1 import RequestFacts
    from lepton_mesh.proxy.observe.access_log import AccessLog
    from lepton_mesh.proxy.observe.metrics import ProxyMetrics
    from lepton_mesh.proxy.outbound.clusters import Cluster
    from lepton_mesh.proxy.outbound.pool import Pools
    from lepton_mesh.proxy.outbound.routing import ServiceTarget
    from lepton_mesh.proxy.security.mtls import MeshIdentity
    from lepton_mesh.proxy.snapshot import Snapshot


class SidecarSide(Protocol):
    """What a listener needs from the sidecar that owns it."""

    loop: asyncio.AbstractEventLoop
    snapshot: Snapshot
    pools: Pools
    metrics: ProxyMetrics
    access_log: AccessLog
    identity: MeshIdentity | None

    def check_drained(self) -> None: ...


# An inbound caller not known: no verified mesh identity (a plaintext caller
# on a PERMISSIVE port), or, without mTLS, no usable x-lepton-peer.
UNKNOWN_WORKLOAD = "unknown"


class HttpListener:
    __slots__ = (
        "connections",
        "draining",
        "l4",
        "loop",
        "name",
        "outbound",
        "peer_header",
        "pools",
        "reporter",
        "server",
        "sidecar",
        "tunnels",
        "upgraded",
    )

    def __init__(self, name: str, sidecar: SidecarSide, *, outbound: bool) -> None:
        self.name = name
        self.sidecar = sidecar
        self.outbound = outbound
        self.reporter = "source" if outbound else "destination"
        self.loop = sidecar.loop
        self.pools = sidecar.pools
        self.connections: set[DownstreamProtocol] = set()
        self.tunnels = 0
        self.upgraded: set[TunnelEnds] = set()
        self.draining = False
        self.server: asyncio.Server | TlsAcceptor | None = None
        self.l4: InboundTunnels | None = None  # inbound L4 tunnels over mTLS
        # Outbound requests tell the callee's sidecar who calls (for its metrics).
        self.peer_header = (
            b"x-lepton-peer: " + sidecar.snapshot.cfg.service.encode() + b"\r\n"
            if outbound
            else b""
        )

    async def start(self, host: str, port: int) -> asyncio.Server | TlsAcceptor:
        identity = None if self.outbound else self.sidecar.identity
        if identity is not None and identity.mode != "DISABLE":
            self.server = await self._start_tls(identity, host, port)
            return self.server
        server = await self.loop.create_server(
            lambda: DownstreamProtocol(self), host, port, backlog=2048, reuse_address=True
        )
        self.server = server
        return server

    async def _start_tls(self, identity: MeshIdentity, host: str, port: int) -> TlsAcceptor:
        sidecar = self.sidecar
        if identity.tcp_app is not None:
            self.l4 = InboundTunnels(
                sidecar.snapshot.cfg.service,
                identity.tcp_app,
                sidecar.metrics,
                identity,
                connect_timeout=lambda: sidecar.snapshot.cfg.timeouts.connect,
                idle_timeout=lambda: sidecar.snapshot.cfg.timeouts.tcp_idle,
                on_open=self.tunnel_opened,
                on_close=self.tunnel_closed,
            )
        tls = InboundTls(identity, self.l4.accept if self.l4 is not None else None)
        acceptor = TlsAcceptor(
            identity,
            lambda secure: DownstreamProtocol(self, tls, secure),
            permissive=identity.mode == "PERMISSIVE",
            handshake_timeout=lambda: sidecar.snapshot.cfg.timeouts.header_read,
        )
        return await acceptor.start(host, port)

    def route(self, snap: Snapshot, facts: RequestFacts) -> ServiceTarget:
        """Logical: the service a request is for."""
        return snap.lookup(facts.authority) if self.outbound else snap.local

    def cluster_for(self, snap: Snapshot, backend: Backend) -> Cluster:
        """Concrete: the backend a rule picked (inbound: always the local app)."""
        return (
            snap.cluster(backend.service, backend.subset) if self.outbound else snap.local_cluster
        )

    # -- accounting ----------------------------------------------------------

    def record(self, ex: Exchange) -> None:
        """One finished exchange: a metric sample and an access-log line."""
        now = time.perf_counter()
        cfg = ex.snap.cfg
        if self.outbound:
            source, destination = cfg.service, ex.destination()
        else:
            source, destination = _workload(ex.facts.peer), cfg.service
        sidecar = self.sidecar
        sidecar.metrics.observe_request(
            self.reporter,
            source,
            destination,
            ex.status,
            ex.reason,
            now - ex.start,
            ex.req_bytes,
            ex.resp_bytes,
        )
        log = sidecar.access_log
        if log.enabled:
            entry = ex.log_entry(now)
            log.defer(render_log_line, entry, log_entry_bytes(entry))  # built when the batch leaves

    def record_reject(
        self,
        err: ProxyError,
        method: bytes,
        authority: bytes,
        target: bytes,
        client: str,
        request_id: bytes,
    ) -> None:
        """A request refused before it became an exchange (malformed, too large, too slow).

        Its access-log line has the fields of an exchange's line that are known
        by then (b"" for what was not parsed), plus `detail`."""
        cfg = self.sidecar.snapshot.cfg
        source, destination = (
            (cfg.service, UNKNOWN_WORKLOAD) if self.outbound else (UNKNOWN_WORKLOAD, cfg.service)
        )
        self.sidecar.metrics.observe_request(
            self.reporter, source, destination, err.status, err.reason, 0.0, 0, 0
        )
        log = self.sidecar.access_log
        if log.enabled:
            log.log(
                {
                    "time": iso_time(time.time()),
                    "reporter": self.reporter,
                    "method": method.decode("latin-1"),
                    "authority": authority[:200].decode("latin-1"),
                    "path": target[:200].decode("latin-1"),
                    "status": err.status,
                    "reason": err.reason,
                    "detail": err.detail,
                    "request_id": request_id.decode("latin-1"),
                    "downstream": client,
                }
            )

    @property
    def snapshot(self) -> Snapshot:
        return self.sidecar.snapshot

    def connection_opened(self, conn: DownstreamProtocol) -> bool:
        """Count a new client connection; False when it is over the limit."""
        self.connections.add(conn)
        return len(self.connections) <= self.sidecar.snapshot.cfg.limits.max_connections

    def connection_closed(self, conn: DownstreamProtocol) -> None:
        """A client connection closed or became a tunnel."""
        self.connections.discard(conn)
        if self.draining and not self.busy():
            self.sidecar.check_drained()

    def tunnel_opened(self, ends: TunnelEnds | None = None) -> None:
        """A tunnel began: an L4 one, or an upgraded HTTP connection (`ends`: its
        two transports, reset by `abort_all` when a stop cuts it)."""
        self.tunnels += 1
        if ends is not None:
            self.upgraded.add(ends)

    def tunnel_closed(self, ends: TunnelEnds | None = None) -> None:
        self.tunnels -= 1
        if ends is not None:
            self.upgraded.discard(ends)
        if self.draining and not self.busy():
            self.sidecar.check_drained()

    def observe_mirror(self, service: str, outcome: str) -> None:
        self.sidecar.metrics.observe_mirror(service, outcome)

    # -- drain ---------------------------------------------------------------

    def start_drain(self) -> None:
        self.draining = True
        if self.server is not None:
            self.server.close()  # stop accepting; accepted connections go on
        for conn in list(self.connections):
            conn.start_drain()

    def busy(self) -> int:
        return len(self.connections) + self.tunnels

    def abort_all(self) -> None:
        if isinstance(self.server, TlsAcceptor):
            self.server.abort()  # handshakes under way too
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        # Upgraded connections (WebSockets) cut short: a reset both ways, never
        # a clean end the client could take for the server closing normally.
        for ends in list(self.upgraded):
            for transport in ends:
                reset(transport)
        self.upgraded.clear()
        if self.l4 is not None:
            self.l4.abort_all()


def _workload(peer: bytes) -> str:
    """A caller's self-declared workload name, if it is one (a DNS label); else unknown."""
    if peer and len(peer) <= 63 and peer.replace(b"-", b"").isalnum() and peer.isascii():
        return peer.decode("ascii")
    return UNKNOWN_WORKLOAD
