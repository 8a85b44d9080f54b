"""Fixtures for the control client's tests: one uvloop loop per test (the sidecar's),
real upstreams, sidecars with shrunk control clocks, control peers; all stopped at teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from control_support import FAST, ControlPeer
from proxy_harness import DEADLINE, Handler, Upstream

from lepton_mesh.proxy.mesh.control_client import ControlTiming
from tests.support.sidecars import sidecar_starter


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The sidecar runs on uvloop, so its tests do too."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[[Handler], Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def start(handler: Handler) -> Upstream:
        up = Upstream(handler)
        await up.start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


@pytest.fixture
async def peers() -> AsyncIterator[Callable[..., Awaitable[ControlPeer]]]:
    started: list[ControlPeer] = []

    async def start(*args: Any, **kw: Any) -> ControlPeer:
        peer = ControlPeer(*args, **kw)
        await peer.start()
        started.append(peer)
        return peer

    yield start
    for peer in started:
        await peer.stop()


def _timed(sc: Any, *, timing: ControlTiming = FAST, **kw: Any) -> None:
    if sc.control is not None:
        sc.control.timing = timing
        for key, value in kw.items():
            setattr(sc.control, key, value)


@pytest.fixture
async def sidecars() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """`await sidecars(cfg, timing=...)`: a started Sidecar whose control client uses `timing`."""
    async with sidecar_starter(DEADLINE, _timed) as start:
        yield start
