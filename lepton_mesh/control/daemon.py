"""`lepton-mesh control`: the control daemon's wiring and lifecycle.

One replica = one etcd `Store`, one `WatchCache` over `/lepton/v1/`, and on
top of that cache: the registry (connected sidecars' instances), the push
server (sidecar streams), the election (singleton jobs), the policy store and
the admin API. Every replica is the same; they share nothing but etcd.

Lifecycle:
- start: listen at once, while the cache does its first read (a sidecar that
  connects before it is done waits a little, then gets `store_unavailable`
  and retries). etcd being down at start is not fatal: the cache retries.
- etcd down later: connected sidecars keep their streams and snapshots (the
  cache keeps what it had); new registrations fail and are retried by their
  sidecars; pending registry writes are retried. When etcd is back the cache
  resumes its watch and changes flow again.
- SIGTERM/SIGINT: stop accepting, close every stream (its lease is left to the
  replica the sidecar reconnects to, or to its TTL: the sidecar is alive),
  resign the leadership, exit 0. A stream that closes while the replica runs
  (the sidecar left) revokes its lease at once.
- `--ca-dir`: the CA is loaded before anything listens (a bad CA directory
  is an exit 2 naming the file); sidecar streams are TLS and authenticated
  (control/identity_service.py). The CA files are re-read when they change
  (polled) and at once on SIGHUP.

Heavy imports (gRPC, aiohttp) happen in `ControlDaemon.start`, so that the
CLI can build its parser without loading them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lepton_mesh.control.auth import TokenVerifier
    from lepton_mesh.control.election import Election
    from lepton_mesh.control.identity_service import IdentityService
    from lepton_mesh.control.policy_store import PolicyStore
    from lepton_mesh.control.push import PushServer
    from lepton_mesh.control.registry import Registry
    from lepton_mesh.control.store import Store
    from lepton_mesh.control.watch_cache import WatchCache

__all__ = [
    "ControlContext",
    "ControlDaemon",
    "ControlOptions",
    "add_control_arguments",
    "options_from_args",
    "run_control",
]

log = logging.getLogger(__name__)

PREFIX = "/lepton/v1/"


class OptionError(ValueError):
    """A flag or environment value is invalid; the CLI prints it and exits 2."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class ControlOptions:
    """The daemon's settings, from flags or LEPTON_* environment variables."""

    etcd: tuple[str, ...]
    listen: tuple[str, int] = ("0.0.0.0", 15010)
    admin: tuple[str, int] | None = ("127.0.0.1", 15011)  # None: no admin API (tests)
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = None
    token_key: str | None = None
    history_depth: int = 1000
    lease_ttl: int = 10
    replica_id: str = field(default_factory=lambda: default_replica_id())
    etcd_timeout: float = 5.0
    idle_timeout: float = 15.0  # a sidecar stream silent this long is dropped
    min_push_interval: float = 0.1  # a group's snapshot is pushed at most this often
    seen_interval: float = 5.0  # a sidecar's last_seen is written at most this often
    ca_dir: str | None = None  # the CA's mounted secret: TLS streams, identities
    cert_lifetime: float = 24 * 3600.0  # seconds a workload certificate lives
    ca_reload_interval: float = 5.0  # how often the CA files are checked for changes


def default_replica_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class ControlContext:
    """What the admin API (and anything else built on a replica) gets to use."""

    store: Store
    cache: WatchCache
    registry: Registry
    policies: PolicyStore
    push: PushServer
    election: Election
    replica_id: str
    token_verifier: TokenVerifier | None  # None: no --token-key (admin API refuses everything)
    options: ControlOptions
    started_at: float
    identity: IdentityService | None = None  # None: no --ca-dir


class ControlDaemon:
    """One control replica: `await start()`, then `await stop()` (graceful) or `kill()`."""

    def __init__(self, options: ControlOptions) -> None:
        self.options = options
        self.ctx: ControlContext | None = None
        self.listen_port = 0
        self.admin_port = 0
        self._admin: Any = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> ControlContext:
        from lepton_mesh.control.election import Election, leader_jobs
        from lepton_mesh.control.policy_store import PolicyStore
        from lepton_mesh.control.push import PushServer
        from lepton_mesh.control.registry import Registry
        from lepton_mesh.control.store import Store
        from lepton_mesh.control.watch_cache import WatchCache

        opts = self.options
        verifier = _load_verifier(opts.token_key)
        identity = _load_identity(opts, verifier)
        store = await Store.connect(
            opts.etcd,
            ca_file=opts.etcd_ca,
            cert_file=opts.etcd_cert,
            key_file=opts.etcd_key,
            username=opts.etcd_user,
            password=opts.etcd_password,
            timeout=opts.etcd_timeout,
        )
        try:
            cache = WatchCache(store, PREFIX)
            registry = Registry(
                store,
                cache,
                replica_id=opts.replica_id,
                lease_ttl=opts.lease_ttl,
                seen_interval=opts.seen_interval,
            )
            push = PushServer(
                cache,
                registry,
                control_id=opts.replica_id,
                idle_timeout=opts.idle_timeout,
                min_push_interval=opts.min_push_interval,
                identity=identity,
            )
            cache.subscribe(push.on_cache_change)
            policies = PolicyStore(store, cache)
            jobs = leader_jobs(store, cache, policies, history_depth=opts.history_depth)
            election = Election(
                store, cache, replica_id=opts.replica_id, lease_ttl=opts.lease_ttl, jobs=jobs
            )
            self.ctx = ctx = ControlContext(
                store=store,
                cache=cache,
                registry=registry,
                policies=policies,
                push=push,
                election=election,
                replica_id=opts.replica_id,
                token_verifier=verifier,
                options=opts,
                started_at=time.time(),
                identity=identity,
            )
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(cache.run(), name="watch-cache"),
                loop.create_task(registry.run(), name="registry-flusher"),
                loop.create_task(election.run(), name="election"),
            ]
            if identity is not None:
                self._tasks.append(loop.create_task(identity.run(), name="ca-reload"))
            self.listen_port = await push.start(*opts.listen)
            if opts.admin is not None:
                await self._start_admin(ctx, *opts.admin)
        except BaseException:
            if self.ctx is not None:
                await self.stop()
            else:
                await store.close()
            raise
        return ctx

    async def _start_admin(self, ctx: ControlContext, host: str, port: int) -> None:
        from lepton_mesh.control.admin_api import start_admin_api

        self._admin = await start_admin_api(ctx, host, port)
        self.admin_port = int(getattr(self._admin, "port", port))

    async def stop(self) -> None:
        """Graceful: stop accepting, close streams, resign.

        The sidecars' leases are not revoked: the sidecars are alive, and
        reconnect to another replica within milliseconds, which takes their
        keys over. Revoking them dropped live instances from every caller
        during a rolling restart (16 of 215 calls failed). A sidecar with no
        replica left keeps its instance until the lease TTL.
        """
        ctx = self.ctx
        if ctx is None:
            return
        self.ctx = None
        ctx.registry.abandon()
        await ctx.push.close()
        await ctx.registry.close()
        await self._close_admin()
        await self._cancel_tasks()
        await ctx.election.resign()
        await ctx.store.close()

    async def kill(self) -> None:
        """As if the process died: nothing is revoked, leases expire on their own."""
        ctx = self.ctx
        if ctx is None:
            return
        self.ctx = None
        ctx.registry.abandon()
        await ctx.store.close()  # no keep-alive, revoke or write gets out any more
        await ctx.push.close()
        await self._close_admin()
        await self._cancel_tasks()

    async def _close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is None:
            return
        for name in ("close", "cleanup", "stop"):
            method = getattr(admin, name, None)
            if method is not None:
                await method()
                return

    async def _cancel_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _load_identity(opts: ControlOptions, verifier: TokenVerifier | None) -> IdentityService | None:
    """The CA from `--ca-dir`, or None; OptionError (exit 2) naming what is wrong."""
    if opts.ca_dir is None:
        return None
    import datetime as dt

    from lepton_mesh.control.identity_service import IdentityService
    from lepton_mesh.identity.errors import IdentityError

    service = IdentityService(
        opts.ca_dir,
        verifier=verifier,
        workload_lifetime=dt.timedelta(seconds=opts.cert_lifetime),
        reload_interval=opts.ca_reload_interval,
    )
    try:
        service.load()
    except IdentityError as e:  # names files, never key bytes
        raise OptionError(f"--ca-dir {opts.ca_dir}: {e}") from None
    if verifier is None:
        log.warning("--ca-dir without --token-key: only sidecars that hold a certificate can join")
    return service


def _load_verifier(path: str | None) -> TokenVerifier | None:
    if path is None:
        return None
    from lepton_mesh.control.auth import TokenVerifier

    return TokenVerifier.from_key_file(path)


async def run_control(args: argparse.Namespace) -> int:
    """Run one replica until SIGTERM or SIGINT; 0 after a clean stop."""
    opts = options_from_args(args)
    daemon = ControlDaemon(opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        ctx = await daemon.start()
        if ctx.identity is not None:
            loop.add_signal_handler(signal.SIGHUP, ctx.identity.reload)
        admin = f"{opts.admin[0]}:{daemon.admin_port}" if opts.admin else "off"
        tls = ""
        if ctx.identity is not None:
            tls = f", sidecar streams TLS (trust domain {ctx.identity.trust_domain})"
        print(
            f"lepton-mesh control {ctx.replica_id}: sidecars on {opts.listen[0]}:{daemon.listen_port}, "
            f"admin on {admin}, etcd {','.join(opts.etcd)}{tls}",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        log.info("stopping: closing sidecar streams and revoking their leases")
        await daemon.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await daemon.stop()
    return 0


# --- flags ---------------------------------------------------------------------

# flag -> (environment variable, metavar, help); each flag can come from its LEPTON_* variable.
_FLAGS: dict[str, tuple[str, str, str]] = {
    "--etcd": ("LEPTON_ETCD", "URL[,URL]", "etcd endpoints (host:port or http[s]://host:port)"),
    "--etcd-ca": ("LEPTON_ETCD_CA", "FILE", "CA bundle to verify etcd with (turns TLS on)"),
    "--etcd-cert": ("LEPTON_ETCD_CERT", "FILE", "client certificate for etcd"),
    "--etcd-key": ("LEPTON_ETCD_KEY", "FILE", "client key for etcd"),
    "--etcd-user": ("LEPTON_ETCD_USER", "USER", "etcd username"),
    "--etcd-password": ("LEPTON_ETCD_PASSWORD", "PASSWORD", "etcd password"),
    "--listen": ("LEPTON_LISTEN", "HOST:PORT", "sidecar-facing address (0.0.0.0:15010)"),
    "--admin": ("LEPTON_ADMIN", "HOST:PORT", "admin API address (127.0.0.1:15011)"),
    "--token-key": ("LEPTON_TOKEN_KEY", "FILE", "EC P-256 key (PEM) for admin tokens"),
    "--history-depth": ("LEPTON_HISTORY_DEPTH", "N", "policy history records kept (1000)"),
    "--lease-ttl": ("LEPTON_LEASE_TTL", "SECONDS", "a dead replica's sidecars expire after (10)"),
    "--id": ("LEPTON_ID", "NAME", "this replica's name (host name and a random suffix)"),
    "--ca-dir": (
        "LEPTON_CA_DIR",
        "DIR",
        "CA directory (ca-cert.pem, ca-key.pem, bundle.pem): TLS streams, workload certificates",
    ),
    "--cert-lifetime": ("LEPTON_CERT_LIFETIME", "DURATION", "workload certificates live (24h)"),
}


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, (env, metavar, help_text) in _FLAGS.items():
        parser.add_argument(
            flag, default=os.environ.get(env), metavar=metavar, help=f"{help_text} [${env}]"
        )


def options_from_args(args: argparse.Namespace) -> ControlOptions:
    """Check and convert the flags; raises OptionError naming the flag."""
    if not args.etcd:
        raise OptionError("--etcd (or LEPTON_ETCD) is required: etcd endpoints, comma-separated")
    endpoints = tuple(e.strip() for e in args.etcd.split(",") if e.strip())
    for endpoint in endpoints:
        _check_etcd_endpoint(endpoint)
    kwargs: dict[str, Any] = {
        "etcd": endpoints,
        "etcd_ca": args.etcd_ca,
        "etcd_cert": args.etcd_cert,
        "etcd_key": args.etcd_key,
        "etcd_user": args.etcd_user,
        "etcd_password": args.etcd_password,
        "token_key": args.token_key,
        "ca_dir": args.ca_dir,
    }
    if args.listen:
        kwargs["listen"] = parse_address(args.listen, "--listen")
    if args.admin:
        kwargs["admin"] = parse_address(args.admin, "--admin")
    if args.history_depth:
        kwargs["history_depth"] = _positive_int(args.history_depth, "--history-depth")
    if args.lease_ttl:
        kwargs["lease_ttl"] = _positive_int(args.lease_ttl, "--lease-ttl")
    if args.id:
        kwargs["replica_id"] = args.id
    if args.cert_lifetime:
        kwargs["cert_lifetime"] = _duration(args.cert_lifetime, "--cert-lifetime")
    if (args.etcd_cert is None) != (args.etcd_key is None):
        raise OptionError("--etcd-cert and --etcd-key go together")
    return ControlOptions(**kwargs)


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise OptionError(f"{flag} {text!r}: expected host:port")
    return host.strip("[]"), int(port)


def _check_etcd_endpoint(endpoint: str) -> None:
    """Refuse what the store would fail on only when it connects (as a traceback)."""
    from lepton_mesh.policy.endpoint_fields import base_url

    _, why = base_url(endpoint)
    if why:
        raise OptionError(
            f"--etcd: invalid URL {endpoint!r}: {why}; expected host:port or http[s]://host:port"
        )


def _duration(text: str, flag: str) -> float:
    from lepton_mesh.policy.fields import to_seconds

    seconds = to_seconds(text)
    if seconds is None or seconds <= 0:
        raise OptionError(f"{flag} {text!r}: expected a duration like 12h or 3600")
    return float(seconds)


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise OptionError(f"{flag} {text!r}: expected a positive integer")
    return value
