"""Run by test_lean_imports.py in a fresh interpreter: one sidecar scenario, one JSON line out.

    python lean_child.py plaintext '{}'
    python lean_child.py tls '{"a": {...tls files...}, "b": {...}}'
    python lean_child.py jwt '{"issuer": ..., "jwks": ..., "token": ...}'
    python lean_child.py loaded '{"dir": "/a/temporary/folder"}'

Configs are built from the model (policy.sidecar_config), not loaded from
YAML, except in `loaded`: the scenarios measure what the sidecar imports, not
what the loader does. Each step records the status of one request sent
through the sidecar and which heavy modules are in sys.modules after it.

This file imports nothing heavy at module level, and neither may anything
it imports before the scenario starts: its sys.modules is the measurement.
"""

from __future__ import annotations

import asyncio
import json
import sys
from types import MappingProxyType
from typing import Any

import uvloop

from lepton_mesh.policy.sidecar_config import (
    AccessLogConfig,
    Address,
    Endpoint,
    Listeners,
    ServiceConfig,
    SidecarConfig,
    TlsConfig,
)
from lepton_mesh.proxy.sidecar import Sidecar

HEAVY = ("cryptography", "jwt")
LOCAL = "127.0.0.1"
EPHEMERAL = Listeners(Address(LOCAL, 0), Address(LOCAL, 0), Address(LOCAL, 0))
DEADLINE = 10.0


def heavy_modules() -> list[str]:
    return [m for m in HEAVY if m in sys.modules]


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Report:
    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def step(self, name: str, status: int | None = None) -> None:
        self.steps.append({"step": name, "status": status, "modules": heavy_modules()})

    def dump(self) -> None:
        print(json.dumps({"steps": self.steps, "rss_kb": rss_kb()}), flush=True)


# --- a local app and a client -------------------------------------------------------


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """200 `ok` to each request (no request bodies in these scenarios); keep-alive."""
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def start_app() -> tuple[asyncio.Server, Address]:
    server = await asyncio.start_server(_answer, LOCAL, 0)
    return server, Address(LOCAL, server.sockets[0].getsockname()[1])


async def get(address: Address, host: str, headers: str = "") -> int:
    """One request on a new connection; the response's status code."""
    async with asyncio.timeout(DEADLINE):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        try:
            request = f"GET /lean HTTP/1.1\r\nhost: {host}\r\n{headers}connection: close\r\n\r\n"
            writer.write(request.encode("latin-1"))
            status_line = await reader.readline()
            await reader.read()
        finally:
            writer.close()
    return int(status_line.split()[1])


def config(service: str, app: Address, **kw: Any) -> SidecarConfig:
    return SidecarConfig(
        service=service,
        app=app,
        listeners=EPHEMERAL,
        access_log=AccessLogConfig(enabled=False),
        **kw,
    )


# --- scenarios ------------------------------------------------------------------------


async def plaintext(report: Report, args: dict[str, Any]) -> None:
    """No tls, no security policies: a request each way, through outbound and inbound."""
    server, app = await start_app()
    report.step("imported")
    services = {"up": ServiceConfig("up", endpoints=(Endpoint(app),))}
    sc = Sidecar(config("lean", app, services=MappingProxyType(services)))
    await sc.start()
    try:
        report.step("started")
        report.step("outbound", await get(sc.addresses["outbound"], "up"))
        report.step("inbound", await get(sc.addresses["inbound"], "lean"))
    finally:
        await sc.stop()
        server.close()


async def tls(report: Report, args: dict[str, Any]) -> None:
    """Sidecar `a` calls service `b` through `b`'s sidecar over mTLS (STRICT)."""
    server, app = await start_app()
    report.step("imported")
    b = Sidecar(config("b", app, tls=TlsConfig(**args["b"])))
    await b.start()
    try:
        ep = Endpoint(b.addresses["inbound"])
        services = {"b": ServiceConfig("b", endpoints=(ep,))}
        a = Sidecar(
            config("a", app, services=MappingProxyType(services), tls=TlsConfig(**args["a"]))
        )
        await a.start()
        try:
            report.step("started")
            report.step("outbound_mtls", await get(a.addresses["outbound"], "b"))
            report.step("inbound_plaintext_refused", await _refused(b.addresses["inbound"]))
        finally:
            await a.stop()
    finally:
        await b.stop()
        server.close()


async def _refused(address: Address) -> int:
    """The status a plaintext request to a STRICT port gets (400 mtls_required; 0: no answer)."""
    try:
        return await get(address, "b")
    except (ConnectionError, ValueError, IndexError):
        return 0


async def jwt(report: Report, args: dict[str, Any]) -> None:
    """Plaintext first; then a config with a RequestAuthentication is swapped in."""
    from lepton_mesh.policy.security import JwtProvider, RequestAuthentication, SecurityPolicies

    server, app = await start_app()
    sc = Sidecar(config("lean", app))
    await sc.start()
    try:
        report.step("plaintext_inbound", await get(sc.addresses["inbound"], "lean"))
        provider = JwtProvider(
            "lean-issuer", args["issuer"], jwks=args["jwks"], algorithms=("ES256",), required=True
        )
        authn = RequestAuthentication("lean-authn", "default", "lean", (provider,))
        sc.swap_config(config("lean", app, security=SecurityPolicies(authentication=authn)))
        report.step("swapped")
        report.step("no_token", await get(sc.addresses["inbound"], "lean"))
        bearer = f"authorization: Bearer {args['token']}\r\n"
        report.step("valid_token", await get(sc.addresses["inbound"], "lean", bearer))
    finally:
        await sc.stop()
        server.close()


async def loaded(report: Report, args: dict[str, Any]) -> None:
    """The `lepton-mesh sidecar --config` path: the plaintext sidecar, loaded from YAML."""
    from lepton_mesh.policy.sidecar_loader import load_sidecar_config

    server, app = await start_app()
    path = f"{args['dir']}/sidecar.yaml"
    with open(path, "w") as f:
        f.write(
            f"service: lean\napp: {app}\n"
            f"listeners: {{outbound: {LOCAL}:0, inbound: {LOCAL}:0, admin: {LOCAL}:0}}\n"
            f"services:\n  up: {{endpoints: ['{app}']}}\n"
            "access_log: {enabled: false}\n"
        )
    sc = Sidecar(load_sidecar_config(path))
    await sc.start()
    try:
        report.step("outbound", await get(sc.addresses["outbound"], "up"))
    finally:
        await sc.stop()
        server.close()


SCENARIOS = {"plaintext": plaintext, "tls": tls, "jwt": jwt, "loaded": loaded}


def main() -> None:
    scenario, args = SCENARIOS[sys.argv[1]], json.loads(sys.argv[2])
    report = Report()
    uvloop.run(scenario(report, args))
    report.dump()


if __name__ == "__main__":
    main()
