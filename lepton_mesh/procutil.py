"""Child processes that never outlive us: shared by `run`, the demo and the local etcd.

Standard library only; importable from any package.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

_PROC = Path("/proc")


def die_with_parent_prefix(signal_name: str = "KILL") -> list[str]:
    """A command prefix (`setpriv --pdeathsig SIG --`) so a child gets SIG when we die.

    Exec-based, so it is safe where a preexec hook is not (a parent with
    threads: gRPC's, the access-log writer, a last-known-good write). Empty off
    Linux, without setpriv, or off the main thread (Linux ties the signal to
    the thread that forked).
    """
    if not sys.platform.startswith("linux"):
        return []
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", signal_name, "--"] if setpriv else []


def live_group_members(pgid: int) -> tuple[int, ...]:
    """Pids in group `pgid` that are not zombies (a zombie holds no socket, no CPU).

    Zombies are excluded because an orphaned grandchild is reaped by whoever
    adopts it, which we do not control. Without /proc, any member counts.
    """
    if not _PROC.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return ()
        except PermissionError:
            pass
        return (pgid,)
    pids = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return tuple(sorted(pids))


def pid_alive(pid: int) -> bool:
    """True if `pid` names a live, non-zombie process."""
    if _PROC.is_dir():
        try:
            stat = (_PROC / str(pid) / "stat").read_text()
        except OSError:
            return False
        return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
