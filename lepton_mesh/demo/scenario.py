"""The demo's story, once the mesh is up: a canary, a change, a rollback.

1. `lepton-mesh apply examples/mesh`: dialog v2 gets 10% of the turns;
   traffic, with a live line per tick and a summary per service.
2. `lepton-mesh diff` and `apply` of dialog's Route at 50/50; traffic.
3. `lepton-mesh rollback` to the first revision; traffic, back at 90/10.
4. `lepton-mesh history`: three revisions, who made them and why.

Before each traffic phase the demo waits until chat's sidecar runs the new
weights (its admin /config), so every phase measures one policy only. The
load stops between phases, so the difference of two scrapes is one phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lepton_mesh.demo import load
from lepton_mesh.demo.commands import Cli, shown_path
from lepton_mesh.demo.errors import CommandFailed, TrafficFailed
from lepton_mesh.demo.observe import Observer, route_rule_weights
from lepton_mesh.demo.policies import (
    CANARY_RULE,
    DESTINATION,
    canary_weights,
    examples_dir,
    fmt_weights,
    load_manifests,
    write_change,
)
from lepton_mesh.demo.procs import Completed, Supervisor
from lepton_mesh.demo.report import PhaseResult, print_phase
from lepton_mesh.demo.summary import (
    Scrape,
    ServiceStats,
    Split,
    delta,
    inbound,
    service_stats,
    tick_line,
)
from lepton_mesh.demo.topology import Mesh

RATE_PER_S = 100.0
CONCURRENCY = 8
# A phase "works" if at least this share of its requests got a 200.
MIN_SUCCESS = 0.99
PROPAGATION_TIMEOUT_S = 15.0
CHANGE = {"v1": 50, "v2": 50}
VERSIONS = ("v1", "v2")

_APPLIED = re.compile(r"applied as policy revision (\d+)")
_ROLLED_BACK = re.compile(r"rolled back to policy revision \d+ as revision (\d+)")

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Stage:
    """What the story runs on: the mesh, its processes, the CLI, the sidecars' views."""

    mesh: Mesh
    sup: Supervisor
    cli: Cli
    observer: Observer
    say: Say
    duration: float
    workdir: Path


@dataclass(frozen=True, slots=True)
class Outcome:
    phases: tuple[PhaseResult, ...]
    first_revision: int
    change_file: Path


async def run_story(st: Stage) -> Outcome:
    examples = examples_dir()
    base = canary_weights(load_manifests(sorted(examples.glob("*.yaml"))), str(examples))
    phases = []

    _banner(st, 1, f"the canary: dialog v2 gets {base['v2']}% of the turns")
    done = await st.cli.run(
        "apply", shown_path(examples), "-m", f"dialog v2 canary at {base['v2']}%"
    )
    first = _revision(done, _APPLIED)
    await _wait_for_weights(st, base)
    phases.append(await traffic_phase(st, f"canary {fmt_weights(base)}", first, base))

    _banner(st, 2, f"a change: dialog v2 to {CHANGE['v2']}%")
    change = write_change(examples, CHANGE, st.workdir / "dialog-50-50.yaml")
    await st.cli.run("diff", str(change), expect=(1,))  # 1: there are changes
    done = await st.cli.run("apply", str(change), "-m", f"dialog v2 to {CHANGE['v2']}%")
    second = _revision(done, _APPLIED)
    await _wait_for_weights(st, CHANGE)
    phases.append(await traffic_phase(st, f"change {fmt_weights(CHANGE)}", second, CHANGE))

    _banner(st, 3, f"roll back to revision {first}")
    done = await st.cli.run(
        "rollback", str(first), "-m", "v2 at 50% is too early: back to the canary"
    )
    third = _revision(done, _ROLLED_BACK)
    await _wait_for_weights(st, base)
    phases.append(await traffic_phase(st, f"rollback to {first}", third, base))

    st.say("")
    await st.cli.run("history")
    return Outcome(tuple(phases), first, change)


def _banner(st: Stage, n: int, title: str) -> None:
    st.say(f"\n== {n}/3 {title} ==\n")


def _revision(done: Completed, pattern: re.Pattern[str]) -> int:
    if m := pattern.search(done.stdout):
        return int(m[1])
    raise CommandFailed(
        f"`{' '.join(done.argv[3:])}` did not say which revision it wrote:\n{done.stdout}"
    )


async def _wait_for_weights(st: Stage, weights: dict[str, int]) -> None:
    """Until chat's sidecar routes with `weights`: the apply reached the data plane."""

    def running(config: dict) -> bool:
        return route_rule_weights(config.get("policies"), DESTINATION, CANARY_RULE) == weights

    took = await st.observer.wait_until(
        st.mesh.chat,
        running,
        timeout=PROPAGATION_TIMEOUT_S,
        what=f"dialog weights {fmt_weights(weights)}",
    )
    st.say(f"  chat's sidecar routes dialog {fmt_weights(weights)} {took * 1000:.0f} ms later")


# -- one phase of traffic ----------------------------------------------------


async def traffic_phase(
    st: Stage, title: str, revision: int, weights: dict[str, int]
) -> PhaseResult:
    mesh, say = st.mesh, st.say
    url = mesh.chat.url("inbound", "/v1/chat")
    say(
        f"\ntraffic: {st.duration:.0f} s at {RATE_PER_S:.0f} req/s over {CONCURRENCY} "
        f"connections, POST {url}\n"
        "  live from the sidecars' metrics, since the line before: per service req/s, "
        "success, p99; dialog split"
    )
    loop = asyncio.get_running_loop()
    before = await st.observer.scrape_all()
    gen = asyncio.ensure_future(
        load.generate(url, duration=st.duration, rate=RATE_PER_S, concurrency=CONCURRENCY)
    )
    try:
        await _ticks(st, gen, before, loop.time())
        stats = await gen
    finally:
        if not gen.done():
            gen.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gen
    st.sup.check_alive()
    phase = _measure(st, title, revision, weights, before, await st.observer.scrape_all(), stats)
    print_phase(say, phase)
    _judge(title, stats)
    return phase


async def _ticks(
    st: Stage, gen: asyncio.Future[load.ClientStats], start: dict[str, Scrape], t0: float
) -> None:
    """A live line every tick until the load is done: each service since the last tick."""
    loop = asyncio.get_running_loop()
    tick = max(1.0, min(3.0, st.duration / 3))
    prev, t_prev = start, t0
    while True:
        done, _ = await asyncio.wait({gen}, timeout=tick)
        if done:
            return
        st.sup.check_alive()
        now = await st.observer.scrape_all()
        t_now = loop.time()
        deltas = {name: delta(now[name], prev[name]) for name in now}
        stats = _services(st.mesh, deltas, t_now - t_prev)
        st.say("  " + tick_line(t_now - t0, stats, _sidecar_split(st.mesh, deltas)))
        prev, t_prev = now, t_now


def _measure(
    st: Stage,
    title: str,
    revision: int,
    weights: dict[str, int],
    before: dict[str, Scrape],
    after: dict[str, Scrape],
    stats: load.ClientStats,
) -> PhaseResult:
    deltas = {name: delta(after[name], before[name]) for name in after}
    return PhaseResult(
        title=title,
        revision=revision,
        weights=weights,
        services=_services(st.mesh, deltas, stats.elapsed_s),
        sidecar_split=_sidecar_split(st.mesh, deltas),
        reply_split=Split(tuple((v, stats.versions.get(v, 0)) for v in VERSIONS)),
        client=stats,
    )


def _services(mesh: Mesh, deltas: dict[str, Scrape], elapsed: float) -> tuple[ServiceStats, ...]:
    return tuple(
        service_stats(svc, {n.name: deltas[n.name] for n in mesh.nodes_of(svc)}, elapsed)
        for svc in mesh.services
    )


def _sidecar_split(mesh: Mesh, deltas: dict[str, Scrape]) -> Split:
    """Dialog calls by version, as each dialog instance's sidecar counted them inbound."""
    return Split(tuple((n.version, inbound(deltas[n.name]).requests) for n in mesh.dialogs))


def _judge(title: str, stats: load.ClientStats) -> None:
    if stats.ok == 0:
        raise TrafficFailed(f"{title}: no request succeeded out of {stats.sent}")
    if stats.ok < MIN_SUCCESS * stats.sent:
        raise TrafficFailed(
            f"{title}: only {stats.ok} of {stats.sent} requests got 200 "
            f"(codes {dict(stats.codes)}, errors {dict(stats.errors)})"
        )
