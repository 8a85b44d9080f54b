"""mTLS between sidecars: SSL contexts, peer identity, session resumption,
handshake failure reasons, and telling TLS from plaintext on a PERMISSIVE port.

Loading is separate from declaring (STYLE 6): the sidecar builds contexts once
per certificate or bundle change and swaps them in; a connection keeps the
context it started with.

Invariants:
- The contexts are `identity.tls_contexts`' (shared with the control daemon):
  TLS 1.2 floor, TLS 1.3 preferred, ECDHE+AEAD suites, chains verified
  against the trust bundle only (never the system store) with strict X.509
  checks, key material handed to OpenSSL through a memfd. Host names are not
  checked: mesh certificates carry SPIFFE IDs, not DNS names. Instead the
  caller checks that the peer is the service it meant to reach
  (`verify_peer_identity`); any certificate the bundle accepts is not enough.
- Session tickets stay on (OP_NO_TICKET would make OpenSSL keep every session
  in the server-side cache: ~20 MiB under churn that is never released).
  Ticket keys belong to one server context, so a new context (new certificate
  or bundle) invalidates every ticket issued before: a session never outlives
  the trust it was verified under.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextvars import ContextVar

from lepton_mesh.identity import tls_contexts
from lepton_mesh.identity.errors import InvalidSpiffeId
from lepton_mesh.identity.spiffe import SpiffeId, as_spiffe_id, spiffe_id_of_peercert

# A client resumes with one ticket per endpoint: a second ticket per full
# handshake would cost the server an encryption and ~250 bytes for nothing.
SERVER_TICKETS = 1

SslConnection = ssl.SSLObject | ssl.SSLSocket


class HandshakeFailure:
    """Reasons a TLS handshake failed: the `reason` label of
    `lepton_tls_handshake_failures_total`. Stable strings.

    PLAINTEXT: the peer sent something that is not TLS where a handshake was
    expected (plaintext HTTP to a STRICT port, or a plaintext answer to our
    ClientHello): a caller or endpoint outside the mesh, or one not yet
    switched to mTLS, rather than a broken certificate.
    """

    UNKNOWN_CA = "unknown_ca"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    IDENTITY_MISMATCH = "identity_mismatch"
    NO_CLIENT_CERTIFICATE = "no_client_certificate"
    PROTOCOL_VERSION = "protocol_version"
    PLAINTEXT = "plaintext"
    OTHER = "other"

    ALL = (
        UNKNOWN_CA,
        EXPIRED,
        NOT_YET_VALID,
        IDENTITY_MISMATCH,
        NO_CLIENT_CERTIFICATE,
        PROTOCOL_VERSION,
        PLAINTEXT,
        OTHER,
    )


class PeerIdentityError(Exception):
    """The peer's verified certificate is not the identity the caller expected
    (or carries no mesh identity at all). `actual` is None in the latter case."""

    reason = HandshakeFailure.IDENTITY_MISMATCH

    def __init__(self, expected: str, actual: str | None) -> None:
        shown = actual if actual is not None else "no mesh identity"
        super().__init__(f"peer is {shown}, expected {expected}")
        self.expected = expected
        self.actual = actual


# --- contexts -----------------------------------------------------------------

# (the context the session belongs to, the session): Python refuses a session
# from another context, so a mismatched pair is ignored rather than fatal.
_RESUME: ContextVar[tuple[ssl.SSLContext, ssl.SSLSession] | None] = ContextVar(
    "lepton_tls_resume", default=None
)


class MeshClientContext(ssl.SSLContext):
    """A client context that resumes the session `SessionCache.resuming()` set.

    asyncio and uvloop create the SSLObject inside `create_connection` (in a
    callback that runs in the calling task's context) and pass no session, so
    the session travels in a ContextVar and is added here.
    """

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            offered = _RESUME.get()
            if offered is not None and offered[0] is self:
                session = offered[1]
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def server_context(
    cert_chain_pem: bytes,
    key_pem: bytes,
    bundle_pem: bytes,
    *,
    require_client_cert: bool = True,
) -> ssl.SSLContext:
    """The inbound context: presents the workload chain, verifies client chains
    against the bundle. With `require_client_cert=False` a client may connect
    without a certificate (then `peer_identity` is None); one it does present
    must still verify."""
    return tls_contexts.server_context(
        cert_chain_pem,
        key_pem,
        bundle_pem,
        require_client_cert=require_client_cert,
        tickets=SERVER_TICKETS,
    )


def client_context(cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> MeshClientContext:
    """The outbound context: presents the workload chain, verifies the server's
    chain against the bundle. The caller must still `verify_peer_identity`."""
    return tls_contexts.client_context(cert_chain_pem, key_pem, bundle_pem, cls=MeshClientContext)


# --- peer identity --------------------------------------------------------------


def peer_identity(conn: SslConnection) -> str | None:
    """The SPIFFE ID of the verified peer, or None if it sent no certificate or
    one without a mesh identity. Works on resumed sessions too (the session
    keeps the peer certificate)."""
    try:
        return spiffe_id_of_peercert(conn.getpeercert()).uri
    except (InvalidSpiffeId, ValueError):
        return None


def verify_peer_identity(conn: SslConnection, expected: SpiffeId | str) -> SpiffeId:
    """Raise PeerIdentityError unless the peer is exactly `expected`.

    Call it right after the handshake, before sending a byte of the request:
    the chain was verified by OpenSSL, this checks it is the right workload.
    """
    want = as_spiffe_id(expected)
    try:
        got = spiffe_id_of_peercert(conn.getpeercert())
    except (InvalidSpiffeId, ValueError):
        raise PeerIdentityError(want.uri, None) from None
    if got != want:
        raise PeerIdentityError(want.uri, got.uri)
    return got


# --- session resumption ---------------------------------------------------------


class SessionCache:
    """The last resumable TLS session per endpoint, for one client context.

    Bounded (least recently stored first out); expired sessions are dropped on
    lookup. Bound to one context: Python refuses a session from another, and a
    new context (new certificate or bundle) must start from full handshakes.

        with cache.resuming(endpoint):
            transport, proto = await loop.create_connection(..., ssl=cache.context)
        ...after the first response (TLS 1.3 tickets arrive after the handshake):
        cache.store(endpoint, transport.get_extra_info("ssl_object"))
    """

    __slots__ = ("_max", "_sessions", "context")

    def __init__(self, context: ssl.SSLContext, *, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.context = context
        self._max = max_entries
        self._sessions: OrderedDict[Hashable, ssl.SSLSession] = OrderedDict()

    @property
    def size(self) -> int:
        # Not __len__: an empty cache must not be falsy where callers test `if cache`.
        return len(self._sessions)

    def get(self, endpoint: Hashable) -> ssl.SSLSession | None:
        session = self._sessions.get(endpoint)
        if session is not None and session.time + session.timeout <= time.time():
            del self._sessions[endpoint]
            return None
        return session

    def store(self, endpoint: Hashable, conn: SslConnection | None) -> bool:
        """Keep `conn`'s session for `endpoint` if it can be resumed (it holds a
        ticket). False when there is nothing to keep yet: under TLS 1.3 the
        ticket arrives after the handshake, with or before the first response."""
        if conn is None or conn.context is not self.context:
            return False
        session = conn.session
        if session is None or not session.has_ticket:
            return False
        self._sessions[endpoint] = session
        self._sessions.move_to_end(endpoint)
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return True

    def discard(self, endpoint: Hashable) -> None:
        self._sessions.pop(endpoint, None)

    @contextlib.contextmanager
    def resuming(self, endpoint: Hashable) -> Iterator[ssl.SSLSession | None]:
        """Within the block, connections made with this cache's context (a
        MeshClientContext) offer `endpoint`'s session. Yields the session."""
        session = self.get(endpoint)
        token = _RESUME.set(None if session is None else (self.context, session))
        try:
            yield session
        finally:
            _RESUME.reset(token)


# --- handshake failure reasons --------------------------------------------------

# X509_V_ERR_* codes (OpenSSL x509_vfy.h) as the verifying side sees them.
_VERIFY_CODES = {
    2: HandshakeFailure.UNKNOWN_CA,  # unable to get issuer certificate
    9: HandshakeFailure.NOT_YET_VALID,  # certificate is not yet valid
    10: HandshakeFailure.EXPIRED,  # certificate has expired
    18: HandshakeFailure.UNKNOWN_CA,  # self-signed certificate
    19: HandshakeFailure.UNKNOWN_CA,  # self-signed certificate in chain
    20: HandshakeFailure.UNKNOWN_CA,  # unable to get local issuer certificate
    21: HandshakeFailure.UNKNOWN_CA,  # unable to verify the first certificate
}
# OpenSSL reason codes (SSLError.reason): local errors and alerts from the peer.
# The side whose certificate was refused only learns what the alert says:
# OpenSSL sends "bad certificate" for not-yet-valid, so that side reports other.
_SSL_REASONS = {
    "TLSV1_ALERT_UNKNOWN_CA": HandshakeFailure.UNKNOWN_CA,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": HandshakeFailure.EXPIRED,
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": HandshakeFailure.NO_CLIENT_CERTIFICATE,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": HandshakeFailure.NO_CLIENT_CERTIFICATE,
    "UNSUPPORTED_PROTOCOL": HandshakeFailure.PROTOCOL_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": HandshakeFailure.PROTOCOL_VERSION,
    "NO_PROTOCOLS_AVAILABLE": HandshakeFailure.PROTOCOL_VERSION,
    "VERSION_TOO_LOW": HandshakeFailure.PROTOCOL_VERSION,
    "WRONG_SSL_VERSION": HandshakeFailure.PROTOCOL_VERSION,
    "UNSUPPORTED_SSL_VERSION": HandshakeFailure.PROTOCOL_VERSION,
    # A first record that is not TLS. OpenSSL names the HTTP requests it knows
    # (GET, POST, HEAD, PUT) and a proxy's CONNECT; any other bytes (another
    # method, h2c's preface, a plaintext server's answer to our ClientHello)
    # are a wrong version number, which is what PeekTLS calls plaintext too.
    # (OpenSSL also says WRONG_VERSION_NUMBER for a later record whose version
    # changed mid-handshake: only a broken TLS stack does that.)
    "HTTP_REQUEST": HandshakeFailure.PLAINTEXT,
    "HTTPS_PROXY_REQUEST": HandshakeFailure.PLAINTEXT,
    "WRONG_VERSION_NUMBER": HandshakeFailure.PLAINTEXT,
}


def classify_handshake_error(exc: BaseException) -> str:
    """The `HandshakeFailure` reason for an exception raised while setting up a
    TLS connection (by the handshake, or by `verify_peer_identity` after it)."""
    if isinstance(exc, PeerIdentityError):
        return HandshakeFailure.IDENTITY_MISMATCH
    if isinstance(exc, ssl.SSLCertVerificationError):
        found = _VERIFY_CODES.get(exc.verify_code)
        if found is not None:
            return found
    if isinstance(exc, ssl.SSLError):
        # `reason` is set by _ssl on errors it raises; absent on hand-made ones.
        return _SSL_REASONS.get(getattr(exc, "reason", None) or "", HandshakeFailure.OTHER)
    return HandshakeFailure.OTHER


# --- PERMISSIVE: TLS or plaintext? ----------------------------------------------


class PeekTLS:
    """Tell a TLS ClientHello from plaintext HTTP by a connection's first bytes.

    A TLS connection opens with a handshake record: content type 0x16, then
    the record version's major byte 0x03 (every SSL 3 / TLS version). No HTTP
    request can start with 0x16 (a method is letters), so two bytes decide.
    Anything that is not a TLS prefix is plaintext: the HTTP parser rejects
    garbage with a 400, which says more than a failed handshake would.

    `classify` is sans-IO (bytes in, verdict out); `peek` waits on a socket
    without consuming anything, so the socket can then be handed whole to a
    TLS or a plaintext transport (`loop.connect_accepted_socket`).
    """

    TLS = "tls"
    PLAINTEXT = "plaintext"
    NEED_MORE = "need_more"
    CLOSED = "closed"
    PEEK_BYTES = 2

    @staticmethod
    def classify(first_bytes: bytes) -> str:
        """TLS, PLAINTEXT, or NEED_MORE (only for b"" and b"\\x16")."""
        if not first_bytes:
            return PeekTLS.NEED_MORE
        if first_bytes[0] != 0x16:
            return PeekTLS.PLAINTEXT
        if len(first_bytes) < 2:
            return PeekTLS.NEED_MORE
        return PeekTLS.TLS if first_bytes[1] == 0x03 else PeekTLS.PLAINTEXT

    @staticmethod
    async def peek(sock: socket.socket, *, timeout: float) -> str:
        """Wait for enough bytes on a non-blocking, accepted socket to classify
        it, without reading them: TLS, PLAINTEXT or CLOSED (EOF first).

        Raises TimeoutError after `timeout` seconds and OSError from the socket.
        A peer that sent a lone 0x16 is re-peeked every millisecond (the only
        case where readable does not mean decidable; level-triggered readiness
        would otherwise spin) until the deadline.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                ready = loop.create_future()
                fd = sock.fileno()
                loop.add_reader(fd, _set_ready, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                try:
                    data = sock.recv(PeekTLS.PEEK_BYTES, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    return PeekTLS.CLOSED
                verdict = PeekTLS.classify(data)
                if verdict != PeekTLS.NEED_MORE:
                    return verdict
                await asyncio.sleep(0.001)


def _set_ready(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
