"""LocalEtcd: restarts keep data and ports; nothing is ever left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lepton_mesh.control.etcd_local import EtcdStartError, LocalEtcd, cluster


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling another process's state: no event to wait on
    return True


def test_restart_and_kill_keep_data_and_endpoints(etcd_private: LocalEtcd) -> None:
    endpoints = etcd_private.endpoints
    etcd_private.etcdctl("put", "/k", "v")
    etcd_private.restart()
    assert etcd_private.endpoints == endpoints
    assert etcd_private.etcdctl("get", "/k", "--print-value-only").strip() == "v"
    pid = etcd_private.pid
    etcd_private.kill()
    assert pid is not None and _wait_dead(pid) and not etcd_private.running
    etcd_private.start()
    assert etcd_private.etcdctl("get", "/k", "--print-value-only").strip() == "v"


@pytest.mark.parametrize(
    ("kwargs", "syncs"),
    [
        ({}, True),
        ({"fast": True}, False),  # throwaway data: the shared test etcd, the demo
        ({"fast": True, "fsync": True}, True),  # members that tests kill
        ({"fsync": False}, False),
    ],
)
def test_fsync_is_off_only_when_asked(tmp_path: Path, kwargs: dict[str, bool], syncs: bool) -> None:
    """Without fsync a SIGKILLed etcd 3.5 can lose acknowledged writes (docs/etcd.md)."""
    command = LocalEtcd(tmp_path / "data", **kwargs).command()
    assert ("--unsafe-no-fsync=true" not in command) is syncs
    assert ("--election-timeout=500" in command) is kwargs.get("fast", False)


def test_cluster_members_fsync_unless_told_not_to() -> None:
    for fsync in (True, False):
        group = cluster(3, fsync=fsync, start=False)
        try:
            for member in group.members:
                assert ("--unsafe-no-fsync=true" not in member.command()) is fsync
        finally:
            group.close()


def test_close_removes_the_temp_dir(tmp_path: Path) -> None:
    server = LocalEtcd(fast=True).start()
    data_dir, pid = server.data_dir, server.pid
    assert data_dir.exists() and pid is not None
    server.close()
    assert _wait_dead(pid)
    assert not data_dir.parent.exists()


def test_a_failed_start_leaves_nothing_running(etcd_private: LocalEtcd, tmp_path: Path) -> None:
    # The client port is taken by a running etcd: the second one cannot start.
    clash = LocalEtcd(tmp_path / "data", fast=True, client_port=etcd_private.client_port)
    with pytest.raises(EtcdStartError):
        clash.start(timeout=5)
    assert not clash.running
    clash.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
def test_a_killed_parent_takes_its_etcd_along(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, signal, sys
        from lepton_mesh.control.etcd_local import LocalEtcd
        server = LocalEtcd(sys.argv[1], fast=True).start()
        print(server.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no cleanup
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data")],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL
    pid = int(done.stdout.split()[0])
    assert _wait_dead(pid), "etcd outlived its SIGKILLed parent"
