"""`lepton-mesh demo`: bring up a mesh on a control plane, run its story, stop it all.

Bring-up: plan ports; write the sidecar configs and a token key; start, tier
by tier and each tier ready before the next, etcd, the control daemon, the
four apps and their four sidecars; wait until chat's sidecar has discovered
intent and both dialog versions. Then the story (scenario.py): a canary, a
change, a rollback, each with DURATION seconds of traffic. Then stop
everything, or with keep, lend the user's CLI the demo's token and wait for
Ctrl-C.

Every exit path (success, failure, Ctrl-C, SIGTERM, SIGHUP) goes through one
`finally` that stops every child, last started first, and verifies none is
left; the exit code says which path it was (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
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

from lepton_mesh.cli_client import save_config
from lepton_mesh.control.etcd_local import EtcdStartError, LocalEtcd
from lepton_mesh.demo.commands import Cli, UserConfig, command_name
from lepton_mesh.demo.errors import (
    ChildExited,
    DemoError,
    Interrupted,
    MissingDependency,
    NotReady,
    PortTaken,
    ProcessesLeft,
)
from lepton_mesh.demo.observe import Observer, healthy_endpoints
from lepton_mesh.demo.procs import ProcessSpec, StopResult, Supervisor
from lepton_mesh.demo.report import print_closing, print_try_it
from lepton_mesh.demo.scenario import Outcome, Stage, run_story
from lepton_mesh.demo.topology import (
    DEPENDENCIES,
    PORTS_NEEDED,
    Mesh,
    app_specs,
    control_spec,
    etcd_spec,
    free_ports,
    plan,
    sidecar_specs,
    write_configs,
)

# Environment knob, mainly for tests: each of the three traffic phases lasts this long.
DURATION_ENV = "LEPTON_DEMO_DURATION"
DEFAULT_DURATION_S = 10.0
READY_TIMEOUT_S = 30.0
DISCOVERY_TIMEOUT_S = 20.0
TOKEN_TTL = "24h"

T = TypeVar("T")


def run_demo(
    keep: bool = False, *, duration: float | None = None, out: TextIO | None = None
) -> int:
    """Run the demo and return its exit code. Never leaves a child process behind."""
    out = out or sys.stdout
    if duration is None:
        duration = _duration_from_env()
    with _Caught() as caught:
        workdir = Path(tempfile.mkdtemp(prefix="lepton-demo-"))
        sup = Supervisor(workdir)
        user_config = UserConfig()
        code = 0
        try:
            asyncio.run(_main(sup, workdir, keep, duration, _Printer(out), user_config, caught))
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
            user_config.restore()
            if code == 0 and caught.signum is not None:  # came as the loop was closing
                code = 128 + caught.signum
                _say(out, f"\ndemo stopped: {Interrupted(caught.signum)}")
            code = _stop_and_verify(sup, out, code)
            if code == 0 and sup.hurried_by is not None:  # the stop itself was interrupted
                code = 128 + sup.hurried_by
    if code == 0 or code > 128:  # done, or stopped on purpose: nothing to look into
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        _say(out, f"logs and configs kept in {workdir}")
    return code


class _Caught:
    """SIGINT, SIGTERM and SIGHUP, recorded instead of fatal for all of run_demo.

    While the event loop runs, `_StopSignal` handles them; this covers the rest
    (before the loop watches, while it closes, until every child is stopped), so
    no signal can end the demo between two steps of its cleanup.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Caught:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _record(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum


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
        _say(out, f"  {r.name:<17} pid {r.pid:<7} {_how(r)}")
    left = [p for r in results for p in r.left]
    if left:
        err = ProcessesLeft(f"live processes remain: pids {left}")
        _say(out, f"demo stopped: {err}")
        return code or err.exit_code
    _say(out, f"all {len(results)} processes stopped; none left running")
    return code


def _how(r: StopResult) -> str:
    if r.killed:
        return f"SIGKILL after its grace (code {r.returncode})"
    if r.returncode is not None and r.returncode < 0:
        # etcd re-raises SIGTERM once it has shut down cleanly, as Go programs do.
        return f"exited on {signal.Signals(-r.returncode).name}"
    return f"exited (code {r.returncode})"


def _say(out: TextIO, text: str) -> None:
    try:
        print(text, file=out, flush=True)
    except BrokenPipeError:
        # The reader went away (`demo | head`): stopping everything matters more than
        # output, so later output goes to /dev/null instead of raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, out.fileno())
        os.close(devnull)


class _Printer:
    """Output for the async phases; one place so tests can capture it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, text: str = "") -> None:
        _say(self.out, text)


# -- the async part ----------------------------------------------------------


async def _main(
    sup: Supervisor,
    workdir: Path,
    keep: bool,
    duration: float,
    say: _Printer,
    user_config: UserConfig,
    caught: _Caught,
) -> None:
    stop = _StopSignal(caught)
    stop.install()
    cli = Cli(workdir / "cli-config.json", say)
    try:
        mesh = await stop.race(_bring_up(sup, workdir, cli, say))
        async with Observer(mesh) as observer:
            stage = Stage(mesh, sup, cli, observer, say, duration, workdir)
            outcome = await stop.race(_story(stage))
        stop.raise_if_fired()  # a Ctrl-C as the story ended (its summary) still counts
        if keep:
            await _keep(stop, sup, mesh, workdir, cli, outcome, user_config, say)
    finally:
        stop.uninstall()


async def _story(st: Stage) -> Outcome:
    await _wait_for_discovery(st)
    st.say("")
    await st.cli.run("get", "instances")
    outcome = await run_story(st)
    print_closing(st.say, outcome.phases, await st.observer.scrape_all())
    return outcome


async def _keep(
    stop: _StopSignal,
    sup: Supervisor,
    mesh: Mesh,
    workdir: Path,
    cli: Cli,
    outcome: Outcome,
    user_config: UserConfig,
    say: _Printer,
) -> None:
    token = (workdir / "admin.token").read_text().strip()
    lent = user_config.install(mesh.admin_url, token)
    if lent:
        say(f"\n(the CLI's config {user_config.path} points at this demo until it stops)")
    else:
        say(f"\n(you have a CLI config at {user_config.path}: left alone; use the export below)")
    if overriding := [name for name in ("LEPTON_SERVER", "LEPTON_TOKEN") if name in os.environ]:
        say(
            f"(your environment sets {' and '.join(overriding)}, which win over any config: unset them)"
        )
    print_try_it(
        say,
        mesh,
        workdir,
        lepton=command_name(),
        cli_ready=lent,
        cli_config=cli.config,
        rollback_to=outcome.first_revision,
        change_file=outcome.change_file,
    )
    try:
        await stop.race(_watch(sup))
    except Interrupted as e:
        # How a kept mesh is meant to end: not a failure.
        say(f"\n{signal.Signals(e.signum).name}: stopping the mesh")


class _StopSignal:
    """SIGINT/SIGTERM/SIGHUP become `Interrupted` in whatever phase is running."""

    _SIGNALS = _Caught.SIGNALS  # handed back to it by `uninstall`

    def __init__(self, caught: _Caught) -> None:
        self._event = asyncio.Event()
        self._signum = 0
        self._caught = caught

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._SIGNALS:
            loop.add_signal_handler(sig, self._fire, sig)
        if self._caught.signum is not None:  # came before the loop watched
            self._fire(self._caught.signum)

    def uninstall(self) -> None:
        # The loop would leave SIGTERM and SIGHUP fatal (SIG_DFL) and SIGINT raising
        # KeyboardInterrupt in the middle of the cleanup: give them back to _Caught.
        loop = asyncio.get_running_loop()
        for sig in self._SIGNALS:
            loop.remove_signal_handler(sig)
            with contextlib.suppress(ValueError):
                signal.signal(sig, self._caught._record)

    def raise_if_fired(self) -> None:
        if self._event.is_set():
            raise Interrupted(self._signum)

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
        if task.done() and not self._event.is_set():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Interrupted(self._signum)


async def _bring_up(sup: Supervisor, workdir: Path, cli: Cli, say: _Printer) -> Mesh:
    mesh = plan(free_ports(PORTS_NEEDED))
    configs = write_configs(mesh, workdir)
    say(
        "lepton-mesh demo: an AI customer-service app on a control plane. etcd, one control\n"
        "daemon, and three services (chat calls intent and dialog; dialog runs v1 and v2),\n"
        "each instance behind a sidecar that the control daemon feeds.\n"
    )
    t0 = time.perf_counter()
    key = workdir / "token.key"
    await cli.run("token", "init-key", str(key), show=False)
    tiers = [
        [etcd_spec(mesh, _etcd_argv(mesh, workdir))],
        [control_spec(mesh, key)],
        app_specs(mesh),
        sidecar_specs(mesh, configs),
    ]
    for i, tier in enumerate(tiers):
        await _start_tier(sup, tier, say)
        if i == 1:  # the control daemon is up: a token and the CLI's config
            await _admin_token(cli, mesh, workdir, key)
    say(f"  all ready in {time.perf_counter() - t0:.1f} s\n")
    _print_layout(mesh, workdir, cli, say)
    return mesh


async def _start_tier(sup: Supervisor, specs: list[ProcessSpec], say: _Printer) -> None:
    children = [sup.start(spec) for spec in specs]
    for c in children:
        say(f"  started {c.name:<17} pid {c.pid}")
    try:
        await sup.wait_ready(children, READY_TIMEOUT_S)
    except (ChildExited, NotReady) as e:
        # The ports were free when picked; another process can take one before our
        # child binds it. Say so plainly: a new run picks new ports.
        if "address already in use" in e.detail:
            raise PortTaken(
                "another process took a port the demo had picked before its child could "
                "listen on it; run the demo again (it picks new free ports). " + e.detail
            ) from e
        raise


def _etcd_argv(mesh: Mesh, workdir: Path) -> tuple[str, ...]:
    """etcd's command line as LocalEtcd builds it; the supervisor runs it.

    `fast`: no fsync and short raft timers. The data dir is thrown away with
    the demo, and one member has no peers to elect with.
    """
    try:
        etcd = LocalEtcd(
            workdir / "etcd",
            name="demo",
            fast=True,
            client_port=mesh.etcd_client,
            peer_port=mesh.etcd_peer,
        )
        return tuple(etcd.command())
    except EtcdStartError as e:
        raise MissingDependency(str(e)) from e


async def _admin_token(cli: Cli, mesh: Mesh, workdir: Path, key: Path) -> None:
    """An admin token for the local user, saved where the demo's CLI reads it."""
    done = await cli.run(
        "token", "create", "--role", "admin", "--token-key", str(key), "--ttl", TOKEN_TTL,
        show=False,
    )  # fmt: skip
    token = done.stdout.strip()
    path = workdir / "admin.token"
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    save_config(cli.config, mesh.admin_url, token)


async def _wait_for_discovery(st: Stage) -> None:
    """Until chat's sidecar has healthy endpoints for intent and both dialog versions."""
    want = {svc: sorted(n.version for n in st.mesh.nodes_of(svc)) for svc in DEPENDENCIES["chat"]}

    def found(config: dict) -> bool:
        seen = healthy_endpoints(config)
        return all(seen.get(svc) == versions for svc, versions in want.items())

    took = await st.observer.wait_until(
        st.mesh.chat, found, timeout=DISCOVERY_TIMEOUT_S, what=f"healthy endpoints {want}"
    )
    found_text = ", ".join(f"{svc} ({' '.join(v)})" for svc, v in want.items())
    st.say(
        f"  chat's sidecar discovered {found_text} through the control daemon (+{took * 1000:.0f} ms)"
    )


def _print_layout(mesh: Mesh, workdir: Path, cli: Cli, say: _Printer) -> None:
    c = mesh.chat
    say(f"  etcd {mesh.etcd_url} (data in {workdir / 'etcd'})")
    say(f"  control daemon: sidecars connect to :{mesh.control}, admin API {mesh.admin_url}")
    say(f"  client -> chat sidecar :{c.inbound} -> chat app :{c.app} -> chat sidecar :{c.outbound}")
    for n in (mesh.intent, *mesh.dialogs):
        say(f"         -> {n.name} sidecar :{n.inbound} -> {n.service} {n.version} app :{n.app}")
    say(f"  an admin token for {getpass.getuser()!r}; the CLI reads it from {cli.config}")


async def _watch(sup: Supervisor) -> None:
    """While the mesh is kept running, fail as soon as any child dies."""
    while True:
        sup.check_alive()
        await asyncio.sleep(0.5)
