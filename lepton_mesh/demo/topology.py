"""The demo mesh's layout: which ports, which sidecar configs, which processes.

Pure data from a list of free ports, so the layout is testable without
starting anything. Three services of an AI customer-service app, every one
behind a sidecar that the control daemon feeds:

    client -> chat sidecar -> chat app -+-> chat sidecar -> intent sidecar -> intent app
                                        +-> chat sidecar -> dialog-v1 sidecar -> dialog v1 app
                                                         \\-> dialog-v2 sidecar -> dialog v2 app

    etcd <- control daemon <- one stream per sidecar (registration, snapshots)

No sidecar config names another service's address: chat's sidecar declares
`dependencies: [intent, dialog]` and learns their instances from the control
daemon, which learns them from the sidecars that registered them.
"""

from __future__ import annotations

import signal
import socket
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lepton_mesh.demo.procs import HttpProbe, ProcessSpec, TcpProbe

HOST = "127.0.0.1"
# Longer than the sidecar's drain deadline we configure, so SIGKILL is for hangs only.
SIDECAR_STOP_GRACE = 5.0
SIDECAR_DRAIN_S = 2.0
# The control daemon revokes every sidecar's lease on SIGTERM: a few etcd round trips.
CONTROL_STOP_GRACE = 10.0
ETCD_STOP_GRACE = 10.0
CONTROL_ID = "demo-control"
# How often a sidecar checks its app: a dead app leaves its callers' balancing within ~2 s.
HEALTH_CHECK = {"path": "/healthz", "interval": "1s", "timeout": "500ms"}
# Who calls whom: the only services each sidecar is sent (docs/control-plane.md, scoping).
DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "chat": ("intent", "dialog"),
    "intent": (),
    "dialog": (),
}


@dataclass(frozen=True, slots=True)
class Node:
    """One instance: its app's port and its sidecar's three listeners.

    `name` is the instance id registered with the control daemon and the
    prefix of its processes' names; `version` is its `version` label, which
    the DestinationPolicy's subsets select on.
    """

    name: str
    service: str
    version: str
    app: int
    outbound: int
    inbound: int
    admin: int

    def url(self, listener: str, path: str = "") -> str:
        return f"http://{HOST}:{getattr(self, listener)}{path}"


@dataclass(frozen=True, slots=True)
class Mesh:
    etcd_client: int
    etcd_peer: int
    control: int  # the sidecar-facing stream port
    admin_api: int  # the control daemon's admin API (what the CLI talks to)
    chat: Node
    intent: Node
    dialog_v1: Node
    dialog_v2: Node

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (self.chat, self.intent, self.dialog_v1, self.dialog_v2)

    @property
    def dialogs(self) -> tuple[Node, ...]:
        return (self.dialog_v1, self.dialog_v2)

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n.service for n in self.nodes))

    def nodes_of(self, service: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.service == service)

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_api}"

    @property
    def etcd_url(self) -> str:
        return f"http://{HOST}:{self.etcd_client}"


_NODES = (("chat", "chat", "v1"), ("intent", "intent", "v1"),
          ("dialog-v1", "dialog", "v1"), ("dialog-v2", "dialog", "v2"))  # fmt: skip
PORTS_NEEDED = 4 + 4 * len(_NODES)


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
    etcd_client, etcd_peer, control, admin_api = next(p), next(p), next(p), next(p)
    nodes = [Node(name, svc, ver, next(p), next(p), next(p), next(p)) for name, svc, ver in _NODES]
    return Mesh(etcd_client, etcd_peer, control, admin_api, *nodes)


def sidecar_config(mesh: Mesh, node: Node) -> dict[str, Any]:
    """The config file of `node`'s sidecar: its own listeners, and where control is.

    Everything about other services (their instances, routes, retries) comes
    from the control daemon's snapshots. `state_dir` is relative to the file.
    """
    return {
        "service": node.service,
        "app": f"{HOST}:{node.app}",
        "listeners": {
            "outbound": f"{HOST}:{node.outbound}",
            "inbound": f"{HOST}:{node.inbound}",
            "admin": f"{HOST}:{node.admin}",
        },
        "timeouts": {"drain": SIDECAR_DRAIN_S},
        "dependencies": list(DEPENDENCIES[node.service]),
        "instance": {"id": node.name, "labels": {"version": node.version}},
        "control": {"addresses": [f"{HOST}:{mesh.control}"], "state_dir": f"state/{node.name}"},
        "health_check": dict(HEALTH_CHECK),
    }


def write_configs(mesh: Mesh, config_dir: Path) -> dict[str, Path]:
    """One sidecar config per node, by node name."""
    paths = {}
    for node in mesh.nodes:
        path = config_dir / f"{node.name}-sidecar.yaml"
        path.write_text(yaml.safe_dump(sidecar_config(mesh, node), sort_keys=False))
        paths[node.name] = path
    return paths


def etcd_spec(mesh: Mesh, etcd_argv: tuple[str, ...]) -> ProcessSpec:
    """etcd, with the command line LocalEtcd builds (see runner), probed on /health.

    etcd's /health answers 503 until the member has a leader and serves reads.
    """
    return ProcessSpec(
        name="etcd",
        argv=etcd_argv,
        probes=(HttpProbe(HOST, mesh.etcd_client, "/health"),),
        stop_grace=ETCD_STOP_GRACE,
    )


def control_spec(mesh: Mesh, token_key: Path) -> ProcessSpec:
    """One control daemon replica. Ready when both its ports answer: the admin
    API's public OpenAPI document, and a TCP connect on the sidecar port."""
    argv = (
        sys.executable, "-m", "lepton_mesh", "control",
        "--etcd", f"{HOST}:{mesh.etcd_client}",
        "--listen", f"{HOST}:{mesh.control}",
        "--admin", f"{HOST}:{mesh.admin_api}",
        "--token-key", str(token_key),
        "--id", CONTROL_ID,
    )  # fmt: skip
    return ProcessSpec(
        name="control",
        argv=argv,
        probes=(
            HttpProbe(HOST, mesh.admin_api, "/ready"),
            TcpProbe(HOST, mesh.control),
        ),
        stop_grace=CONTROL_STOP_GRACE,
    )


def app_specs(mesh: Mesh) -> list[ProcessSpec]:
    """The four apps. They start before their sidecars, so a sidecar's first
    health check finds its app up and registers the instance healthy."""
    py = (sys.executable, "-m", "lepton_mesh.demo.apps")
    specs = []
    for node in mesh.nodes:
        argv = (*py, node.service, "--port", str(node.app))
        if node.service == "chat":
            argv += ("--outbound", f"{HOST}:{node.outbound}")
        if node.service == "dialog":
            argv += ("--version", node.version)
        specs.append(
            ProcessSpec(
                name=f"{node.name}-app",
                argv=argv,
                probes=(HttpProbe(HOST, node.app, "/healthz"),),
            )
        )
    return specs


def sidecar_specs(mesh: Mesh, configs: dict[str, Path]) -> list[ProcessSpec]:
    """The four sidecars. /ready answers 200 once the first snapshot from the
    control daemon is applied."""
    py = sys.executable
    return [
        ProcessSpec(
            name=f"{node.name}-sidecar",
            argv=(py, "-m", "lepton_mesh", "sidecar", "--config", str(configs[node.name])),
            probes=(HttpProbe(HOST, node.admin, "/ready"),),
            stop_grace=SIDECAR_STOP_GRACE,
            stop_signal=signal.SIGINT,  # the whole mesh stops: no outbound grace
        )
        for node in mesh.nodes
    ]
