"""`lepton-mesh run` as real processes: the app starts only after the sidecar is
ready, gets our signals, its exit code is ours, SIGTERM drains inbound first
while the app's outbound calls still work, and nothing is left behind."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import pytest
from lifecycle_support import (
    LOCAL,
    ControlPeer,
    Upstream,
    eventually,
    gone,
    group_empty,
    http_get,
    refuses,
    run_app,
    sidecar_config,
    start,
)

from lepton_mesh import meshproto as mp
from tests.support.ports import free_port

HOLD_WINDOW = 0.6  # seconds the control peer holds the first snapshot back


async def test_the_app_starts_only_once_the_sidecar_is_ready(tmp_path) -> None:
    peer = await ControlPeer(mp.Snapshot(1, {})).start()
    admin = free_port()
    cfg = sidecar_config(tmp_path, app_port=free_port(), admin_port=admin, control=[peer.address])
    run = await run_app(
        cfg,
        """
        status, body = get(os.environ["LEPTON_SIDECAR_ADMIN"] + "/ready")
        say("started", ready=status, t=time.time())
        """,
    )
    try:
        await eventually(lambda: bool(peer.of(mp.Hello)), "the sidecar's Hello")
        # The absence of an event needs a window: several times what the app
        # takes to start and print (~0.1 s), watching /ready the while.
        window_end = time.monotonic() + HOLD_WINDOW
        while time.monotonic() < window_end:
            status, body = await asyncio.to_thread(http_get, admin, "/ready")
            assert (status, "waiting for the first snapshot from control" in body) == (503, True)
            assert run.seen == [], "the app started before the sidecar was ready"
            await asyncio.sleep(0.05)
        released = time.time()
        peer.release()
        started = await run.event("started")
        assert started["ready"] == 200, "the app's first look at /ready was not 200"
        assert started["t"] >= released
        assert await run.wait() == 0
    finally:
        await run.close()
        await peer.stop()


EXIT_CASES = [
    ("exit-0", "raise SystemExit(0)", 0),
    ("exit-3", "raise SystemExit(3)", 3),
    ("killed-by-sigkill", "os.kill(os.getpid(), signal.SIGKILL)", 128 + signal.SIGKILL),
    ("killed-by-sigterm", "os.kill(os.getpid(), signal.SIGTERM)", 128 + signal.SIGTERM),
]


@pytest.mark.parametrize(
    ("body", "expected"), [c[1:] for c in EXIT_CASES], ids=[c[0] for c in EXIT_CASES]
)
async def test_the_apps_exit_code_is_ours(tmp_path, body, expected) -> None:
    run = await run_app(sidecar_config(tmp_path, app_port=free_port()), body)
    try:
        assert await run.wait() == expected, run.report()
    finally:
        await run.close()


FORWARDED_ONLY = (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


async def test_signals_are_forwarded_once_to_the_app_in_its_own_group(tmp_path) -> None:
    run = await run_app(
        sidecar_config(tmp_path, app_port=free_port()),
        """
        def on(sig, frame):
            say("signal", name=signal.Signals(sig).name)
            if sig == signal.SIGTERM:
                sys.exit(7)
        for s in (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                  signal.SIGINT, signal.SIGTERM):
            signal.signal(s, on)
        say("ready", pid=os.getpid(), pgid=os.getpgid(0), sid=os.getsid(0))
        wait_for_signals()
        """,
    )
    try:
        ready = await run.event("ready")
        assert ready["pgid"] == ready["sid"] == ready["pid"] != run.pid
        for sig in (*FORWARDED_ONLY, signal.SIGTERM):
            run.send(sig)
            assert (await run.event("signal"))["name"] == sig.name
        assert await run.wait() == 7
        assert [e["event"] for e in run.seen] == ["ready"] + ["signal"] * 6, run.report()
    finally:
        await run.close()


# The app: serves HTTP on its port (GET /hold answers once SIGTERM came), and
# on SIGTERM waits for a line on stdin, then calls `up` through its sidecar.
DRAINING_APP = """
import threading, http.server
term = threading.Event()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/hold":
            say("held")
            term.wait(10)
        self.send_response(200)
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"app")
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", APP_PORT), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
signal.signal(signal.SIGTERM, lambda sig, frame: term.set())
say("ready")
while not term.wait(1):
    pass
say("term")
sys.stdin.readline()
say("calls", results=[get("http://up/after-sigterm/%d" % i) for i in range(5)])
say("exit", t=time.time())
"""


def _hold_request(port: int) -> socket.socket:
    s = socket.create_connection((LOCAL, port), timeout=10)
    s.sendall(b"GET /hold HTTP/1.1\r\nHost: worker\r\n\r\n")
    return s


def _read_to_eof(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data


async def test_sigterm_drains_inbound_first_and_keeps_outbound_for_the_app(tmp_path) -> None:
    up = await Upstream().start()
    endpoint = {"address": up.address, "weight": 1, "labels": {}, "healthy": True}
    peer = await ControlPeer(
        mp.Snapshot(1, {"up": {"protocol": "http", "endpoints": [endpoint]}})
    ).start()
    peer.release()
    app_port, inbound, admin = free_port(), free_port(), free_port()
    cfg = sidecar_config(
        tmp_path, app_port=app_port, inbound_port=inbound, admin_port=admin, control=[peer.address]
    )
    run = await run_app(cfg, DRAINING_APP.replace("APP_PORT", str(app_port)))
    try:
        await run.event("ready")
        held = await asyncio.to_thread(_hold_request, inbound)
        await run.event("held")
        run.send(signal.SIGTERM)
        await run.event("term")
        # The request in flight finishes, and its connection is closed after it.
        answer = await asyncio.to_thread(_read_to_eof, held)
        assert answer.startswith(b"HTTP/1.1 200") and b"\r\nconnection: close\r\n" in answer.lower()
        # Control heard first; new inbound connections are refused; /ready says why.
        await eventually(lambda: bool(peer.of(mp.Draining)), "Draining sent to control")
        assert refuses(inbound)
        status, body = await asyncio.to_thread(http_get, admin, "/ready")
        assert (status, '"draining"' in body) == (503, True)
        # The app, still finishing its work, calls out through the sidecar.
        before = up.requests
        run.write("go\n")
        calls = await run.event("calls")
        assert calls["results"] == [[200, "up"]] * 5
        assert up.requests == before + 5
        exited = await run.event("exit")
        assert await run.wait() == 0
        assert run.exited_at is not None and run.exited_at - exited["t"] < 3.0
        assert refuses(admin) and refuses(inbound)
    finally:
        await run.close()
        await peer.stop()
        await up.stop()


async def test_a_job_that_exits_0_ends_the_run_at_once(tmp_path) -> None:
    # A drain period of 20 s must not keep a finished Job alive: nothing is in flight.
    cfg = sidecar_config(tmp_path, app_port=free_port(), drain="20s")
    run = await run_app(cfg, 'say("done", t=time.time())')
    try:
        done = await run.event("done")
        assert await run.wait() == 0
        assert run.exited_at is not None and run.exited_at - done["t"] < 2.0, run.report()
    finally:
        await run.close()


async def test_no_process_is_left_behind(tmp_path) -> None:
    # One grandchild goes on SIGTERM, one ignores it and needs SIGKILL (after timeouts.drain).
    cfg = sidecar_config(tmp_path, app_port=free_port(), drain="1s")
    run = await run_app(
        cfg,
        """
        import subprocess
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        stubborn = subprocess.Popen(
            [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
             " print(flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
        stubborn.stdout.readline()
        say("spawned", pids=[os.getpid(), sleeper.pid, stubborn.pid], pgid=os.getpgid(0))
        """,
    )
    try:
        spawned = await run.event("spawned")
        assert await run.wait() == 0
        assert [pid for pid in spawned["pids"] if not gone(pid)] == []
        assert group_empty(spawned["pgid"])
    finally:
        await run.close()


async def test_the_app_goes_when_the_wrapper_is_killed(tmp_path) -> None:
    run = await run_app(
        sidecar_config(tmp_path, app_port=free_port()),
        """
        def on_term(sig, frame):
            say("sigterm")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        say("ready", pid=os.getpid())
        wait_for_signals()
        """,
    )
    try:
        app_pid = (await run.event("ready"))["pid"]
        run.send(signal.SIGKILL)
        await run.event("sigterm")  # from the kernel: the parent died
        await eventually(lambda: gone(app_pid), "the app to exit")
    finally:
        await run.close()


async def test_not_ready_in_time_exits_1_without_starting_the_app(tmp_path) -> None:
    closed = free_port()  # nothing listens there: control is never reached
    admin = free_port()
    cfg = sidecar_config(
        tmp_path, app_port=free_port(), admin_port=admin, control=[f"{LOCAL}:{closed}"]
    )
    began = time.monotonic()
    run = await run_app(cfg, 'say("started")', "--ready-timeout", "500ms")
    try:
        assert await run.wait() == 1
        assert time.monotonic() - began < 10
        err = run.stderr.decode()
        assert "not_ready: the sidecar was not ready within 0.5s" in err, err
        assert "waiting for the first snapshot from control" in err, err
        assert "the app was not started" in err
        assert run.seen == []
        assert refuses(admin)
    finally:
        await run.close()


async def test_sigterm_before_ready_exits_143_without_starting_the_app(tmp_path) -> None:
    admin = free_port()
    cfg = sidecar_config(
        tmp_path, app_port=free_port(), admin_port=admin, control=[f"{LOCAL}:{free_port()}"]
    )
    run = await run_app(cfg, 'say("started")')
    try:

        async def answering() -> bool:
            try:
                return (await asyncio.to_thread(http_get, admin, "/ready"))[0] == 503
            except OSError:
                return False

        await eventually(answering, "the sidecar's admin port")
        run.send(signal.SIGTERM)
        assert await run.wait() == 128 + signal.SIGTERM
        assert run.seen == []
    finally:
        await run.close()


CLI_ERRORS = [
    ("no-command", ["--"], 2, "give the app's command after `--`"),
    ("not-found", ["--", "/nonexistent/app"], 127, "app_not_started: /nonexistent/app"),
    ("not-executable", ["--", "/"], 126, "app_not_started: /"),
    ("bad-timeout", ["--ready-timeout", "0", "--", "true"], 2, "use a duration like"),
]


@pytest.mark.parametrize(
    ("args", "code", "message"), [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS]
)
async def test_cli_errors(tmp_path, args, code, message) -> None:
    cfg = sidecar_config(tmp_path, app_port=free_port())
    run = await start("run", "--config", str(cfg), *args)
    try:
        assert await run.wait() == code
        assert message in run.stderr.decode(), run.report()
    finally:
        await run.close()


def _post(port: int, path: str) -> int:
    import http.client

    conn = http.client.HTTPConnection(LOCAL, port, timeout=5)
    try:
        conn.request("POST", path, headers={"Host": "admin"})
        return conn.getresponse().status
    finally:
        conn.close()


async def test_post_drain_keeps_outbound_for_the_running_app(tmp_path) -> None:
    # A preStop hook that POSTs /drain: inbound stops, but the app still runs and
    # may still call out; under `run` outbound lasts as long as the app.
    up = await Upstream().start()
    inbound, admin = free_port(), free_port()
    cfg = sidecar_config(
        tmp_path,
        app_port=free_port(),
        inbound_port=inbound,
        admin_port=admin,
        services={"up": [up.address]},
    )
    run = await run_app(
        cfg,
        """
        say("ready")
        sys.stdin.readline()
        say("calls", results=[get("http://up/after-drain/%d" % i) for i in range(3)])
        """,
    )
    try:
        await run.event("ready")
        assert await asyncio.to_thread(_post, admin, "/drain") == 202
        await eventually(lambda: refuses(inbound), "inbound to stop accepting")
        status, body = await asyncio.to_thread(http_get, admin, "/ready")
        assert (status, '"draining"' in body) == (503, True)
        run.write("go\n")
        calls = await run.event("calls")
        assert calls["results"] == [[200, "up"]] * 3, run.report()
        assert await run.wait() == 0
    finally:
        await run.close()
        await up.stop()
