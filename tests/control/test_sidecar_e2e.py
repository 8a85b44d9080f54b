"""End to end: real sidecars fed by a real control daemon on a real etcd.

`chat` (a sidecar in this process) calls `intent`, whose two instances are
sidecar processes in front of two apps. Discovery, health and a kill -9 go
through the whole path: sidecar -> stream -> registry -> etcd -> watch ->
snapshot -> the caller's sidecar -> its balancer.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from lepton_mesh.control.daemon import ControlDaemon
from lepton_mesh.control.etcd_local import die_with_parent_prefix
from lepton_mesh.policy.sidecar_loader import load_sidecar_config
from lepton_mesh.proxy.sidecar import Sidecar
from tests.control.conftest import Replicas, eventually
from tests.support.ports import free_port

LOCAL = "127.0.0.1"


class App:
    """An HTTP/1.1 app answering every request with its name (and 503 once told to)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, LOCAL, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                ok = self.healthy or path != b"/healthz"
                body = self.name.encode()
                status = b"200 OK" if ok else b"503 Service Unavailable"
                writer.write(
                    b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
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


def sidecar_file(
    tmp: Path, name: str, service: str, app_port: int, control_port: int, **extra: object
) -> Path:
    cfg = {
        "service": service,
        "app": f"{LOCAL}:{app_port}",
        "listeners": {
            "outbound": f"{LOCAL}:{free_port()}",
            "inbound": f"{LOCAL}:{free_port()}",
            "admin": f"{LOCAL}:{free_port()}",
        },
        "access_log": False,
        "instance": {"id": name},
        "control": {"addresses": [f"{LOCAL}:{control_port}"]},
    } | extra
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def call(port: int, host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(LOCAL, port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@pytest.fixture
async def mesh(replicas: Replicas, tmp_path: Path) -> AsyncIterator[dict]:
    control: ControlDaemon = await replicas(lease_ttl=10)
    apps = {name: App(name) for name in ("intent-1", "intent-2", "chat")}
    ports = {name: await app.start() for name, app in apps.items()}
    procs: dict[str, asyncio.subprocess.Process] = {}
    for name in ("intent-1", "intent-2"):
        path = sidecar_file(
            tmp_path, name, "intent", ports[name], control.listen_port,
            health_check={"path": "/healthz", "interval": "100ms", "timeout": "100ms"},
        )  # fmt: skip
        procs[name] = await asyncio.create_subprocess_exec(
            *die_with_parent_prefix(), sys.executable, "-m", "lepton_mesh", "sidecar", "--config", str(path),
            env=os.environ, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    chat_cfg = load_sidecar_config(
        sidecar_file(
            tmp_path, "chat-1", "chat", ports["chat"], control.listen_port, dependencies=["intent"]
        )
    )
    chat = Sidecar(chat_cfg)
    await chat.start()
    try:
        yield {"control": control, "apps": apps, "procs": procs, "chat": chat}
    finally:
        await chat.stop()
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for app in apps.values():
            await app.stop()


def intent_endpoints(chat: Sidecar) -> list[tuple[str, bool]]:
    svc = chat.cfg.services.get("intent")
    return sorted((str(e.address), e.healthy) for e in svc.endpoints) if svc else []


async def test_discover_call_unhealthy_and_kill_9(mesh: dict) -> None:
    chat: Sidecar = mesh["chat"]
    out = chat.addresses["outbound"].port
    await eventually(
        lambda: chat.ready and len(intent_endpoints(chat)) == 2, timeout=15, what="both intents"
    )

    seen = {(await asyncio.to_thread(call, out, "intent")) for _ in range(20)}
    assert seen == {(200, "intent-1"), (200, "intent-2")}

    # intent-1's app turns unhealthy: its sidecar reports it, chat stops sending to it.
    mesh["apps"]["intent-1"].healthy = False
    await eventually(
        lambda: sorted(h for _, h in intent_endpoints(chat)) == [False, True], timeout=5
    )
    seen = {(await asyncio.to_thread(call, out, "intent")) for _ in range(10)}
    assert seen == {(200, "intent-2")}
    mesh["apps"]["intent-1"].healthy = True
    await eventually(lambda: [h for _, h in intent_endpoints(chat)] == [True, True], timeout=5)

    # kill -9 intent-2's sidecar: the kernel closes its stream, its lease is revoked at once.
    killed = time.monotonic()
    mesh["procs"]["intent-2"].send_signal(signal.SIGKILL)
    await eventually(lambda: len(intent_endpoints(chat)) == 1, timeout=5, what="intent-2 gone")
    print(
        f"kill -9 -> gone from the caller's endpoints: {(time.monotonic() - killed) * 1000:.0f} ms"
    )
    seen = {(await asyncio.to_thread(call, out, "intent")) for _ in range(10)}
    assert seen == {(200, "intent-1")}

    registry = mesh["control"].ctx.registry
    assert {s["node_id"] for s in registry.sidecars()} == {"intent-1", "chat-1"}
    assert [i["id"] for i in registry.instances("intent")] == ["intent-1"]
    assert chat.control is not None

    def chat_acked() -> bool:
        rows = {s["node_id"]: s for s in registry.sidecars()}
        return rows["chat-1"]["applied_version"] == chat.control.applied_version  # type: ignore[union-attr]

    await eventually(chat_acked, what="chat's applied version recorded")
