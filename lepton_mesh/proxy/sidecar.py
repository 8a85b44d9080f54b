"""The sidecar process: its listeners, its running snapshot, its lifecycle.

Lifecycle: `start()` binds every listener (or raises before serving
anything), then the sidecar is ready (`wait_ready()` returns). `swap_config()`
replaces the snapshot in one assignment. `stop()` closes everything at once.

Draining (docs/lifecycle.md) has two phases, bounded by `timeouts.drain`:
1. Control is told first (callers stop picking us), then inbound stops
   accepting and answers in-flight requests with `Connection: close`.
   Outbound and the tcp services keep serving the local app during the
   outbound grace: the app may still be finishing work that calls others.
2. Outbound and the tcp services stop accepting too; in-flight requests
   finish until the deadline (at least `LAST_CALL_GRACE` after the grace),
   then `drain()` returns and what is left is closed by `stop()`.
`start_drain()` (`/drain`, `/quit`, SIGINT, SIGHUP) has no grace; `terminate()`
(SIGTERM) grants the whole drain period; `lepton-mesh run` grants it until
its app exits (`end_outbound_grace()`), whatever started the drain (SIGTERM,
`/quit`, `/drain`), then gives phase 2 the full period.

With `control` in its config, a `ControlClient` feeds the sidecar: ready
only once a snapshot from control (or the last-known-good one) is applied,
and `drain()` tells control before it stops accepting.

With `tls` in its config, `identity` (mtls.MeshIdentity) holds its
certificate, read from the files when the sidecar is made (a file that cannot
be read or does not check out is a ConfigError); `identity.reload(chain,
key, bundle)` swaps it at run time. The inbound mode and `tcp_app` are fixed
at start, as listener addresses are.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import signal
import sys
from collections.abc import Callable
from typing import Any

from lepton_mesh.policy.sidecar_config import Address, SidecarConfig
from lepton_mesh.proxy.http.listeners import HttpListener
from lepton_mesh.proxy.l4.tcp_proxy import TcpProxy
from lepton_mesh.proxy.mesh.control_client import ControlClient
from lepton_mesh.proxy.observe.access_log import AccessLog
from lepton_mesh.proxy.observe.admin import start_admin_server
from lepton_mesh.proxy.observe.metrics import ProxyMetrics
from lepton_mesh.proxy.outbound.clusters import Cluster, ServiceStates
from lepton_mesh.proxy.outbound.pool import Pools
from lepton_mesh.proxy.security.inbound_policy import InboundState
from lepton_mesh.proxy.security.mtls import MeshIdentity, plaintext_endpoints
from lepton_mesh.proxy.snapshot import Snapshot

# Phase 2 of a drain lasts at least this long (or `timeouts.drain`, if shorter).
LAST_CALL_GRACE = 1.0


class Sidecar:
    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg  # the config until start() builds the first snapshot from it
        # 2,000 label tuples keep a scrape under ~60 ms of loop time (measured: 10,000 -> 270 ms).
        self.metrics = ProxyMetrics(max_series=2000)
        self.access_log = AccessLog(cfg.access_log.enabled)
        self.snapshot: Snapshot
        self.addresses: dict[str, Address] = {}
        self.draining = False
        self._ready = False
        self._ready_event = asyncio.Event()
        # Set to end the outbound grace of a drain (phase 1 -> phase 2).
        self._grace_over = asyncio.Event()
        # Outbound (and the tcp services) still accept: phase 1 of a drain, or no drain.
        self._outbound_open = True
        # `lepton-mesh run` sets this: there, /quit means "stop the app", which
        # then stops the sidecar; a sidecar alone drains and exits.
        self.quit_handler: Callable[[], None] | None = None
        # `lepton-mesh run` holds this True until its app exits: a drain then
        # (`/drain`, a preStop hook) keeps outbound for the app, which still runs.
        self.outbound_for_app = False
        self._servers: list[asyncio.AbstractServer] = []
        self._tcp: dict[str, TcpProxy] = {}
        self._drained: asyncio.Event | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # Created here so that its settings (`control.timing`) can be adjusted before start().
        self.control = ControlClient(self, cfg) if cfg.control is not None else None
        self.identity = MeshIdentity.from_config(cfg) if cfg.tls is not None else None

    # -- start / config ------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Config applied (and, with `tls.source: control`, a certificate held)."""
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value
        if value:
            self._ready_event.set()
        else:
            self._ready_event.clear()

    async def wait_ready(self) -> None:
        """Return once the sidecar is ready (as `/ready` would say before any drain)."""
        await self._ready_event.wait()

    async def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        cfg = self.cfg
        self.states = ServiceStates(loop)
        # JWKS keys, rate-limit buckets and security counters outlive config swaps.
        self.inbound_state = InboundState()
        self.snapshot = Snapshot(cfg, self.states, self.inbound_state)
        self.metrics.set_security_source(self.inbound_state)
        self._stopped = asyncio.Event()
        self._drained = asyncio.Event()
        identity = self.identity
        self.pools = Pools(loop, cfg.pool, identity, self._plaintext(cfg))
        if identity is not None:
            identity.on_trust_change = self.pools.close_idle_tls
            self.metrics.set_tls_source(identity)
        self.outbound = HttpListener("outbound", self, outbound=True)
        self.inbound = HttpListener("inbound", self, outbound=False)
        self.metrics.set_pool_source(self.pools.stats)
        self.metrics.set_listener_source(self._listener_stats)
        self.metrics.set_resilience_source(self.states.resilience_rows)
        try:
            for name, listener, address in (
                ("outbound", self.outbound, cfg.listeners.outbound),
                ("inbound", self.inbound, cfg.listeners.inbound),
            ):
                server = await listener.start(address.host, address.port)
                self._bound(name, server)
            for name, svc in cfg.services.items():
                if svc.protocol == "tcp" and svc.listen is not None:
                    await self._start_tcp(name, svc.listen)
            admin = await start_admin_server(
                self, cfg.listeners.admin.host, cfg.listeners.admin.port
            )
            self._bound("admin", admin)
        except BaseException:
            await self.stop()
            raise
        # With control: ready once a snapshot (or last-known-good) is applied.
        self.ready = self.control is None
        if self.control is not None:
            self.control.start()

    def _bound(self, name: str, server: asyncio.AbstractServer) -> None:
        self._servers.append(server)
        sock = server.sockets[0]  # type: ignore[attr-defined]
        host, port = sock.getsockname()[:2]
        self.addresses[name] = Address(host, port)

    async def _start_tcp(self, name: str, listen: Address) -> None:
        proxy = TcpProxy(name, lambda: self.cfg, self.metrics, self.identity)
        proxy.on_idle = self.check_drained
        server = await proxy.start(listen.host, listen.port)
        self._tcp[name] = proxy
        self._bound(f"tcp:{name}", server)

    def swap_config(self, cfg: SidecarConfig) -> None:
        """Install a new validated config. Listener addresses are fixed at start;
        destinations, timeouts, limits and pool settings take effect for new requests."""
        self.cfg = cfg
        self.snapshot = Snapshot(cfg, self.states, self.inbound_state)
        live = {e.address for svc in cfg.services.values() for e in svc.endpoints}
        live.add(cfg.app)
        self.pools.reconfigure(cfg.pool, live, self._plaintext(cfg))
        self.access_log.enabled = cfg.access_log.enabled

    def _plaintext(self, cfg: SidecarConfig) -> frozenset[Address]:
        """Endpoints called without TLS (all of them without an identity)."""
        return plaintext_endpoints(cfg) if self.identity is not None else frozenset()

    # -- drain / stop -------------------------------------------------------

    def start_drain(self, *, outbound_grace: float | None = 0.0) -> asyncio.Task[None]:
        """Start draining; the task ends when in-flight requests finished or the deadline passed.

        `outbound_grace`: seconds outbound keeps serving the app after inbound
        stopped accepting, None until `end_outbound_grace()`. Only the first
        call starts a drain; a later one without grace ends the grace now.
        While `outbound_for_app`, the grace is None whatever is asked.
        """
        if self.outbound_for_app:
            outbound_grace = None
        if self._drain_task is None:
            # Phase 1 begins now, not when the task first runs: a response
            # leaving inbound after this call already says `Connection: close`.
            self.draining = True
            if self.control is not None:
                self.control.send_draining()  # first: callers stop sending before we stop accepting
            self.inbound.start_drain()
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(outbound_grace))
        elif outbound_grace == 0:
            self.end_outbound_grace()
        return self._drain_task

    def end_outbound_grace(self) -> None:
        """The app no longer needs outbound (it exited, or `/quit`): go to phase 2."""
        self._grace_over.set()

    async def drain(self) -> None:
        """Drain with no outbound grace (or end the grace of a drain under way)."""
        await self.start_drain()

    async def _drain(self, grace: float | None) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.snapshot.cfg.timeouts.drain
        deadline = loop.time() + timeout
        if grace is None or grace > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._grace_over.wait()
            if grace is None:  # the app just exited: its in-flight calls get the full period
                deadline = loop.time() + timeout
        # Idle connections close at once; a call the app made just before the
        # grace ended still gets a moment, whatever the deadline says.
        deadline = max(deadline, loop.time() + min(LAST_CALL_GRACE, timeout))
        self._outbound_open = False
        self.outbound.start_drain()
        for proxy in self._tcp.values():
            proxy.stop_listening()
        self.check_drained()
        try:
            async with asyncio.timeout_at(deadline):
                await self._drained.wait()  # type: ignore[union-attr]
        except TimeoutError:
            print(
                f"lepton-mesh: drain timeout ({timeout:g}s) passed; closing what is left",
                file=sys.stderr,
            )
        self._drained.set()  # type: ignore[union-attr]

    def check_drained(self) -> None:
        # Never during the outbound grace: a quiet moment there does not end the drain.
        if not self.draining or self._outbound_open or self._drained is None:
            return
        busy = (
            self.outbound.busy() + self.inbound.busy() + sum(p.active() for p in self._tcp.values())
        )
        if busy == 0:
            self._drained.set()

    async def stop(self) -> None:
        self.ready = False
        # A stop ends any drain under way: its task returns instead of waiting on.
        self._grace_over.set()
        if self._drained is not None:
            self._drained.set()
        if self.control is not None:
            await self.control.aclose()
        for server in self._servers:
            server.close()
        for listener in (getattr(self, "outbound", None), getattr(self, "inbound", None)):
            if listener is not None:
                listener.abort_all()
        for proxy in self._tcp.values():
            await proxy.close()
        if hasattr(self, "pools"):
            self.pools.close()
        if self.identity is not None:
            self.identity.close()
        if hasattr(self, "inbound_state"):
            self.inbound_state.close()
        self.access_log.close()
        if self._stopped is not None:
            self._stopped.set()

    async def wait_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def drain_and_stop(self) -> None:
        await self.start_drain()
        await self.stop()

    def terminate(self) -> None:
        """SIGTERM: inbound first, outbound for the whole drain period, then stop.
        A second SIGTERM ends the outbound grace."""
        if self._stop_task is not None:
            self.end_outbound_grace()
            return
        self._drain_then_stop(self.snapshot.cfg.timeouts.drain)

    def _drain_then_stop(self, grace: float) -> None:
        task = self.start_drain(outbound_grace=grace)
        if self._stop_task is None:  # one stop, however many signals and /quit calls
            self._stop_task = self.loop.create_task(self._stop_after(task))  # type: ignore[union-attr]

    async def _stop_after(self, task: asyncio.Task[None]) -> None:
        await task
        await self.stop()

    # -- admin hooks ------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.ready:
            return False, self.control.not_ready_reason() if self.control else "starting"
        return True, ""

    def config_json(self) -> dict[str, Any]:
        # Imported per /config call: serving never needs the loader, nor what it imports.
        from lepton_mesh.policy.sidecar_loader import sidecar_config_to_json

        out = sidecar_config_to_json(self.snapshot.cfg)
        out["inbound_security"] = self.inbound_state.describe()
        if self.control is not None:
            out["control_status"] = self.control.status_json()
        if self.identity is not None:
            out["identity"] = self.identity.describe()
        return out

    def clusters_json(self) -> dict[str, Any]:
        """Every destination: its backends, endpoints with load and ejection, pools, breaker, budget."""
        snap = self.snapshot
        pools = self.pools.by_address
        by_service: dict[str, list[Cluster]] = {}
        for cluster in [*snap.clusters.values(), snap.local_cluster]:
            by_service.setdefault(cluster.state.name, []).append(cluster)
        out: dict[str, Any] = {}
        for name, clusters in by_service.items():
            state = clusters[0].state
            budget = state.budget.stats()
            everything = next((c for c in clusters if c.subset is None), clusters[0])
            out[name] = {
                "circuit": state.breaker.describe(),
                "retry_budget": {
                    "available": budget.available,
                    "requests_total": budget.requests_total,
                    "retries_total": budget.retries_total,
                    "exhausted_total": budget.exhausted_total,
                },
                "ejections_total": state.outlier.ejections_total,
                "panic": everything.balancer.panic,
                "subsets": {
                    c.subset: [str(e.address) for e in c.endpoints] for c in clusters if c.subset
                },
                "endpoints": [
                    {
                        "address": str(e.address),
                        "weight": e.weight,
                        "labels": dict(e.labels),
                        "healthy": e.healthy,
                        "ejected": e.ejected,
                        "active_requests": e.active,
                        "requests_total": e.total,
                        "latency_ewma_ms": round(e.latency() * 1000, 3),
                        "outlier": state.outlier.describe(e),
                        "pool": _pool_json(pools.get(e.address)),
                    }
                    for e in everything.endpoints
                ],
            }
        return {"clusters": out}

    def metrics_text(self) -> tuple[bytes, str]:
        return self.metrics.render()

    def quit(self) -> None:
        """`/quit`, SIGINT: drain with no outbound grace, then stop."""
        if self.quit_handler is not None:
            self.quit_handler()
            return
        self._drain_then_stop(0.0)

    def _listener_stats(self) -> list[tuple[str, int]]:
        rows = [
            ("outbound", len(self.outbound.connections)),
            ("inbound", len(self.inbound.connections)),
        ]
        rows += [(f"tcp:{n}", p.active()) for n, p in self._tcp.items()]
        return rows


def _pool_json(pool: Any) -> dict[str, int] | None:
    if pool is None:
        return None
    return {"active": len(pool.busy), "idle": len(pool.idle), "connecting": pool.connecting}


async def serve(cfg: SidecarConfig) -> int:
    """Run a sidecar until SIGTERM/SIGINT/SIGHUP or `POST /quit`; drain first, exit 0.

    SIGTERM (Kubernetes, Docker) keeps outbound up for the app for the drain
    period; SIGINT (a terminal's Ctrl-C), SIGHUP (its terminal went away) and
    `/quit` drain everything at once.
    """
    sidecar = Sidecar(cfg)
    await sidecar.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, sidecar.terminate)
    loop.add_signal_handler(signal.SIGINT, sidecar.quit)
    loop.add_signal_handler(signal.SIGHUP, sidecar.quit)
    addrs = " ".join(f"{k}={v}" for k, v in sidecar.addresses.items())
    print(f"lepton-mesh sidecar {cfg.service}: ready ({addrs})", file=sys.stderr, flush=True)
    await sidecar.wait_stopped()
    return 0


def run(cfg: SidecarConfig) -> int:
    import uvloop

    dump_stacks_on_sigquit()
    return uvloop.run(serve(cfg))


def dump_stacks_on_sigquit() -> None:
    """`kill -QUIT`: every thread's stack on stderr, and the sidecar goes on (a
    JVM's thread dump; Python's default would kill it with a core dump).
    faulthandler writes from the signal itself, so this also works while the
    event loop is stuck, which is when one wants it. A SIGQUIT ignored from the
    start (a background job) stays ignored."""
    if signal.getsignal(signal.SIGQUIT) != signal.SIG_IGN:
        faulthandler.register(signal.SIGQUIT, file=sys.stderr, all_threads=True, chain=False)
