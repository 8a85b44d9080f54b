"""`lepton-mesh run`: a sidecar and its app as one unit, started and stopped in order.

The order, and why (docs/lifecycle.md):
1. The sidecar starts in this process, on this event loop: no second
   interpreter, no port to poll.
2. The app starts only once the sidecar is ready, as `/ready` would say
   (config applied; with `tls.source: control`, a certificate installed).
   Not ready within `ready_timeout`: exit 1 with the reason, no app started.
   A stop signal meanwhile: exit 128+N, no app started.
3. The app leads its own session and process group, with our stdin, stdout
   and stderr, `HTTP_PROXY` at the outbound listener, and (on Linux) SIGTERM
   from the kernel should this process die (an app that ignores it outlives
   us: no one is left to send SIGKILL). Its own session keeps a terminal's
   Ctrl-C to us alone: the app gets it once, from us, not twice.
4. SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to the
   app's process group. SIGTERM and SIGINT (and `/quit`) also start the
   sidecar's drain: control is told, inbound stops accepting, and outbound
   keeps serving the app until it exits.
5. When the app exits: what is left of its process group gets SIGTERM, then
   SIGKILL; the sidecar ends the drain (in-flight requests, bounded by
   `timeouts.drain`) and stops; we exit with the app's code, 128+N if signal
   N killed it. A stop signal during that skips what is left of the drain.

This module runs inside the sidecar's process: it never imports aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lepton_mesh.policy.sidecar_config import Address, SidecarConfig
from lepton_mesh.procutil import die_with_parent_prefix, live_group_members
from lepton_mesh.proxy.sidecar import Sidecar

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Forwarded, and the start of the sidecar's drain.
STOPPING = frozenset({signal.SIGTERM, signal.SIGINT})
# Before the app starts, these end the run (their default action is to end a process).
ABORTING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})

NO_PROXY_HOSTS = ("localhost", "127.0.0.1", "::1")
ENV_ADMIN = "LEPTON_SIDECAR_ADMIN"
ENV_OUTBOUND = "LEPTON_SIDECAR_OUTBOUND"

# How often the process group of an exited app is checked for leftovers.
_GROUP_POLL = 0.05
_KILL_WAIT = 2.0  # after SIGKILL, how long to wait for the group to be gone


class RunError(Exception):
    """The run ends before (or instead of) the app: an exit code and a reason code."""

    def __init__(self, reason: str, detail: str, exit_code: int = 1) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True, slots=True)
class RunOptions:
    command: tuple[str, ...]
    ready_timeout: float = 60.0
    proxy_env: bool = True  # HTTP_PROXY and NO_PROXY for the app


def exit_code(returncode: int) -> int:
    """A child's exit code as a shell reports it: 128+N when signal N killed it."""
    return 128 - returncode if returncode < 0 else returncode


def _url(address: Address) -> str:
    """`http://host:port` the app can dial: a wildcard listener is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)
    return f"http://{Address(host, address.port)}"


def app_environment(
    base: Mapping[str, str], outbound: Address, admin: Address, *, proxy_env: bool
) -> dict[str, str]:
    """The app's environment: ours, plus where its sidecar is.

    With `proxy_env`, HTTP_PROXY (both spellings, since clients disagree on
    which one they read) points at the outbound listener, and NO_PROXY keeps
    loopback direct, added to any list already set. HTTPS_PROXY is left
    alone: an `https://` URL is TLS the sidecar cannot route.
    """
    env = dict(base)
    env[ENV_ADMIN] = _url(admin)
    env[ENV_OUTBOUND] = _url(outbound)
    if proxy_env:
        env["HTTP_PROXY"] = env["http_proxy"] = _url(outbound)
        given = env.get("NO_PROXY") or env.get("no_proxy") or ""
        hosts = [h.strip() for h in given.split(",") if h.strip()]
        hosts += [h for h in NO_PROXY_HOSTS if h not in hosts]
        env["NO_PROXY"] = env["no_proxy"] = ",".join(hosts)
    return env


class _Phase(enum.Enum):
    STARTING = "starting"  # the sidecar is not ready yet
    SPAWNING = "spawning"  # the app is being started: signals wait
    RUNNING = "running"  # signals go to the app
    EXITED = "exited"  # the app is gone: a stop signal hurries the drain


class Runner:
    """One `lepton-mesh run`: a started sidecar, then the app; `run()` returns the exit code."""

    def __init__(self, sidecar: Sidecar, opts: RunOptions, *, began: float) -> None:
        self.sidecar = sidecar
        self.opts = opts
        self.began = began  # loop time before the sidecar started
        self.phase = _Phase.STARTING
        self.proc: asyncio.subprocess.Process | None = None
        self.aborted_by: int | None = None  # a signal number, or 0 for /quit
        self._pending: list[int] = []  # received while SPAWNING
        self._abort = asyncio.Event()
        self._hurry = asyncio.Event()
        sidecar.quit_handler = self.quit
        sidecar.outbound_for_app = True  # until the app exits, whatever drains the sidecar

    # -- signals -----------------------------------------------------------------

    def on_signal(self, sig: int) -> None:
        phase = self.phase
        if phase is _Phase.STARTING:
            if sig in ABORTING:
                self.aborted_by = sig
                self._abort.set()
        elif phase is _Phase.SPAWNING:
            self._pending.append(sig)
        elif phase is _Phase.RUNNING:
            if sig in STOPPING:  # before the app hears it: inbound stops first
                self.sidecar.start_drain(outbound_grace=None)
            self._forward(sig)
        elif sig in STOPPING:
            self._hurry.set()

    def quit(self) -> None:
        """`POST /quit` on the admin port: stop the app as SIGTERM would, then the sidecar."""
        if self.phase is _Phase.STARTING:
            self.aborted_by = 0
            self._abort.set()
        else:
            self.on_signal(signal.SIGTERM)

    def _forward(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the app leads its group: pgid == pid

    # -- the run -------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            await self._wait_ready()
            if self.aborted_by is not None:
                return 128 + self.aborted_by if self.aborted_by else 0
            took = loop.time() - self.began
            await self._spawn()
            _say(f"sidecar ready in {took * 1000:.0f} ms; app started (pid {self.proc.pid})")  # type: ignore[union-attr]
            returncode = await self.proc.wait()  # type: ignore[union-attr]
            self.phase = _Phase.EXITED
            self.sidecar.outbound_for_app = False
            code = exit_code(returncode)
            took = await self._after_exit()
            _say(f"app exited with {code}; sidecar drained in {took * 1000:.0f} ms")
            return code
        finally:
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)
            await self.sidecar.stop()

    async def _wait_ready(self) -> None:
        ready = asyncio.ensure_future(self.sidecar.wait_ready())
        abort = asyncio.ensure_future(self._abort.wait())
        try:
            done, _ = await asyncio.wait(
                (ready, abort), timeout=self.opts.ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (ready, abort):
                task.cancel()
        if abort in done or ready in done:
            return
        _, why = self.sidecar.readiness()
        raise RunError(
            "not_ready",
            f"the sidecar was not ready within {self.opts.ready_timeout:g}s ({why}); "
            "the app was not started",
        )

    async def _spawn(self) -> None:
        self.phase = _Phase.SPAWNING
        sc = self.sidecar
        env = app_environment(
            os.environ,
            sc.addresses["outbound"],
            sc.addresses["admin"],
            proxy_env=self.opts.proxy_env,
        )
        command = list(self.opts.command)
        if shutil.which(command[0], path=env.get("PATH")) is None:
            exists = os.path.exists(command[0])
            what = "Permission denied" if exists else "No such file or directory"
            raise RunError("app_not_started", f"{command[0]}: {what}", 126 if exists else 127)
        try:
            # The app gets SIGTERM if we die; set by exec (setpriv), not by a
            # preexec hook, which is unsafe in a process that has threads.
            self.proc = await asyncio.create_subprocess_exec(
                *die_with_parent_prefix("TERM"),
                *command,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            # As a shell says it: 127 not found, 126 found but not runnable.
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            what = exc.strerror or type(exc).__name__
            raise RunError("app_not_started", f"{self.opts.command[0]}: {what}", code) from None
        self.phase = _Phase.RUNNING
        pending, self._pending = self._pending, []
        for sig in pending:
            self.on_signal(sig)

    async def _after_exit(self) -> float:
        """Clear the app's group and drain the sidecar, both within `timeouts.drain`."""
        started = time.monotonic()
        sc = self.sidecar
        sc.end_outbound_grace()
        drain = sc.start_drain()
        leftovers = asyncio.ensure_future(self._clear_group(sc.snapshot.cfg.timeouts.drain))
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait(
                (asyncio.gather(drain, leftovers), hurry), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            hurry.cancel()
        if not leftovers.done():  # hurried: no more grace for the app's leftovers either
            leftovers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leftovers
            await self._kill_group()
        return time.monotonic() - started

    async def _clear_group(self, grace: float) -> None:
        """The app is gone; anything it left in its group gets SIGTERM, then SIGKILL."""
        assert self.proc is not None
        pgid = self.proc.pid
        if not await _group_alive(pgid):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        if await _group_gone(pgid, grace):
            return
        await self._kill_group()

    async def _kill_group(self) -> None:
        assert self.proc is not None
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if not await _group_gone(pgid, _KILL_WAIT):
            left = await _group_alive(pgid)
            _say(f"processes {', '.join(map(str, left))} of the app's group survived SIGKILL")


async def _group_alive(pgid: int) -> tuple[int, ...]:
    return await asyncio.to_thread(live_group_members, pgid)


async def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while await _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_GROUP_POLL)
    return True


def _say(text: str) -> None:
    print(f"lepton-mesh run: {text}", file=sys.stderr, flush=True)


async def run_app(cfg: SidecarConfig, opts: RunOptions) -> int:
    began = asyncio.get_running_loop().time()
    sidecar = Sidecar(cfg)
    try:
        await sidecar.start()
    except OSError as exc:  # a listener could not bind; start() closed the others
        raise RunError("listen_failed", f"the sidecar cannot listen: {exc}") from None
    return await Runner(sidecar, opts, began=began).run()


def run(cfg: SidecarConfig, command: Sequence[str], **options: object) -> int:
    """The `run` subcommand's entry point: the exit code to exit with."""
    import uvloop

    opts = RunOptions(tuple(command), **options)  # type: ignore[arg-type]
    try:
        return uvloop.run(run_app(cfg, opts))
    except RunError as err:
        _say(str(err))
        return err.exit_code


__all__ = ["RunError", "RunOptions", "Runner", "app_environment", "exit_code", "run", "run_app"]
