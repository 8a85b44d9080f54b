"""Micro-benchmark of mTLS handshakes with the sidecar's contexts, on uvloop.

Run by hand (not by pytest):  python bench/micro_tls.py [--quick] [--seconds S]

A server process (one uvloop loop, `proxy.security.tls.server_context`) writes one
byte on every connection; a client process opens connections as fast as it
can with a few in flight, reads that byte, and closes. Two runs: every
connection a full handshake (ECDHE + ECDSA P-256 both ways, chain
verification both ways), then every connection resuming its endpoint's
session from a `SessionCache`. Reported per run: connections per second, and
the server's CPU time per handshake, whose inverse is the rate one sidecar
core could sustain if the client were elsewhere (here both share the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import multiprocessing as mp
import resource
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import uvloop

from lepton_mesh.identity.bundle import TrustBundle
from lepton_mesh.identity.ca import CertificateAuthority, create_intermediate, create_root
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.spiffe import SpiffeId
from lepton_mesh.proxy.security import tls

IN_FLIGHT = 8


def _creds(ca: CertificateAuthority, service: str) -> tuple[bytes, bytes]:
    key = generate_key()
    sid = SpiffeId(ca.trust_domain, "default", service)
    return ca.issue(build_csr(key, sid), sid).chain_pem, private_key_pem(key)


class _Hello(asyncio.Protocol):
    """Server side: one byte, so the client knows the handshake (and, under
    TLS 1.3, the session ticket that comes with it) has arrived."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"x")  # type: ignore[attr-defined]


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _server(creds: tuple[bytes, bytes], bundle: bytes, conn: Connection) -> None:
    async def main() -> None:
        ctx = tls.server_context(*creds, bundle)
        srv = await asyncio.get_running_loop().create_server(
            _Hello, "127.0.0.1", 0, ssl=ctx, backlog=1024
        )
        conn.send(srv.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        while True:  # each request: "cpu?" -> CPU seconds so far; "stop" -> exit
            msg = await loop.run_in_executor(None, conn.recv)
            if msg == "stop":
                break
            conn.send(_cpu_s())
        srv.close()

    uvloop.run(main())


class _Client(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def data_received(self, data: bytes) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before the first byte"))


@dataclass(frozen=True)
class Run:
    name: str
    connections: int
    seconds: float
    reused: int
    server_cpu_s: float

    @property
    def per_s(self) -> float:
        return self.connections / self.seconds

    @property
    def server_cpu_ms(self) -> float:
        return self.server_cpu_s / self.connections * 1e3


async def _churn(
    port: int, ctx: tls.MeshClientContext, resume: bool, seconds: float
) -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    cache = tls.SessionCache(ctx)
    endpoint = ("127.0.0.1", port)
    deadline = loop.time() + seconds
    count = reused = 0

    async def worker() -> None:
        nonlocal count, reused
        while loop.time() < deadline:
            done: asyncio.Future[None] = loop.create_future()
            with cache.resuming(endpoint) if resume else contextlib.nullcontext():
                transport, _ = await loop.create_connection(
                    functools.partial(_Client, done), "127.0.0.1", port, ssl=ctx
                )
            await done
            sslobj = transport.get_extra_info("ssl_object")
            reused += sslobj.session_reused
            if resume:
                cache.store(endpoint, sslobj)
            transport.close()
            count += 1

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return count, reused


def measure(seconds: float) -> list[Run]:
    root = create_root("cluster.local")
    inter = create_intermediate(root)
    bundle = TrustBundle((root.cert,))
    ca = CertificateAuthority(inter.cert, inter.key, bundle)
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(
        target=_server, args=(_creds(ca, "chat"), bundle.to_pem(), child), daemon=True
    )
    proc.start()
    try:
        port = parent.recv()
        ctx = tls.client_context(*_creds(ca, "web"), bundle.to_pem())
        runs = []
        for name, resume in (("full", False), ("resumed", True)):
            uvloop.run(_churn(port, ctx, resume, min(seconds, 0.3)))  # warm up
            parent.send("cpu?")
            cpu0 = parent.recv()
            t0 = time.perf_counter()
            count, reused = uvloop.run(_churn(port, ctx, resume, seconds))
            elapsed = time.perf_counter() - t0
            parent.send("cpu?")
            runs.append(Run(name, count, elapsed, reused, parent.recv() - cpu0))
        return runs
    finally:
        parent.send("stop")
        proc.join(5)
        if proc.is_alive():
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per run (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 s per run")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    print(f"mTLS handshakes on uvloop, {IN_FLIGHT} in flight, {seconds:g} s per run")
    print(f"{'run':<10}{'conn/s':>10}{'reused':>10}{'server CPU/hs':>16}{'1-core rate':>14}")
    for run in measure(seconds):
        print(
            f"{run.name:<10}{run.per_s:>10.0f}{run.reused / run.connections:>10.0%}"
            f"{run.server_cpu_ms:>13.2f} ms{1e3 / run.server_cpu_ms:>12.0f}/s"
        )


if __name__ == "__main__":
    main()
