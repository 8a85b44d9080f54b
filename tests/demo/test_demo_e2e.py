"""`lepton-mesh demo` end to end, as a user runs it: a subprocess, real sidecars.

Each run is shortened with LEPTON_DEMO_DURATION. Every test checks, by pid,
that no process the demo started is left alive, whichever way it ended.
"""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from lepton_mesh.demo.procs import pid_alive

SCRIPT = Path(sys.executable).with_name("lepton-mesh")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "lepton_mesh"]
STARTED = re.compile(r"^\s+started (\S+)\s+pid (\d+)$", re.M)
NAMES = {"intent-sidecar", "chat-sidecar", "intent-app", "chat-app"}


class Demo:
    """The demo process with its output read line by line on a thread."""

    def __init__(self, *args: str, duration: float, tmp: Path) -> None:
        # TMPDIR: a failed run keeps its configs and logs, here rather than in /tmp.
        env = {**os.environ, "LEPTON_DEMO_DURATION": str(duration), "TMPDIR": str(tmp)}
        self.proc = subprocess.Popen(
            [*COMMAND, "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # our own Ctrl-C must not reach it by accident
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}; output so far:\n{self.output}")

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code

    def children(self) -> dict[str, int]:
        return {name: int(pid) for name, pid in STARTED.findall(self.output)}

    def kill(self) -> None:
        """Test cleanup: the demo's children die with it (PR_SET_PDEATHSIG)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def demo_factory(tmp_path: Path):
    demos: list[Demo] = []

    def make(*args: str, duration: float) -> Demo:
        demos.append(Demo(*args, duration=duration, tmp=tmp_path))
        return demos[-1]

    yield make
    for d in demos:
        d.kill()


def assert_all_gone(pids: dict[str, int]) -> None:
    assert set(pids) == NAMES
    alive = {name: pid for name, pid in pids.items() if pid_alive(pid)}
    assert alive == {}
    for pid in pids.values():  # each was its group's leader: the whole group is gone
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def sidecar_rows(output: str) -> list[list[str]]:
    """The data rows of the sidecar metrics table, split into cells."""
    block = output.split("What the sidecars counted")[1]
    rows = []
    for line in block.splitlines()[3:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def codes_of(row: list[str]) -> dict[str, int]:
    # SIDECAR REPORTER SOURCE DESTINATION REQUESTS CODES... REASONS... P50 P99
    cells = (cell for cell in row[5:] if re.fullmatch(r"\d{3}:\d+", cell))
    return {code: int(n) for code, n in (cell.split(":") for cell in cells)}


def test_demo_runs_traffic_through_both_sidecars_and_cleans_up(demo_factory, tmp_path) -> None:
    demo = demo_factory(duration=3)
    code = demo.finish(timeout=50)
    out = demo.output
    assert code == 0, out
    rows = sidecar_rows(out)
    by_key = {(r[0], r[1], r[3]): r for r in rows}
    for key in [("chat", "destination", "chat"), ("chat", "source", "intent"),
                ("intent", "destination", "intent")]:  # fmt: skip
        assert key in by_key, out
        row = by_key[key]
        assert int(row[4]) > 0 and codes_of(row).get("200", 0) > 0, row
    # The sidecar's own answer for an unknown service, with its reason code.
    assert re.search(r"unknown service .*Host: weather\s+404\s+no_route", out), out
    assert re.search(r"Streaming .*status 200, \d+ tokens in \d+ ms, complete", out), out
    assert "all 4 processes stopped; none left running" in out
    assert_all_gone(demo.children())
    assert list(tmp_path.iterdir()) == []  # a clean run leaves no files either


def test_keep_serves_until_ctrl_c_then_stops_everything(demo_factory) -> None:
    demo = demo_factory("--keep", duration=1)
    m = demo.wait_for_line(r"-d '\{\"message\": .*'\s+(http://127\.0\.0\.1:\d+/v1/chat)", 45)
    demo.wait_for_line(r"Press Ctrl-C", 5)
    request = urllib.request.Request(
        m[1], data=b'{"message": "I want a refund"}', headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
        assert b'"intent":"refund"' in resp.read()
    pids = demo.children()
    assert all(pid_alive(pid) for pid in pids.values())
    demo.proc.send_signal(signal.SIGINT)
    assert demo.finish(timeout=30) == 0, demo.output
    assert_all_gone(pids)


def test_ctrl_c_during_traffic_stops_everything_and_exits_130(demo_factory) -> None:
    demo = demo_factory(duration=60)
    demo.wait_for_line(r"^traffic:", 45)
    demo.proc.send_signal(signal.SIGINT)
    assert demo.finish(timeout=30) == 130, demo.output
    assert "demo stopped: interrupted" in demo.output
    assert_all_gone(demo.children())
