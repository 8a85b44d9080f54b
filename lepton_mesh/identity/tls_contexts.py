"""The mesh's TLS contexts, built one way for every side that speaks TLS: the
sidecar's mTLS between sidecars and its control stream (proxy/), and the
control daemon's serving side of that stream (control/).

Loading is separate from declaring (STYLE 6): each builder takes PEM already
in memory and returns a finished context. Callers build one per certificate
or bundle change and swap it in; a connection keeps the context it started
with.

Invariants of every context built here:
- TLS 1.2 is the floor, TLS 1.3 is preferred (OpenSSL picks the highest both
  sides speak). TLS 1.2 suites are ECDHE with AES-GCM or ChaCha20-Poly1305
  only: forward secrecy and AEAD. TLS 1.3 suites are all of that already.
  No compression, no renegotiation.
- Chains are verified against the bundle the caller gives only (never the
  system store), with strict X.509 checks and no partial chains (the bundle
  holds roots only). Host names are not checked: mesh certificates carry
  SPIFFE IDs, not DNS names, so the caller checks the peer's identity after
  the handshake.
- A client context always verifies the server. A server context verifies a
  client certificate whenever one is presented; `require_client_cert`
  decides only whether one must be.
- Key material reaches OpenSSL through an anonymous in-memory file (memfd)
  where the platform has one, else through a 0600 file in a fresh 0700
  directory removed right after loading; see `_load_cert_chain`.
- Session tickets are the caller's choice (`tickets`): a ticket key belongs
  to one context, so a new context never resumes a session verified under
  an older bundle, whatever the count.

Imports only the standard library: both sides may use it.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from typing import TypeVar, overload

__all__ = [
    "MINIMUM_VERSION",
    "TLS12_CIPHERS",
    "client_context",
    "client_context_without_certificate",
    "server_context",
    "server_context_without_credentials",
]

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# ECDHE key exchange, AEAD ciphers; OpenSSL expands these to the ECDSA and RSA
# variants (mesh certificates are ECDSA, so only those are ever negotiated).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_C = TypeVar("_C", bound=ssl.SSLContext)


# --- servers ----------------------------------------------------------------------


def server_context(
    cert_chain_pem: bytes,
    key_pem: bytes,
    bundle_pem: bytes | str,
    *,
    require_client_cert: bool = True,
    tickets: int,
) -> ssl.SSLContext:
    """A server context presenting `cert_chain_pem` (leaf first, then
    intermediates) with `key_pem`, verifying client chains against
    `bundle_pem`. Issues `tickets` session tickets per full TLS 1.3 handshake
    (0: no resumption). Raises ssl.SSLError for a key that does not match the
    chain, ValueError or ssl.SSLError for PEM that does not parse."""
    ctx = server_context_without_credentials(
        require_client_cert=require_client_cert, tickets=tickets
    )
    _load_trust(ctx, bundle_pem)
    _load_cert_chain(ctx, cert_chain_pem, key_pem)
    return ctx


def server_context_without_credentials(
    *, require_client_cert: bool, tickets: int
) -> ssl.SSLContext:
    """A server context with the mesh's settings and nothing loaded: no
    certificate, no trust. Only useful as a listener's dispatching context,
    whose SNI callback moves each connection to a loaded one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = tickets
    return ctx


# --- clients ----------------------------------------------------------------------


@overload
def client_context(
    cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes | str
) -> ssl.SSLContext: ...
@overload
def client_context(
    cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes | str, *, cls: type[_C]
) -> _C: ...
def client_context(
    cert_chain_pem: bytes,
    key_pem: bytes,
    bundle_pem: bytes | str,
    *,
    cls: type[ssl.SSLContext] = ssl.SSLContext,
) -> ssl.SSLContext:
    """A client context presenting `cert_chain_pem` with `key_pem`, verifying
    the server's chain against `bundle_pem`. `cls` is an SSLContext subclass
    to instantiate (the sidecar's adds session resumption). The caller must
    still check the server's identity after the handshake."""
    ctx = _new_client(cls)
    _load_trust(ctx, bundle_pem)
    _load_cert_chain(ctx, cert_chain_pem, key_pem)
    return ctx


def client_context_without_certificate(bundle_pem: bytes | str) -> ssl.SSLContext:
    """A client context that presents no certificate: it authenticates the
    server against `bundle_pem` and nothing else (a sidecar that has no
    certificate yet, bootstrapping its identity from the control daemon).
    The caller must still check the server's identity after the handshake."""
    ctx = _new_client(ssl.SSLContext)
    _load_trust(ctx, bundle_pem)
    return ctx


def _new_client(cls: type[_C]) -> _C:
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    return ctx


# --- shared settings and loading --------------------------------------------------


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Before verify_mode: a client context refuses CERT_NONE while it checks
    # host names, and SPIFFE IDs are checked by the caller instead.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Strict RFC 5280 checks; the bundle holds roots only, so partial chains
    # (an intermediate as a trust anchor) are never wanted.
    ctx.verify_flags = (ctx.verify_flags | ssl.VERIFY_X509_STRICT) & ~ssl.VERIFY_X509_PARTIAL_CHAIN


def _load_trust(ctx: ssl.SSLContext, bundle_pem: bytes | str) -> None:
    # cadata takes the roots from memory; nothing else (no system store) is trusted.
    cadata = bundle_pem.decode("ascii") if isinstance(bundle_pem, bytes) else bundle_pem
    ctx.load_verify_locations(cadata=cadata)


def _load_cert_chain(ctx: ssl.SSLContext, cert_chain_pem: bytes, key_pem: bytes) -> None:
    """Hand the chain and key to OpenSSL, which reads them only from a path.

    Preferred: a memfd (an anonymous file in RAM, no name in any file system,
    gone when its last descriptor closes), opened by OpenSSL through
    /proc/self/fd. Elsewhere: a 0600 file inside a fresh 0700 directory,
    removed as soon as OpenSSL has read it, so the key is on disk for
    milliseconds and only where the process's own user can read it.
    """
    data = cert_chain_pem.rstrip(b"\n") + b"\n" + key_pem
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("lepton-tls", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="lepton-tls-") as d:
        path = os.path.join(d, "credentials.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        ctx.load_cert_chain(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
