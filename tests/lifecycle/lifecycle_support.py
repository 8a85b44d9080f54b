"""Real processes for the lifecycle tests: `lepton-mesh run` and `lepton-mesh sidecar`,
a small upstream, a control peer that holds its snapshot until told, and waits
on conditions with deadlines (never sleeps to wait for state).

Apps are `python -c` programs that report what they see as JSON lines on their
stdout, which `lepton-mesh run` hands them (it is ours: a pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lepton_mesh import meshproto as mp
from lepton_mesh.control.etcd_local import die_with_parent_prefix
from lepton_mesh.procutil import live_group_members as _live_group_members
from lepton_mesh.procutil import pid_alive

LOCAL = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
DEADLINE = 15.0  # seconds: any wait for a state that should come much sooner


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = DEADLINE
) -> None:
    end = time.monotonic() + timeout
    while True:
        got = check()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


# --- configs --------------------------------------------------------------------------


def sidecar_config(
    folder: Path,
    *,
    app_port: int,
    admin_port: int = 0,
    inbound_port: int = 0,
    outbound_port: int = 0,
    drain: str = "5s",
    services: Mapping[str, Any] | None = None,
    control: Any = None,
) -> Path:
    data: dict[str, Any] = {
        "service": "worker",
        "app": f"{LOCAL}:{app_port}",
        "listeners": {
            "outbound": f"{LOCAL}:{outbound_port}",
            "inbound": f"{LOCAL}:{inbound_port}",
            "admin": f"{LOCAL}:{admin_port}",
        },
        "timeouts": {"drain": drain},
        "access_log": False,
    }
    if services:
        data["services"] = {
            name: {"endpoints": [str(a) for a in addrs]} for name, addrs in services.items()
        }
    if control is not None:
        data["control"] = {"addresses": [str(a) for a in control]}
        data["dependencies"] = ["*"]
    path = folder / "worker.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- the processes ---------------------------------------------------------------------


class Proc:
    """A `python -m lepton_mesh ...` process: its stdout as JSON events, its stderr kept."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.seen: list[dict[str, Any]] = []
        self.stderr = b""
        self.exited_at: float | None = None
        self._readers = [
            asyncio.ensure_future(self._read_stdout()),
            asyncio.ensure_future(self._read_stderr()),
        ]

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                event["_t"] = time.time()
                self.seen.append(event)
                await self.events.put(event)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()

    async def event(self, name: str, timeout: float = DEADLINE) -> dict[str, Any]:
        """The next event on stdout, which must be `name`."""
        try:
            event = await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no {name!r} event within {timeout:g}s; {self.report()}"
            ) from None
        assert event.get("event") == name, (event, self.report())
        return event

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def write(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())

    async def wait(self, timeout: float = DEADLINE) -> int:
        """The exit code, once the process exited and its pipes are closed (by the app too)."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
            self.exited_at = time.time()
            await asyncio.wait_for(asyncio.gather(*self._readers), timeout)
        except TimeoutError:
            raise AssertionError(f"still running after {timeout:g}s; {self.report()}") from None
        return code

    def report(self) -> str:
        return f"events {self.seen}, stderr:\n{self.stderr.decode(errors='replace')}"

    async def close(self) -> None:
        """Kill whatever is left: the app's group first (it may ignore SIGTERM), then us."""
        if self.proc.returncode is None:
            for pgid in _child_groups(self.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), DEADLINE)
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


def _child_groups(ppid: int) -> set[int]:
    """Process groups led by children of `ppid` (the app of a run leads its own)."""
    groups = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rfind(")") + 2 :].split()
                if int(fields[1]) == ppid and int(fields[2]) == int(entry.name):
                    groups.add(int(entry.name))
    return groups


async def start(*args: str) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        *die_with_parent_prefix(),
        sys.executable,
        "-m",
        "lepton_mesh",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    return Proc(proc)


# Every app starts with these lines: `say(event, **fields)` prints one JSON line.
APP_PRELUDE = """\
import json, os, signal, sys, time, urllib.request, urllib.error
def say(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)
def get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
def wait_for_signals():
    # Not signal.pause(): a signal landing after Python's last check and before
    # the pause() call leaves its handler waiting for a second signal that never
    # comes. A short sleep is cut short by a signal, or ends, and either way
    # the handler runs within 50 ms.
    while True:
        time.sleep(0.05)
"""


def app(body: str) -> str:
    return APP_PRELUDE + textwrap.dedent(body)


async def run_app(config: Path, body: str, *options: str) -> Proc:
    """`lepton-mesh run --config CONFIG [options] -- python -c APP`."""
    return await start(
        "run", "--config", str(config), *options, "--", sys.executable, "-c", app(body)
    )


def group_empty(pgid: int) -> bool:
    return not _live_group_members(pgid)


def gone(pid: int) -> bool:
    return not pid_alive(pid)


def signal_name(sig: int) -> str:
    return signal.Signals(sig).name


# --- peers ----------------------------------------------------------------------------------


class Upstream:
    """An HTTP/1.1 server that answers every request `200 <name>`, keep-alive."""

    def __init__(self, name: str = "up") -> None:
        self.name = name
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, LOCAL, 0)
        return self

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"{LOCAL}:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = self.name.encode()
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class ControlPeer:
    """The control end of the stream, reduced to what readiness needs: Welcome
    at once, the snapshot only when `release()` is called, Pong, and a record of
    what the sidecar sent."""

    def __init__(self, snapshot: mp.Snapshot) -> None:
        self.snapshot = snapshot
        self.released = False
        self.received: list[mp.Message] = []
        self._transports: list[asyncio.Transport] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> ControlPeer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _PeerConn(self), LOCAL, 0)
        return self

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"{LOCAL}:{self._server.sockets[0].getsockname()[1]}"

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.received if isinstance(m, kind)]

    def release(self) -> None:
        """Send the snapshot, now and to any later connection."""
        self.released = True
        for t in self._transports:
            if not t.is_closing():
                t.write(mp.encode(self.snapshot))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in self._transports:
            t.abort()


class _PeerConn(asyncio.Protocol):
    def __init__(self, peer: ControlPeer) -> None:
        self.peer = peer
        self.decoder = mp.FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer._transports.append(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.decoder.feed(data)
        while (msg := self.decoder.next_message()) is not None:
            self.peer.received.append(msg)
            if isinstance(msg, mp.Hello):
                self.transport.write(mp.encode(mp.Welcome("control-test")))
                if self.peer.released:
                    self.transport.write(mp.encode(self.peer.snapshot))
            elif isinstance(msg, mp.Ping):
                self.transport.write(mp.encode(mp.Pong(msg.time)))


def http_get(port: int, path: str, host: str = "admin", timeout: float = 5.0) -> tuple[int, str]:
    """One GET on a new connection; (status, body)."""
    import http.client

    conn = http.client.HTTPConnection(LOCAL, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOCAL, port)) != 0
