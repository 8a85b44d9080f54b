"""`lepton-mesh demo` end to end, as a user runs it: a subprocess, a real etcd, a
real control daemon, real sidecars fed by it, the real CLI.

Each run is shortened with LEPTON_DEMO_DURATION (seconds per traffic phase).
Every test checks, by pid and by process group, that no process the demo
started is left alive (etcd included), whichever way it ended. The CLI config
a kept demo lends the user lives under this test's XDG_CONFIG_HOME.
"""

import getpass
import json
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

from lepton_mesh.procutil import pid_alive

SCRIPT = Path(sys.executable).with_name("lepton-mesh")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "lepton_mesh"]
STARTED = re.compile(r"^\s+started (\S+)\s+pid (\d+)$", re.M)
NAMES = {
    "etcd", "control",
    "chat-app", "intent-app", "dialog-v1-app", "dialog-v2-app",
    "chat-sidecar", "intent-sidecar", "dialog-v1-sidecar", "dialog-v2-sidecar",
}  # fmt: skip
# PHASE  REVISION  WEIGHTS  DIALOG CALLS  V1  V2  CHAT 200s
RECAP = re.compile(
    r"^\s+(canary 90/10|change 50/50|rollback to 1)\s+(\d+)\s+(\d+/\d+)\s+(\d+)"
    r"\s+([\d.]+)%\s+([\d.]+)%\s+(\d+)/(\d+)$",
    re.M,
)
SERVICE_ROW = re.compile(
    r"^\s+(chat|intent|dialog)\s+\S.*?\s+(\d+)\s+(\d+)\s+([\d.]+)%\s+[\d.]+$", re.M
)
REPLY_SPLIT = re.compile(r"seen in chat's replies:\s+v1 (\d+) \([\d.]+%\)\s+v2 (\d+)")
SIDECAR_SPLIT = re.compile(r"counted by the dialog sidecars:\s+v1 (\d+) \([\d.]+%\)\s+v2 (\d+)")
# REVISION  TIME  WHO  MESSAGE  CHANGES, as `lepton-mesh history` prints it (indented)
HISTORY_ROW = re.compile(r"^  (\d+)\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+(\S+)\s+(.*?)\s{3}", re.M)
_USER_SETTINGS = ("LEPTON_CONFIG", "LEPTON_SERVER", "LEPTON_TOKEN", "XDG_CONFIG_HOME")


class Demo:
    """The demo process with its output read line by line on a thread."""

    def __init__(self, *args: str, duration: float, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*COMMAND, "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, "LEPTON_DEMO_DURATION": str(duration)},
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
def demo_env(tmp_path: Path) -> dict[str, str]:
    """TMPDIR: a failed run keeps its files here. XDG_CONFIG_HOME: the user's CLI config."""
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in _USER_SETTINGS}
    return env | {"TMPDIR": str(tmp_path / "tmp"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}


@pytest.fixture
def demo_factory(demo_env: dict[str, str]):
    demos: list[Demo] = []

    def make(*args: str, duration: float) -> Demo:
        demos.append(Demo(*args, duration=duration, env=demo_env))
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


def sidecar_rows(output: str) -> dict[tuple[str, ...], list[str]]:
    """The whole-run sidecar table, by (sidecar, reporter, source, destination)."""
    block = output.split("What each sidecar counted")[1].split("SIDECAR", 1)[1]
    rows = {}
    for line in block.splitlines()[2:]:  # past the rest of the header, and the dashes
        if not line.strip():
            break
        cells = line.split()
        rows[tuple(cells[:4])] = cells
    return rows


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_canary_change_and_rollback_show_in_the_split(demo_factory, demo_env) -> None:
    demo = demo_factory(duration=3)
    code = demo.finish(timeout=55)
    out = demo.output
    assert code == 0, out

    # Three phases, each with the three services serving, all of it 200s.
    rows = SERVICE_ROW.findall(out)
    assert [r[0] for r in rows] == ["chat", "intent", "dialog"] * 3, out
    for service, requests, per_s, success in rows:
        assert int(requests) >= 290 and int(per_s) > 0 and float(success) == 100.0, (service, out)
    # Over the whole run, every sidecar counted 200s and nothing else.
    counted = sidecar_rows(out)
    assert sorted(counted) == [
        ("chat", "destination", "unknown", "chat"),
        ("chat", "source", "chat", "dialog"),
        ("chat", "source", "chat", "intent"),
        ("dialog-v1", "destination", "chat", "dialog"),
        ("dialog-v2", "destination", "chat", "dialog"),
        ("intent", "destination", "chat", "intent"),
    ], out
    for key, cells in counted.items():
        assert cells[5] == f"200:{cells[4]}", (key, out)

    # The split: 90/10, then 50/50, then back at 90/10 after the rollback.
    recap = {m[0]: m for m in RECAP.findall(out)}
    assert list(recap) == ["canary 90/10", "change 50/50", "rollback to 1"], out
    # title: (revision, weights, v2's expected share in %, tolerance in points)
    expected = {
        "canary 90/10": ("1", "90/10", 10, 8),
        "change 50/50": ("2", "50/50", 50, 10),
        "rollback to 1": ("3", "90/10", 10, 8),
    }
    for title, (want_revision, want_weights, want_v2, tolerance) in expected.items():
        _, revision, weights, calls, v1, v2, ok, sent = recap[title]
        assert (revision, weights) == (want_revision, want_weights), (title, out)
        assert int(calls) >= 290 and ok == sent, (title, out)
        assert abs(float(v2) - want_v2) <= tolerance, (title, v2, out)
        assert abs(float(v1) + float(v2) - 100) < 0.2
    # The replies the client got agree with what the dialog sidecars counted.
    for (r1, r2), (s1, s2) in zip(
        REPLY_SPLIT.findall(out), SIDECAR_SPLIT.findall(out), strict=True
    ):
        assert abs(int(r1) - int(s1)) <= 3 and abs(int(r2) - int(s2)) <= 3, out

    # The change went through the CLI: a diff, an apply, a rollback, and the history.
    assert re.search(r"^\$ lepton-mesh apply \S*examples/mesh -m", out, re.M), out
    assert re.search(r"^  -      weight: 90\n  \+      weight: 50$", out, re.M), out
    assert "rolled back to policy revision 1 as revision 3" in out
    history = {int(m[0]): m for m in HISTORY_ROW.findall(out)}
    assert sorted(history) == [1, 2, 3], out
    assert {m[1] for m in history.values()} == {getpass.getuser()}
    assert history[1][2] == "dialog v2 canary at 10%"
    assert history[2][2] == "dialog v2 to 50%"
    assert history[3][2].endswith("(rollback to 1)")

    assert "all 10 processes stopped; none left running" in out
    assert_all_gone(demo.children())
    assert list(Path(demo_env["TMPDIR"]).iterdir()) == []  # a clean run leaves no files
    assert not Path(demo_env["XDG_CONFIG_HOME"]).exists()  # and lends no config


def test_keep_serves_the_cli_until_ctrl_c_then_stops_everything(demo_factory, demo_env) -> None:
    demo = demo_factory("--keep", duration=1)
    m = demo.wait_for_line(r"-d '\{\"message\": .*'\s+(http://127\.0\.0\.1:\d+/v1/chat)", 55)
    demo.wait_for_line(r"Press Ctrl-C", 5)
    pids = demo.children()
    assert all(pid_alive(pid) for pid in pids.values())

    # A beta user's turns all go to dialog v2 (the Route's beta-users rule).
    request = urllib.request.Request(
        m[1],
        data=b'{"message": "I want a refund"}',
        headers={"content-type": "application/json", "x-user-group": "beta"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
        body = json.loads(resp.read())
    assert (body["intent"], body["dialog_version"]) == ("refund", "v2")

    # The user's CLI reaches the demo's control daemon with no flag and no login.
    services = cli(demo_env, "get", "services")
    assert services.returncode == 0, services.stderr
    rows = {line.split()[1]: line.split()[2:] for line in services.stdout.splitlines()[1:]}
    assert rows == {"chat": ["1", "1"], "dialog": ["2", "2"], "intent": ["1", "1"]}
    history = cli(demo_env, "history")
    assert history.returncode == 0 and len(history.stdout.splitlines()) == 4, history

    demo.proc.send_signal(signal.SIGINT)
    assert demo.finish(timeout=30) == 0, demo.output
    assert_all_gone(pids)
    config = Path(demo_env["XDG_CONFIG_HOME"]) / "lepton-mesh" / "config.json"
    assert not config.exists()  # given back: the demo's token is gone with it


def test_ctrl_c_during_traffic_stops_everything_and_exits_130(demo_factory) -> None:
    demo = demo_factory(duration=60)
    demo.wait_for_line(r"^traffic:", 55)
    demo.proc.send_signal(signal.SIGINT)
    assert demo.finish(timeout=30) == 130, demo.output
    assert "demo stopped: interrupted" in demo.output
    assert_all_gone(demo.children())


def test_ctrl_c_while_stopping_still_stops_and_verifies_everything(demo_factory) -> None:
    # The stop runs after the event loop closed: a signal there used to escape the
    # cleanup (KeyboardInterrupt, or death on SIGTERM) and leave the children to drain alone.
    demo = demo_factory(duration=1)
    demo.wait_for_line(r"^stopping \.\.\.$", 55)
    demo.proc.send_signal(signal.SIGINT)
    assert demo.finish(timeout=30) == 130, demo.output
    assert "all 10 processes stopped; none left running" in demo.output
    assert_all_gone(demo.children())
