"""`lepton-mesh demo`: bring up a two-service mesh, drive traffic, print what it saw.

Phases: plan ports and write sidecar configs; start four processes and wait
until each is ready; send paced traffic for DURATION seconds plus a few
requests that show the sidecar's own errors; print the summary read from the
sidecars' /metrics; then stop everything (or, with keep, wait for Ctrl-C).

Every exit path (success, failure, Ctrl-C, SIGTERM, SIGHUP) goes through one
`finally` that stops every child and verifies none is left; the exit code
says which path it was (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable
from pathlib import Path
from typing import TextIO, TypeVar

from lepton_mesh.demo import load
from lepton_mesh.demo.errors import DemoError, Interrupted, ProcessesLeft, TrafficFailed
from lepton_mesh.demo.procs import Supervisor
from lepton_mesh.demo.report import print_report, scrape_all
from lepton_mesh.demo.topology import (
    HOST,
    PORTS_NEEDED,
    Mesh,
    free_ports,
    plan,
    process_specs,
    write_configs,
)

# Environment knobs, mainly for tests: a 3 s run still crosses every path.
DURATION_ENV = "LEPTON_DEMO_DURATION"
DEFAULT_DURATION_S = 16.0
RATE_PER_S = 200.0
CONCURRENCY = 8
READY_TIMEOUT_S = 30.0
# The mesh "works" if at least this share of the demo traffic got a 200.
MIN_SUCCESS = 0.99

T = TypeVar("T")


def run_demo(
    keep: bool = False, *, duration: float | None = None, out: TextIO | None = None
) -> int:
    """Run the demo and return its exit code. Never leaves a child process behind."""
    out = out or sys.stdout
    if duration is None:
        duration = _duration_from_env()
    workdir = Path(tempfile.mkdtemp(prefix="lepton-demo-"))
    sup = Supervisor(workdir)
    code = 0
    try:
        asyncio.run(_main(sup, workdir, keep, duration, _Printer(out)))
    except DemoError as e:
        code = e.exit_code
        _say(out, f"\ndemo stopped: {e}")
    except KeyboardInterrupt:  # a Ctrl-C outside the event loop's watch
        code = 128 + signal.SIGINT
        _say(out, "\ndemo stopped: interrupted")
    except Exception:  # a bug: show it, but still stop everything below
        code = 1
        _say(out, f"\ndemo stopped: unexpected error\n{traceback.format_exc()}")
    finally:
        code = _stop_and_verify(sup, out, code)
    if code == 0 or code > 128:  # done, or stopped on purpose: nothing to look into
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        _say(out, f"logs and configs kept in {workdir}")
    return code


def _duration_from_env() -> float:
    raw = os.environ.get(DURATION_ENV)
    if raw is None:
        return DEFAULT_DURATION_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise SystemExit(f"{DURATION_ENV} must be a number of seconds in (0, 3600], got {raw!r}")
    return value


def _stop_and_verify(sup: Supervisor, out: TextIO, code: int) -> int:
    if not sup.children:
        return code
    _say(out, "\nstopping ...")
    results = sup.stop_all()
    for r in results:
        how = "SIGKILL after grace" if r.killed else "exited"
        _say(out, f"  {r.name:<15} pid {r.pid:<7} {how} (code {r.returncode})")
    left = [p for r in results for p in r.left]
    if left:
        err = ProcessesLeft(f"live processes remain: pids {left}")
        _say(out, f"demo stopped: {err}")
        return code or err.exit_code
    _say(out, f"all {len(results)} processes stopped; none left running")
    return code


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


class _Printer:
    """Output for the async phases; one place so tests can capture it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, text: str = "") -> None:
        _say(self.out, text)


# -- the async part ----------------------------------------------------------


async def _main(sup: Supervisor, workdir: Path, keep: bool, duration: float, say: _Printer) -> None:
    stop = _StopSignal()
    stop.install()
    try:
        mesh = await stop.race(_bring_up(sup, workdir, say))
        await stop.race(_exercise(sup, mesh, duration, say))
        if keep:
            _print_try_it(mesh, workdir, say)
            try:
                await stop.race(_watch(sup))
            except Interrupted as e:
                # How a kept mesh is meant to end: not a failure.
                say(f"\n{signal.Signals(e.signum).name}: stopping the mesh")
    finally:
        stop.uninstall()


class _StopSignal:
    """SIGINT/SIGTERM/SIGHUP become `Interrupted` in whatever phase is running."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._signum = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._SIGNALS:
            loop.add_signal_handler(sig, self._fire, sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._SIGNALS:
            loop.remove_signal_handler(sig)

    def _fire(self, signum: int) -> None:
        if not self._event.is_set():
            self._signum = signum
            self._event.set()

    async def race(self, aw: Awaitable[T]) -> T:
        """Await `aw` unless a signal comes first; then cancel it and raise Interrupted."""
        task = asyncio.ensure_future(aw)
        waiter = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Interrupted(self._signum)


async def _bring_up(sup: Supervisor, workdir: Path, say: _Printer) -> Mesh:
    mesh = plan(free_ports(PORTS_NEEDED))
    configs = write_configs(mesh, workdir)
    say("lepton-mesh demo: an AI customer-service app, two services, two sidecars\n")
    t0 = time.perf_counter()
    children = [sup.start(spec) for spec in process_specs(mesh, configs)]
    for c in children:
        say(f"  started {c.name:<15} pid {c.pid}")
    await sup.wait_ready(children, READY_TIMEOUT_S)
    say(f"  all ready in {time.perf_counter() - t0:.1f} s\n")
    say(
        f"  client -> chat sidecar :{mesh.chat.inbound} -> chat app :{mesh.chat.app}"
        f" -> chat sidecar :{mesh.chat.outbound}\n"
        f"         -> intent sidecar :{mesh.intent.inbound} -> intent app :{mesh.intent.app}\n"
    )
    return mesh


async def _exercise(sup: Supervisor, mesh: Mesh, duration: float, say: _Printer) -> None:
    say(
        f"traffic: {duration:.0f} s, up to {RATE_PER_S:.0f} req/s, {CONCURRENCY} connections, "
        f"POST {mesh.chat.url('inbound', '/v1/chat')}"
    )

    def progress(t: float, s: load.ClientStats) -> None:
        say(f"  {t:5.1f} s  {s.sent:6d} sent  {s.ok:6d} ok  {s.sent - s.ok:4d} failed")

    stats = await load.generate(
        mesh.chat.url("inbound", "/v1/chat"),
        duration=duration,
        rate=RATE_PER_S,
        concurrency=CONCURRENCY,
        progress=progress,
        progress_every=max(1.0, min(5.0, duration / 3)),
    )
    sup.check_alive()
    showcase = await load.send_showcase(_showcase_requests(mesh))
    stream = await load.read_stream(
        mesh.chat.url("inbound", "/v1/stream?message=where+is+my+order")
    )
    sup.check_alive()
    rows = await scrape_all(mesh)
    print_report(say, stats, rows, showcase, stream)
    _judge(stats)


def _showcase_requests(mesh: Mesh) -> list[load.Showcase]:
    outbound = mesh.chat.url("outbound", "/v1/forecast")
    body = b'{"text": "hi"}'
    return [
        load.Showcase("unknown service", "POST", outbound, "weather", body),
        load.Showcase(
            "service down", "POST", mesh.chat.url("outbound", "/v1/charge"), "billing", body
        ),
    ]


def _judge(stats: load.ClientStats) -> None:
    if stats.ok == 0:
        raise TrafficFailed(f"no request succeeded out of {stats.sent}")
    if stats.ok < MIN_SUCCESS * stats.sent:
        raise TrafficFailed(
            f"only {stats.ok} of {stats.sent} requests got 200 "
            f"(codes {dict(stats.codes)}, errors {dict(stats.errors)})"
        )


async def _watch(sup: Supervisor) -> None:
    """While the mesh is kept running, fail as soon as any child dies."""
    while True:
        sup.check_alive()
        await asyncio.sleep(0.5)


def _print_try_it(mesh: Mesh, workdir: Path, say: _Printer) -> None:
    chat, intent = mesh.chat, mesh.intent
    json_h = "-H 'content-type: application/json'"
    say("\nThe mesh keeps running. Try:\n")
    say("  # a chat message, through chat's sidecar (inbound) and on to intent")
    say(
        f'  curl -s {json_h} -d \'{{"message": "where is my order?"}}\' '
        f"{chat.url('inbound', '/v1/chat')}"
    )
    say("  # a streamed reply (server-sent events) through the sidecar")
    say(f"  curl -sN '{chat.url('inbound', '/v1/stream?message=refund')}'")
    say("  # what the chat app does: call intent via its sidecar's outbound listener")
    say(
        f"  curl -s -H 'Host: intent' {json_h} -d '{{\"text\": \"cancel my plan\"}}' "
        f"{chat.url('outbound', '/v1/classify')}"
    )
    say("  # the sidecar's own answer for a service it has no route to")
    say(f"  curl -si -H 'Host: weather' {chat.url('outbound', '/')}")
    say("\n  admin endpoints:")
    for node in (chat, intent):
        base = node.url("admin")
        say(f"    {node.service:<7} {base}/metrics  {base}/config  {base}/ready  {base}/clusters")
    say(f"\n  configs and logs: {workdir}")
    say(f"  listening on {HOST} only. Press Ctrl-C to stop everything.")
