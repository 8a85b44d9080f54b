"""The demo mesh's layout: which ports, which sidecar configs, which processes.

Pure data from a list of free ports, so the layout is testable without
starting anything. Two services from an AI customer-service app:

    client -> chat sidecar (inbound) -> chat app -> chat sidecar (outbound)
           -> intent sidecar (inbound) -> intent app

`billing` is declared in chat's sidecar config with an endpoint where nothing
listens, to show the sidecar's own answer for a service that is down.
"""

from __future__ import annotations

import socket
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lepton_mesh.demo.procs import HttpProbe, ProcessSpec

HOST = "127.0.0.1"
# Longer than the sidecar's drain deadline we configure, so SIGKILL is for hangs only.
SIDECAR_STOP_GRACE = 5.0
SIDECAR_DRAIN_S = 2.0


@dataclass(frozen=True, slots=True)
class Node:
    """One service: its app's port and its sidecar's three listeners."""

    service: str
    app: int
    outbound: int
    inbound: int
    admin: int

    def url(self, listener: str, path: str = "") -> str:
        return f"http://{HOST}:{getattr(self, listener)}{path}"


@dataclass(frozen=True, slots=True)
class Mesh:
    chat: Node
    intent: Node
    billing_dead_port: int  # declared for chat's sidecar, never listened on

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (self.chat, self.intent)


PORTS_NEEDED = 11


def free_ports(n: int, host: str = HOST) -> list[int]:
    """`n` distinct ports free right now. All are held open until all are picked,
    so the kernel cannot hand out one twice; another process may still take one
    before our child binds it, which the readiness deadline then reports."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def plan(ports: list[int]) -> Mesh:
    if len(ports) != PORTS_NEEDED or len(set(ports)) != PORTS_NEEDED:
        raise ValueError(f"need {PORTS_NEEDED} distinct ports, got {ports}")
    p = iter(ports)
    chat = Node("chat", next(p), next(p), next(p), next(p))
    intent = Node("intent", next(p), next(p), next(p), next(p))
    return Mesh(chat=chat, intent=intent, billing_dead_port=next(p))


def sidecar_config(mesh: Mesh, node: Node) -> dict[str, Any]:
    """The static config of `node`'s sidecar, as the YAML file holds it."""
    services: dict[str, Any] = {}
    if node is mesh.chat:
        services = {
            "intent": {"endpoints": [f"{HOST}:{mesh.intent.inbound}"]},
            "billing": {"endpoints": [f"{HOST}:{mesh.billing_dead_port}"]},
        }
    return {
        "service": node.service,
        "app": f"{HOST}:{node.app}",
        "listeners": {
            "outbound": f"{HOST}:{node.outbound}",
            "inbound": f"{HOST}:{node.inbound}",
            "admin": f"{HOST}:{node.admin}",
        },
        "timeouts": {"drain": SIDECAR_DRAIN_S},
        "services": services,
    }


def write_configs(mesh: Mesh, config_dir: Path) -> dict[str, Path]:
    paths = {}
    for node in mesh.nodes:
        path = config_dir / f"{node.service}-sidecar.yaml"
        path.write_text(yaml.safe_dump(sidecar_config(mesh, node), sort_keys=False))
        paths[node.service] = path
    return paths


def process_specs(mesh: Mesh, configs: dict[str, Path]) -> list[ProcessSpec]:
    """Sidecars first, apps last: stopped in reverse, the apps finish their calls
    through a sidecar that is still up (Istio's holdApplicationUntilProxyStarts
    order). All are probed concurrently, so neither order waits on the other."""
    py = sys.executable
    specs = [
        ProcessSpec(
            name=f"{node.service}-sidecar",
            argv=(py, "-m", "lepton_mesh", "sidecar", "--config", str(configs[node.service])),
            probes=(HttpProbe(HOST, node.admin, "/ready"),),
            stop_grace=SIDECAR_STOP_GRACE,
        )
        for node in (mesh.intent, mesh.chat)
    ]
    specs.append(
        ProcessSpec(
            name="intent-app",
            argv=(py, "-m", "lepton_mesh.demo.apps", "intent", "--port", str(mesh.intent.app)),
            probes=(HttpProbe(HOST, mesh.intent.app, "/healthz"),),
        )
    )
    specs.append(
        ProcessSpec(
            name="chat-app",
            argv=(
                py,
                "-m",
                "lepton_mesh.demo.apps",
                "chat",
                "--port",
                str(mesh.chat.app),
                "--outbound",
                f"{HOST}:{mesh.chat.outbound}",
            ),
            probes=(HttpProbe(HOST, mesh.chat.app, "/healthz"),),
        )
    )
    return specs
