"""Processes the bench starts and always stops, and what /proc says about them.

Invariant: every process the bench starts goes through `spawn()`, which puts
it in its own session (a terminal's Ctrl-C reaches only the bench, which then
stops its children in order) and asks the kernel to send it SIGTERM if the
bench dies without cleaning up (PR_SET_PDEATHSIG), so none is left behind even
after a SIGKILL of the bench.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STOP_GRACE_S = 10.0


class BenchError(Exception):
    """A bench step failed; the message says which and why, for a human."""


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which core each role runs on; None means not pinned (fewer than 2 cores)."""

    load_core: int | None
    proxy_core: int | None
    usable_cores: int = 2

    @classmethod
    def detect(cls) -> Pinning:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            return cls(None, None, len(cores))
        return cls(cores[0], cores[1], len(cores))

    def prefix(self, core: int | None) -> list[str]:
        return [] if core is None else ["taskset", "-c", str(core)]

    def load(self) -> list[str]:
        return self.prefix(self.load_core)

    def proxy(self) -> list[str]:
        return self.prefix(self.proxy_core)

    def describe(self) -> str:
        if self.load_core is None:
            return "not pinned (fewer than 2 usable cores): figures are not comparable"
        return (
            f"core {self.load_core}: wrk / load clients + upstream nginx; "
            f"core {self.proxy_core}: sidecar(s) or nginx proxy"
        )


def _child_setup() -> None:
    # Runs in the child between fork and exec: die with the bench.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    argv: Sequence[str],
    *,
    stdout: Path | int,
    stderr: Path | int,
    stdin: int | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session; stdout/stderr go to files (or DEVNULL/PIPE)."""
    out = open(stdout, "wb") if isinstance(stdout, Path) else stdout  # noqa: SIM115
    err = open(stderr, "wb") if isinstance(stderr, Path) else stderr  # noqa: SIM115
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=out,
            stderr=err,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_child_setup,  # single-threaded bench: safe
        )
    except OSError as exc:
        raise BenchError(f"cannot start {argv[0]}: {exc}") from exc
    finally:
        for f in (out, err):
            if not isinstance(f, int):
                f.close()


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> str:
    """Signal, wait up to a grace period, then SIGKILL. Returns how it ended."""
    if proc.poll() is not None:
        return f"already exited ({proc.returncode})"
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=_STOP_GRACE_S)
        return "stopped"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"killed after {_STOP_GRACE_S:.0f}s grace"


@contextlib.contextmanager
def running(proc: subprocess.Popen[bytes], label: str, sig: int = signal.SIGTERM) -> Iterator[None]:
    try:
        yield
    finally:
        outcome = stop(proc, sig)
        if outcome.startswith("killed"):
            print(f"  note: {label} {outcome}")


def tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


# --- ports and readiness ---------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now on 127.0.0.1.

    All n sockets stay bound until all are picked: the kernel may hand out a
    port again as soon as it is closed. Racy by nature after that (whoever
    binds first wins), so each caller binds what it picked right away.
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def _http_status(port: int, path: str, timeout: float) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_http(
    proc: subprocess.Popen[bytes], port: int, path: str, *, want: int, deadline_s: float, what: str
) -> float:
    """Poll until GET `path` answers `want`; fail early if `proc` exits. Returns seconds waited."""
    start = time.monotonic()
    last: int | None = None
    while time.monotonic() - start < deadline_s:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} before it was ready")
        last = _http_status(port, path, timeout=0.5)
        if last == want:
            return time.monotonic() - start
        time.sleep(0.05)  # polling interval of a readiness probe, not a wait for state
    raise BenchError(f"{what} not ready after {deadline_s:.0f}s (last status: {last})")


# --- /proc ----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.extend(int(p) for p in f.read().split())
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a proxy that forks workers is counted whole)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most RSS the process ever had (its whole life, not a sample)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """Reads a process tree's RSS every `interval_s` on a thread, from start() to stop().

    `samples` holds (seconds since start, MB). A thread, because the bench's
    main thread is blocked reading its clients' output meanwhile.
    """

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = 0.0

    def start(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def sample(self) -> float:
        mb = tree_rss_mb(self.pid)
        self.samples.append((self.elapsed(), mb))
        return mb

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def peak(self, since_s: float = 0.0) -> float:
        return max((mb for t, mb in self.samples if t >= since_s), default=0.0)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _sum_over_tree(root: int, read: Callable[[int], float]) -> float:
    total = 0.0
    for p in process_tree(root):
        with contextlib.suppress(OSError):  # a descendant may exit while we read
            total += read(p)
    return total


def tree_cpu_seconds(roots: Sequence[int]) -> float:
    return sum(_sum_over_tree(r, cpu_seconds) for r in roots)


def tree_rss_mb(root: int) -> float:
    return _sum_over_tree(root, rss_mb)


# --- what else the machine is doing -----------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine was busy since boot, all cores (from /proc/stat).

    user + nice + system + irq + softirq. With tick-based accounting (no
    CONFIG_IRQ_TIME_ACCOUNTING) a tick that lands in a softirq is charged both
    to the softirq line and to the interrupted task's stime, and most of our
    loopback traffic's softirq work runs in our processes' context: leaving it
    out would hide others' load behind our own. Where the kernel accounts IRQ
    time apart, our softirq work counts as others' load: a few percent of a core.
    """
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (
            int(v) for v in f.readline().split()[1:8]
        )
    return (user + nice + system + irq + softirq) / _CLK_TCK


def own_cpu_seconds(live: Sequence[int]) -> float:
    """The bench, its reaped children (wrk, clients) and the live process trees given."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + tree_cpu_seconds(live)


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall: float
    machine: float
    ours: float

    @classmethod
    def take(cls, live: Sequence[int]) -> CpuSample:
        return cls(time.monotonic(), machine_busy_seconds(), own_cpu_seconds(live))

    def background_cores(self, later: CpuSample) -> float:
        """Cores' worth of CPU used by processes that are not the bench's, between the two.

        A figure measured while this is well above 0 shared its cores with
        someone else's work (on a shared machine: colleagues' test runs).
        """
        others = (later.machine - self.machine) - (later.ours - self.ours)
        return max(0.0, others / max(later.wall - self.wall, 1e-9))


def wait_quiet(
    live: Sequence[int], max_cores: float, deadline_s: float, window_s: float = 1.0
) -> float:
    """Wait until two windows in a row see less than `max_cores` of others' CPU.

    Returns the seconds waited; gives up (returning) at the deadline. Sleeping
    is the measurement here: load is an average over a window.
    """
    start, quiet = time.monotonic(), 0
    while quiet < 2 and time.monotonic() - start < deadline_s:
        before = CpuSample.take(live)
        time.sleep(window_s)
        quiet = quiet + 1 if before.background_cores(CpuSample.take(live)) < max_cores else 0
    return time.monotonic() - start
