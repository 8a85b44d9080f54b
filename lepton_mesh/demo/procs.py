"""Start child processes, wait until they are ready, stop them all.

Anything that brings up a local mesh uses this: etcd, the control daemon, the
sidecars and the apps of the demo, and the short-lived `lepton-mesh` commands
it runs (`run_once`). Nothing here knows about sidecars.

Invariants:
- Every child leads its own session and process group (pgid == pid). One
  signal to the group reaches the child and anything it spawned, and a Ctrl-C
  typed at the terminal reaches only us, so we choose the order and the
  deadlines of the shutdown.
- On Linux every child also asks the kernel for SIGTERM when we die, so even
  a supervisor killed with SIGKILL leaves no child serving.
- `stop_all()` is idempotent and safe on every exit path. It stops children in
  reverse start order (a later child may depend on an earlier one), SIGTERM
  first and SIGKILL after the child's grace, then checks that no live process
  is left in any of the groups; what is left is reported, never ignored.
- A second Ctrl-C (or SIGTERM) during `stop_all()` skips the remaining graces
  and goes straight to SIGKILL.
- A short-lived child (`run_once`) follows the same two rules, and never
  outlives the call: on timeout or cancellation its group is killed and the
  child reaped before the call returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol

from lepton_mesh.demo.errors import ChildExited, CommandFailed, NotReady
from lepton_mesh.procutil import live_group_members

_PROC = Path("/proc")
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 15


class Probe(Protocol):
    """A readiness check: `check()` is True once the child serves."""

    def describe(self) -> str: ...

    async def check(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class HttpProbe:
    """Ready when `GET path` answers status 200 (like a Kubernetes httpGet probe).

    Only the status line is read: a probe needs the code, nothing else.
    """

    host: str
    port: int
    path: str = "/"
    timeout: float = 1.0

    def describe(self) -> str:
        return f"GET http://{self.host}:{self.port}{self.path} -> 200"

    async def check(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(
                        f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                        "Connection: close\r\n\r\n".encode("ascii")
                    )
                    status_line = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError):
            return False
        parts = status_line.split(None, 2)
        return len(parts) >= 2 and parts[1] == b"200"


@dataclass(frozen=True, slots=True)
class TcpProbe:
    """Ready when a TCP connection to host:port succeeds."""

    host: str
    port: int
    timeout: float = 1.0

    def describe(self) -> str:
        return f"TCP connect {self.host}:{self.port}"

    async def check(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """How to run one child. `env` is laid over the supervisor's environment."""

    name: str
    argv: tuple[str, ...]
    probes: tuple[Probe, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    # stop_signal-to-SIGKILL grace; longer than the child's own drain deadline.
    stop_grace: float = 5.0
    # How to ask it to stop. A sidecar takes SIGTERM as "my app is still
    # working: keep its outbound calls going for the drain period"; stopping a
    # whole mesh wants SIGINT (drain in-flight requests, no grace period).
    stop_signal: signal.Signals = signal.SIGTERM


@dataclass(slots=True)
class Child:
    spec: ProcessSpec
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> int | None:
        """The exit code if the child has exited (and is now reaped), else None."""
        return self.popen.poll()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class StopResult:
    name: str
    pid: int
    returncode: int | None
    killed: bool  # needed SIGKILL: did not exit within its grace
    left: tuple[int, ...]  # pids of its group still alive after everything


class Supervisor:
    """Owns a set of children from start to verified stop. Not thread-safe."""

    def __init__(self, log_dir: Path, *, poll_interval: float = 0.02) -> None:
        self._log_dir = log_dir
        self._poll = poll_interval
        self._children: list[Child] = []
        self._hurry = False
        # The signal that hurried stop_all(), if one did: the stop was interrupted.
        self.hurried_by: int | None = None

    @property
    def children(self) -> tuple[Child, ...]:
        return tuple(self._children)

    def start(self, spec: ProcessSpec) -> Child:
        log_path = self._log_dir / f"{spec.name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        child = Child(spec, popen, log_path)
        self._children.append(child)
        return child

    # -- readiness -----------------------------------------------------------

    async def wait_ready(self, children: Sequence[Child], timeout: float) -> None:
        """Return once every probe of every child passes; raise on exit or deadline.

        All children are probed concurrently under one deadline, so a mesh whose
        parts wait for each other still comes up, and the first failure cancels
        the rest.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        tasks = [
            asyncio.ensure_future(self._wait_probe(child, probe, deadline))
            for child in children
            for probe in child.spec.probes
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _wait_probe(self, child: Child, probe: Probe, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.02
        while True:
            self.raise_if_exited(child)
            if await probe.check():
                return
            if loop.time() >= deadline:
                raise NotReady(
                    f"{child.name} (pid {child.pid}) failed {probe.describe()} before the "
                    f"deadline; log {child.log_path}:\n{child.log_tail()}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    def raise_if_exited(self, child: Child) -> None:
        code = child.exited()
        if code is not None:
            raise ChildExited(
                f"{child.name} (pid {child.pid}) exited with code {code}; "
                f"log {child.log_path}:\n{child.log_tail()}"
            )

    def check_alive(self) -> None:
        """Raise ChildExited for the first child that is no longer running."""
        for child in self._children:
            self.raise_if_exited(child)

    # -- stopping ------------------------------------------------------------

    def stop_all(self) -> list[StopResult]:
        """Stop every child, last started first, and verify no process is left."""
        results = []
        with self._hurry_on_signals():
            while self._children:
                results.append(self._stop(self._children.pop()))
        return results

    def _stop(self, child: Child) -> StopResult:
        pgid = child.pid  # leader of its own group, see start()
        _signal_group(pgid, child.spec.stop_signal)
        killed = not self._wait_exit(child, child.spec.stop_grace)
        if killed:
            _signal_group(pgid, signal.SIGKILL)
            self._wait_exit(child, 5.0, hurry_aware=False)
        # The leader is reaped; anything it spawned may still be in the group.
        left = live_group_members(pgid)
        if left:
            _signal_group(pgid, signal.SIGKILL)
            left = self._wait_group_empty(pgid, 2.0)
        return StopResult(child.name, child.pid, child.popen.returncode, killed, left)

    def _wait_exit(self, child: Child, grace: float, *, hurry_aware: bool = True) -> bool:
        end = time.monotonic() + grace
        while time.monotonic() < end and not (hurry_aware and self._hurry):
            try:
                child.popen.wait(timeout=self._poll)
                return True
            except subprocess.TimeoutExpired:
                continue
        return child.popen.poll() is not None

    def _wait_group_empty(self, pgid: int, timeout: float) -> tuple[int, ...]:
        end = time.monotonic() + timeout
        left = live_group_members(pgid)
        while left and time.monotonic() < end:
            time.sleep(self._poll)
            left = live_group_members(pgid)
        return left

    @contextlib.contextmanager
    def _hurry_on_signals(self) -> Iterator[None]:
        """While stopping, a repeated Ctrl-C means "kill now", not "abandon the stop"."""

        def hurry(signum: int, frame: FrameType | None) -> None:
            self._hurry = True
            if self.hurried_by is None:
                self.hurried_by = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                previous[sig] = signal.signal(sig, hurry)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass(frozen=True, slots=True)
class Completed:
    """A short-lived child's exit code and output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


async def run_once(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 30.0,
) -> Completed:
    """Run a command to completion and return its output, whatever its exit code.

    `env` replaces the environment (unlike ProcessSpec.env). Raises
    CommandFailed when it does not finish within `timeout`.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=None if env is None else dict(env),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_parent(),
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except BaseException as e:
        _signal_group(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
        if isinstance(e, TimeoutError):
            raise CommandFailed(f"{argv[0]} did not finish within {timeout:.0f} s") from e
        raise
    assert proc.returncode is not None
    return Completed(tuple(argv), proc.returncode, out.decode(errors="replace"),
                     err.decode(errors="replace"))  # fmt: skip


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook asking Linux to SIGTERM the child when its parent dies.

    The libc function is looked up here, in the parent, so the hook itself runs
    no Python machinery beyond one foreign call between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return hook
