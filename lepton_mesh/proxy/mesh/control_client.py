"""The sidecar's side of the control stream (docs/control-plane.md, protocol 1).

One connection at a time to one of `control.addresses`, carried by a thin
asyncio Protocol over the `meshproto` codec. What the client promises:

- Connecting: the addresses are tried in turn, each attempt on the next
  one. Between attempts the delay is exponential with full jitter:
  uniform in [0, min(5 s, 0.1 s * 2**failures)), so a thousand sidecars
  that lose one control replica do not all come back in the same instant.
  The failure count resets when a control replica says Welcome. The delay
  is a loop timer; an attempt is one short task (connecting is a
  coroutine) bounded by `connect_timeout`.
- The stream: Hello first (node id, service, namespace, instance,
  dependencies, the version applied so far); the control must answer
  Welcome before anything else. After it: Ping every `ping_interval`, and a
  connection on which no byte arrived for `silence_timeout` is dead. Any
  message out of order, a protocol error, or an `error` from control closes
  the connection (answering `error` where it can) and counts as a failure.
- Snapshots: each one becomes a new `SidecarConfig`: the file's config with
  `services` replaced (a tcp service keeps the local `listen` the file gives
  it) and `policies` replaced, validated by `sidecar_config_from_mapping`,
  the same code that validates a file. Valid: swapped into the sidecar in
  one assignment, answered Ack, and written to
  `state_dir/last-known-good.json` (temp file, fsync, rename, in a worker
  thread so the loop never waits on the disk). Invalid: answered Nack with
  every problem, and the config in use stays. A tcp service the file has no
  `listen` for cannot be served (there is no local port for the app to dial):
  it is left out and named in `skipped_services`, not Nacked, so one
  unusable service does not block every other update.
- Last-known-good: at start, a valid `last-known-good.json` is applied at
  once (its version goes in Hello) but the sidecar only reports ready from
  it if no snapshot was applied within `lkg_wait`; then it serves from it
  and keeps trying to connect.
- Health and drain: `Health` is sent when the local app's health changes,
  and again after each Welcome (a new replica has not heard it); `Draining`
  when the sidecar starts draining, and again after a Welcome while it is.
- TLS (`control.ca_bundle`): the stream is TLS and the control daemon must
  present `spiffe://<td>/ns/lepton-system/svc/control` under those roots
  (checked before Hello is sent). Until the sidecar holds a certificate it
  sends a join token (`control.token_file`, else $LEPTON_JOIN_TOKEN) in Hello
  and presents no client certificate; once it holds one, the stream is mTLS
  with it and no token is sent. An attempt presenting the certificate that
  ends before Welcome is followed by one with the token (a certificate the
  control no longer trusts must not lock the sidecar out).
- Identity (`tls.source: control`): an `IdentityClient` makes the key, sends
  CSRs and installs certificates through `sidecar.identity.reload`
  (proxy/mesh/identity_client.py). The sidecar is ready only once it has both a
  config and a certificate.

Snapshot versions are applied as they come, a lower one included: a
snapshot is the complete state the replica serves now, and versions only
go down when a replica lags, which the next snapshot repairs.

Importing this module loads neither the config loader nor `cryptography`:
every sidecar imports it, only one with `control:` uses it. The loader is
imported by the config builder (once per client, once per snapshot), the
identity client (`cryptography`) only with `tls.source: control`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from lepton_mesh import meshproto as mp
from lepton_mesh.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from lepton_mesh.identity.tls_contexts import client_context_without_certificate
from lepton_mesh.policy.endpoints import PLAINTEXT_LABEL, PLAINTEXT_VALUE
from lepton_mesh.policy.errors import ConfigError, Problem
from lepton_mesh.policy.sidecar_config import Address, SidecarConfig
from lepton_mesh.proxy.mesh.health_check import HealthChecker
from lepton_mesh.proxy.security.tls import PeerIdentityError, client_context, verify_peer_identity
from lepton_mesh.proxy.timers import Deadline

if TYPE_CHECKING:
    from lepton_mesh.proxy.mesh.identity_client import IdentityClient

__all__ = [
    "LKG_FILE",
    "ControlClient",
    "ControlTiming",
    "backoff_delay",
    "read_last_known_good",
    "write_atomic",
]

log = logging.getLogger(__name__)

LKG_FILE = "last-known-good.json"
LKG_FORMAT = 1
JOIN_TOKEN_ENV = "LEPTON_JOIN_TOKEN"


@dataclass(frozen=True, slots=True)
class ControlTiming:
    """The stream's clocks, in seconds. The defaults are the documented ones; tests shrink them."""

    backoff_base: float = 0.1
    backoff_max: float = 5.0
    connect_timeout: float = 2.0
    ping_interval: float = 5.0
    silence_timeout: float = 15.0
    lkg_wait: float = 1.5

    def __post_init__(self) -> None:
        if not 0 < self.backoff_base <= self.backoff_max:
            raise ValueError("need 0 < backoff_base <= backoff_max")
        if not 0 < self.ping_interval < self.silence_timeout:
            raise ValueError("need 0 < ping_interval < silence_timeout")


# backoff_delay's exponent stops growing here: this many failures is backoff_max.
_LONGEST_BACKOFF = 32


def backoff_delay(failures: int, timing: ControlTiming, rng: Callable[[], float]) -> float:
    """Full jitter: `rng()` (uniform in [0, 1)) times min(max, base * 2**failures)."""
    cap = min(timing.backoff_max, timing.backoff_base * 2 ** min(failures, _LONGEST_BACKOFF))
    return cap * rng()


class IdentityHook(Protocol):
    """The data plane's TLS state (`proxy.security.mtls.MeshIdentity`): `reload` swaps in
    a certificate chain, key and bundle, or raises and keeps what it had."""

    def reload(self, cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> Any: ...


class SidecarHooks(Protocol):
    """What the client needs from the sidecar (`proxy.sidecar.Sidecar`)."""

    ready: bool
    draining: bool
    addresses: dict[str, Address]
    identity: IdentityHook | None  # with `tls.source: control`, present before any certificate

    def swap_config(self, cfg: SidecarConfig) -> None: ...


class _Rejected(Exception):
    """A last-known-good file that cannot be used; the message says why."""


# --- building a config from a snapshot ------------------------------------------------


def _dialable(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


class _ConfigBuilder:
    """The file's config with a snapshot's `services` and `policies`, validated as a file is."""

    __slots__ = ("_base", "_base_json")

    def __init__(self, base: SidecarConfig) -> None:
        from lepton_mesh.policy.sidecar_loader import sidecar_config_to_json

        self._base = base
        data = sidecar_config_to_json(base)
        for key in ("source", "services", "policies"):
            data.pop(key, None)
        self._base_json = data

    def build(self, snap: mp.Snapshot, source: str) -> tuple[SidecarConfig, tuple[str, ...]]:
        """(config, tcp services left out). Raises `ConfigError` naming every problem."""
        from lepton_mesh.policy.sidecar_loader import sidecar_config_from_mapping

        services: dict[str, Any] = {}
        skipped: list[str] = []
        for name, svc in snap.services.items():
            if svc.get("protocol") == "tcp":
                local = self._base.services.get(name)
                if local is None or local.listen is None:
                    skipped.append(name)
                    continue
                svc = {**svc, "listen": str(local.listen)}
            services[name] = svc
        data = {**self._base_json, "services": services, "policies": list(snap.policies)}
        return sidecar_config_from_mapping(data, source), tuple(skipped)


def _read_config_file(cfg: SidecarConfig, field: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(
            [Problem(cfg.source, None, field, f"cannot read {path}: {e.strerror}")]
        ) from None


# --- last-known-good on disk --------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new one, whole.

    Temp file in the same folder, fsync, rename, fsync the folder (so the
    rename itself survives a crash). Mode 0600: snapshots are config, and
    will carry more once the mTLS work lands.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _lkg_bytes(snap: mp.Snapshot, service: str, namespace: str, control_id: str | None) -> bytes:
    doc = {
        "format": LKG_FORMAT,
        "service": service,
        "namespace": namespace,
        "control_id": control_id,
        "saved_at": time.time(),
        "snapshot": mp.message_to_json(snap),
    }
    return orjson.dumps(doc, default=_default, option=orjson.OPT_INDENT_2)


def read_last_known_good(path: str, service: str, namespace: str) -> mp.Snapshot | None:
    """The snapshot saved at `path`; None if there is no file. Raises `_Rejected`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _Rejected(f"cannot read it: {e.strerror or e}") from None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _Rejected(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != LKG_FORMAT:
        raise _Rejected(f"not a format {LKG_FORMAT} last-known-good file")
    if (doc.get("service"), doc.get("namespace")) != (service, namespace):
        raise _Rejected(
            f"saved for service {doc.get('service')!r} in namespace {doc.get('namespace')!r}, "
            f"not {service!r} in {namespace!r}"
        )
    try:
        snap = mp.message_from_json(doc.get("snapshot"))
    except mp.ProtocolError as e:
        raise _Rejected(f"invalid snapshot: {e.detail}") from None
    if not isinstance(snap, mp.Snapshot):
        raise _Rejected("'snapshot' holds no snapshot")
    return snap


# --- the client ------------------------------------------------------------------------


class ControlClient:
    """Keeps this sidecar fed by the control daemon. Create it, then `start()` on the loop."""

    def __init__(
        self,
        sidecar: SidecarHooks,
        cfg: SidecarConfig,
        *,
        timing: ControlTiming | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if cfg.control is None:
            raise ValueError("ControlClient needs a config with a `control` section")
        self.sidecar = sidecar
        self.cfg = cfg  # the file's config: the base of every snapshot
        self.timing = timing or ControlTiming()
        self._rng = rng
        self._builder = _ConfigBuilder(cfg)
        self.node_id = cfg.instance.id or f"{cfg.service}-{secrets.token_hex(4)}"
        state_dir = cfg.control.state_dir
        self.lkg_path = os.path.join(state_dir, LKG_FILE) if state_dir else None

        # TLS and identity. The control CA bundle is read once, here: a file
        # that cannot be read stops the sidecar before it serves anything.
        ca_bundle = cfg.control.ca_bundle
        self._control_ca = (
            _read_config_file(cfg, "control.ca_bundle", ca_bundle) if ca_bundle else None
        )
        trust_domain = cfg.tls.trust_domain if cfg.tls is not None else DEFAULT_TRUST_DOMAIN
        self.control_identity = SpiffeId(trust_domain, mp.CONTROL_NAMESPACE, mp.CONTROL_SERVICE)
        self.identity: IdentityClient | None = None
        if cfg.tls is not None and cfg.tls.source == "control":
            from lepton_mesh.proxy.mesh.identity_client import IdentityClient

            self.identity = IdentityClient(
                SpiffeId(trust_domain, cfg.namespace, cfg.service),
                self._install_credentials,
                on_installed=self._update_ready,
            )
        self._config_ready = False  # a snapshot (or last-known-good) is applied
        self._mtls: tuple[bytes, ssl.SSLContext] | None = None  # (chain, context) cache
        self._skip_cert = False  # the last attempt with our certificate ended before Welcome

        # Status, for /ready and /config.
        self.applied_version = 0
        self.connected = False  # a replica answered Welcome on the current connection
        self.control_id: str | None = None
        self.address: Address | None = None  # of the current (or last) connection
        self.last_error: str | None = None
        self.last_nack: tuple[int, str] | None = None
        self.from_last_known_good = False  # serving the saved snapshot, not a pushed one
        self.skipped_services: tuple[str, ...] = ()
        self.persisted_version = 0
        self.app_health: tuple[bool, str] | None = None
        self.rtt: float | None = None  # seconds, from the last Pong
        self.next_delay = 0.0  # the last backoff delay chosen (for tests and /config)

        # Connection state.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: _Stream | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._next_address = 0
        self._failures = 0
        self._closed = False

        # Boot and side jobs.
        self._lkg_timer: asyncio.TimerHandle | None = None
        self._health: HealthChecker | None = None
        self._writing: asyncio.Future[None] | None = None
        self._unwritten: mp.Snapshot | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Load last-known-good, start health checks, connect. Call after the sidecar bound."""
        loop = self._loop = asyncio.get_running_loop()
        if self._load_last_known_good():
            self._lkg_timer = loop.call_later(self.timing.lkg_wait, self._boot_from_lkg)
        hc = self.cfg.health_check
        if hc is not None:
            self._health = HealthChecker(loop, self.cfg.app, hc, self._on_app_health)
            self._health.start()
        self._connect()

    async def aclose(self) -> None:
        """Stop everything; wait for a last-known-good write in progress."""
        self._closed = True
        for handle in (self._retry, self._lkg_timer):
            if handle is not None:
                handle.cancel()
        self._retry = self._lkg_timer = None
        if self._health is not None:
            self._health.stop()
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.wait([self._connecting])  # never raises: our own cancel is expected
        if self._stream is not None:
            self._stream.abort()
        if self.identity is not None:
            self.identity.close()
        while (writing := self._writing) is not None:
            if writing.done():
                # Finished, but `_written` (which clears it, or starts the next
                # write) has not run yet. Awaiting a finished future does not
                # yield, so without this the loop would spin here forever.
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(Exception):
                await asyncio.shield(writing)

    # -- what the sidecar calls ----------------------------------------------------------

    def send_draining(self) -> None:
        """The sidecar started draining: tell control first, so callers stop sending."""
        if self._stream is not None and self._stream.welcomed:
            self._stream.send(mp.Draining())

    def not_ready_reason(self) -> str:
        if self._config_ready and self.identity is not None and not self.identity.has_certificate:
            return self.identity.not_ready_reason()
        why = "waiting for the first snapshot from control"
        return f"{why} (last error: {self.last_error})" if self.last_error else why

    def status_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "connected": self.connected,
            "control_id": self.control_id,
            "address": str(self.address) if self.address else None,
            "applied_version": self.applied_version,
            "persisted_version": self.persisted_version,
            "from_last_known_good": self.from_last_known_good,
            "last_error": self.last_error,
            "last_nack": (
                {"version": self.last_nack[0], "error": self.last_nack[1]}
                if self.last_nack
                else None
            ),
            "skipped_services": list(self.skipped_services),
            "app_health": (
                {"healthy": self.app_health[0], "detail": self.app_health[1]}
                if self.app_health
                else None
            ),
            "rtt_ms": round(self.rtt * 1000, 3) if self.rtt is not None else None,
            "tls": self._control_ca is not None,
            "identity": self.identity.status_json() if self.identity is not None else None,
        }

    # -- connecting ----------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if self._closed:
            return
        addresses = self.cfg.control.addresses  # type: ignore[union-attr]
        address = addresses[self._next_address]
        self._next_address = (self._next_address + 1) % len(addresses)
        self._connecting = self._loop.create_task(self._open(address))  # type: ignore[union-attr]

    async def _open(self, address: Address) -> None:
        loop = self._loop
        assert loop is not None
        self.address = address
        made: list[_Stream] = []
        try:
            ctx, with_cert = self._stream_tls()
        except (ssl.SSLError, ValueError) as e:  # e.g. a ca_bundle file rewritten with junk
            self._connecting = None
            self._failed(f"cannot set up TLS to control at {address}: {e}")
            return

        def factory() -> _Stream:
            made.append(_Stream(self, address, with_cert))
            return made[-1]

        try:
            async with asyncio.timeout(self.timing.connect_timeout):
                await loop.create_connection(factory, address.host, address.port, ssl=ctx)
        except (OSError, TimeoutError) as e:
            self._skip_cert = with_cert  # refused our certificate? next time, the token
            self._connecting = None
            if made:
                made[-1].abort()
            why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            self._failed(f"cannot connect to control at {address}: {why}")
            return
        self._connecting = None
        if self._stream is None:  # lost before create_connection returned
            self._schedule_retry()

    def _stream_tls(self) -> tuple[ssl.SSLContext | None, bool]:
        """(context, presents our certificate) for the next connection."""
        if self._control_ca is None:
            return None, False
        creds = self.identity.credentials() if self.identity is not None else None
        if creds is None or self._skip_cert or not self.identity.usable():  # type: ignore[union-attr]
            # No certificate (yet, or one control refused): authenticate control only,
            # with the roots we were last given and those in the file (re-read: an
            # operator recovers a sidecar whose roots are all gone by replacing it).
            return client_context_without_certificate(self._bootstrap_roots(creds)), False
        chain, key, bundle = creds
        if self._mtls is None or self._mtls[0] != chain:
            self._mtls = (chain, client_context(chain, key, bundle))
        return self._mtls[1], True

    def _bootstrap_roots(self, creds: tuple[bytes, bytes, bytes] | None) -> bytes:
        assert self.cfg.control is not None and self.cfg.control.ca_bundle is not None
        with contextlib.suppress(OSError), open(self.cfg.control.ca_bundle, "rb") as f:
            self._control_ca = f.read()
        file_roots = self._control_ca or b""
        return creds[2] + b"\n" + file_roots if creds is not None else file_roots

    def _join_token(self) -> str | None:
        """The join token: `control.token_file` (read each time: it may be replaced),
        else $LEPTON_JOIN_TOKEN."""
        path = self.cfg.control.token_file  # type: ignore[union-attr]
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    return f.read().strip() or None
            except OSError as e:
                self.last_error = f"cannot read the join token {path}: {e.strerror}"
                return None
        return os.environ.get(JOIN_TOKEN_ENV) or None

    def _install_credentials(self, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> None:
        identity = self.sidecar.identity
        if identity is None:
            raise RuntimeError("this sidecar has no TLS identity to install a certificate into")
        identity.reload(chain_pem, key_pem, bundle_pem)
        self._skip_cert = False  # a new certificate: present it from the next connection on

    def _update_ready(self) -> None:
        """Ready once a config is in place and, with `tls.source: control`, a certificate."""
        if self._config_ready and (self.identity is None or self.identity.has_certificate):
            self.sidecar.ready = True

    def _failed(self, error: str) -> None:
        if error != self.last_error:  # one line per new problem, not one per retry
            log.warning("lepton-mesh sidecar %s: %s", self.cfg.service, error)
        self.last_error = error
        self._failures += 1
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        busy = self._retry or self._connecting or self._stream
        if self._closed or busy is not None:
            return
        self.next_delay = backoff_delay(self._failures, self.timing, self._rng)
        self._retry = self._loop.call_later(self.next_delay, self._connect)  # type: ignore[union-attr]

    # -- stream events (called by _Stream) -------------------------------------------------

    def _on_connected(self, stream: _Stream) -> None:
        self._stream = stream
        if self._control_ca is not None and not self._control_verified(stream):
            return
        # A token only over TLS (never in plaintext), and only until we hold a certificate.
        token = self._control_ca is not None and not stream.with_cert
        stream.send(self._hello(token=token))

    def _control_verified(self, stream: _Stream) -> bool:
        """The TLS peer is the control daemon (not merely someone the bundle trusts)."""
        assert stream.transport is not None
        try:
            verify_peer_identity(
                stream.transport.get_extra_info("ssl_object"), self.control_identity
            )
        except PeerIdentityError as e:
            stream.abort(f"control at {stream.address} is not the control daemon: {e}")
            return False
        return True

    def _hello(self, *, token: bool = False) -> mp.Hello:
        cfg = self.cfg
        inbound = self.sidecar.addresses.get("inbound", cfg.listeners.inbound)
        inst = cfg.instance
        ports = {"http": inbound.port}
        labels = dict(inst.labels)
        tls = cfg.tls
        if tls is None or tls.mode == "DISABLE":
            # No mTLS on our inbound port: callers that use mTLS must speak
            # plaintext to us, or they would fail every call.
            labels[PLAINTEXT_LABEL] = PLAINTEXT_VALUE
        elif tls.tcp_app is not None:
            # L4 tunnels from peer sidecars arrive on the same (mTLS) inbound port.
            ports["tcp"] = inbound.port
        return mp.Hello(
            node_id=self.node_id,
            service=cfg.service,
            namespace=cfg.namespace,
            instance=mp.Instance(
                address=inst.address or _dialable(inbound.host),
                ports=ports,
                labels=labels,
                weight=inst.weight,
            ),
            dependencies=cfg.dependencies,
            applied_version=self.applied_version,
            token=self._join_token() if token else None,
        )

    def _on_lost(self, stream: _Stream, error: str | None) -> None:
        if stream is not self._stream:
            return
        self._stream = None
        self.connected = False
        if self.identity is not None:
            self.identity.disconnected()
        # Refused our certificate? Next time, the token (and after that, the certificate again).
        self._skip_cert = stream.with_cert and not stream.welcomed
        if self._closed:
            return
        if error is not None:
            self._failed(error)
        else:
            what = "closed the stream" if stream.welcomed else "closed the stream before Welcome"
            self._failed(f"control at {stream.address} {what}")

    def _on_welcome(self, stream: _Stream, msg: mp.Welcome) -> None:
        if msg.protocol != mp.PROTOCOL_VERSION:
            stream.fail(
                mp.Reason.UNSUPPORTED_VERSION,
                f"control speaks protocol {msg.protocol}, this sidecar {mp.PROTOCOL_VERSION}",
            )
            return
        self.connected = True
        self.control_id = msg.control_id
        self._failures = 0
        log.info(
            "lepton-mesh sidecar %s: connected to control %s", self.cfg.service, stream.address
        )
        if self.app_health is not None:
            stream.send(mp.Health(*self.app_health))
        if self.sidecar.draining:
            stream.send(mp.Draining())
        if self.identity is not None:
            self.identity.connected(stream.send)

    def _on_snapshot(self, stream: _Stream, msg: mp.Snapshot) -> None:
        try:
            cfg, skipped = self._builder.build(msg, f"snapshot {msg.version}")
            self.sidecar.swap_config(cfg)
        except ConfigError as e:
            self._reject(stream, msg.version, str(e))
            return
        except Exception as e:  # a bug in building the running snapshot: keep the old one
            log.exception("applying snapshot %d failed", msg.version)
            self._reject(stream, msg.version, f"snapshot {msg.version}: internal error: {e!r}")
            return
        self._applied(msg.version, skipped)
        stream.send(mp.Ack(msg.version))
        self._persist(msg)

    def _reject(self, stream: _Stream, version: int, error: str) -> None:
        self.last_nack = (version, error)
        self.last_error = f"snapshot {version} rejected"
        log.warning("lepton-mesh sidecar %s: %s:\n%s", self.cfg.service, self.last_error, error)
        stream.send(mp.Nack(version, error))

    def _applied(self, version: int, skipped: tuple[str, ...]) -> None:
        self.applied_version = version
        self.from_last_known_good = False
        if skipped and skipped != self.skipped_services:
            log.warning(
                "lepton-mesh sidecar %s: tcp services %s left out: this sidecar's config "
                "gives them no local 'listen' address",
                self.cfg.service,
                ", ".join(skipped),
            )
        self.skipped_services = skipped
        if self._lkg_timer is not None:
            self._lkg_timer.cancel()
            self._lkg_timer = None
        self._config_ready = True
        self._update_ready()

    def _on_identity(self, stream: _Stream, msg: mp.Certificate | mp.Trust) -> None:
        if self.identity is None:
            return  # not `tls.source: control`: a certificate is none of our business
        if isinstance(msg, mp.Certificate):
            self.identity.on_certificate(msg)
        else:
            self.identity.on_trust(msg)

    def _on_pong(self, msg: mp.Pong) -> None:
        self.rtt = max(0.0, time.time() - msg.time)

    def _on_error(self, stream: _Stream, msg: mp.Error) -> None:
        detail = f": {msg.detail}" if msg.detail else ""
        if msg.reason == mp.Reason.SUPERSEDED:
            # A stream we still read was replaced by a newer one with our node_id:
            # not our own earlier stream (we drop those before reconnecting), so
            # another sidecar uses the same id. Each reconnect would take its place
            # and it ours: wait the longest delay, so that the fight costs the
            # control a takeover every few seconds rather than several a second.
            self._failures = max(self._failures, _LONGEST_BACKOFF)
            detail += (
                f" (node_id {self.node_id!r}: does another sidecar have the same instance.id?)"
            )
        stream.abort(f"control at {stream.address} ended the stream: {msg.reason}{detail}")

    # -- health ------------------------------------------------------------------------------

    def _on_app_health(self, healthy: bool, detail: str) -> None:
        self.app_health = (healthy, detail)
        state = "healthy" if healthy else "unhealthy"
        log.warning("lepton-mesh sidecar %s: app is %s (%s)", self.cfg.service, state, detail)
        if self._stream is not None and self._stream.welcomed:
            self._stream.send(mp.Health(healthy, detail))

    # -- last-known-good ---------------------------------------------------------------------

    def _load_last_known_good(self) -> bool:
        """Apply the saved snapshot if there is a valid one (not ready yet). True if applied."""
        path = self.lkg_path
        if path is None:
            return False
        try:
            snap = read_last_known_good(path, self.cfg.service, self.cfg.namespace)
            if snap is None:
                return False
            cfg, skipped = self._builder.build(snap, f"{path} (snapshot {snap.version})")
        except (_Rejected, ConfigError) as e:
            self.last_error = f"last-known-good {path} ignored: {e}"
            log.warning("lepton-mesh sidecar %s: %s", self.cfg.service, self.last_error)
            return False
        self.sidecar.swap_config(cfg)
        self.applied_version = self.persisted_version = snap.version
        self.skipped_services = skipped
        return True

    def _boot_from_lkg(self) -> None:
        self._lkg_timer = None
        if self._config_ready:
            return
        self.from_last_known_good = True
        self._config_ready = True
        self._update_ready()
        log.warning(
            "lepton-mesh sidecar %s: no snapshot from control within %gs; serving "
            "last-known-good snapshot %d from %s",
            self.cfg.service,
            self.timing.lkg_wait,
            self.applied_version,
            self.lkg_path,
        )

    def _persist(self, snap: mp.Snapshot) -> None:
        """Queue `snap` for writing; only the newest waiting snapshot is kept."""
        if self.lkg_path is None:
            return
        self._unwritten = snap
        if self._writing is None:
            self._write_next()

    def _write_next(self) -> None:
        snap, self._unwritten = self._unwritten, None
        if snap is None or self.lkg_path is None:
            return
        data = (snap, self.cfg.service, self.cfg.namespace, self.control_id)
        # Encoding and the disk both happen in a worker thread; snapshots are never mutated.
        fut = self._loop.run_in_executor(None, _write_lkg, self.lkg_path, data)  # type: ignore[union-attr]
        self._writing = fut
        fut.add_done_callback(lambda f: self._written(f, snap.version))

    def _written(self, fut: asyncio.Future[None], version: int) -> None:
        self._writing = None
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            self.last_error = f"cannot write last-known-good {self.lkg_path}: {exc}"
            log.warning("lepton-mesh sidecar %s: %s", self.cfg.service, self.last_error)
        else:
            self.persisted_version = version
        self._write_next()


def _write_lkg(path: str, data: tuple[mp.Snapshot, str, str, str | None]) -> None:
    write_atomic(path, _lkg_bytes(*data))


# --- the connection ----------------------------------------------------------------------------


class _Stream(asyncio.Protocol):
    """One connection to a control replica: frames in, messages to the client.

    Per-connection state lives here (decoder, Welcome seen, timers); the
    client keeps what outlives connections. `data_received` never awaits.
    """

    __slots__ = (
        "_error",
        "_ping",
        "_silence",
        "address",
        "client",
        "decoder",
        "transport",
        "welcomed",
        "with_cert",
    )

    def __init__(self, client: ControlClient, address: Address, with_cert: bool = False) -> None:
        self.client = client
        self.address = address
        self.with_cert = with_cert  # TLS presenting our workload certificate
        self.decoder = mp.FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.welcomed = False
        self._ping: asyncio.TimerHandle | None = None
        self._silence: Deadline | None = None
        self._error: str | None = None  # why we closed it, when we did

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self._silence = Deadline(loop, self._silent)
        self._silence.arm(self.client.timing.silence_timeout)
        self.client._on_connected(self)

    def data_received(self, data: bytes) -> None:
        if self._silence is not None:
            self._silence.arm(self.client.timing.silence_timeout)
        self.decoder.feed(data)
        try:
            while self.transport is not None and (msg := self.decoder.next_message()) is not None:
                self._dispatch(msg)
        except mp.ProtocolError as e:
            self.fail(e.reason, e.detail)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        error = self._error
        if error is None and exc is not None:
            when = "" if self.welcomed else " before Welcome"
            error = f"connection to control at {self.address} lost{when}: {exc}"
        self.transport = None
        self.client._on_lost(self, error)

    # -- messages -------------------------------------------------------------------------------

    def _dispatch(self, msg: mp.Message) -> None:
        client = self.client
        if isinstance(msg, mp.Unknown):
            return  # forward compatibility: a newer control's extras
        if isinstance(msg, mp.Error):
            client._on_error(self, msg)
        elif not self.welcomed:
            if not isinstance(msg, mp.Welcome):
                self._unexpected(msg, "before welcome")
                return
            self.welcomed = True
            client._on_welcome(self, msg)
            if self.transport is not None:
                self._arm_ping()
        elif isinstance(msg, mp.Snapshot):
            client._on_snapshot(self, msg)
        elif isinstance(msg, (mp.Certificate, mp.Trust)):
            client._on_identity(self, msg)
        elif isinstance(msg, mp.Pong):
            client._on_pong(msg)
        else:
            self._unexpected(msg, "from control")

    def _unexpected(self, msg: mp.Message, when: str) -> None:
        self.fail(mp.Reason.UNEXPECTED_MESSAGE, f"unexpected {mp.msg_type(msg)} message {when}")

    def send(self, msg: mp.Message) -> bool:
        """Write `msg`; False if the connection is closed or closing."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(mp.encode(msg))
        return True

    def fail(self, reason: str, detail: str) -> None:
        """Tell control what went wrong, then close: the stream is no longer usable."""
        self.send(mp.Error(reason, detail))
        self.abort(f"protocol error on the stream to control at {self.address}: {reason}: {detail}")

    def abort(self, error: str | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error
        if self.transport is not None:
            self.transport.close()  # flushes an Error frame first; connection_lost follows

    # -- timers --------------------------------------------------------------------------------

    def _arm_ping(self) -> None:
        loop = asyncio.get_running_loop()
        self._ping = loop.call_later(self.client.timing.ping_interval, self._send_ping)

    def _send_ping(self) -> None:
        self._ping = None
        if self.transport is None:
            return
        self.send(mp.Ping(time.time()))
        self._arm_ping()

    def _silent(self) -> None:
        self.abort(
            f"control at {self.address} sent nothing for {self.client.timing.silence_timeout:g}s"
        )
        if self.transport is not None:
            self.transport.abort()  # a silent peer may also not be reading: don't wait on it

    def _stop_timers(self) -> None:
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None
        if self._silence is not None:
            self._silence.cancel()
