"""The external tools the bench drives, installed from the OS package manager if missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench.procs import BenchError

# binary -> Debian package that provides it
REQUIRED = {"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux"}
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def which(binary: str) -> str | None:
    return shutil.which(binary) or shutil.which(binary, path=_SBIN)


def missing() -> list[str]:
    return sorted({pkg for binary, pkg in REQUIRED.items() if which(binary) is None})


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, check=False)


def ensure(install: bool) -> None:
    """Install what is missing with apt-get (updating the package lists once if needed)."""
    packages = missing()
    if not packages:
        return
    hint = f"apt-get install -y {' '.join(packages)}"
    if not install:
        raise BenchError(f"missing tools; install them with: {hint}")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(f"missing tools and cannot install them here; run as root: {hint}")
    print(f"installing with apt-get: {' '.join(packages)}", flush=True)
    done = _apt("install", "-y", *packages)
    if done.returncode != 0:
        print("  apt-get install failed; running apt-get update first", flush=True)
        _apt("update")
        done = _apt("install", "-y", *packages)
    if done.returncode != 0 or missing():
        raise BenchError(f"{hint} failed:\n{done.stderr.strip()[-1500:]}")
    print(f"  installed: {' '.join(packages)}", flush=True)
    _note_system_service()


def _note_system_service() -> None:
    # Debian's nginx package may start its own service on install (unless the
    # system's policy forbids it). That service is not the bench's: say so,
    # leave it alone.
    if Path("/run/nginx.pid").exists():
        print(
            "  note: the nginx package started the system's nginx service; "
            "the bench neither uses nor stops it",
            flush=True,
        )


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for binary, argv in {"nginx": ["-v"], "wrk": ["-v"]}.items():
        path = which(binary)
        if path is None:
            continue
        done = subprocess.run([path, *argv], capture_output=True, text=True, check=False)
        text = (done.stdout + done.stderr).strip().splitlines()
        out[binary] = text[0] if text else "?"
    return out
