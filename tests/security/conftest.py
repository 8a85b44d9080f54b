"""Fixtures for the inbound-security tests: one uvloop event loop per test runs the
sidecar, the app, the JWKS server and the clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from security_support import DEADLINE, Client, EchoApp, JwksServer, LogCapture, sidecar_config

from lepton_mesh.policy.security import SecurityPolicies


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The sidecar runs on uvloop, so its tests do too."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def app() -> AsyncIterator[EchoApp]:
    app = await EchoApp().start()
    yield app
    await app.stop()


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = await JwksServer().start()
    yield server
    await server.stop()


SidecarFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def secured(app: EchoApp) -> AsyncIterator[SidecarFactory]:
    """Factory: `await secured(SecurityPolicies(...), **config kwargs)` starts a sidecar
    for service `intent` in front of `app`; its access log is captured in `sc.log`."""
    from lepton_mesh.proxy.sidecar import Sidecar

    started: list[Any] = []

    async def start(security: SecurityPolicies, **kw: Any) -> Any:
        sc = Sidecar(sidecar_config(app.address, security, **kw))
        started.append(sc)
        await sc.start()
        sc.log = sc.access_log = LogCapture()
        state = getattr(sc, "inbound_state", None) or sc.snapshot.inbound_state
        sc.metrics.set_security_source(state)
        return sc

    yield start
    await Client.close_all()
    for sc in reversed(started):
        await asyncio.wait_for(sc.stop(), DEADLINE)
        sc.snapshot.inbound_state.close()
