"""Mesh certificates for the mTLS runs, made the way an operator makes them: with the CLI.

`lepton-mesh certs init` creates a root and an intermediate CA in a fresh
directory; `lepton-mesh certs issue --service NAME` a workload key and chain
per service (24 h, ECDSA P-256, the SPIFFE ID of `default/NAME`). Every run
gets its own CA under the bench's temp directory.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError
from bench.sidecar import binary

NAMESPACE = "default"


@dataclass(frozen=True, slots=True)
class Workload:
    chain: Path
    key: Path


@dataclass(frozen=True, slots=True)
class MeshCerts:
    bundle: Path
    workloads: Mapping[str, Workload]

    def sidecar_tls(self, service: str, mode: str = "STRICT") -> dict[str, str]:
        """The sidecar config's `tls` section for `service` (docs/sidecar-config.md)."""
        w = self.workloads[service]
        return {"mode": mode, "cert": str(w.chain), "key": str(w.key), "bundle": str(self.bundle)}


def _cli(*args: str) -> None:
    done = subprocess.run(
        [binary(), "certs", *args], capture_output=True, text=True, check=False, timeout=60
    )
    if done.returncode != 0:
        raise BenchError(f"lepton-mesh certs {args[0]} failed: {done.stderr.strip()[-800:]}")


def issue(directory: Path, services: Iterable[str]) -> MeshCerts:
    _cli("init", "--dir", str(directory))
    workloads = {}
    for service in services:
        _cli("issue", "--dir", str(directory), "--service", service, "--out", str(directory))
        stem = directory / f"{NAMESPACE}.{service}"
        workloads[service] = Workload(Path(f"{stem}-chain.pem"), Path(f"{stem}-key.pem"))
    return MeshCerts(directory / "bundle.pem", workloads)
