"""`lepton-mesh control` as a real process: flags and env, serving, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import requests

from lepton_mesh.control.auth import TokenIssuer, init_key
from lepton_mesh.control.etcd_local import LocalEtcd, die_with_parent_prefix
from lepton_mesh.control.store import Store
from tests.control.conftest import Peer, eventually, hello

_READY = re.compile(r"sidecars on [^ ]+:(\d+), admin on [^ ]+:(\d+)")


async def _start(env: dict[str, str], *args: str) -> tuple[asyncio.subprocess.Process, int, int]:
    proc = await asyncio.create_subprocess_exec(
        *die_with_parent_prefix(), sys.executable, "-m", "lepton_mesh", "control", *args,
        env=os.environ | env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "control exited before it was ready"
            if m := _READY.search(line):
                return proc, int(m.group(1)), int(m.group(2))


async def test_control_process_serves_sidecars_and_admin_then_exits_0_on_sigterm(
    control_etcd: LocalEtcd, store: Store, tmp_path: Path
) -> None:
    key = tmp_path / "token.key"
    token = TokenIssuer(init_key(key)).create(subject="t", role="read", ttl=60)
    # The endpoints come from the environment, everything else from flags.
    proc, port, admin_port = await _start(
        {"LEPTON_ETCD": ",".join(control_etcd.endpoints)},
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--token-key", str(key), "--id", "cli-replica", "--lease-ttl", "5",
    )  # fmt: skip
    try:
        peer = await Peer.join(port, hello("chat", "chat-cli"))
        url = f"http://127.0.0.1:{admin_port}/api/v1/sidecars"
        headers = {"Authorization": f"Bearer {token}"}

        def listed() -> bool:
            resp = requests.get(url, headers=headers, timeout=5)
            return resp.status_code == 200 and "chat-cli" in resp.text

        await eventually(lambda: asyncio.to_thread(listed), what="sidecar in the admin API")  # type: ignore[arg-type,return-value]

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        assert await peer.recv() is None  # the stream was closed

        # The sidecar is alive: its instance stays for the replica it reconnects
        # to (or until the lease TTL), so a rolling restart drops no endpoint.
        assert await store.get("/lepton/v1/instances/default/chat/chat-cli") is not None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--etcd (or LEPTON_ETCD) is required"),
        (("--etcd", "127.0.0.1:1", "--listen", "nope"), "--listen 'nope': expected host:port"),
        (("--etcd", "127.0.0.1:1", "--lease-ttl", "0"), "--lease-ttl '0'"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    args: tuple[str, ...],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lepton_mesh.cli import main

    monkeypatch.delenv("LEPTON_ETCD", raising=False)
    assert main(["control", *args]) == 2
    assert message in capsys.readouterr().err
