"""Run `python -m lepton_mesh` as a subprocess without blocking the event loop that
serves the admin API under test."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lepton_mesh.control.etcd_local import die_with_parent_prefix

__all__ = ["CliResult", "cli_env", "run_cli"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: no server or token unless a test sets them; config in tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
    env |= {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "PYTHONPATH": str(ROOT),
    }
    return env


async def run_cli(env: dict[str, str], *args: str, cwd: Path = ROOT) -> CliResult:
    proc = await asyncio.create_subprocess_exec(
        *die_with_parent_prefix(),
        sys.executable,
        "-m",
        "lepton_mesh",
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())
