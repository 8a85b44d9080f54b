"""`python -m lepton_mesh sidecar --config FILE`: an invalid file stops the
process before it listens, with a message naming the file and the field."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest
from proxy_harness import LOCAL, free_port, repo_root


def write_config(tmp_path: Path, body: str, name: str = "bad.yaml") -> tuple[Path, int]:
    port = free_port()
    text = body.replace("$PORT", str(port)).replace("$APP", str(free_port()))
    path = tmp_path / name
    path.write_text(text)
    return path, port


GOOD_HEAD = """\
service: demo
app: 127.0.0.1:$APP
listeners:
  outbound: 127.0.0.1:$PORT
  inbound: 127.0.0.1:0
  admin: 127.0.0.1:0
"""

BAD_CONFIGS = [
    ("unknown-field", GOOD_HEAD + "timeouts:\n  requets: 5s\n", "timeouts.requets"),
    ("wrong-type", GOOD_HEAD + "timeouts:\n  request: soon\n", "timeouts.request"),
    ("bad-endpoint", GOOD_HEAD + "services:\n  intent:\n    endpoints: ['127.0.0.1:99999']\n", "services.intent.endpoints[0]"),
    ("bad-size", GOOD_HEAD + "limits:\n  max_header_bytes: lots\n", "limits.max_header_bytes"),
    ("missing-app", GOOD_HEAD.replace("app: 127.0.0.1:$APP\n", ""), "app"),
    ("bad-service-name", GOOD_HEAD.replace("service: demo", "service: Demo_1"), "service"),
    ("yaml-syntax", GOOD_HEAD + "timeouts: [unclosed\n", ""),
]  # fmt: skip


async def run_sidecar(config: Path, timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lepton_mesh", "sidecar", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=repo_root(),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the sidecar kept running with an invalid config") from None
    return proc.returncode or 0, out.decode(), err.decode()


def nothing_listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOCAL, port)) != 0


@pytest.mark.parametrize(("case_id", "body", "field"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
async def test_invalid_config_exits_nonzero_naming_file_and_field(
    tmp_path, case_id, body, field
) -> None:
    path, port = write_config(tmp_path, body)
    code, out, err = await run_sidecar(path)
    assert code != 0
    message = out + err
    assert str(path) in message or path.name in message, message
    if field:
        assert field in message, message
    assert "Traceback" not in message, message
    assert nothing_listens(port)


async def test_missing_config_file_exits_nonzero(tmp_path) -> None:
    path = tmp_path / "nope.yaml"
    code, out, err = await run_sidecar(path)
    assert code != 0
    assert "nope.yaml" in out + err
    assert "Traceback" not in out + err
