"""The control daemon's side of workload identity: who a sidecar's stream is,
certificates for it, the trust bundle, and the daemon's own serving identity.

    sidecar --TLS (server-authenticated: control's certificate, the bundle)--> control
      hello {token}      -> authenticate: the join token's scope must be the hello's
      csr {csr_pem}      -> issue: signed for the *authenticated* identity only
      <- certificate {chain_pem, bundle_pem, not_after}
      <- trust {bundle_pem, issuer}      after welcome, and whenever either changes
    later connections: mTLS with the workload certificate; the certificate is the proof.

Invariants:
- A stream's identity is proven before it registers: by a verified client
  certificate (TLS checked the chain against the bundle; its SPIFFE ID must
  be the hello's service and namespace), else by a join token (role `join`,
  scope equal to the hello's). Nothing else is accepted. The namespace
  `lepton-system` is reserved: no sidecar can be, or be issued, the control
  daemon's identity.
- The issuing key is read from `--ca-dir` (a mounted secret) by
  `identity.ca.CertificateAuthority`, kept in memory, and never written,
  logged or put in an error. The daemon's own serving key is made in memory
  and handed to OpenSSL through an anonymous memory file (memfd), by
  `identity.tls_contexts`, which also gives the serving contexts the mesh's
  TLS settings (the sidecars' own).
- The CA files are polled (`reload_interval`); a change is loaded whole and
  swapped in one assignment, or refused (a half-replaced pair during
  `certs rotate-root activate` does not load) and the previous CA kept.
- The serving certificate is re-issued at two thirds of its lifetime and
  whenever the CA or bundle changes. The listener keeps one dispatching
  SSLContext whose SNI callback (OpenSSL runs it for every ClientHello, with
  or without SNI) moves each new connection to the current context, so
  established streams keep theirs and new ones get the new certificate and
  bundle. Contexts issue no session tickets: a stream never resumes a
  session verified under an older bundle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from lepton_mesh import meshproto as mp
from lepton_mesh.control.auth import TokenVerifier, Unauthenticated
from lepton_mesh.identity.bundle import fingerprint
from lepton_mesh.identity.ca import WORKLOAD_LIFETIME, CertificateAuthority, IssuedCertificate
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.errors import (
    CaError,
    CsrReason,
    CsrRejected,
    IdentityError,
    InvalidSpiffeId,
)
from lepton_mesh.identity.file_stamp import files_stamp
from lepton_mesh.identity.spiffe import SpiffeId, spiffe_id_of_peercert
from lepton_mesh.identity.store import CaFiles
from lepton_mesh.identity.tls_contexts import server_context, server_context_without_credentials

__all__ = [
    "CONTROL_NAMESPACE",
    "CONTROL_SERVICE",
    "CsrLimiter",
    "IdentityService",
    "StreamRefused",
    "TrustState",
    "certificate_status",
    "key_id",
    "peer_certificate",
]

log = logging.getLogger(__name__)

# The control daemon's own identity: spiffe://<td>/ns/lepton-system/svc/control.
CONTROL_NAMESPACE = mp.CONTROL_NAMESPACE
CONTROL_SERVICE = mp.CONTROL_SERVICE
# A CSR is a few hundred bytes; anything this large is not one of ours.
MAX_CSR_BYTES = 16 * 1024
# TLS 1.3 session tickets per handshake: none, so a stream never resumes a
# session verified under an older bundle.
SERVING_TICKETS = 0
# The serving certificate is renewed at this fraction of its lifetime.
RENEW_AT = 2 / 3


class StreamRefused(Exception):
    """A hello whose identity is not proven; `reason` goes into the `error` frame."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class TrustState:
    """What every sidecar must hold: the bundle, and which CA issues now."""

    bundle_pem: str
    issuer: str  # SHA-256 fingerprint (hex) of the issuing CA certificate
    roots: tuple[str, ...]  # the bundle's root fingerprints, for status

    def message(self) -> mp.Trust:
        return mp.Trust(self.bundle_pem, self.issuer)


def certificate_status(cert: x509.Certificate, trust: TrustState | None = None) -> dict[str, Any]:
    """The `certificate` field of a sidecar's status key (public facts only).

    `issuer_key_id` (the leaf's authority key identifier) tells intermediates
    apart even when their names do not (names carry the creation time to
    the second): during a root rotation, wait until every sidecar shows the
    new intermediate's key id.
    """
    out: dict[str, Any] = {
        "serial": f"{cert.serial_number:x}",
        "not_after": cert.not_valid_after_utc.timestamp(),
        "issuer": cert.issuer.rfc4514_string(),
        "issuer_key_id": _authority_key_id(cert),
    }
    if trust is not None:
        out["roots"] = [r[:16] for r in trust.roots]
    return out


def _authority_key_id(cert: x509.Certificate) -> str | None:
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier.hex() if aki.key_identifier is not None else None


def key_id(cert: x509.Certificate) -> str | None:
    """A CA certificate's subject key identifier (hex): what its leaves' `issuer_key_id` is."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return None


class CsrLimiter:
    """At most `burst` CSRs per `window` seconds on one stream.

    A sidecar asks at two thirds of its certificate's lifetime and when the
    bundle or issuer changes: a handful an hour. Signing costs ~0.3 ms of the
    loop, so a stream that asks more often is misbehaving and is closed.
    """

    __slots__ = ("_times", "burst", "window")

    def __init__(self, burst: int = 5, window: float = 10.0) -> None:
        self.burst = burst
        self.window = window
        self._times: collections.deque[float] = collections.deque()

    def allow(self, now: float) -> bool:
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.burst:
            return False
        self._times.append(now)
        return True


class IdentityService:
    """Loads the CA from `ca_dir`, authenticates streams, issues certificates.

    `load()` once (raises `IdentityError` naming the bad file), then `run()`
    as a task: it watches the files and renews the serving certificate.
    """

    def __init__(
        self,
        ca_dir: str | os.PathLike[str],
        *,
        verifier: TokenVerifier | None,
        workload_lifetime: dt.timedelta = WORKLOAD_LIFETIME,
        reload_interval: float = 5.0,
    ) -> None:
        self.files = CaFiles(Path(ca_dir))
        self.verifier = verifier
        self.workload_lifetime = workload_lifetime
        self.reload_interval = reload_interval
        self._authority: CertificateAuthority | None = None
        self._trust: TrustState | None = None
        self._stamp: tuple[Any, ...] = ()
        self._last_reload_error = ""
        self._subscribers: list[Callable[[TrustState], None]] = []
        # The serving side: the context new connections are moved to, and
        # when its certificate is due for renewal (time.time()).
        self._current: ssl.SSLContext | None = None
        self._dispatch: ssl.SSLContext | None = None
        self._renew_at = 0.0
        self.serving_serial = 0
        # counters, for tests and the admin side
        self.issued = 0
        self.refused = 0

    # --- loading ---------------------------------------------------------------

    def load(self) -> None:
        """Read the CA files and issue the serving certificate. Raises IdentityError."""
        authority = self.files.load_authority(workload_lifetime=self.workload_lifetime)
        try:
            stamp = self._file_stamp()
        except OSError as e:
            raise CaError(f"{self.files.directory}: {e.strerror}") from None
        self._install(authority, stamp)

    def reload(self) -> bool:
        """Re-read the CA files if they changed. True if a new CA or bundle is
        in use. A CA that does not load is logged and the old one kept."""
        try:
            stamp = self._file_stamp()
        except OSError as e:
            self._reload_failed(f"cannot stat the CA files in {self.files.directory}: {e}")
            return False
        if stamp == self._stamp:
            return False
        try:
            authority = self.files.load_authority(workload_lifetime=self.workload_lifetime)
        except IdentityError as e:  # never key bytes: these errors name files only
            self._reload_failed(f"CA files changed but do not load, keeping the current CA: {e}")
            return False
        self._last_reload_error = ""
        before = self._trust
        self._install(authority, stamp)
        trust = self.trust
        if before is not None and (before.bundle_pem, before.issuer) == (
            trust.bundle_pem,
            trust.issuer,
        ):
            return False
        log.warning(
            "CA reloaded from %s: issuer %s, %d root(s) in the bundle",
            self.files.directory,
            trust.issuer[:16],
            len(trust.roots),
        )
        for callback in list(self._subscribers):
            callback(trust)
        return True

    def _reload_failed(self, message: str) -> None:
        if message != self._last_reload_error:  # once per distinct problem, not per poll
            log.warning("%s", message)
        self._last_reload_error = message

    def _file_stamp(self) -> tuple[Any, ...]:
        return files_stamp(
            [str(p) for p in (self.files.ca_cert, self.files.ca_key, self.files.bundle)]
        )

    def _install(self, authority: CertificateAuthority, stamp: tuple[Any, ...]) -> None:
        bundle = authority.bundle
        self._trust = TrustState(
            bundle_pem=bundle.to_pem().decode("ascii"),
            issuer=fingerprint(authority.certificate),
            roots=bundle.fingerprints(),
        )
        self._authority = authority
        self._stamp = stamp
        self._renew_serving()

    @property
    def authority(self) -> CertificateAuthority:
        assert self._authority is not None, "load() first"
        return self._authority

    @property
    def trust(self) -> TrustState:
        assert self._trust is not None, "load() first"
        return self._trust

    @property
    def trust_domain(self) -> str:
        return self.authority.trust_domain

    @property
    def control_identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, CONTROL_NAMESPACE, CONTROL_SERVICE)

    def subscribe(self, callback: Callable[[TrustState], None]) -> None:
        """`callback(trust)` after a reload that changed the bundle or the issuer."""
        self._subscribers.append(callback)

    # --- streams ----------------------------------------------------------------

    def authenticate(self, hello: mp.Hello, peercert: Mapping[str, Any] | None) -> SpiffeId:
        """The identity a hello has proven, or StreamRefused.

        `peercert` is `getpeercert()` of the stream's TLS connection: a
        non-empty dict only for a client certificate TLS verified.
        """
        if hello.namespace == CONTROL_NAMESPACE:
            raise StreamRefused(
                mp.Reason.IDENTITY_MISMATCH,
                f"namespace {CONTROL_NAMESPACE!r} is reserved for the control daemon",
            )
        try:
            claimed = SpiffeId(self.trust_domain, hello.namespace, hello.service)
        except InvalidSpiffeId as e:
            raise StreamRefused(mp.Reason.BAD_HELLO, e.detail) from None
        if peercert:
            return _by_certificate(claimed, peercert)
        return self._by_token(claimed, hello.token)

    def _by_token(self, claimed: SpiffeId, token: str | None) -> SpiffeId:
        if not token:
            raise StreamRefused(
                mp.Reason.MISSING_TOKEN,
                "no client certificate and no join token: create one with "
                f"`lepton-mesh token create --role join --service {claimed.service}`",
            )
        if self.verifier is None:
            raise StreamRefused(
                mp.Reason.INVALID_TOKEN,
                "this control daemon has no token key (--token-key): it cannot check join tokens",
            )
        try:
            claims = self.verifier.verify(token)
        except Unauthenticated as e:
            raise StreamRefused(e.reason, str(e)) from None
        if claims.role != "join":
            raise StreamRefused(
                mp.Reason.INVALID_TOKEN, f"a {claims.role!r} token cannot join: use a join token"
            )
        scope = (claims.namespace or "default", claims.service)
        if scope != (claimed.namespace, claimed.service):
            raise StreamRefused(
                mp.Reason.IDENTITY_MISMATCH,
                f"the join token is for service {scope[1]!r} in namespace {scope[0]!r}, "
                f"not {claimed.service!r} in {claimed.namespace!r}",
            )
        return claimed

    def issue(self, csr_pem: str, identity: SpiffeId) -> IssuedCertificate:
        """Sign `csr_pem` for the stream's proven `identity`; CsrRejected otherwise."""
        if len(csr_pem) > MAX_CSR_BYTES:
            self.refused += 1
            raise CsrRejected(
                f"the CSR is {len(csr_pem)} bytes (at most {MAX_CSR_BYTES})",
                reason=CsrReason.MALFORMED,
            )
        try:
            issued = self.authority.issue(csr_pem.encode("utf-8", "replace"), identity)
        except CsrRejected:
            self.refused += 1
            raise
        self.issued += 1
        return issued

    # --- the serving side ---------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """The listener's context: it moves every new connection to the current one."""
        if self._dispatch is None:
            # Client certificates are optional on every serving context (a
            # sidecar bootstraps without one) but verified when presented.
            ctx = server_context_without_credentials(
                require_client_cert=False, tickets=SERVING_TICKETS
            )
            ctx.sni_callback = self._select
            self._dispatch = ctx
        return self._dispatch

    def _select(self, conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        conn.context = self._current

    def _renew_serving(self) -> None:
        authority = self.authority
        key = generate_key()
        identity = self.control_identity
        issued = authority.issue(build_csr(key, identity), identity)
        self._current = server_context(
            issued.chain_pem,
            private_key_pem(key),
            self.trust.bundle_pem,
            require_client_cert=False,
            tickets=SERVING_TICKETS,
        )
        self.serving_serial = issued.serial
        now = time.time()
        self._renew_at = now + (issued.not_after.timestamp() - now) * RENEW_AT

    async def run(self) -> None:
        """Until cancelled: poll the CA files, renew the serving certificate when due."""
        while True:
            wait = min(self.reload_interval, max(self._renew_at - time.time(), 0.0))
            await asyncio.sleep(wait)
            changed = self.reload()
            if not changed and time.time() >= self._renew_at:
                try:
                    self._renew_serving()
                except IdentityError as e:
                    log.error("cannot renew the control daemon's certificate: %s", e)
                    self._renew_at = time.time() + self.reload_interval


def _by_certificate(claimed: SpiffeId, peercert: Mapping[str, Any]) -> SpiffeId:
    try:
        presented = spiffe_id_of_peercert(peercert)
    except InvalidSpiffeId as e:
        raise StreamRefused(
            mp.Reason.IDENTITY_MISMATCH, f"client certificate: {e.detail}"
        ) from None
    if presented != claimed:
        raise StreamRefused(
            mp.Reason.IDENTITY_MISMATCH,
            f"the client certificate is {presented}, the hello says {claimed}",
        )
    return presented


def peer_certificate(transport: Any) -> tuple[dict[str, Any] | None, x509.Certificate | None]:
    """(getpeercert() dict, parsed certificate) of a TLS transport's verified
    client certificate; (None, None) without TLS or without a certificate."""
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if sslobj is None:
        return None, None
    with contextlib.suppress(ValueError):
        info = sslobj.getpeercert()
        der = sslobj.getpeercert(binary_form=True)
        if info and der:
            return info, x509.load_der_x509_certificate(der)
    return None, None
