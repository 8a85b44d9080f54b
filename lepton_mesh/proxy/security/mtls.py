"""The sidecar's mTLS state: identity, contexts, reload, handshake accounting,
the inbound accept path, outbound connection checks, and the memory mitigation.

The primitives (contexts, peer identity, session caches, failure reasons,
PERMISSIVE sniffing) are in proxy/security/tls.py; this module is what one running
sidecar keeps and does with them:

- `MeshIdentity`: who this sidecar is, its current `Credentials` (the contexts
  and session caches built from one certificate chain, key and bundle),
  `reload()` to replace them, and the counters behind the TLS metrics.
- `TlsAcceptor`: an inbound listening socket in STRICT or PERMISSIVE mode.
  It accepts with `sock_accept` + `connect_accepted_socket(ssl=...)` so that
  each failed handshake is seen, classified, counted and logged with the
  peer's address (`create_server(ssl=...)` would swallow them). In STRICT
  mode plaintext HTTP is answered `400` with reason `mtls_required` rather
  than cut by a failed handshake (the same `PeekTLS` peek as PERMISSIVE).
- `InboundTls`: what a secured inbound connection learns from its handshake:
  the caller's workload (for metrics) and the `x-forwarded-client-cert`
  value for the app, or that it is an L4 tunnel (ALPN `lepton-tcp/1`).
- `open_mesh_connection`: outbound TLS for the pools (HTTP) and the TCP proxy
  (L4): connect, handshake with session resumption, check the peer's SPIFFE
  ID is the destination service's before any byte is sent.
- `MallocTrimmer`: glibc `malloc_trim(0)` at most once a second while TLS
  connections close (see "Memory" in docs/security.md).
- `plaintext_endpoints`: which endpoints are called without TLS.

Invariants:
- `MeshIdentity.current` is replaced in one assignment, and only after the new
  material was checked whole: the chain verifies against the new bundle now,
  its leaf names this sidecar's identity, the key matches. A connection keeps
  the contexts it started with, so nothing established is cut by a reload.
- Outbound, no request byte is written before the peer's certificate was
  found to name the service the caller meant (`verify_peer_identity`).
- Inbound in STRICT or PERMISSIVE mode, the caller is what its verified
  certificate says, never what a header says (`x-lepton-peer` is ignored),
  and only we set `x-forwarded-client-cert` (the downstream protocol drops
  any received one, on every listener).
- At most `max_handshakes` inbound connections are between accept and the
  end of their handshake; past that the listening socket is not read and the
  kernel backlog holds the rest, which bounds the memory handshakes take.
- Key material is never logged, never in /config, never kept outside the
  contexts (tls.py hands it to OpenSSL through a memfd).
- Importing this module loads no `cryptography` (~16 MB of RSS): the hot
  path needs only the constants, `InboundTls` and `open_mesh_connection`.
  `identity.bundle` (and with it `cryptography`) is imported by the code
  that builds or describes credentials, once per certificate or /config.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import hashlib
import logging
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from lepton_mesh.identity.errors import IdentityError, InvalidSpiffeId
from lepton_mesh.identity.file_stamp import files_stamp
from lepton_mesh.identity.spiffe import SpiffeId, spiffe_id_of_peercert
from lepton_mesh.policy.endpoints import PLAINTEXT_LABEL, PLAINTEXT_VALUE
from lepton_mesh.policy.errors import ConfigError, Problem
from lepton_mesh.proxy.errors import ProxyError, Reason, error_body
from lepton_mesh.proxy.http.http1 import error_response, new_request_id
from lepton_mesh.proxy.security.tls import (
    HandshakeFailure,
    PeekTLS,
    PeerIdentityError,
    SessionCache,
    classify_handshake_error,
    client_context,
    server_context,
    verify_peer_identity,
)

if TYPE_CHECKING:
    from cryptography import x509

    from lepton_mesh.identity.bundle import TrustBundle
    from lepton_mesh.policy.sidecar_config import Address, SidecarConfig, TlsConfig

log = logging.getLogger(__name__)

# ALPN protocol of an L4 tunnel between sidecars (docs/security.md, "TCP over mTLS").
TCP_ALPN = "lepton-tcp/1"
# Set by the inbound side for the app; dropped from every request we receive.
XFCC = b"x-forwarded-client-cert"
UPSTREAM_IDENTITY_MISMATCH = Reason.UPSTREAM_IDENTITY_MISMATCH
DEFAULT_MAX_HANDSHAKES = 256
# `tls.source: files`: how often the cert, key and bundle files are checked
# for a replacement (as the control daemon checks its CA files).
FILE_POLL_INTERVAL = 5.0
NO_CERT = "this sidecar has no certificate yet"

Side = Literal["inbound", "outbound"]


class TlsCredentialsError(IdentityError):
    """New TLS material was refused; the credentials in use stay."""

    reason = "tls_credentials_invalid"


class MeshTlsError(Exception):
    """An outbound connection's handshake failed or reached the wrong service.
    `reason` is a `HandshakeFailure` value; the connection is already closed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --- credentials ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """Everything built from one chain, key and bundle: swapped whole by `reload`.

    `http` and `tcp` are session caches over two client contexts (the L4 one
    offers ALPN `lepton-tcp/1`); `server` is the inbound context. No key
    material is kept here: it lives only inside the contexts.
    """

    identity: SpiffeId
    certificate: x509.Certificate
    bundle: TrustBundle
    server: ssl.SSLContext
    http: SessionCache
    tcp: SessionCache
    trust_generation: int

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


def build_credentials(
    chain_pem: bytes,
    key_pem: bytes,
    bundle_pem: bytes,
    expected: SpiffeId,
    *,
    accept_tcp: bool,
    trust_generation: int,
    now: dt.datetime | None = None,
) -> Credentials:
    """Check the material and build its contexts; TlsCredentialsError says what is wrong."""
    from lepton_mesh.identity.bundle import TrustBundle, load_certificates

    try:
        bundle = TrustBundle.from_pem(bundle_pem)
        chain = load_certificates(chain_pem, what="certificate chain")
        got = bundle.verify(chain, now=now)
    except IdentityError as exc:
        raise TlsCredentialsError(exc.detail) from None
    if got != expected:
        raise TlsCredentialsError(f"the certificate names {got}, but this sidecar is {expected}")
    try:
        server = server_context(chain_pem, key_pem, bundle_pem)
        http = client_context(chain_pem, key_pem, bundle_pem)
        tcp = client_context(chain_pem, key_pem, bundle_pem)
    except (ssl.SSLError, ValueError):
        # Never the exception text: OpenSSL's messages may quote the input.
        raise TlsCredentialsError(
            "the private key does not load or does not belong to the certificate"
        ) from None
    tcp.set_alpn_protocols([TCP_ALPN])
    if accept_tcp:
        server.set_alpn_protocols([TCP_ALPN])
    return Credentials(
        expected, chain[0], bundle, server, SessionCache(http), SessionCache(tcp), trust_generation
    )


# --- the memory mitigation ---------------------------------------------------------


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None off glibc (musl, macOS): then trimming is a no-op."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


class MallocTrimmer:
    """Give freed heap back to the OS at most once per `interval` while TLS
    connections close.

    Under TLS connection churn glibc keeps tens of MiB freed by OpenSSL and the
    SSL transports in its heap (measured in docs/security.md); `malloc_trim(0)`
    returns it in ~0.6 ms. A closing connection arms one loop timer if none is
    armed; when it fires, it trims once. No closes, no timer, no cost.
    """

    __slots__ = ("_handle", "_trim", "interval", "trims")

    def __init__(
        self, trim: Callable[[int], int] | None = _MALLOC_TRIM, *, interval: float = 1.0
    ) -> None:
        self._trim = trim
        self.interval = interval
        self._handle: asyncio.TimerHandle | None = None
        self.trims = 0

    @property
    def armed(self) -> bool:
        return self._handle is not None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def connection_closed(self) -> None:
        if self._handle is None and self._trim is not None:
            self._handle = asyncio.get_running_loop().call_later(self.interval, self._run)

    def _run(self) -> None:
        self._handle = None
        self.trims += 1
        self._trim(0)  # type: ignore[misc]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


# --- the sidecar's identity ----------------------------------------------------------


class MeshIdentity:
    """One sidecar's workload identity and TLS state; `sidecar.identity`."""

    def __init__(
        self,
        identity: SpiffeId,
        credentials: Credentials | None,
        *,
        mode: str = "STRICT",
        tcp_app: Address | None = None,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        trimmer: MallocTrimmer | None = None,
    ) -> None:
        self.id = identity
        # None until the first certificate is installed (`tls.source: control`):
        # until then TLS connections are refused both ways.
        self.current = credentials
        self.mode = mode
        self.tcp_app = tcp_app
        self.max_handshakes = max_handshakes
        self.trimmer = trimmer if trimmer is not None else MallocTrimmer()
        self.reloads = 0
        self.loaded_at = time.time()
        # Told after a reload that changed the bundle (the pools close idle
        # connections verified under the old one).
        self.on_trust_change: Callable[[], None] | None = None
        self.failures: dict[str, int] = dict.fromkeys(HandshakeFailure.ALL, 0)
        self.handshakes: dict[tuple[str, bool], int] = {
            (side, resumed): 0 for side in ("inbound", "outbound") for resumed in (False, True)
        }
        self._peer_ids: dict[str, SpiffeId] = {}
        self.plaintext_accepted = 0  # PERMISSIVE: connections that came in plaintext
        # `tls.source: files`: (cert, key, bundle) paths, their stat stamp and
        # content digest when last looked at, and what went wrong loading them.
        self._files: tuple[str, str, str] | None = None
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        self._digest = b""
        self._file_error: str | None = None
        self._poll: asyncio.TimerHandle | None = None
        self.file_poll_interval = FILE_POLL_INTERVAL

    @classmethod
    def create(
        cls,
        chain_pem: bytes,
        key_pem: bytes,
        bundle_pem: bytes,
        *,
        trust_domain: str,
        namespace: str,
        service: str,
        mode: str = "STRICT",
        tcp_app: Address | None = None,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
    ) -> MeshIdentity:
        """From PEM bytes in memory (what a bootstrap over the control stream has)."""
        try:
            me = SpiffeId(trust_domain, namespace, service)
        except InvalidSpiffeId as exc:
            raise TlsCredentialsError(exc.detail) from None
        creds = build_credentials(
            chain_pem, key_pem, bundle_pem, me, accept_tcp=tcp_app is not None, trust_generation=1
        )
        return cls(me, creds, mode=mode, tcp_app=tcp_app, max_handshakes=max_handshakes)

    @classmethod
    def from_config(cls, cfg: SidecarConfig) -> MeshIdentity:
        """Read the files `cfg.tls` names; ConfigError names the field that is wrong.
        With `source: control` there are none: the identity waits for `reload`."""
        tls = cfg.tls
        assert tls is not None
        if tls.source == "control":
            try:
                me = SpiffeId(tls.trust_domain, cfg.namespace, cfg.service)
            except InvalidSpiffeId as exc:
                raise ConfigError.single(cfg.source, None, "tls", exc.detail) from None
            return cls(
                me, None, mode=tls.mode, tcp_app=tls.tcp_app, max_handshakes=tls.max_handshakes
            )
        paths = (tls.cert, tls.key, tls.bundle)
        stamp: tuple[tuple[int, int, int], ...] = ()
        with contextlib.suppress(OSError):  # then reading fails below, naming the field
            stamp = files_stamp(paths)
        pems = [_read_pem(cfg.source, field, path) for field, path in _files(tls)]
        try:
            me = cls.create(
                *pems,
                trust_domain=tls.trust_domain,
                namespace=cfg.namespace,
                service=cfg.service,
                mode=tls.mode,
                tcp_app=tls.tcp_app,
                max_handshakes=tls.max_handshakes,
            )
        except TlsCredentialsError as exc:
            raise ConfigError.single(cfg.source, None, "tls", exc.detail) from None
        me._files, me._stamp, me._digest = paths, stamp, _digest(pems)
        with contextlib.suppress(RuntimeError):  # no loop: made only to check the files
            me.watch()
        return me

    # -- files (`tls.source: files`) -------------------------------------------------

    def watch(self, interval: float | None = None) -> None:
        """Check the credential files every `interval` seconds (default
        FILE_POLL_INTERVAL) on the running loop; re-arms if already watching.
        Without files (`source: control`) it does nothing."""
        if self._files is None:
            return
        if interval is not None:
            self.file_poll_interval = interval
        if self._poll is not None:
            self._poll.cancel()
        self._poll = asyncio.get_running_loop().call_later(
            self.file_poll_interval, self._poll_files
        )

    def _poll_files(self) -> None:
        self._poll = None
        try:
            self.check_files()
        finally:
            self.watch()

    def check_files(self) -> bool:
        """Reload the cert, key and bundle files if they changed since last
        looked at (inode, size, mtime: a rename over them, as `certs` and
        secret mounts do, or a rewrite). True if new credentials are in use.
        Material that does not check out (a certificate replaced before its
        key) is logged once and the current credentials stay."""
        paths = self._files
        if paths is None:
            return False
        try:
            stamp = files_stamp(paths)
        except OSError as exc:
            self._file_problem(f"cannot stat the tls files: {exc.filename}: {exc.strerror}")
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            pems = []
            for path in paths:
                with open(path, "rb") as f:
                    pems.append(f.read())
        except OSError as exc:
            self._file_problem(f"cannot read {exc.filename}: {exc.strerror}")
            return False
        digest = _digest(pems)
        if digest == self._digest:
            self._file_error = None
            return False  # same certificate and bundle: no new contexts, no full handshakes
        try:
            self.reload(*pems)
        except TlsCredentialsError as exc:
            self._file_problem(
                f"tls files changed but do not load, keeping the current certificate: {exc.detail}"
            )
            return False
        self._digest = digest
        self._file_error = None
        return True

    def _file_problem(self, message: str) -> None:
        if message != self._file_error:  # once per distinct problem, not per poll
            log.warning("%s", message)
        self._file_error = message

    # -- reload --------------------------------------------------------------------

    def reload(self, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> Credentials:
        """Swap in a new certificate chain, key and bundle, all or nothing.

        New connections (both ways) use them from the next accept or connect;
        established ones keep theirs. A changed bundle also starts a new trust
        generation: pooled connections verified under the old bundle are
        closed when idle rather than reused. Raises TlsCredentialsError (the
        current credentials stay) if the material does not check out.
        """
        old = self.current
        creds = build_credentials(
            chain_pem,
            key_pem,
            bundle_pem,
            self.id,
            accept_tcp=self.tcp_app is not None,
            trust_generation=old.trust_generation + 1 if old is not None else 1,
        )
        same_trust = old is not None and creds.bundle.fingerprints() == old.bundle.fingerprints()
        if same_trust:
            creds = replace(creds, trust_generation=old.trust_generation)  # type: ignore[union-attr]
        self.current = creds
        self.reloads += 1
        self.loaded_at = time.time()
        log.info(
            "tls credentials reloaded: identity=%s serial=%x not_after=%s bundle_changed=%s",
            self.id,
            creds.certificate.serial_number,
            f"{creds.not_after:%Y-%m-%dT%H:%M:%SZ}",
            not same_trust,
        )
        if not same_trust and self.on_trust_change is not None:
            self.on_trust_change()
        return creds

    def trust_generation(self) -> int:
        """Bumped by each reload that changes the bundle (0: no certificate yet)."""
        creds = self.current
        return creds.trust_generation if creds is not None else 0

    # -- identities ----------------------------------------------------------------

    def peer_id(self, service: str) -> SpiffeId:
        """The identity a sidecar of `service` (in our namespace) must present."""
        sid = self._peer_ids.get(service)
        if sid is None:
            sid = self._peer_ids[service] = SpiffeId(
                self.id.trust_domain, self.id.namespace, service
            )
        return sid

    # -- accounting ----------------------------------------------------------------

    def handshake_done(self, side: Side, resumed: bool) -> None:
        self.handshakes[side, resumed] += 1

    def handshake_failed(self, side: Side, reason: str, peer: str, detail: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        log.warning(
            "tls handshake failed: side=%s peer=%s reason=%s detail=%s", side, peer, reason, detail
        )
        self.trimmer.connection_closed()

    def connection_closed(self) -> None:
        """A TLS connection closed (either way): the trim timer is armed if it is not."""
        self.trimmer.connection_closed()

    def expiry_timestamp(self) -> float | None:
        creds = self.current
        return creds.not_after.timestamp() if creds is not None else None

    def failure_rows(self) -> list[tuple[str, int]]:
        return list(self.failures.items())

    def handshake_rows(self) -> list[tuple[str, str, int]]:
        return [(side, "true" if r else "false", n) for (side, r), n in self.handshakes.items()]

    def describe(self) -> dict[str, Any]:
        """For /config: who we are and what we hold. Public facts only, no key material."""
        from lepton_mesh.identity.bundle import fingerprint

        creds = self.current
        return {
            "spiffe_id": self.id.uri,
            "mode": self.mode,
            "tcp_app": str(self.tcp_app) if self.tcp_app is not None else None,
            "certificate": _describe_cert(creds.certificate) if creds is not None else None,
            "bundle": [
                {"subject": r.subject.rfc4514_string(), "sha256": fingerprint(r)}
                for r in (creds.bundle.roots if creds is not None else ())
            ],
            "trust_generation": creds.trust_generation if creds is not None else 0,
            "reloads": self.reloads,
            "loaded_at": _iso(dt.datetime.fromtimestamp(self.loaded_at, dt.UTC)),
            "handshakes": {
                f"{s}/{'resumed' if r else 'full'}": n for (s, r), n in self.handshakes.items()
            },
            "handshake_failures": {k: v for k, v in self.failures.items() if v},
            "plaintext_accepted": self.plaintext_accepted,
            "malloc_trim": {"available": self.trimmer.available, "trims": self.trimmer.trims},
            "files": None
            if self._files is None
            else {"poll_interval_s": self.file_poll_interval, "last_error": self._file_error},
        }

    def close(self) -> None:
        self.trimmer.close()
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None


def _files(tls: TlsConfig) -> Iterator[tuple[str, str]]:
    yield "cert", tls.cert
    yield "key", tls.key
    yield "bundle", tls.bundle


def _digest(pems: list[bytes]) -> bytes:
    """Of the chain and the bundle: a new key comes with a new certificate
    (alone it cannot match), and no form of the key is kept."""
    chain, _key, bundle = pems
    return hashlib.sha256(len(chain).to_bytes(8, "big") + chain + bundle).digest()


def _read_pem(source: str, field: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(
            [Problem(source, None, f"tls.{field}", f"cannot read {path}: {exc.strerror}")]
        ) from None


def _describe_cert(cert: x509.Certificate) -> dict[str, Any]:
    from lepton_mesh.identity.bundle import fingerprint

    now = dt.datetime.now(dt.UTC)
    return {
        "serial": f"{cert.serial_number:x}",
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
        "expires_in_s": round((cert.not_valid_after_utc - now).total_seconds()),
        "sha256": fingerprint(cert),
    }


def _iso(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%dT%H:%M:%SZ}"


# --- which endpoints are called in plaintext ---------------------------------------


def plaintext_endpoints(cfg: SidecarConfig) -> frozenset[Address]:
    """Endpoints this sidecar calls without TLS even when it has an identity.

    The local app (inbound forwards in plaintext on the loopback), endpoints
    labelled `lepton.io/tls: disabled` (no sidecar in front of them), and the
    endpoints of ExternalServices the config holds. Everything else is a
    peer sidecar and is called over mTLS.
    """
    out = {cfg.app}
    for svc in cfg.services.values():
        out.update(
            e.address for e in svc.endpoints if e.labels.get(PLAINTEXT_LABEL) == PLAINTEXT_VALUE
        )
    for ext in cfg.traffic.external.values():
        out.update(e.address for e in ext.endpoints)
    return frozenset(out)


# --- outbound ---------------------------------------------------------------------------


async def open_mesh_connection(
    identity: MeshIdentity,
    factory: Callable[[], asyncio.BaseProtocol],
    address: Address,
    service: str,
    *,
    tcp: bool = False,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol, Credentials]:
    """Connect to a peer sidecar over mTLS and check it is `service`'s.

    Offers the endpoint's last session (resumption) and returns the
    credentials used, whose cache the caller stores the new session in once
    the first response is in (TLS 1.3 tickets follow the handshake). The
    caller bounds the time (asyncio.timeout). Raises MeshTlsError (counted,
    logged, connection closed) for a failed handshake, a peer of another
    service, or an L4 peer that does not take tunnels; OSError as connecting does.
    """
    creds = identity.current
    if creds is None:
        identity.handshake_failed("outbound", HandshakeFailure.OTHER, str(address), NO_CERT)
        raise MeshTlsError(HandshakeFailure.OTHER, f"cannot call {address} over mTLS: {NO_CERT}")
    cache = creds.tcp if tcp else creds.http
    loop = asyncio.get_running_loop()
    try:
        with cache.resuming(address):
            transport, proto = await loop.create_connection(
                factory, address.host, address.port, ssl=cache.context
            )
    except ssl.SSLError as exc:
        reason = classify_handshake_error(exc)
        identity.handshake_failed("outbound", reason, str(address), _detail(exc))
        raise MeshTlsError(reason, f"TLS handshake with {address} failed: {reason}") from None
    sslobj = transport.get_extra_info("ssl_object")
    try:
        verify_peer_identity(sslobj, identity.peer_id(service))
        if tcp and sslobj.selected_alpn_protocol() != TCP_ALPN:
            raise MeshTlsError(
                HandshakeFailure.OTHER,
                f"{address} does not accept L4 tunnels (no ALPN {TCP_ALPN}; tls.tcp_app unset there?)",
            )
    except (PeerIdentityError, MeshTlsError) as exc:
        transport.abort()
        reason = classify_handshake_error(exc) if isinstance(exc, PeerIdentityError) else exc.reason
        identity.handshake_failed("outbound", reason, str(address), str(exc))
        raise MeshTlsError(reason, f"{address}: {exc}") from None
    identity.handshake_done("outbound", sslobj.session_reused)
    return transport, proto, creds  # type: ignore[return-value]


def _detail(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower()
    return str(exc) or type(exc).__name__


# --- inbound -------------------------------------------------------------------------------

# (transport, caller's workload or "unknown"): hands a secured connection
# that negotiated TCP_ALPN over to the L4 path.
TcpTunnelAcceptor = Callable[[asyncio.Transport, str], None]


class InboundTls:
    """What the inbound listener's connections learn from their handshake.

    `secured(transport)` is called by the downstream protocol in
    `connection_made` on a TLS connection: it returns (workload, xfcc) for
    HTTP, or None when the connection was handed to the L4 path.
    """

    __slots__ = ("_by", "accept_tcp", "identity")

    def __init__(self, identity: MeshIdentity, accept_tcp: TcpTunnelAcceptor | None) -> None:
        self.identity = identity
        self.accept_tcp = accept_tcp
        self._by = b"By=" + identity.id.uri.encode("ascii") + b";URI="

    def secured(self, transport: asyncio.Transport) -> tuple[bytes, bytes] | None:
        """(caller's workload, xfcc) for HTTP; None when the connection was
        handed to the L4 path or refused (then it is already aborted)."""
        sslobj = transport.get_extra_info("ssl_object")
        mine = self.identity.id.trust_domain
        try:
            peer = spiffe_id_of_peercert(sslobj.getpeercert())
        except (InvalidSpiffeId, ValueError) as exc:
            # A certificate the bundle verified but that names no workload:
            # served, it would be an anonymous caller no DENY rule can name.
            detail = exc.detail if isinstance(exc, InvalidSpiffeId) else str(exc)
            return self._refuse(transport, f"the peer certificate has no mesh identity: {detail}")
        if peer.trust_domain != mine:
            # Authorization matches namespace and service only: a bundle that
            # also holds another trust domain's root must not let its `web`
            # pass as ours.
            return self._refuse(transport, f"peer is {peer}, not of trust domain {mine}")
        if self.accept_tcp is not None and sslobj.selected_alpn_protocol() == TCP_ALPN:
            self.accept_tcp(transport, peer.service)
            return None
        return peer.service.encode("ascii"), self._by + peer.uri.encode("ascii")

    def _refuse(self, transport: asyncio.Transport, detail: str) -> None:
        peer = transport.get_extra_info("peername")
        transport.set_protocol(_Refused())  # the caller's protocol never saw it open
        transport.abort()
        self.identity.handshake_failed(
            "inbound", HandshakeFailure.IDENTITY_MISMATCH, _peer(peer), detail
        )


class _Refused(asyncio.Protocol):
    """Takes over an inbound TLS connection refused after its handshake."""


class TlsAcceptor:
    """An inbound listening socket in STRICT or PERMISSIVE mode.

    Stands in for the asyncio.Server the plaintext path uses (`sockets`,
    `close`, `wait_closed`). `factory(secure)` makes the protocol of a
    connection; it runs only once the connection's kind is known (after the
    peek in PERMISSIVE mode).
    """

    def __init__(
        self,
        identity: MeshIdentity,
        factory: Callable[[bool], asyncio.BaseProtocol],
        *,
        permissive: bool,
        handshake_timeout: Callable[[], float],
    ) -> None:
        self.identity = identity
        self.factory = factory
        self.permissive = permissive
        self.handshake_timeout = handshake_timeout
        self._slots = asyncio.Semaphore(identity.max_handshakes)
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshaking: set[asyncio.Task[None]] = set()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._sock is not None else ()

    @property
    def handshakes_in_flight(self) -> int:
        return len(self._handshaking)

    async def start(self, host: str, port: int) -> TlsAcceptor:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as create_server
            sock.bind(addr)
            sock.listen(2048)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._accepting = loop.create_task(self._accept_loop(sock))
        return self

    def close(self) -> None:
        """Stop accepting. Handshakes already under way finish (drain)."""
        sock, self._sock = self._sock, None
        task, self._accepting = self._accepting, None
        if task is not None and not task.done():
            # The socket closes once the accept loop has let go of it (a
            # cancelled sock_accept removes its reader first).
            task.cancel()
            if sock is not None:
                task.add_done_callback(lambda _: sock.close())
        elif sock is not None:
            sock.close()

    def abort(self) -> None:
        """Stop accepting and cancel the handshakes under way (stop)."""
        self.close()
        for task in list(self._handshaking):
            task.cancel()

    async def wait_closed(self) -> None:
        tasks = list(self._handshaking)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def is_serving(self) -> bool:
        return self._sock is not None

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        slots = self._slots
        while True:
            await slots.acquire()
            try:
                sock, addr = await loop.sock_accept(lsock)
            except OSError as exc:
                slots.release()
                # EMFILE and friends: accepting again at once would spin.
                log.warning("inbound accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            task = loop.create_task(self._setup(sock, addr))
            self._handshaking.add(task)
            task.add_done_callback(self._setup_done)

    def _setup_done(self, task: asyncio.Task[None]) -> None:
        self._handshaking.discard(task)
        self._slots.release()

    async def _setup(self, sock: socket.socket, addr: Any) -> None:
        """Peek, then hand the socket to a TLS or plaintext transport (PERMISSIVE),
        or to TLS unless it is plaintext HTTP, which is answered 400 (STRICT)."""
        loop = asyncio.get_running_loop()
        identity = self.identity
        timeout = self.handshake_timeout()
        deadline = loop.time() + timeout  # one bound for the peek and the handshake
        secure = True
        try:
            if self.permissive:
                secure = await self._is_tls(sock, timeout)
            elif await self._refused_http(sock, addr, timeout):
                return
            if secure:
                creds = identity.current
                if creds is None:
                    raise ssl.SSLError(NO_CERT)  # counted below, as a refused handshake
                transport, _ = await loop.connect_accepted_socket(
                    lambda: self.factory(True),
                    sock,
                    ssl=creds.server,
                    ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
                )
            else:
                identity.plaintext_accepted += 1
                await loop.connect_accepted_socket(lambda: self.factory(False), sock)
                return
        except _NotServed:
            sock.close()
            return
        except (OSError, TimeoutError) as exc:
            sock.close()
            if secure:
                reason = classify_handshake_error(exc)
                detail = "timed out" if isinstance(exc, TimeoutError) else _detail(exc)
                identity.handshake_failed("inbound", reason, _peer(addr), detail)
            return
        except BaseException:
            sock.close()
            raise
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None and not transport.is_closing():  # else refused by InboundTls
            identity.handshake_done("inbound", sslobj.session_reused)

    async def _refused_http(self, sock: socket.socket, addr: Any, timeout: float) -> bool:
        """STRICT: answer plaintext HTTP with a 400 that says why, as nginx does
        on an HTTPS port (OpenSSL would only let us close it: "Empty reply").

        True if the first bytes were an HTTP/1.x request: it was answered,
        counted as today's failed handshake (`plaintext`, `http_request`) and
        closed. False for a ClientHello, and for bytes that are neither (TLS
        refuses those as before). Nothing is consumed before the verdict, so a
        ClientHello reaches TLS whole; a silent peer times out as a handshake
        would (TimeoutError, counted by the caller).
        """
        if await PeekTLS.peek(sock, timeout=timeout) != PeekTLS.PLAINTEXT:
            return False  # TLS, or closed: TLS sees the EOF as before
        try:
            first = sock.recv(HTTP_SNIFF_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        if not is_http1_request(first):
            return False
        _answer_plaintext_http(sock, head=first.startswith(b"HEAD "))
        sock.close()
        self.identity.handshake_failed(
            "inbound", HandshakeFailure.PLAINTEXT, _peer(addr), "http_request"
        )
        return True

    @staticmethod
    async def _is_tls(sock: socket.socket, timeout: float) -> bool:
        """PERMISSIVE: TLS or plaintext by the first bytes. A peer that closes or
        stays silent is no handshake failure: it never started one."""
        try:
            verdict = await PeekTLS.peek(sock, timeout=timeout)
        except (OSError, TimeoutError):
            raise _NotServed from None
        if verdict == PeekTLS.CLOSED:
            raise _NotServed
        return verdict == PeekTLS.TLS


# --- STRICT: plaintext HTTP gets an answer --------------------------------------------

# What is looked at (MSG_PEEK) to tell HTTP/1.x from other plaintext, and what
# is read of the request (one read of what has arrived) before answering.
HTTP_SNIFF_BYTES = 1024
HTTP_DRAIN_BYTES = 65536
MTLS_REQUIRED_DETAIL = (
    "this port requires mTLS from a mesh sidecar; plaintext HTTP was sent to it "
    "(call the service through your sidecar's outbound listener)"
)
# A request line: a method (a token; every registered one is upper-case
# letters, some with '-' as VERSION-CONTROL), one space, a target, and, once
# the line is complete, HTTP/1.x.
# h2c's preface ("PRI * HTTP/2.0") is not one.
_HTTP1_LINE = re.compile(rb"[A-Z][A-Z-]{0,19} [!-~]+ HTTP/1\.[0-9]\r?\n")
_HTTP1_PARTIAL = re.compile(rb"[A-Z][A-Z-]{0,19} [!-~][^\n]*\Z")


def is_http1_request(first: bytes) -> bool:
    """Whether a connection's first bytes (sans-IO, any prefix length) are
    plainly an HTTP/1.x request line or the start of one: `GET / HTTP/1.1`,
    or `GET /very-long-target` cut before the line ends."""
    if b"\n" in first:
        return _HTTP1_LINE.match(first) is not None
    return _HTTP1_PARTIAL.match(first) is not None


def _answer_plaintext_http(sock: socket.socket, *, head: bool) -> None:
    """Best effort, never blocking: read what has arrived of the request (so
    the close is a FIN, not a reset that could drop the answer), write the
    400 (~300 bytes: the empty send buffer takes it whole), end our side."""
    err = ProxyError(400, Reason.MTLS_REQUIRED, MTLS_REQUIRED_DETAIL, close=True)
    rid = new_request_id()
    body = error_body(err, rid.decode("ascii"))
    with contextlib.suppress(OSError):
        sock.recv(HTTP_DRAIN_BYTES)
    with contextlib.suppress(OSError):
        sock.send(error_response(err, rid, body, keep_alive=False, head_request=head))
        sock.shutdown(socket.SHUT_WR)


class _NotServed(Exception):
    """A PERMISSIVE connection closed or silent before its first bytes."""


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)
