"""A small real mesh whose /metrics the rules and the dashboard are checked against.

`web`'s sidecar calls `ratings`' sidecar over mTLS (certificates from a throwaway CA);
`ratings` enforces an AuthorizationPolicy and a RateLimit, both loaded from the YAML
sidecar config by the real loader. A few requests make the families the rules use carry
samples (so their labels are known, not guessed): requests both ways (reporter source
and destination), durations, resilience rows, TLS handshakes and the certificate's
expiry, authorization decisions, rate-limit refusals. A control daemon on a real etcd,
with one peer that takes its snapshot and never acks it, gives the control families,
the ack-lag series included. Everything is on 127.0.0.1 with ports picked by the OS.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lepton_mesh import meshproto as mp
from lepton_mesh.control.daemon import ControlDaemon, ControlOptions
from lepton_mesh.identity.bundle import TrustBundle
from lepton_mesh.identity.ca import CertificateAuthority, create_intermediate, create_root
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.spiffe import SpiffeId
from lepton_mesh.policy.sidecar_config import Address
from lepton_mesh.policy.sidecar_loader import load_sidecar_config
from lepton_mesh.proxy.sidecar import Sidecar

LOCAL = "127.0.0.1"
TD = "cluster.local"
DEADLINE = 10.0


async def wait_for(pred: Callable[[], Any], what: str, timeout: float = DEADLINE) -> None:
    """Poll `pred` on the loop until it holds; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not await _call(pred):
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)  # yield to the loop; the condition decides


async def _call(pred: Callable[[], Any]) -> Any:
    result = pred()
    return await result if asyncio.iscoroutine(result) else result


# --- HTTP, by hand: one request per connection ------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes


async def http_get(address: Address, path: str, host: str = "") -> Reply:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        async with asyncio.timeout(DEADLINE):
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host or address.host}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            raw = await reader.read(-1)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return Reply(int(head.split(b" ", 2)[1]), body)


async def scrape(address: Address) -> str:
    reply = await http_get(address, "/metrics")
    assert reply.status == 200, reply
    return reply.body.decode()


class App:
    """An HTTP/1.1 app answering 200 "ok" to everything, keep-alive."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def start(self) -> Address:
        self.server = await asyncio.start_server(self._serve, LOCAL, 0)
        return Address(LOCAL, self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# --- the mesh ------------------------------------------------------------------------------


def _write_pki(folder: Path, services: tuple[str, ...]) -> None:
    """A root, an intermediate, and for each service `<svc>/cert.pem` and `key.pem`."""
    root = create_root(TD)
    bundle = TrustBundle((root.cert,))
    intermediate = create_intermediate(root)
    ca = CertificateAuthority(intermediate.cert, intermediate.key, bundle)
    (folder / "bundle.pem").write_bytes(bundle.to_pem())
    for svc in services:
        key = generate_key()
        sid = SpiffeId(TD, "default", svc)
        issued = ca.issue(build_csr(key, sid), sid)
        (folder / svc).mkdir()
        (folder / svc / "cert.pem").write_bytes(issued.chain_pem)
        (folder / svc / "key.pem").write_bytes(private_key_pem(key))


def _config(service: str, app: Address, **extra: Any) -> dict[str, Any]:
    return {
        "service": service,
        "app": f"{app.host}:{app.port}",
        "listeners": {"outbound": f"{LOCAL}:0", "inbound": f"{LOCAL}:0", "admin": f"{LOCAL}:0"},
        "access_log": False,
        "tls": {"cert": f"{service}/cert.pem", "key": f"{service}/key.pem", "bundle": "bundle.pem"},
        **extra,
    }


RATINGS_POLICIES = [
    {
        "apiVersion": "lepton-mesh/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "ratings-callers", "namespace": "default"},
        "spec": {
            "service": "ratings",
            "action": "ALLOW",
            "rules": [{"name": "web-reads", "from": [{"services": ["web"]}], "to": [{"paths": ["/ok"]}]}],
        },
    },
    {
        "apiVersion": "lepton-mesh/v1",
        "kind": "RateLimit",
        "metadata": {"name": "ratings", "namespace": "default"},
        "spec": {
            "service": "ratings",
            "limits": [{"name": "per-caller", "key": "source_identity", "requests_per_second": 1, "burst": 3}],
        },
    },
]  # fmt: skip


async def scrape_sidecars(folder: Path) -> tuple[str, str]:
    """(web's /metrics, ratings' /metrics) after traffic through both."""
    _write_pki(folder, ("web", "ratings"))
    app = App()
    app_address = await app.start()
    started: list[Sidecar] = []
    try:
        ratings = await _sidecar(
            folder, "ratings", _config("ratings", app_address, policies=RATINGS_POLICIES)
        )
        started.append(ratings)
        inbound = ratings.addresses["inbound"]
        web_cfg = _config(
            "web", app_address, services={"ratings": {"endpoints": [f"{LOCAL}:{inbound.port}"]}}
        )
        web = await _sidecar(folder, "web", web_cfg)
        started.append(web)
        await _traffic(web.addresses["outbound"])
        return await scrape(web.addresses["admin"]), await scrape(ratings.addresses["admin"])
    finally:
        for sidecar in started:
            await sidecar.stop()
        await app.stop()


async def _sidecar(folder: Path, name: str, cfg: dict[str, Any]) -> Sidecar:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sidecar = Sidecar(load_sidecar_config(path))
    await sidecar.start()
    return sidecar


async def _traffic(outbound: Address) -> None:
    """Allowed, denied, then allowed until rate-limited (burst 3)."""
    assert (await http_get(outbound, "/ok", "ratings")).status == 200
    assert (await http_get(outbound, "/admin", "ratings")).status == 403
    statuses = [(await http_get(outbound, "/ok", "ratings")).status for _ in range(6)]
    assert 429 in statuses, statuses


# --- the control daemon --------------------------------------------------------------------


class Peer:
    """A sidecar as control sees it, over meshproto: it takes snapshots and acks on request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = mp.FrameDecoder()
        self.snapshot: mp.Snapshot | None = None

    @classmethod
    async def join(cls, port: int, node_id: str, service: str) -> Peer:
        """Hello, then read up to the first snapshot (not acked)."""
        peer = cls(*await asyncio.open_connection(LOCAL, port))
        hello = mp.Hello(node_id, service, "default", mp.Instance(LOCAL, {"http": 15006}))
        peer.writer.write(mp.encode(hello))
        while peer.snapshot is None:
            msg = await peer.recv()
            assert not isinstance(msg, mp.Error), msg
            if isinstance(msg, mp.Snapshot):
                peer.snapshot = msg
        return peer

    async def recv(self) -> mp.Message:
        async with asyncio.timeout(DEADLINE):
            while (msg := self.decoder.next_message()) is None:
                data = await self.reader.read(65536)
                assert data, "control closed the stream"
                self.decoder.feed(data)
        return msg

    def ack(self) -> None:
        assert self.snapshot is not None
        self.writer.write(mp.encode(mp.Ack(self.snapshot.version)))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def start_control(endpoints: list[str], replica: str = "obs-1") -> ControlDaemon:
    daemon = ControlDaemon(
        ControlOptions(
            etcd=tuple(endpoints),
            listen=(LOCAL, 0),
            admin=(LOCAL, 0),
            replica_id=replica,
            etcd_timeout=2.0,
        )
    )
    ctx = await daemon.start()
    await asyncio.wait_for(ctx.cache.ready.wait(), DEADLINE)
    return daemon


def admin_address(daemon: ControlDaemon) -> Address:
    return Address(LOCAL, daemon.admin_port)


async def scrape_control(endpoints: list[str]) -> str:
    """A control daemon's /metrics while one of its sidecars has not acked its snapshot."""
    daemon = await start_control(endpoints)
    peer = None
    try:
        peer = await Peer.join(daemon.listen_port, "laggard-1", "ratings")
        text = ""

        async def behind() -> bool:
            nonlocal text
            text = await scrape(admin_address(daemon))
            return "lepton_control_sidecars_not_acked 1.0" in text

        await wait_for(behind, "the unacked peer in /metrics")
        return text
    finally:
        if peer is not None:
            await peer.close()
        await daemon.stop()
