"""Run `python -m lepton_mesh` as a subprocess without blocking the event loop that
serves the admin API under test."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lepton_mesh.control.etcd_local import die_with_parent_prefix
from tests.support.signals import not_ignored

__all__ = [
    "CliResult",
    "cli_env",
    "deny_listing",
    "finish",
    "run_cli",
    "run_main",
    "sigint_not_ignored",
    "start_cli",
]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def sigint_not_ignored() -> Iterator[None]:
    """The CLI under test reacts to the test's Ctrl-C even when the suite runs as
    a background job (see tests/support/signals.py)."""
    with not_ignored(signal.SIGINT):
        yield


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


async def start_cli(
    env: dict[str, str], *args: str, cwd: Path = ROOT, stdout: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *die_with_parent_prefix(),
        sys.executable,
        "-X",
        "faulthandler",  # SIGABRT prints every thread's stack (see `finish`)
        "-m",
        "lepton_mesh",
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process) -> CliResult:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        # Say where it hangs: faulthandler writes every thread's stack on SIGABRT,
        # and /proc which signals it blocks, ignores and catches.
        masks = _signal_masks(proc.pid)
        proc.send_signal(signal.SIGABRT)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        raise AssertionError(
            f"the CLI did not exit within 30 s; its signals: {masks}; where it was:\n"
            f"{err.decode(errors='replace')}"
        ) from None
    assert proc.returncode is not None
    return CliResult(proc.returncode, (out or b"").decode(), err.decode())


def _signal_masks(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as e:
        return f"unknown ({e})"
    return ", ".join(
        ln for ln in lines if ln.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))
    )


async def run_cli(env: dict[str, str], *args: str, cwd: Path = ROOT) -> CliResult:
    return await finish(await start_cli(env, *args, cwd=cwd))


def deny_listing(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make `folder` fail to list as it would for a user without read permission
    (the tests run as root, whom permissions do not stop)."""
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.path.realpath(path) == os.path.realpath(folder):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def run_main(*args: str) -> int:
    """The CLI in this process (where a test patches what it calls), as its exit code."""
    from lepton_mesh.cli import main

    try:
        return main(list(args))
    except SystemExit as e:  # argparse
        return int(e.code or 0)
