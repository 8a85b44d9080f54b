"""A lepton-mesh sidecar as the bench runs it: "as in the demo".

Routing, metrics and the access log are on (the sidecar's defaults); its
stdout and stderr, where the access log goes, are redirected to files in the
bench's temp directory, so logging costs what it costs in production (a write
per request to a file), not what a terminal costs.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.procs import BenchError, free_ports, running, spawn, tail, wait_http


@dataclass(frozen=True, slots=True)
class SidecarPorts:
    outbound: int
    inbound: int
    admin: int

    @classmethod
    def pick(cls) -> SidecarPorts:
        return cls(*free_ports(3))


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    """One sidecar of a run: who it is, where its app is, which services it may call."""

    label: str
    service: str
    app_port: int
    services: Mapping[str, Sequence[int]]
    ports: SidecarPorts = field(default_factory=SidecarPorts.pick)
    # Route / DestinationPolicy manifests, inline (docs/policy-reference.md).
    policies: Sequence[Mapping[str, Any]] = ()
    # The `tls` section (mTLS between sidecars); None: plaintext.
    tls: Mapping[str, str] | None = None


def config(spec: SidecarSpec) -> dict[str, object]:
    """The YAML document the config loader reads (see the sidecar config docs)."""
    doc: dict[str, object] = {
        "service": spec.service,
        "app": f"127.0.0.1:{spec.app_port}",
        "listeners": {
            "outbound": f"127.0.0.1:{spec.ports.outbound}",
            "inbound": f"127.0.0.1:{spec.ports.inbound}",
            "admin": f"127.0.0.1:{spec.ports.admin}",
        },
        "access_log": {"enabled": True},
        "services": {
            name: {"endpoints": [f"127.0.0.1:{p}" for p in ports]}
            for name, ports in spec.services.items()
        },
    }
    if spec.policies:
        doc["policies"] = [dict(p) for p in spec.policies]
    if spec.tls is not None:
        doc["tls"] = dict(spec.tls)
    return doc


def binary() -> str:
    """The `lepton-mesh` script next to the running interpreter (the venv's), else PATH."""
    beside = Path(sys.executable).parent / "lepton-mesh"
    found = str(beside) if beside.exists() else shutil.which("lepton-mesh")
    if found is None:
        raise BenchError("lepton-mesh not found: install the project (make bench does)")
    return found


@dataclass(frozen=True, slots=True)
class Sidecar:
    proc: subprocess.Popen[bytes]
    spec: SidecarSpec

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ports(self) -> SidecarPorts:
        return self.spec.ports


@contextmanager
def serve(
    spec: SidecarSpec, workdir: Path, pin: Sequence[str], deadline_s: float
) -> Iterator[Sidecar]:
    """Start a sidecar for `spec`; yield once /ready says 200; SIGINT and wait on exit."""
    conf_path = workdir / f"{spec.label}.yaml"
    conf_path.write_text(yaml.safe_dump(config(spec), sort_keys=False))
    stdout, stderr = workdir / f"{spec.label}.stdout.log", workdir / f"{spec.label}.stderr.log"
    argv = [*pin, binary(), "sidecar", "--config", str(conf_path)]
    proc = spawn(argv, stdout=stdout, stderr=stderr)
    # SIGINT drains at once; SIGTERM would keep outbound open for an app for the
    # whole drain period (20 s), and the bench has no app that still needs it.
    with running(proc, spec.label, signal.SIGINT):
        try:
            wait_http(
                proc, spec.ports.admin, "/ready", want=200, deadline_s=deadline_s, what=spec.label
            )
        except BenchError as exc:
            raise BenchError(f"{exc}\n--- {spec.label} stderr:\n{tail(stderr)}") from exc
        yield Sidecar(proc, spec)
