"""The supervisor: readiness with deadlines, and stops that leave nothing behind."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lepton_mesh.demo.errors import ChildExited, CommandFailed, NotReady
from lepton_mesh.demo.procs import (
    HttpProbe,
    ProcessSpec,
    Supervisor,
    TcpProbe,
    run_once,
)
from lepton_mesh.demo.topology import free_ports
from lepton_mesh.procutil import pid_alive

PY = sys.executable


def _py(code: str) -> tuple[str, ...]:
    return (PY, "-c", textwrap.dedent(code))


def _wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


def _log_has(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text()


# A child that says "ready" only once its SIGTERM handler is in place.
IGNORES_SIGTERM = """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(60)
"""


async def test_ready_when_probe_passes_then_stopped_with_sigterm(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    sup = Supervisor(tmp_path)
    child = sup.start(
        ProcessSpec(
            "web",
            (PY, "-m", "http.server", "--bind", "127.0.0.1", str(port)),
            probes=(HttpProbe("127.0.0.1", port, "/"), TcpProbe("127.0.0.1", port)),
            cwd=tmp_path,
        )
    )
    try:
        await sup.wait_ready([child], timeout=20)
        assert await HttpProbe("127.0.0.1", port, "/").check()
    finally:
        results = sup.stop_all()
    assert [(r.name, r.killed, r.left) for r in results] == [("web", False, ())]
    assert results[0].returncode == -signal.SIGTERM
    assert not pid_alive(child.pid)
    assert sup.stop_all() == []  # idempotent


async def test_exit_before_ready_is_reported_with_the_log_tail(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    sup = Supervisor(tmp_path)
    child = sup.start(
        ProcessSpec(
            "crasher",
            _py("import sys; print('bad config: no such key', flush=True); sys.exit(3)"),
            probes=(HttpProbe("127.0.0.1", port, "/ready"),),
        )
    )
    try:
        with pytest.raises(ChildExited, match=r"(?s)crasher .* code 3.*bad config: no such key"):
            await sup.wait_ready([child], timeout=20)
    finally:
        sup.stop_all()


async def test_not_ready_before_the_deadline(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    sup = Supervisor(tmp_path)
    child = sup.start(
        ProcessSpec(
            "sleeper", _py("import time; time.sleep(60)"), probes=(TcpProbe("127.0.0.1", port),)
        )
    )
    try:
        with pytest.raises(NotReady, match=f"sleeper .*TCP connect 127.0.0.1:{port}"):
            await sup.wait_ready([child], timeout=0.2)
    finally:
        results = sup.stop_all()
    assert results[0].left == ()
    assert not pid_alive(child.pid)


def test_child_ignoring_sigterm_is_killed_after_its_grace(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    child = sup.start(ProcessSpec("stubborn", _py(IGNORES_SIGTERM), stop_grace=0.2))
    _wait_for(lambda: _log_has(child.log_path, "ready"))
    (result,) = sup.stop_all()
    assert (result.killed, result.returncode, result.left) == (True, -signal.SIGKILL, ())
    assert not pid_alive(child.pid)


def test_grandchild_left_in_the_group_is_killed(tmp_path: Path) -> None:
    # The child dies on SIGTERM, but what it spawned ignores SIGTERM and would outlive it.
    spawner = f"""
        import subprocess, sys, time
        gc = subprocess.Popen([sys.executable, "-c", {textwrap.dedent(IGNORES_SIGTERM)!r}])
        print("grandchild", gc.pid, flush=True)
        time.sleep(60)
    """
    sup = Supervisor(tmp_path)
    child = sup.start(ProcessSpec("spawner", _py(spawner), stop_grace=2.0))
    _wait_for(lambda: _log_has(child.log_path, "ready") and _log_has(child.log_path, "grandchild"))
    grandchild = int(child.log_path.read_text().split("grandchild")[1].split()[0])
    assert os.getpgid(grandchild) == child.pid
    (result,) = sup.stop_all()
    assert (result.killed, result.left) == (False, ())
    _wait_for(lambda: not pid_alive(grandchild))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    # The supervisor itself is SIGKILLed: no finally runs, the kernel must do the stop.
    script = f"""
        import time
        from pathlib import Path
        from lepton_mesh.demo.procs import ProcessSpec, Supervisor
        sup = Supervisor(Path({str(tmp_path)!r}))
        c = sup.start(ProcessSpec("orphan", ("{PY}", "-c", "import time; time.sleep(60)")))
        print(c.pid, flush=True)
        time.sleep(60)
    """
    boss = subprocess.Popen(_py(script), stdout=subprocess.PIPE, text=True)
    try:
        orphan = int(boss.stdout.readline())
        assert pid_alive(orphan)
    finally:
        boss.kill()
        boss.wait()
        boss.stdout.close()
    _wait_for(lambda: not pid_alive(orphan))


async def test_run_once_returns_code_and_output() -> None:
    done = await run_once(
        _py("import sys; print('out'); print('err', file=sys.stderr); sys.exit(4)")
    )
    assert (done.returncode, done.stdout, done.stderr) == (4, "out\n", "err\n")


async def test_run_once_past_its_deadline_kills_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    with pytest.raises(CommandFailed, match="did not finish within 2 s"):
        await run_once(_py(code), timeout=2.0)
    assert not pid_alive(int(pidfile.read_text()))  # reaped before the error was raised


async def test_a_cancelled_run_once_leaves_no_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    task = asyncio.ensure_future(run_once(_py(code)))
    end = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < end, "the child never started"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not pid_alive(int(pidfile.read_text()))


async def test_a_taken_port_is_reported_as_such_without_a_traceback(tmp_path: Path) -> None:
    from lepton_mesh.demo.errors import PortTaken
    from lepton_mesh.demo.runner import _start_tier

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        spec = ProcessSpec(
            "intent-app",
            (PY, "-m", "lepton_mesh.demo.apps", "intent", "--port", str(port)),
            probes=(HttpProbe("127.0.0.1", port, "/healthz"),),
        )
        sup = Supervisor(tmp_path)
        try:
            with pytest.raises(PortTaken) as caught:
                await asyncio.wait_for(_start_tier(sup, [spec], lambda _: None), 20)
        finally:
            sup.stop_all()
    message = str(caught.value)
    assert message.startswith("port_taken: another process took a port"), message
    assert f"intent: cannot listen on 127.0.0.1:{port}: " in message, message
    assert "Traceback" not in message
