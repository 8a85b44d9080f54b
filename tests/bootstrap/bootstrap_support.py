"""Helpers for the bootstrap tests: the operator's CA and token key, a raw
meshproto peer over TLS (the control daemon's view of a sidecar), and a
sidecar stand-in whose data-plane identity records what is installed.

Nothing here sleeps to wait for state: `eventually` polls a condition with
a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lepton_mesh import meshproto as mp
from lepton_mesh.control.auth import TokenIssuer
from lepton_mesh.identity.bundle import TrustBundle, load_certificates
from lepton_mesh.identity.store import CaFiles
from lepton_mesh.policy.sidecar_config import Address, SidecarConfig
from lepton_mesh.policy.sidecar_loader import sidecar_config_from_mapping
from lepton_mesh.proxy.mesh.control_client import ControlClient, ControlTiming
from lepton_mesh.proxy.security import tls
from tests.support.etcd import eventually

__all__ = ["FAST", "FakeSidecar", "Pki", "Replicas", "TlsPeer", "eventually"]

LOCAL = "127.0.0.1"
# `await replicas(**option overrides)`: the conftest's fixture that starts a control replica.
Replicas = Callable[..., Awaitable[Any]]
# Clocks shrunk so that every timer-driven path runs within a test's budget.
FAST = ControlTiming(
    backoff_base=0.02,
    backoff_max=0.2,
    connect_timeout=2.0,
    ping_interval=0.2,
    silence_timeout=2.0,
    lkg_wait=0.3,
)


@dataclass
class Pki:
    """The CA directory and token key an operator made with the CLI."""

    ca: CaFiles
    token_key: Path
    issuer: TokenIssuer
    tmp: Path

    def token(
        self,
        service: str,
        namespace: str = "default",
        *,
        role: str = "join",
        ttl: float = 3600.0,
        now: float | None = None,
    ) -> str:
        return self.issuer.create(
            subject=f"{namespace}/{service}",
            role=role,  # type: ignore[arg-type]
            ttl=ttl,
            service=service if role == "join" else None,
            namespace=namespace if role == "join" else None,
            now=now,
        )

    def token_file(self, service: str, namespace: str = "default", **kw: Any) -> Path:
        path = self.tmp / f"{namespace}.{service}.token"
        path.write_text(self.token(service, namespace, **kw) + "\n")
        return path

    @property
    def bundle_pem(self) -> bytes:
        return self.ca.bundle.read_bytes()

    def bootstrap_context(self, bundle_pem: bytes | None = None) -> ssl.SSLContext:
        """What a sidecar without a certificate dials control with."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=(bundle_pem or self.bundle_pem).decode())
        return ctx


def key_secrets(key_pem: bytes) -> list[bytes]:
    """Forms a private key's bytes could leak in: PEM, DER, the raw scalar (and its hex)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    body = b"".join(key_pem.strip().splitlines()[1:-1])  # the base64 without its armor
    return [key_pem, body, der, scalar, scalar.hex().encode()]


def contains_any(haystack: bytes, needles: list[bytes]) -> bool:
    return any(n in haystack for n in needles)


class TlsPeer:
    """A sidecar as the control daemon sees it: meshproto over a real TLS socket."""

    opened: list[TlsPeer] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = mp.FrameDecoder()
        self.received: list[mp.Message] = []

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> TlsPeer:
        reader, writer = await asyncio.open_connection(LOCAL, port, ssl=ctx)
        peer = cls(reader, writer)
        cls.opened.append(peer)
        return peer

    @property
    def server_identity(self) -> str | None:
        return tls.peer_identity(self.writer.get_extra_info("ssl_object"))

    def send(self, msg: mp.Message) -> None:
        self.writer.write(mp.encode(msg))

    async def recv(self, timeout: float = 5.0) -> mp.Message | None:
        """The next message; None once control closed the stream."""
        async with asyncio.timeout(timeout):
            while True:
                msg = self.decoder.next_message()
                if msg is not None:
                    self.received.append(msg)
                    return msg
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    return None
                if not data:
                    return None
                self.decoder.feed(data)

    async def until(self, kind: type, timeout: float = 5.0) -> Any:
        """Read until a message of `kind` (an `Error` or a close fails the wait)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv(timeout)
                if isinstance(msg, kind):
                    return msg
                assert msg is not None, f"stream closed while waiting for {kind.__name__}"
                assert not isinstance(msg, mp.Error), msg

    async def refusal(self) -> mp.Error:
        """The `error` control ends the stream with, then the close."""
        while True:
            msg = await self.recv()
            assert msg is not None, "closed without an error frame"
            if isinstance(msg, mp.Error):
                assert await self.recv() is None, "the stream stayed open after the error"
                return msg

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def hello(
    service: str, token: str | None, *, namespace: str = "default", node: str = ""
) -> mp.Hello:
    return mp.Hello(
        node_id=node or f"{service}-1",
        service=service,
        namespace=namespace,
        instance=mp.Instance(LOCAL, {"http": 15006}),
        token=token,
    )


# --- the sidecar side ----------------------------------------------------------------


@dataclass
class RecordingIdentity:
    """Stands in for `proxy.security.mtls.MeshIdentity`: checks what `reload` gets as a
    TLS stack would (the chain verifies against the bundle; the key loads into
    a server context with it) and records it."""

    installs: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)
    refuse: Callable[[bytes], bool] = lambda chain: False

    def reload(self, cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> None:
        if self.refuse(cert_chain_pem):
            raise ValueError("refused by the test")
        TrustBundle.from_pem(bundle_pem).verify(load_certificates(cert_chain_pem))
        tls.server_context(cert_chain_pem, key_pem, bundle_pem)
        self.installs.append((cert_chain_pem, key_pem, bundle_pem))

    @property
    def leaf(self) -> x509.Certificate:
        return load_certificates(self.installs[-1][0])[0]

    @property
    def serial(self) -> int | None:
        return self.leaf.serial_number if self.installs else None


class FakeSidecar:
    """The hooks `ControlClient` needs, with a recording data-plane identity."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.addresses: dict[str, Address] = {"inbound": Address(LOCAL, 15006)}
        self.identity = RecordingIdentity()
        self.configs: list[SidecarConfig] = []

    def swap_config(self, cfg: SidecarConfig) -> None:
        self.configs.append(cfg)


def client_config(
    control_port: int,
    pki: Pki,
    service: str,
    *,
    namespace: str = "default",
    token_file: Path | None = None,
    ca_bundle: Path | None = None,
    state_dir: Path | None = None,
    **extra: Any,
) -> SidecarConfig:
    control: dict[str, Any] = {
        "addresses": [f"{LOCAL}:{control_port}"],
        "ca_bundle": str(ca_bundle or pki.ca.bundle),
    }
    if token_file is not None:
        control["token_file"] = str(token_file)
    if state_dir is not None:
        control["state_dir"] = str(state_dir)
    data = {
        "service": service,
        "namespace": namespace,
        "app": f"{LOCAL}:1",
        "listeners": {"outbound": f"{LOCAL}:0", "inbound": f"{LOCAL}:0", "admin": f"{LOCAL}:0"},
        "tls": {"source": "control"},
        "control": control,
        **extra,
    }
    return sidecar_config_from_mapping(data, f"{service}.yaml")


async def start_client(cfg: SidecarConfig, sidecar: FakeSidecar | None = None) -> ControlClient:
    client = ControlClient(sidecar or FakeSidecar(), cfg, timing=FAST)
    client.start()
    return client


async def until_certified(client: ControlClient, timeout: float = 5.0) -> float:
    """Wait for the first certificate; seconds it took from the client's start."""
    started = time.monotonic()
    assert client.identity is not None
    await eventually(
        lambda: client.identity.has_certificate,  # type: ignore[union-attr]
        timeout,
        f"a certificate ({client.last_error or client.identity.last_error})",  # type: ignore[union-attr]
    )
    return time.monotonic() - started


# --- a mesh of real sidecars and a request loop through it ------------------------------


class App:
    """An HTTP/1.1 keep-alive app that answers every request with its name."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> App:
        self.server = await asyncio.start_server(self._serve, LOCAL, 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.name), self.name)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class Load:
    """`workers` clients calling `host` through a sidecar's outbound listener,
    each on a keep-alive connection replaced every `per_connection` requests.
    Every answer that is not a 200 from the app, and every broken connection,
    is a failure (recorded with what was seen)."""

    def __init__(
        self,
        address: Address,
        host: str,
        expect: bytes,
        *,
        workers: int = 4,
        per_connection: int = 20,
    ) -> None:
        self.address = address
        self.host = host
        self.expect = expect
        self.workers = workers
        self.per_connection = per_connection
        self.ok = 0
        self.failures: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> Load:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def stop(self) -> None:
        """Let each worker finish the request it is in, then stop."""
        self._stopping = True
        await asyncio.gather(*self._tasks)

    async def progress(self, more: int = 50, timeout: float = 10.0) -> None:
        """Wait until `more` further requests succeeded."""
        target = self.ok + more
        await eventually(lambda: self.ok >= target, timeout, f"{more} more requests")

    async def _worker(self) -> None:
        request = b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % self.host.encode()
        while not self._stopping:
            try:
                reader, writer = await asyncio.open_connection(self.address.host, self.address.port)
            except OSError as e:
                self.failures.append(f"connect: {e}")
                continue
            try:
                for _ in range(self.per_connection):
                    if self._stopping:
                        break
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = _content_length(head)
                    body = await reader.readexactly(length)
                    if not head.startswith(b"HTTP/1.1 200 ") or body != self.expect:
                        self.failures.append(
                            head.decode(errors="replace") + body.decode(errors="replace")
                        )
                    else:
                        self.ok += 1
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                self.failures.append(f"connection broke: {e!r}")
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0
