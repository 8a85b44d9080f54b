"""Fixtures for the sidecar's end-to-end HTTP/1.1 tests (helpers live in proxy_harness).

Everything runs on one uvloop event loop per test: the sidecar under test,
the upstream servers it forwards to, and the clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from proxy_harness import (
    DEADLINE,
    Handler,
    SidecarConfig,
    Upstream,
    echo_app,
    http,
    make_config,
)

SidecarFactory = Callable[..., Awaitable[Any]]
UpstreamFactory = Callable[[Handler], Awaitable[Upstream]]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The sidecar runs on uvloop, so its tests do too."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[[Handler], Awaitable[Upstream]]]:
    """Factory: `await upstreams(handler)` starts a server; all stop at teardown."""
    started: list[Upstream] = []

    async def start(handler: Handler) -> Upstream:
        up = Upstream(handler)
        await up.start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()
    for up in started:
        assert not up.violations, f"the proxy wrote invalid HTTP to an upstream: {up.violations}"


@pytest.fixture
async def echo(upstreams: Callable[[Handler], Awaitable[Upstream]]) -> Upstream:
    return await upstreams(http(echo_app))


@pytest.fixture
async def sidecars() -> AsyncIterator[SidecarFactory]:
    """Factory: `await sidecars(cfg)` or `await sidecars(**make_config kwargs)`
    starts a Sidecar on this loop; all are stopped at teardown."""
    from lepton_mesh.proxy.sidecar import Sidecar

    started: list[Any] = []

    async def start(cfg: SidecarConfig | None = None, **kw: Any) -> Any:
        sc = Sidecar(cfg if cfg is not None else make_config(**kw))
        started.append(sc)  # before start: a half-started sidecar is stopped too
        await sc.start()
        return sc

    yield start
    for sc in reversed(started):
        await asyncio.wait_for(sc.stop(), DEADLINE)


@pytest.fixture
async def proxy(sidecars: SidecarFactory, echo: Upstream) -> Any:
    """A sidecar whose service `svc` is one echo upstream, also its app."""
    return await sidecars(app=echo.address, services={"svc": echo.address})
