"""The deployment shape, as processes: `lepton-mesh control --ca-dir`, a
`lepton-mesh sidecar` with `tls.source: control` and a join token in its
environment, and `lepton-mesh get sidecars` showing its identity and
certificate expiry; SIGHUP makes the daemon re-read its CA at once."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import yaml
from bootstrap_support import Pki, eventually

from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.store import Store
from lepton_mesh.identity.store import rotate_prepare

_READY = re.compile(r"sidecars on [^ ]+:(\d+), admin on [^ ]+:(\d+).*sidecar streams TLS")


async def _spawn(
    *args: str, env: dict[str, str] | None = None, quiet: bool = False
) -> asyncio.subprocess.Process:
    # No preexec_fn: running Python between fork and exec in a process with gRPC
    # threads (this one's etcd client) can abort the child.
    out = asyncio.subprocess.DEVNULL if quiet else asyncio.subprocess.PIPE
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lepton_mesh", *args,
        env=os.environ | (env or {}), stdout=out, stderr=out,
    )  # fmt: skip


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await _spawn(*args)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_control_and_sidecar_processes_bootstrap_and_show_in_get_sidecars(
    control_etcd: LocalEtcd, store: Store, pki: Pki, tmp_path: Path
) -> None:
    control = await _spawn(
        "control", "--etcd", ",".join(control_etcd.endpoints), "--listen", "127.0.0.1:0",
        "--admin", "127.0.0.1:0", "--token-key", str(pki.token_key),
        "--ca-dir", str(pki.ca.directory), "--cert-lifetime", "2h",
    )  # fmt: skip
    sidecar = None
    try:
        port, admin = await _ready(control)
        config = tmp_path / "chat.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "service": "chat",
                    "app": "127.0.0.1:1",
                    "listeners": {"outbound": "127.0.0.1:0", "inbound": "127.0.0.1:0",
                                  "admin": "127.0.0.1:0"},
                    "access_log": False,
                    "instance": {"id": "chat-proc"},
                    "tls": {"source": "control"},
                    "control": {"addresses": [f"127.0.0.1:{port}"],
                                "ca_bundle": str(pki.ca.bundle)},
                }
            )
        )  # fmt: skip
        sidecar = await _spawn(
            "sidecar",
            "--config",
            str(config),
            env={"LEPTON_JOIN_TOKEN": pki.token("chat")},
            quiet=True,
        )
        server = ["--server", f"http://127.0.0.1:{admin}", "--token", pki.token("x", role="read")]

        async def rows() -> list[dict]:
            code, out, err = await _cli("get", "sidecars", "-o", "json", *server)
            assert code == 0, err
            return json.loads(out)

        async def certified() -> bool:
            return any(r.get("certificate") for r in await rows())

        await eventually(certified, 20, "the sidecar process certified")
        (row,) = await rows()
        assert row["identity"] == "spiffe://cluster.local/ns/default/svc/chat"
        assert 7000 < row["certificate"]["not_after"] - time.time() <= 7200
        assert len(row["certificate"]["roots"]) == 1

        # A new root: SIGHUP and the daemon re-reads its CA now, the sidecar re-issues.
        rotate_prepare(pki.ca.directory)
        control.send_signal(signal.SIGHUP)

        async def two_roots() -> bool:
            return len((await rows())[0]["certificate"]["roots"]) == 2

        await eventually(two_roots, 10, "the sidecar re-issued with both roots")
    finally:
        for proc in (sidecar, control):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(15):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    assert control.returncode == 0


async def _ready(proc: asyncio.subprocess.Process) -> tuple[int, int]:
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "control exited before it was ready"
            if m := _READY.search(line):
                return int(m.group(1)), int(m.group(2))
