"""The local app's health check: thresholds as a table, probes against real servers,
and changes reported on the control stream."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
from control_support import control_config, snapshot, wait_for
from proxy_harness import LOCAL, Conn, free_port, response_bytes

from lepton_mesh import meshproto as mp
from lepton_mesh.policy.sidecar_config import Address, HealthCheckConfig
from lepton_mesh.proxy.mesh.health_check import HealthChecker, HealthState

# (results fed in order) -> what `healthy` is after each, None while unknown
THRESHOLDS: list[tuple[str, int, int, str, list[bool | None]]] = [
    ("first_success_decides", 2, 1, "+", [True]),
    ("first_failure_decides", 2, 1, "-", [False]),
    ("one_failure_is_not_enough", 2, 1, "+-+-+", [True, True, True, True, True]),
    ("two_in_a_row_are", 2, 1, "+--", [True, True, False]),
    ("one_success_recovers", 2, 1, "+--+", [True, True, False, True]),
    ("three_needed", 3, 1, "+--+---", [True, True, True, True, True, True, False]),
    ("two_to_recover", 2, 2, "-+-++", [False, False, False, False, True]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("unhealthy_after", "healthy_after", "results", "states"),
    [t[1:] for t in THRESHOLDS],
    ids=[t[0] for t in THRESHOLDS],
)
def test_thresholds(
    unhealthy_after: int, healthy_after: int, results: str, states: list[bool | None]
) -> None:
    state = HealthState(unhealthy_after, healthy_after)
    assert state.healthy is None
    seen: list[bool | None] = []
    changes = 0
    for i, r in enumerate(results):
        changed = state.observe(r == "+", f"probe {i}")
        changes += changed
        seen.append(state.healthy)
        if changed:
            assert state.detail == f"probe {i}"  # the probe that changed it
    assert seen == states
    assert changes == 1 + sum(a != b for a, b in itertools.pairwise(states))


class HealthApp:
    """An app whose health endpoint answers `status` (or misbehaves as told)."""

    def __init__(self) -> None:
        self.status = 200
        self.mode = "answer"  # answer | hang | garbage | close
        self.requests: list[str] = []

    async def handle(self, conn: Conn) -> None:
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "garbage":
            await conn.send(b"HTTX/9 what\r\n\r\n")
            return
        req = await conn.read_request()
        if req is None or self.mode == "close":
            return
        self.requests.append(f"{req.method} {req.target} {req.get('host')} {req.get('connection')}")
        await conn.send(response_bytes(self.status, b"{}"))


@pytest.fixture
async def health_app(upstreams) -> tuple[HealthApp, Address]:
    app = HealthApp()
    up = await upstreams(app.handle)
    return app, up.address


def checker(
    app: Address, changes: list[tuple[bool, str]], *, interval: float = 0.05, timeout: float = 0.05
) -> HealthChecker:
    cfg = HealthCheckConfig(path="/healthz", interval=interval, timeout=timeout)
    record: Callable[[bool, str], None] = lambda ok, detail: changes.append((ok, detail))  # noqa: E731
    return HealthChecker(asyncio.get_running_loop(), app, cfg, record)


async def test_changes_are_reported_once_each(health_app) -> None:
    app, address = health_app
    changes: list[tuple[bool, str]] = []
    hc = checker(address, changes)
    hc.start()
    try:
        await wait_for(lambda: changes == [(True, "GET /healthz: status 200")])
        assert app.requests[0] == f"GET /healthz {address} close"
        app.status = 503
        await wait_for(lambda: len(changes) == 2)
        assert changes[1] == (False, "GET /healthz: status 503")
        failures_at_change = len(app.requests)
        app.status = 204
        await wait_for(lambda: len(changes) == 3)
        assert changes[2] == (True, "GET /healthz: status 204")
        assert hc.healthy is True
    finally:
        hc.stop()
    # between the two changes: two failures went to unhealthy
    assert failures_at_change >= 3


@pytest.mark.parametrize(
    ("mode", "status", "detail"),
    [
        ("answer", 204, "GET /healthz: status 204"),
        ("answer", 301, "GET /healthz: status 301"),
        ("answer", 500, "GET /healthz: status 500"),
        ("hang", 200, "GET /healthz: no response within 0.05s"),
        ("garbage", 200, "GET /healthz: invalid HTTP response: "),
        ("close", 200, "GET /healthz: connection closed before a response"),
    ],
)
async def test_one_probe(health_app, mode: str, status: int, detail: str) -> None:
    app, address = health_app
    app.mode, app.status = mode, status
    ok, got = await checker(address, []).probe()
    assert (ok, got[: len(detail)]) == (200 <= status < 300 and mode == "answer", detail)


async def test_probe_of_an_app_that_is_not_listening() -> None:
    address = Address(LOCAL, free_port())
    ok, detail = await checker(address, []).probe()
    assert not ok
    assert detail == f"GET /healthz: cannot connect to {address}: Connection refused"


async def test_health_is_reported_to_control_and_repeated_to_a_new_replica(
    sidecars, peers, health_app
) -> None:
    app, address = health_app
    first = await peers("control-a", snapshot=snapshot(1, {}))
    second = await peers("control-b", snapshot=snapshot(1, {}))
    cfg = control_config(
        [first.address, second.address],
        app=address,
        health_check={"path": "/healthz", "interval": "50ms", "timeout": "50ms"},
    )
    sc = await sidecars(cfg)
    assert await first.wait_message(mp.Health) == mp.Health(True, "GET /healthz: status 200")
    app.status = 503
    assert await first.wait_message(mp.Health, healthy=False) == mp.Health(
        False, "GET /healthz: status 503"
    )
    assert sc.control.app_health == (False, "GET /healthz: status 503")

    await first.stop()
    assert await second.wait_message(mp.Health) == mp.Health(False, "GET /healthz: status 503")
    app.status = 200
    assert await second.wait_message(mp.Health, healthy=True) == mp.Health(
        True, "GET /healthz: status 200"
    )
