"""Helpers for the TLS tests: a test CA, an mTLS echo server that reports how
each handshake ended, and a client that does one round trip.

The server accepts with `loop.sock_accept` and hands each socket to
`loop.connect_accepted_socket(ssl=...)`: unlike `create_server(ssl=...)`, that
raises the handshake's exception to the caller, so the server side can
classify and count its failures (the way the sidecar's inbound listener must).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import warnings
from dataclasses import dataclass
from typing import Any

from lepton_mesh.identity.bundle import TrustBundle
from lepton_mesh.identity.ca import CertificateAuthority, create_intermediate, create_root
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.spiffe import SpiffeId
from lepton_mesh.proxy.security import tls

TD = "cluster.local"
DEADLINE = 10.0
PING = b"ping"


def spiffe(service: str, namespace: str = "default") -> SpiffeId:
    return SpiffeId(TD, namespace, service)


@dataclass(frozen=True)
class Creds:
    chain_pem: bytes
    key_pem: bytes
    identity: SpiffeId


class Pki:
    """A root, an intermediate and a CertificateAuthority, like `certs init` makes."""

    def __init__(self) -> None:
        self.root = create_root(TD)
        self.intermediate = create_intermediate(self.root)
        self.bundle = TrustBundle((self.root.cert,))
        self.ca = CertificateAuthority(self.intermediate.cert, self.intermediate.key, self.bundle)

    @property
    def bundle_pem(self) -> bytes:
        return self.bundle.to_pem()

    def creds(
        self,
        service: str,
        *,
        now: dt.datetime | None = None,
        lifetime: dt.timedelta | None = None,
    ) -> Creds:
        key = generate_key()
        sid = spiffe(service)
        issued = self.ca.issue(build_csr(key, sid), sid, now=now, lifetime=lifetime)
        return Creds(issued.chain_pem, private_key_pem(key), sid)


def server_ctx(creds: Creds, bundle_pem: bytes, **kwargs: Any) -> ssl.SSLContext:
    return tls.server_context(creds.chain_pem, creds.key_pem, bundle_pem, **kwargs)


def client_ctx(creds: Creds, bundle_pem: bytes) -> tls.MeshClientContext:
    return tls.client_context(creds.chain_pem, creds.key_pem, bundle_pem)


def tls11_client() -> ssl.SSLContext:
    """A client that speaks only TLS 1.1 (what an old stack would offer)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # the TLSv1_1 member is deprecated; that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 will not offer TLS 1.1 otherwise
    return ctx


@dataclass(frozen=True)
class Outcome:
    """How one inbound connection's setup ended on the server."""

    kind: str  # "tls", "plaintext", or "failed"
    identity: str | None = None
    reused: bool = False
    reason: str | None = None
    error: BaseException | None = None


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        # Not asserted to be an asyncio.Transport: uvloop's SSL transport is not one.
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class TlsServer:
    """An echo server on 127.0.0.1. With `permissive`, one port serves TLS and
    plaintext, told apart by `PeekTLS.peek` before any byte is consumed."""

    def __init__(self, ctx: ssl.SSLContext, *, permissive: bool = False) -> None:
        self.ctx = ctx
        self.permissive = permissive
        self.outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: list[asyncio.BaseTransport] = []
        self.port = 0

    async def start(self) -> None:
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            sock.setblocking(False)
            self._spawn(self._setup(sock))

    async def _setup(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        use_tls = True
        try:
            if self.permissive:
                verdict = await tls.PeekTLS.peek(sock, timeout=DEADLINE)
                use_tls = verdict == tls.PeekTLS.TLS
            transport, _ = await loop.connect_accepted_socket(
                _Echo, sock, ssl=self.ctx if use_tls else None
            )
        except (OSError, TimeoutError) as exc:
            sock.close()
            self.outcomes.put_nowait(
                Outcome("failed", reason=tls.classify_handshake_error(exc), error=exc)
            )
            return
        self._transports.append(transport)
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None:
            self.outcomes.put_nowait(Outcome("plaintext"))
        else:
            self.outcomes.put_nowait(
                Outcome("tls", identity=tls.peer_identity(sslobj), reused=sslobj.session_reused)
            )

    async def next_outcome(self) -> Outcome:
        async with asyncio.timeout(DEADLINE):
            return await self.outcomes.get()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._listener.close()
        for t in self._transports:
            t.close()


@dataclass(frozen=True)
class ClientResult:
    identity: str | None
    version: str | None
    cipher: str | None
    reused: bool
    session_stored: bool


async def connect(
    port: int,
    ctx: ssl.SSLContext,
    *,
    expect: SpiffeId | str | None = None,
    cache: tls.SessionCache | None = None,
    endpoint: object = "endpoint",
) -> ClientResult:
    """Connect, check the peer's identity if `expect`, echo one message, close.

    A server that refuses our certificate under TLS 1.3 does so after our side
    of the handshake is done: we learn it as a closed connection on the first
    read, raised here as ConnectionResetError.
    """
    resume = cache.resuming(endpoint) if cache is not None else contextlib.nullcontext()
    async with asyncio.timeout(DEADLINE):
        with resume:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        try:
            sslobj = writer.get_extra_info("ssl_object")
            if expect is not None:
                tls.verify_peer_identity(sslobj, expect)
            writer.write(PING)
            try:
                got = await reader.readexactly(len(PING))
            except asyncio.IncompleteReadError:
                raise ConnectionResetError("the server closed the connection") from None
            assert got == PING
            stored = cache.store(endpoint, sslobj) if cache is not None else False
            cipher = sslobj.cipher()
            return ClientResult(
                identity=tls.peer_identity(sslobj),
                version=sslobj.version(),
                cipher=cipher[0] if cipher else None,
                reused=sslobj.session_reused,
                session_stored=stored,
            )
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def connect_plain(port: int, payload: bytes) -> bytes:
    """Plaintext: send `payload`, read the echo of it."""
    async with asyncio.timeout(DEADLINE):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(payload)
            return await reader.readexactly(len(payload))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
