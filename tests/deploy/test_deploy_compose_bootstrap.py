"""The compose demo's secrets, used for real: init-secrets.sh, then a control
daemon configured by control-a's LEPTON_* variables, then intent's sidecar
with its compose config, as processes on this machine (there is no Docker
engine here).

Only what Docker would provide is translated: host names and ports become
127.0.0.1 and free ports, and each volume's mount point becomes a folder of
the test. Everything else (the files init-secrets.sh writes and their names,
the control flags, the sidecar's tls and control sections) is used as
written, so the test fails if the CA, the join token or the admin CLI
config the script makes would not bootstrap the compose mesh: the sidecar
must turn ready with a certificate for its identity, and the `policies`
step's apply must go through with the admin token.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from deploy_support import COMPOSE_DIR, REPO, controls, mounts, services, sidecars

from tests.support.ports import free_port

DEADLINE_S = 30.0
SIDECAR = "intent"


class Volumes:
    """Compose's named volumes as folders of the test."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, service: dict[str, Any], container_path: str) -> str:
        for target, source in sorted(mounts(service).items(), key=lambda m: -len(m[0])):
            if PurePosixPath(container_path).is_relative_to(target) and not source.startswith("."):
                inner = PurePosixPath(container_path).relative_to(target)
                folder = self.root / source
                folder.mkdir(exist_ok=True)
                return str(folder / inner)
        raise AssertionError(f"{container_path} is on no volume")


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path) -> Any:
    """GET url until it answers 200 (its JSON), the process dies, or the deadline passes."""
    deadline = time.monotonic() + DEADLINE_S
    last = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            last = e.read().decode(errors="replace")
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    pytest.fail(f"{url} not 200 in {DEADLINE_S}s: {last}\n{log.read_text()[-3000:]}")


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_the_init_secrets_bootstrap_a_sidecar_and_the_admin_cli(tmp_path, etcd_private):
    volumes = Volumes(tmp_path / "volumes")
    volumes.root.mkdir()
    init = services()["lepton-init"]

    # lepton-init, as compose runs it (its volumes are folders here; no chown).
    env = base_env() | {
        "CA_DIR": volumes.path(init, "/var/lib/lepton/ca"),
        "JOIN_DIR": volumes.path(init, "/var/lib/lepton/join"),
        "OWNER": "",
        "SERVICES": SIDECAR,  # each CLI start costs ~0.5 s: only the token used here
    }
    done = subprocess.run(
        ["sh", str(COMPOSE_DIR / "init-secrets.sh")], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    # Run twice: the CA and key are kept, tokens re-issued.
    key = Path(env["CA_DIR"], "token.key").read_bytes()
    done = subprocess.run(
        ["sh", str(COMPOSE_DIR / "init-secrets.sh")], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0 and Path(env["CA_DIR"], "token.key").read_bytes() == key

    # control-a, with its own LEPTON_* variables; what Docker provides is translated.
    control = controls()["control-a"]
    listen, admin = free_port(), free_port()
    control_env = base_env() | {k: str(v) for k, v in control["environment"].items()}
    control_env |= {
        "LEPTON_ETCD": ",".join(etcd_private.endpoints),
        "LEPTON_LISTEN": f"127.0.0.1:{listen}",
        "LEPTON_ADMIN": f"127.0.0.1:{admin}",
        "LEPTON_CA_DIR": volumes.path(control, control_env["LEPTON_CA_DIR"]),
        "LEPTON_TOKEN_KEY": volumes.path(control, control_env["LEPTON_TOKEN_KEY"]),
    }
    control_argv = [sys.executable, "-m", "lepton_mesh", *control["command"]]

    # intent's sidecar, with its compose config; addresses and volumes translated.
    sidecar = sidecars()[SIDECAR]
    cfg = yaml.safe_load((COMPOSE_DIR / "config" / f"{SIDECAR}.yaml").read_text())
    admin_port = free_port()
    cfg["listeners"] = {
        "outbound": f"127.0.0.1:{free_port()}",
        "inbound": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{admin_port}",
    }
    cfg["app"] = f"127.0.0.1:{free_port()}"  # no app: only its health is reported
    cfg["instance"]["address"] = "127.0.0.1"
    cfg["control"]["addresses"] = [f"127.0.0.1:{listen}"]
    for field in ("ca_bundle", "token_file", "state_dir"):
        cfg["control"][field] = volumes.path(sidecar, cfg["control"][field])
    config = tmp_path / f"{SIDECAR}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    sidecar_argv = [sys.executable, "-m", "lepton_mesh", "sidecar", "--config", str(config)]

    with (
        process(control_argv, control_env, tmp_path / "control.log") as control_proc,
        process(sidecar_argv, base_env(), tmp_path / "sidecar.log") as sidecar_proc,
    ):
        openapi = f"http://127.0.0.1:{admin}/api/v1/openapi.json"
        wait_for(openapi, control_proc, tmp_path / "control.log")
        base = f"http://127.0.0.1:{admin_port}"
        assert wait_for(f"{base}/ready", sidecar_proc, tmp_path / "sidecar.log") == {"ready": True}
        with urllib.request.urlopen(f"{base}/config", timeout=5) as r:
            identity = json.loads(r.read())["identity"]
        assert identity["spiffe_id"] == "spiffe://cluster.local/ns/default/svc/intent"
        assert identity["certificate"]["expires_in_s"] > 0

        # The `policies` step: apply with the CLI config lepton-init wrote.
        policies = services()["policies"]
        cli_env = base_env() | {
            "LEPTON_CONFIG": volumes.path(policies, policies["environment"]["LEPTON_CONFIG"]),
        }
        mesh = str(REPO / "examples" / "mesh")
        command = [a if a != "/etc/lepton/mesh" else mesh for a in policies["command"]]
        applied = subprocess.run(
            [
                sys.executable,
                "-m",
                "lepton_mesh",
                *command,
                "--server",
                f"http://127.0.0.1:{admin}",
            ],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert "applied as policy revision 1" in applied.stdout
